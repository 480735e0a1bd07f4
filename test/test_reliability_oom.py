"""CUDA out-of-memory fallback (stream/fallback.py), on the CPU with injected allocation failures:
the window is retried with fewer frames, the engine carries on with a smaller window, and the
trajectory stays right. The real-GPU check is ``vggt4d-oom-check`` (tools/oom_check.py)."""
import numpy as np
import pytest
import torch

from vggt4d_ros.geometry.sim3 import umeyama_sim3
from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.stream.fallback import (AdaptiveWindowPredictor, FallbackConfig,
                                        WindowTooLargeError, is_out_of_memory)
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


class OomAbove:
    """Raises torch.cuda.OutOfMemoryError (as the CUDA caching allocator does) for windows of
    more than ``max_frames`` frames, during the first ``fail_calls`` calls (None = always)."""

    def __init__(self, inner, max_frames: int, fail_calls=None):
        self.inner, self.max_frames, self.fail_calls = inner, max_frames, fail_calls
        self.calls, self.ooms, self.sizes = 0, 0, []

    def predict(self, images, frame_keys):
        self.calls += 1
        self.sizes.append(len(frame_keys))
        if len(frame_keys) > self.max_frames and (self.fail_calls is None
                                                  or self.calls <= self.fail_calls):
            self.ooms += 1
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (window of {len(frame_keys)})")
        return self.inner.predict(images, frame_keys)


def _gt(n=80):
    world = SynthWorld(SynthConfig(width=48, height=32, num_frames=n, num_objects=1, seed=0))
    return GroundTruthPredictor(world, seed=5, depth_noise=0.005, rot_noise_deg=0.05,
                                trans_noise=0.001)


def _run(pred, gt, n, **cfg):
    engine = StreamEngine(pred, StreamConfig(**{"window_size": 8, "stride": 4,
                                                "voxel_size": 0.1, **cfg}))
    outs = []
    for i in range(n):
        f = gt.render(i)
        outs += engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
    return engine, outs + engine.flush()


def _ate_rel(outs, gt, skip):
    """Relative ATE (after Sim(3) alignment) of the camera centres of outs[skip:]."""
    est = np.stack([o.world_from_cam[:3, 3] for o in outs[skip:]])
    true = np.stack([np.linalg.inv(gt.render(i).cam_from_world)[:3, 3]
                     for i in range(skip, len(outs))])
    err = np.linalg.norm(umeyama_sim3(est, true).apply(est) - true, axis=1)
    return float(err.mean() / np.linalg.norm(true - true.mean(0), axis=1).mean())


def test_injected_oom_shrinks_the_window_and_the_engine_continues():
    gt = _gt()
    freed = []
    inj = OomAbove(gt, max_frames=6)
    pred = AdaptiveWindowPredictor(inj, FallbackConfig(min_window_size=5),
                                   free_memory=lambda: freed.append(1))
    engine, outs = _run(pred, gt, 80)
    # one OOM (first window, 8 frames) -> retried at floor(0.75*8)=6 -> stays at 6
    assert inj.ooms == 1 and pred.oom_retries == 1 and len(freed) == 1
    assert pred.limit == 6 and max(inj.sizes[1:]) == 6
    assert pred.stats()["window_limit"] == 6 and pred.stats()["oom_retries"] == 1
    # every frame is emitted exactly once, poses finite, the stream ends TRACKING
    assert [o.stamp_ns for o in outs] == [gt.render(i).stamp_ns for i in range(80)]
    assert all(np.isfinite(o.world_from_cam).all() for o in outs)
    assert all(np.isfinite(o.covariance).all() for o in outs)
    assert engine.state == "TRACKING" and engine.counters.windows == 19
    # steady-state windows (overlap 2 of 4 kept) still stitch into the right trajectory
    assert _ate_rel(outs, gt, skip=8) < 0.02
    # the first window lost its 2 oldest frames: reported as not predicted, pose held, LOST
    assert pred.frames_not_predicted >= 2 and outs[0].state == "LOST"


def test_oom_at_min_window_raises_window_too_large_and_keeps_counting():
    gt = _gt(20)
    inj = OomAbove(gt, max_frames=1)                       # nothing fits
    pred = AdaptiveWindowPredictor(inj, FallbackConfig(min_window_size=5), free_memory=lambda: 0)
    frames = np.stack([gt.render(i).image for i in range(8)])
    with pytest.raises(WindowTooLargeError, match="min_window_size=5"):
        pred.predict(frames, list(range(8)))
    assert inj.sizes == [8, 6, 5]                           # 8 -> 6 -> 5 (minimum) -> give up
    assert pred.oom_retries == 2 and pred.oom_windows_dropped == 1 and pred.limit == 5


def test_other_exceptions_pass_through_unchanged():
    class Boom:
        def predict(self, images, frame_keys):
            raise ValueError("bad window")
    pred = AdaptiveWindowPredictor(Boom(), FallbackConfig(min_window_size=2))
    with pytest.raises(ValueError, match="bad window"):
        pred.predict(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 2, 3])
    assert pred.oom_retries == 0 and pred.limit is None


