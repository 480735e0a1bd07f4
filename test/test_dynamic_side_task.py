"""SideTask (dynamic/side_task.py) and the pipeline's overlap options, on CPU (inline and deferred).

The CUDA path (worker thread + side stream) runs on the GPU device only; the benchmarks in
docs/BENCHMARKS.md (runs 8-10) exercise it there.
"""
from __future__ import annotations

import pytest
import torch

from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
from vggt4d_ros.dynamic.side_task import SideTask
from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.vggt import VGGT
from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG


def _tiny_vggt() -> VGGT:
    """A fresh seeded tiny random VGGT (fresh: one test switches its fused blocks)."""
    torch.manual_seed(0)
    return VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()


def test_side_task_inline_on_cpu_returns_and_raises():
    calls = []
    task = SideTask(lambda: calls.append(1) or 7, torch.device("cpu"))
    assert calls == [1] and not task.overlapped       # ran at creation, no thread
    assert task.result() == 7 and task.seconds >= 0.0

    def boom():
        raise RuntimeError("side failure")
    failing = SideTask(boom, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="side failure"):
        failing.result()


def test_pipeline_overlap_option_gives_the_same_result_on_cpu():
    model = _tiny_vggt()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(5, 3, 56, 70, generator=g)
    res = {flag: Vggt4dPipeline(model, Vggt4dConfig(cluster_backend="fast",
                                                    overlap_stages=flag))(images)
           for flag in (False, True)}
    for key in ("extrinsic", "depth", "coarse_mask", "mask", "saliency"):
        assert torch.equal(getattr(res[False], key), getattr(res[True], key)), key
    assert {"embed", "cluster", "cluster_wait", "refine_prep", "total"} <= set(res[True].timings)


def test_compiled_heads_are_restored_by_the_plain_path():
    """use_fused_blocks(compile=True) wraps the heads' forwards; use_fused_blocks(False) puts
    the eager class forward back (the benchmark's official-recipe baseline relies on it)."""
    model = _tiny_vggt()
    model.use_fused_blocks(True, compile=True)           # wrapping is lazy: nothing compiles
    assert "forward" in model.depth_head.__dict__ and "forward" in model.camera_head.__dict__
    model.use_fused_blocks(True, compile=True, compile_heads=False)
    assert "forward" not in model.depth_head.__dict__
    model.use_fused_blocks(True, compile=True)
    model.use_fused_blocks(False)
    assert all("forward" not in h.__dict__ for h in (model.camera_head, model.depth_head,
                                                       model.point_head))


def test_profile_lists_the_side_tasks_as_stages():
    """tools/profile_window attributes kernels by the pipeline's named profiler ranges; the
    k-means and the refinement's pose-free half (side tasks) have theirs too, so the per-stage
    table accounts for the whole window (they were missing from it on the device)."""
    from vggt4d_ros.tools.profile_window import profile_stages
    model = _tiny_vggt()
    images = torch.rand(4, 3, 56, 70, generator=torch.Generator().manual_seed(2))
    pipe = Vggt4dPipeline(model, Vggt4dConfig(cluster_backend="fast"))
    with torch.inference_mode():
        stages = profile_stages(pipe, images)["stages"]
    assert {"pass1", "cluster", "threshold", "pass2", "refine_prep", "refine"} <= set(stages)
    assert stages["cluster"]["wall_ms"] > 0 and stages["refine_prep"]["wall_ms"] > 0


def test_deferred_side_task_runs_at_launch_once_and_inline_at_creation():
    calls = []
    task = SideTask(lambda: calls.append("side") or 3, torch.device("cpu"), "deferred")
    calls.append("pass")                       # the caller queues its pass first
    task.launch()
    task.launch()                              # a second launch is a no-op
    assert task.result() == 3 and calls == ["pass", "side"]
    late = SideTask(lambda: calls.append("late") or 4, torch.device("cpu"), "deferred")
    assert late.result() == 4 and calls[-1] == "late"       # result() runs an unlaunched one
    SideTask(lambda: calls.append("inline"), torch.device("cpu"), "inline")
    assert calls[-1] == "inline"
    with pytest.raises(ValueError, match="mode"):
        SideTask(lambda: None, torch.device("cpu"), "later")


def test_pipeline_interleave_option_gives_the_same_result_on_cpu():
    model = _tiny_vggt()
    images = torch.rand(5, 3, 56, 70, generator=torch.Generator().manual_seed(5))
    cfgs = {mode: Vggt4dConfig(cluster_backend="fast", interleave_stages=mode == "deferred")
            for mode in ("inline", "deferred")}
    assert {m: c.side_task_mode() for m, c in cfgs.items()} == {"inline": "inline",
                                                                "deferred": "deferred"}
    assert Vggt4dConfig(overlap_stages=True, interleave_stages=True).side_task_mode() == "thread"
    res = {m: Vggt4dPipeline(model, c)(images) for m, c in cfgs.items()}
    for key in ("extrinsic", "depth", "coarse_mask", "mask", "saliency"):
        assert torch.equal(getattr(res["inline"], key), getattr(res["deferred"], key)), key
