"""Soak: 640x480 rgb8 images at 30 Hz for a bounded time into the real node (VGGT4D on tiny
random weights, CPU, queue 4, drop_oldest and drop_newest). Shows bounded memory, a queue
that never grows past its bound, every received frame accounted for (processed + dropped by
the policy + at most one window still pending) and latency reported. Prints its figures."""
from __future__ import annotations

import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from vggt4d_ros.ros import node as node_mod  # noqa: E402
from vggt4d_ros.ros.image_conv import array_to_image  # noqa: E402
from vggt4d_ros.ros.probe import ThreadSpinner, TopicProbe, qos_for  # noqa: E402
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
DURATION_S = 20.0
RATE_HZ = 30.0
QUEUE = 4
WINDOW, STRIDE = 4, 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("policy,duration_s", [("drop_oldest", DURATION_S),
                                               ("drop_newest", DURATION_S / 2.5)])
def test_soak_30hz_vga_bounded_queue_memory_and_accounting(policy, duration_s):
    world = SynthWorld(SynthConfig(width=640, height=480, num_frames=10, num_objects=1,
                                   seed=5))
    frames = [world.render(i).image for i in range(10)]
    cycle = frames + frames[-2:0:-1]          # ping-pong: the camera goes back and forth
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = node_mod.Vggt4dNode(context=ctx, parameter_overrides=[
        Parameter("model.checkpoint", value="random_tiny"), Parameter("model.device", value="cpu"),
        Parameter("model.image_width", value=126), Parameter("window.size", value=WINDOW),
        Parameter("window.stride", value=STRIDE), Parameter("queue_size", value=QUEUE),
        Parameter("drop_policy", value=policy),
        Parameter("camera_info.enabled", value=False),
        Parameter("map.publish_period", value=1.0), Parameter("log_throttle", value=60.0)])
    probe = TopicProbe("soak_probe", context=ctx)
    probe.watch("/diagnostics", DiagnosticArray, qos_for())
    pub = probe.create_publisher(Image, "image", qos_for(reliable=False, depth=5))
    spinner = ThreadSpinner(ctx, node, probe)
    max_queue, rss = 0, []
    try:
        deadline = time.monotonic() + 60
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        msgs = [array_to_image(img, "rgb8", frame_id="camera_optical_frame") for img in cycle]
        start = time.monotonic()
        sent = 0
        stamp0 = 1_700_000_000_000_000_000
        while time.monotonic() - start < duration_s:
            msg = msgs[sent % len(msgs)]
            stamp = stamp0 + int(sent * 1e9 / RATE_HZ)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            pub.publish(msg)
            sent += 1
            max_queue = max(max_queue, node.engine.counters.queue_depth)
            if sent % 30 == 0:
                rss.append(_rss_mb())
            next_t = start + sent / RATE_HZ
            time.sleep(max(0.0, next_t - time.monotonic()))
        # drain: wait until the worker is idle (the safety timeout is not a measurement)
        deadline = time.monotonic() + 120
        while node.engine.counters.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        n_diag = len(probe.get("/diagnostics"))
        while len(probe.get("/diagnostics")) <= n_diag and time.monotonic() < deadline:
            time.sleep(0.05)
        diag = {kv.key: kv.value for kv in probe.get("/diagnostics")[-1].status[0].values}
    finally:
        spinner.close()
    received = node.frames_received
    processed = node.frames_processed
    counters = node.engine.counters
    # drop_oldest: the engine queue evicts; drop_newest: the node refuses the incoming frame
    dropped = dict(counters.dropped if policy == "drop_oldest" else node.node_dropped)
    assert not (node.node_dropped if policy == "drop_oldest" else counters.dropped)
    lat = np.array(node.latencies)
    print(f"\nSOAK {policy} {duration_s:.0f}s @ {RATE_HZ:.0f} Hz 640x480: sent {sent}, received "
          f"{received}, processed {processed}, dropped {dropped}, windows {counters.windows}, "
          f"max queue {max_queue}/{QUEUE}, RSS {rss[0]:.0f}->{rss[-1]:.0f} MB "
          f"(peak sample {max(rss):.0f}), latency p50 {np.percentile(lat, 50):.3f}s "
          f"p99 {np.percentile(lat, 99):.3f}s")
    assert received > 0 and processed > 0
    assert max_queue <= QUEUE + STRIDE       # + the pinned frames of a started prediction
    assert sum(dropped.values()) > 0 or processed >= received - WINDOW   # (a fast machine)
    assert set(dropped) <= {"queue_full"}, dropped          # the only drop the policy makes
    pending = received - processed - sum(dropped.values())
    assert 0 <= pending < WINDOW, (received, processed, dropped)
    assert int(diag["frames_received"]) == received
    assert int(diag["frames_dropped"]) == sum(dropped.values())
    assert float(diag["latency_p50_s"]) > 0 and float(diag["latency_p99_s"]) >= \
        float(diag["latency_p50_s"])
    # bounded memory: after warm-up (first third) the resident size stays flat; a leak of
    # one VGA frame per received frame would add ~500 MB here
    third = len(rss) // 3
    assert max(rss[third:]) - rss[third] < 150, rss