def test_grow_back_after_successful_windows():
    gt = _gt()
    inj = OomAbove(gt, max_frames=6, fail_calls=1)          # a transient OOM (first call only)
    pred = AdaptiveWindowPredictor(inj, FallbackConfig(min_window_size=5, grow_after=3),
                                   free_memory=lambda: 0)
    engine, outs = _run(pred, gt, 60)
    assert pred.oom_retries == 1
    assert pred.limit is None and inj.sizes[-2] == 8        # back to the full window
    assert 7 in inj.sizes and len(outs) == 60 and engine.state == "TRACKING"


def test_forwarding_and_oom_classification():
    gt = _gt(10)
    gt.label = "gt"
    pred = AdaptiveWindowPredictor(gt)
    assert pred.label == "gt" and pred.world is gt.world
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(WindowTooLargeError("too big"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                         "DefaultCPUAllocator: can't allocate memory: you tried "
                                         "to allocate 1099511627776 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
    with pytest.raises(ValueError):
        FallbackConfig(min_window_size=1)


def test_oom_check_cli_smoke_on_cpu(tmp_path, capsys):
    """The GPU script's code path on the CPU (simulated OOM, tiny random VGGT4D)."""
    from vggt4d_ros.tools import oom_check
    out = tmp_path / "oom.json"
    rc = oom_check.main(["--device", "cpu", "--tiny", "--simulate-limit", "6", "--window", "8",
                         "--stride", "4", "--min-window", "5", "--frames", "16", "--width", "56",
                         "--height", "42", "--out", str(out)])
    assert rc == 0 and "OOM-CHECK PASS" in capsys.readouterr().out
    import json
    rep = json.loads(out.read_text())
    assert rep["oom_retries"] == 1 and rep["window_limit"] == 6 and rep["frames_out"] == 16


def test_real_cpu_allocator_failure_triggers_the_fallback():
    """Not an injected exception: the predictor really asks torch's CPU allocator for 1 PiB per
    frame beyond 6 frames, and the allocator's own error drives the fallback."""
    gt = _gt(40)

    class Greedy:
        def __init__(self):
            self.sizes = []

        def predict(self, images, frame_keys):
            self.sizes.append(len(frame_keys))
            if len(frame_keys) > 6:
                torch.empty(len(frame_keys) * 2**50, dtype=torch.uint8)   # > address space
            return gt.predict(images, frame_keys)
    inner = Greedy()
    pred = AdaptiveWindowPredictor(inner, FallbackConfig(min_window_size=5))
    engine, outs = _run(pred, gt, 40)
    assert inner.sizes[:2] == [8, 6] and pred.oom_retries == 1 and pred.limit == 6
    assert "can't allocate memory" in pred.last_oom and len(outs) == 40


def test_oom_check_cap_search_with_a_fake_allocator(monkeypatch):
    """The GPU script's cap search, on a simulated device: memory = 10 GiB + 1 GiB per frame,
    a cap set by set_per_process_memory_fraction; the search must find a cap where 64 frames
    fail and 36 run, and the stream must then continue at fewer than 64 frames."""
    import argparse
    from vggt4d_ros.tools import oom_check
    gib = 2**30
    total = 80 * gib

    class FakeCuda:
        cap = total
        peak = 0

    def predict_cost(n):
        need = 10 * gib + n * gib
        FakeCuda.peak = max(FakeCuda.peak, need)
        if need > FakeCuda.cap:
            raise torch.cuda.OutOfMemoryError(f"fake: {need / gib:.0f} GiB > cap")

    class FakePredictor:
        _cache: dict = {}

        def predict(self, images, frame_keys):
            predict_cost(len(frame_keys))
            return gt.predict(images, frame_keys)
    gt = _gt(160)
    props = type("P", (), {"total_memory": total})()
    for name, fn in {"synchronize": lambda *a: None, "empty_cache": lambda *a: None,
                     "reset_peak_memory_stats": lambda *a: setattr(FakeCuda, "peak", 0),
                     "max_memory_allocated": lambda *a: FakeCuda.peak,
                     "max_memory_reserved": lambda *a: FakeCuda.peak,
                     "get_device_properties": lambda *a: props,
                     "get_device_name": lambda *a: "fake", "current_device": lambda: 0,
                     "set_per_process_memory_fraction":
                         lambda f, *a: setattr(FakeCuda, "cap", f * total)}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(oom_check, "_predictor", lambda args, device: FakePredictor())
    monkeypatch.setattr(oom_check, "_frames",
                        lambda args: [gt.render(i).image for i in range(args.frames)])
    args = argparse.Namespace(device="cuda", tiny=True, width=48, height=32, window=64,
                              stride=32, min_window=33, fit_frames=36, cap_gib=0.0,
                              frames=160, simulate_limit=0)
    rep = oom_check.run(args)
    assert rep["fit_peak_gib"] == 46 and rep["window_peak_gib"] == 74
    assert rep["cap_gib"] == 60 and rep["caps_tried"][0] == {
        "cap_gib": 60.0, "window_fits": False, "fit_fits": True}
    assert rep["pass"] and rep["oom_retries"] == 1 and rep["window_limit"] == 48
    assert rep["frames_out"] == 160 and rep["error"] == ""
