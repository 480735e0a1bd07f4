"""SideTask (dynamic/side_task.py) and the pipeline's overlap option, on CPU (inline path).

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
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
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
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    model.use_fused_blocks(True, compile=True)           # wrapping is lazy: nothing compiles
    assert "forward" in model.depth_head.__dict__ and "forward" in model.camera_head.__dict__
    model.use_fused_blocks(True, compile=True, compile_heads=False)
    assert "forward" not in model.depth_head.__dict__
    model.use_fused_blocks(True, compile=True)
    model.use_fused_blocks(False)
    assert all("forward" not in h.__dict__ for h in (model.camera_head, model.depth_head,
                                                       model.point_head))
