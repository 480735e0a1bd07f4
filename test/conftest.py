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
    the static-buffer, cache and replay logic of the graph paths runs exactly as on a GPU
    (what only a GPU can check - that capture succeeds - is graph_check's job on the device)."""
    from vggt4d_ros.dynamic import cluster, cuda_graph, refine_fast
    captured = []

    def capture(fn, device):
        fn()                                                # the warm-up
        captured.append(fn)
        return fn
    monkeypatch.setattr(cuda_graph, "usable", lambda t: True)
    monkeypatch.setattr(cuda_graph, "capture", capture)
    monkeypatch.setattr(cluster, "_graphs", cuda_graph.GraphCache(cluster._graphs.capacity))
    monkeypatch.setattr(refine_fast, "_refine_graphs",
                        cuda_graph.GraphCache(refine_fast._refine_graphs.capacity))
    return captured
