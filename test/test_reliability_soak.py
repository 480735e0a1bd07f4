"""Soak: 30 Hz 640x480 rgb8 images through the REAL node on loopback for a bounded time.

A publisher in its own rclpy context (its own DDS participant: the images cross the loopback
interface) sends 640x480 rgb8 frames at 30 Hz with the sensor-data profile to the node (real
StreamEngine + VGGT4D, tiny random weights, CPU, ``drop_policy: drop_oldest``, ``queue_size``
8). The model is far slower than 30 Hz on the CPU, so the queue is full all the time: the
policy, not the hardware, bounds memory and latency.

Printed figures (run with ``-s``; also written as JSON to ``$VGGT4D_SOAK_REPORT`` if set):
frames published / received / processed, dropped by reason, peak RSS, RSS growth after
warm-up, max queue depth, p50/p99 latency (receive -> publish, wall clock), windows.

Asserted (no timing thresholds): queue depth never above ``queue_size``; RSS growth after
warm-up under a generous bound; received == processed + dropped + queued + pending with
0 <= pending < window.size; the newest frames are the ones kept (drop_oldest); latency measured.
Duration: ``VGGT4D_SOAK_S`` seconds of publishing (default 45).
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.qos import QoSProfile, QoSReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from reliability_harness import NodeHarness, new_context, wait_for  # noqa: E402
from vggt4d_ros.ros import node as node_mod  # noqa: E402
from vggt4d_ros.ros.image_conv import array_to_image  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
SOAK_S = float(os.environ.get("VGGT4D_SOAK_S", "45"))
WARMUP_S = min(15.0, SOAK_S / 3)
RATE_HZ = 30.0
W, H = 640, 480
QUEUE = 8
WINDOW, STRIDE = 4, 2
RSS_GROWTH_BOUND_MB = 300.0


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _frames(n: int = 30) -> list[Image]:
    """n distinct 640x480 rgb8 images: a panning view of one random texture."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(H, W + 8 * n, 3), dtype=np.uint8)
    return [array_to_image(np.ascontiguousarray(base[:, 8 * i: 8 * i + W]), "rgb8",
                           frame_id="camera_optical_frame") for i in range(n)]


class Sampler(threading.Thread):
    """Samples RSS and the engine queue depth every 50 ms."""

    def __init__(self, node) -> None:
        super().__init__(daemon=True)
        self.node, self.stop = node, threading.Event()
        self.samples: list[tuple[float, float, int]] = []    # (t, rss MiB, queue depth)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - t0, rss_mb(),
                                 self.node.engine.counters.queue_depth))
            time.sleep(0.05)


