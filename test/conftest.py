"""Shared pytest fixtures: location of the optional golden data, deterministic seeds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VGGT4D_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Path of ../shared/golden; skips (saying why) when it is absent."""
    if not (GOLDEN_DIR / "vggt" / "weights.safetensors").is_file():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (optional input; set VGGT4D_GOLDEN)")
    return GOLDEN_DIR


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """CUDA-graph capture emulated on the CPU: the captured function runs at every replay, so
    the static-buffer, cache and replay logic of the graph paths runs exactly as on a GPU.
    Every run of a captured function is watched for the ops that read device data on the
    host (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ...): on a GPU those
    would break the capture, here they fail the test. (That capture then succeeds on a real
    device is graph_check's job.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from vggt4d_ros.dynamic import cluster, cuda_graph, pipeline, refine_fast, threshold
    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
               "unique_dim", "_unique2", "unique_consecutive", "allclose", "repeat_interleave",
               "bincount", "histc"}     # (output size from the data: read on the host)

    class NoHostSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if name in syncing or bool_index:      # a boolean mask index runs nonzero
                raise AssertionError(f"captured CUDA-graph body reads device data on the "
                                     f"host: aten.{name}")
            return func(*args, **(kwargs or {}))

    def watched(fn):
        def run():
            with NoHostSync():
                fn()
        return run

    captured = []

    def capture(fn, device, priority=-1):
        run = watched(fn)
        run()                                               # the warm-up
        captured.append(fn)
        return run
    monkeypatch.setattr(cuda_graph, "usable", lambda t: True)
    monkeypatch.setattr(cuda_graph, "capture", capture)
    monkeypatch.setattr(cluster, "_graphs", cuda_graph.GraphCache(cluster._graphs.capacity))
    monkeypatch.setattr(refine_fast, "_refine_graphs",
                        cuda_graph.GraphCache(refine_fast._refine_graphs.capacity))
    monkeypatch.setattr(threshold, "_coarse_graphs",
                        cuda_graph.GraphCache(threshold._coarse_graphs.capacity))
    monkeypatch.setattr(pipeline, "_pass1_graphs",
                        cuda_graph.GraphCache(pipeline._pass1_graphs.capacity))
    monkeypatch.setattr(pipeline, "_pass2_graphs",
                        cuda_graph.GraphCache(pipeline._pass2_graphs.capacity))
    monkeypatch.setattr(pipeline, "_embed_graphs",
                        cuda_graph.GraphCache(pipeline._embed_graphs.capacity))
    return captured