def test_soak_30hz_640x480_bounded_memory_queue_and_consistent_drops():
    h = NodeHarness({"model.image_width": 56, "window.size": WINDOW, "window.stride": STRIDE,
                     "queue_size": QUEUE, "drop_policy": "drop_oldest",
                     "qos.image.depth": 5}, namespace="/rel_soak")
    pub_ctx = new_context()
    pub_node = rclpy.create_node("soak_camera", context=pub_ctx)
    sensor_qos = QoSProfile(depth=5, reliability=QoSReliabilityPolicy.BEST_EFFORT)
    pub = pub_node.create_publisher(Image, "/rel_soak/image", sensor_qos)
    sampler = Sampler(h.node)
    try:
        assert wait_for(lambda: pub.get_subscription_count() >= 1), "no discovery"
        msgs = _frames()
        stamp0 = 1_700_000_000_000_000_000
        sampler.start()
        t0 = time.monotonic()
        sent_stamps: list[int] = []
        k = 0
        while time.monotonic() - t0 < SOAK_S:
            msg = msgs[k % len(msgs)]
            stamp = stamp0 + int(round(k * 1e9 / RATE_HZ))
            msg.header.stamp = rclpy.time.Time(nanoseconds=stamp).to_msg()
            pub.publish(msg)
            sent_stamps.append(stamp)
            k += 1
            delay = t0 + k / RATE_HZ - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        wall = time.monotonic() - t0

        def settled() -> bool:
            c = h.node.engine.counters
            with h.node._lock:
                rest = h.node.frames_received - h.node.frames_processed - \
                    h.node._dropped_total(c) - c.queue_depth
            return c.queue_depth == 0 and rest == c.pending < WINDOW
        assert wait_for(settled, timeout=120)
        time.sleep(0.5)                                   # late DDS deliveries
        assert wait_for(settled, timeout=120)
        sampler.stop.set()
        sampler.join()
        d = h.fresh_diagnostics()
        c = h.node.engine.counters
        with h.node._lock:
            received, processed = h.node.frames_received, h.node.frames_processed
            dropped = h.node._dropped_total(c)
            latencies = np.array(h.node.latencies)
        out_stamps = sorted(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
                            for m in h.odoms())
        # every other container of the node and the predictor stays within its bound
        bounds = {"node._pending": (len(h.node._pending), node_mod.PENDING_STAMPS_MIN + 1),
                  "node.latencies": (len(h.node.latencies), h.node.latencies.maxlen),
                  "node camera_info cache": (len(h.node._infos), h.node._infos.capacity),
                  "node._path.poses": (len(h.node._path.poses), h.node.settings["path.max_poses"]),
                  "predictor token cache": (len(h.node.engine.predictor.inner._cache),
                                            max(64, WINDOW)),
                  "engine trajectory": (len(h.node.engine.trajectory_arrays()[0]),
                                        h.node.engine.config.trajectory_capacity)}
    finally:
        sampler.stop.set()
        pub_node.destroy_node()
        rclpy.try_shutdown(context=pub_ctx)
        h.close()

    t = np.array([s[0] for s in sampler.samples])
    rss = np.array([s[1] for s in sampler.samples])
    depth = np.array([s[2] for s in sampler.samples])
    after = rss[t >= WARMUP_S]
    warm_rss = float(after[0]) if len(after) else float(rss[-1])
    growth = float(after.max() - warm_rss) if len(after) else 0.0
    by_reason = {k: int(v) for k, v in d.items()
                 if (k.startswith("dropped.") or k.startswith("bad_input.")) and v != "0"}
    report = {
        "duration_s": round(wall, 1), "rate_hz": RATE_HZ, "size": f"{W}x{H} rgb8",
        "frames_published": len(sent_stamps), "frames_received": received,
        "frames_processed": processed, "frames_dropped": dropped,
        "lost_in_transport": len(sent_stamps) - received, "dropped_by_reason": by_reason,
        "still_pending": received - processed - dropped - c.queue_depth,
        "windows": int(c.windows), "peak_rss_mb": round(float(rss.max()), 1),
        "rss_after_warmup_mb": round(warm_rss, 1), "rss_growth_after_warmup_mb": round(growth, 1),
        "max_queue_depth": int(depth.max()), "queue_size": QUEUE,
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 3),
        "latency_samples": int(len(latencies)), "rss_samples": int(len(rss)),
    }
    print("\nSOAK " + json.dumps(report))
    if os.environ.get("VGGT4D_SOAK_REPORT"):
        with open(os.environ["VGGT4D_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=1)

    assert all(n <= bound for n, bound in bounds.values()), bounds
    # bounded queue: never above the configured size (sampled and as reported), plus the
    # STRIDE frames of a window whose prediction already started (pinned, not waiting)
    assert depth.max() <= QUEUE + STRIDE and len(depth) > 100
    # bounded memory after warm-up
    assert growth < RSS_GROWTH_BOUND_MB, report
    # accounting: every received frame is published, dropped (with a reason) or still pending
    assert 0 <= received - processed - dropped - c.queue_depth < WINDOW, report
    not_drops = ("missing_camera_info", "invalid_camera_info", "inference_error",
                 "stamp_backwards", "image_size_changed")      # counted, frame still used
    by_reason_total = sum(v for k, v in by_reason.items() if k.startswith("dropped.")) + sum(
        v for k, v in by_reason.items()
        if k.startswith("bad_input.") and k.split(".", 1)[1] not in not_drops)
    assert by_reason_total == dropped, report
    assert received > 0.5 * len(sent_stamps) and processed > 0 and c.windows > 0
    # drop_oldest keeps the newest frames: the newest published frame is among the last
    # window of frames received, and outputs are in stamp order without duplicates
    assert out_stamps[-1] >= sent_stamps[-(WINDOW + 5)], report
    assert len(set(out_stamps)) == len(out_stamps) == processed
    # latency is measured for every published frame (up to the window of the last 500)
    assert len(latencies) == min(processed, 500), report
    assert np.isfinite(latencies).all() and latencies.min() >= 0
