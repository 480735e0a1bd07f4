"""Clustering, upsampling, adaptive multi-Otsu threshold and token mask (VGGT4D spec §3-5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vggt4d_ros.dynamic.cluster import (cluster_features, cluster_mean_map, kmeans_reference,
                                        kmeans_torch)
from vggt4d_ros.dynamic.intervention import key_keep_from_tokens, token_dynamic_mask
from vggt4d_ros.dynamic.threshold import (adaptive_threshold, multiotsu_reference,
                                          multiotsu_torch, upsample_map)


@pytest.fixture(scope="module")
def seq10(golden_dir):
    return load_file(str(golden_dir / "vggt4d" / "case_seq10.safetensors"))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _coarse(saliency, labels, size, backend):
    cmap = cluster_mean_map(saliency, labels)
    up = upsample_map(cmap, size)
    thr = adaptive_threshold(up, backend=backend)
    return cmap, up, thr, up > thr


# ---------------------------------------------------------------- golden (reference path)
def test_dynamic_mask_golden_reference_labels(seq10):
    feats = seq10["enc_feat"]
    labels = cluster_features(feats, backend="reference").reshape(seq10["cluster.labels"].shape)
    assert torch.equal(labels, seq10["cluster.labels"])


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_dynamic_mask_golden_from_labels(seq10, backend):
    """Clustering-free parts, exact from the golden labels, for both threshold backends."""
    size = tuple(seq10["mask.coarse"].shape[1:])
    cmap, up, thr, coarse = _coarse(seq10["saliency.dyn_map"], seq10["cluster.labels"], size,
                                    backend)
    assert torch.allclose(cmap, seq10["cluster.map"], atol=1e-5)
    assert torch.allclose(up, seq10["mask.upsampled"], atol=1e-5)
    assert abs(thr - float(seq10["mask.threshold"])) < 1e-6
    gold = seq10["mask.coarse"]
    near = (seq10["mask.upsampled"] - float(seq10["mask.threshold"])).abs() < 1e-4
    assert torch.equal(coarse[~near], gold[~near])


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_dynamic_mask_golden_end_to_end(seq10, backend):
    """Clustering included: the fast torch k-means follows scikit-learn's random stream."""
    size = tuple(seq10["mask.coarse"].shape[1:])
    labels = cluster_features(seq10["enc_feat"], backend=backend).reshape(10, 12, 16)
    assert torch.equal(labels, seq10["cluster.labels"])
    *_, coarse = _coarse(seq10["saliency.dyn_map"], labels, size, backend)
    assert _iou(coarse, seq10["mask.coarse"]) >= 0.99      # measured 1.0 for both


@pytest.mark.parametrize("m,c,k,seed", [(955, 37, 30, 42), (1424, 85, 64, 0), (998, 3, 8, 42)])
def test_dynamic_mask_torch_kmeans_equals_sklearn(m, c, k, seed):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, c, generator=g) * 3
    x[: m // 2] += 5                                        # some structure
    ref = kmeans_reference(x.numpy(), k, seed)
    for dtype in (torch.float32, torch.float64):
        labels, centres = kmeans_torch(x.to(dtype), k, seed)
        np.testing.assert_array_equal(labels.numpy(), ref)
        assert centres.shape == (k, c) and centres.dtype == dtype


def test_dynamic_mask_torch_kmeans_duplicates_and_empty_clusters():
    x = torch.cat([torch.zeros(30, 2), torch.ones(30, 2), torch.tensor([[5.0, 5.0]])])
    labels, _ = kmeans_torch(x, 5, seed=0)                  # only 3 distinct points
    assert labels.shape == (61,) and int(labels.max()) < 5
    assert len(torch.unique(labels[:30])) == 1 and len(torch.unique(labels[30:60])) == 1


@pytest.mark.parametrize("block", [3, 8])
def test_dynamic_mask_torch_kmeans_blocks_of_iterations_between_host_reads(block, monkeypatch):
    """Several Lloyd steps per host read (the CUDA-graph schedule, run eagerly here): a stopped
    loop idles through its block unchanged, and a block that met an empty cluster is redone
    from its saved state on the eager path with the relocation -> the same labels."""
    from vggt4d_ros.dynamic import cluster
    g = torch.Generator().manual_seed(3)
    x = torch.randn(700, 6, generator=g)
    x[:300] += 4
    ref = kmeans_reference(x.numpy(), 12, 42)
    np.testing.assert_array_equal(kmeans_torch(x, 12, 42, block=block)[0].numpy(), ref)
    dup = torch.cat([torch.zeros(30, 2), torch.ones(30, 2), torch.tensor([[5.0, 5.0]])])
    one_step = kmeans_torch(dup, 5, seed=0)[0]
    eager = []
    real = cluster._lloyd_eager
    monkeypatch.setattr(cluster, "_lloyd_eager", lambda *a: eager.append(1) or real(*a))
    labels, _ = kmeans_torch(dup, 5, seed=0, block=block)
    np.testing.assert_array_equal(labels.numpy(), one_step.numpy())
    assert eager == [1]                                     # the relocation path ran


def test_dynamic_mask_fast_path_matches_reference_on_structured_scene():
    """Features with real cluster structure (one blob per surface, like a trained encoder):
    fast and reference paths give the same coarse mask."""
    g = torch.Generator().manual_seed(0)
    s, h, w, c, k = 8, 12, 16, 32, 64
    blob_id = torch.randint(0, k, (s, h, w), generator=g)
    blob_id[:, 4:8, :] = torch.arange(s)[:, None, None] % 4   # a moving band of 4 blobs
    centres = torch.randn(k, c, generator=g) * 5
    feats = centres[blob_id] + 0.1 * torch.randn(s, h, w, c, generator=g)
    sal = torch.rand(s, h, w, generator=g) * 0.3
    sal[:, 4:8, :] += 0.7 * (torch.arange(w) > w // 2).float()      # dynamic half of the band
    size = (h * 14, w * 14)
    masks = {}
    for backend in ("reference", "fast"):
        labels = cluster_features(feats.reshape(s, h * w, c), backend=backend).reshape(s, h, w)
        masks[backend] = _coarse(sal, labels, size, backend)[3]
    assert masks["reference"].any()
    assert _iou(masks["fast"], masks["reference"]) >= 0.95


def test_dynamic_mask_fast_otsu_equals_skimage_on_random_maps():
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        x = torch.cat([torch.rand(3000, generator=g) * 0.3,
                       0.5 + torch.rand(800, generator=g) * 0.2,
                       0.8 + torch.rand(200 + 100 * trial, generator=g) * 0.2])
        for n in (2, 3, 4):
            ref = multiotsu_reference(x.numpy(), n)
            ours = multiotsu_torch(x, n).numpy()
            np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_dynamic_mask_threshold_degenerate_inputs():
    assert adaptive_threshold(torch.full((4, 5), 0.3)) == float("inf")
    assert adaptive_threshold(torch.full((4, 5), 0.3), backend="fast") == float("inf")
    with pytest.raises(ValueError):
        adaptive_threshold(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError):
        adaptive_threshold(torch.rand(10), backend="gpu")
    two = torch.tensor([0.0] * 50 + [1.0] * 10)     # fewer values than 3 or 4 classes
    assert 0.0 <= adaptive_threshold(two) < 1.0
    assert 0.0 <= adaptive_threshold(two, backend="fast") < 1.0


def test_dynamic_mask_cluster_degenerate_inputs():
    feats = torch.randn(1, 10, 4)                    # fewer tokens than 64 clusters
    for backend in ("reference", "fast"):
        lab = cluster_features(feats, backend=backend)
        assert lab.shape == (1, 10) and int(lab.max()) < 10
    with pytest.raises(ValueError):
        cluster_features(feats, backend="nope")
    with pytest.raises(ValueError):
        cluster_mean_map(torch.rand(2, 3, 4), torch.zeros(2, 3, 5, dtype=torch.long))


# ---------------------------------------------------------------- token mask (spec §5)
def test_dynamic_mask_token_mask_golden(seq10):
    assert torch.equal(token_dynamic_mask(seq10["mask.coarse"]), seq10["mask.token"])


def test_dynamic_mask_token_mask_rules():
    m = torch.zeros(2, 28, 42, dtype=torch.bool)
    m[0, 13, 14] = True                             # a single pixel -> token (0, 1)
    m[1, 27, 41] = True                             # last pixel -> last token
    tok = token_dynamic_mask(m)
    assert tok.shape == (2, 6)
    assert tok[0].tolist() == [False, True, False, False, False, False]
    assert tok[1].tolist() == [False] * 5 + [True]
    keep = key_keep_from_tokens(tok)
    assert keep.shape == (1, 2, 11) and keep.dtype == torch.bool
    assert keep[:, :, :5].all()                     # special tokens always kept
    assert torch.equal(keep[0, :, 5:], ~tok)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        token_dynamic_mask(torch.zeros(1, 20, 28))


def test_dynamic_mask_threshold_as_tensor_matches_float():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(4000, generator=g) * 0.4, 0.7 + torch.rand(900, generator=g) * 0.3])
    for backend in ("reference", "fast"):
        t = adaptive_threshold(x, backend=backend, as_tensor=True)
        assert isinstance(t, torch.Tensor) and t.dim() == 0
        assert float(t) == adaptive_threshold(x, backend=backend)
    const = adaptive_threshold(torch.full((5, 5), 0.2), backend="fast", as_tensor=True)
    assert float(const) == float("inf")
    bad = adaptive_threshold(torch.tensor([0.1, float("nan"), 0.5]), backend="fast",
                             as_tensor=True)
    assert torch.isnan(bad)                      # the tensor form flags instead of raising


def test_dynamic_mask_kmeans_plusplus_one_draw_block_equals_per_step_draws():
    """The k-means++ seeding draws all uniforms up front; numpy's legacy RandomState gives
    the same numbers as one draw per step (what scikit-learn does)."""
    a = np.random.RandomState(42)
    a.choice(100, p=np.full(100, 0.01))
    block = a.uniform(size=(5, 3))
    b = np.random.RandomState(42)
    b.choice(100, p=np.full(100, 0.01))
    steps = np.stack([b.uniform(size=3) for _ in range(5)])
    np.testing.assert_array_equal(block, steps)


def test_dynamic_mask_kmeans_graph_path_equals_sklearn(emulated_cuda_graphs):
    """The graph path (static buffers reloaded per call, Lloyd blocks of LLOYD_BLOCK steps,
    seeding steps as replays) gives scikit-learn's labels, also for a second input of the
    same shape (cached graphs reused) and when a block meets an empty cluster."""
    g = torch.Generator().manual_seed(5)
    for trial in range(2):
        x = torch.randn(640, 9, generator=g)
        x[: 200 + 100 * trial] += 3
        labels, centres = kmeans_torch(x, 16, 42, cuda_graphs=True)
        np.testing.assert_array_equal(labels.numpy(), kmeans_reference(x.numpy(), 16, 42))
        assert centres.dtype == torch.float32
    assert len(emulated_cuda_graphs) == 2                   # one shape: captured once
    dup = torch.cat([torch.zeros(30, 2), torch.ones(30, 2), torch.tensor([[5.0, 5.0]])])
    graph_labels, _ = kmeans_torch(dup.double(), 5, seed=0, cuda_graphs=True)
    np.testing.assert_array_equal(graph_labels.numpy(), kmeans_torch(dup, 5, seed=0)[0].numpy())


def test_graph_cache_is_a_bounded_lru(monkeypatch):
    from vggt4d_ros.dynamic import cuda_graph
    from vggt4d_ros.dynamic.cuda_graph import GraphCache
    monkeypatch.setattr(cuda_graph, "_named_caches", {})
    cache, built = GraphCache(2, "lru"), []

    def build(name):
        return lambda: built.append(name) or name
    assert cache.get("a", build("a")) == "a" and cache.get("b", build("b")) == "b"
    assert cache.get("a", build("a2")) == "a"              # hit: not rebuilt, now newest
    cache.get("c", build("c"))                               # evicts b (least recent)
    assert len(cache) == 2 and cache.get("b", build("b2")) == "b2"
    assert built == ["a", "b", "c", "b2"]
    assert cuda_graph.cache_stats() == {"lru": {"hits": 1, "builds": 4, "size": 2}}
    with pytest.raises(ValueError):
        GraphCache(0)


def test_emulated_capture_refuses_host_reads(emulated_cuda_graphs):
    """The CPU emulation of CUDA-graph capture fails a body that reads device data on the host
    (which would break a real capture), and accepts a sync-free one."""
    from vggt4d_ros.dynamic import cuda_graph
    t = torch.arange(6.0)
    for body in (lambda: t.sum().item(), lambda: bool((t > 2).any()),
                 lambda: t[t > 2], lambda: torch.nonzero(t), lambda: t.masked_select(t > 1)):
        with pytest.raises(AssertionError, match="reads device data on the host"):
            cuda_graph.capture(body, torch.device("cpu"))
    out = torch.zeros(6)
    cuda_graph.capture(lambda: out.copy_(torch.where(t > 2, t, -t).cumsum(0)),
                       torch.device("cpu"))()
    assert out[-1] == 9.0


def test_a_failed_capture_falls_back_to_the_eager_path_once(emulated_cuda_graphs, monkeypatch):
    """A capture that raises (a driver or PyTorch that cannot capture) costs speed, not
    results: one warning, scikit-learn's labels, no further capture attempts."""
    from vggt4d_ros.dynamic import cluster, cuda_graph
    attempts = []

    def refuse(fn, device):
        attempts.append(1)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graph, "capture", refuse)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 5, generator=g)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed"):
        labels, _ = kmeans_torch(x, 8, 42, cuda_graphs=True)
    np.testing.assert_array_equal(labels.numpy(), kmeans_reference(x.numpy(), 8, 42))
    labels2, _ = kmeans_torch(x * 2, 8, 42, cuda_graphs=True)
    np.testing.assert_array_equal(labels2.numpy(), kmeans_reference((x * 2).numpy(), 8, 42))
    assert attempts == [1] and "not permitted" in cluster._graphs.disabled_reason


def test_coarse_mask_graph_path_equals_eager_and_reads_nothing_on_the_host(
        emulated_cuda_graphs):
    """The threshold stage (cluster map, upsampling, multi-Otsu) as one emulated graph replay
    (the watcher fails any host read, e.g. bincount or indexing by a device scalar): same
    threshold and mask as the eager call, for two inputs of one shape."""
    from vggt4d_ros.dynamic.threshold import coarse_mask
    g = torch.Generator().manual_seed(11)
    for trial in range(2):
        sal = torch.rand(4, 6, 9, generator=g)
        sal[:, 2:4, 3:6] += 0.8 + 0.1 * trial
        lab = torch.randint(0, 16, (4, 6, 9), generator=g)
        eager = coarse_mask(sal, lab, (84, 126), 16, backend="fast")
        graph = coarse_mask(sal, lab, (84, 126), 16, backend="fast", cuda_graphs=True)
        assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])
        assert graph[1].any() and not graph[1].all()
    assert len(emulated_cuda_graphs) == 1


def test_cached_graphs_serve_inference_mode_and_no_grad_callers_alike(emulated_cuda_graphs):
    """The graph caches are process-wide: buffers built during an ``inference_mode`` call
    (vggt4d-bench, the node) must take in-place updates from a later ``no_grad`` call (the
    pipeline's own decorator) - inference tensors refuse that ("Inplace update to inference
    tensor outside InferenceMode", seen on the device)."""
    from vggt4d_ros.dynamic import refine_fast, threshold
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g)
    sal, lab = torch.rand(2, 5, 7, generator=g), torch.randint(0, 4, (2, 5, 7), generator=g)
    pts, valid = torch.randn(2, 1024, 3, generator=g), torch.rand(2, 1024, generator=g) < 0.9

    def run_all():
        out = [kmeans_torch(x, 8, 42, cuda_graphs=True)[0],
               threshold.coarse_mask(sal, lab, (10, 14), 4, backend="fast", cuda_graphs=True)[1],
               refine_fast.batched_kmeans(pts, valid, 5, torch.Generator().manual_seed(1),
                                          cuda_graphs=True)[0]]
        return [t.clone() for t in out]
    with torch.inference_mode():
        first = run_all()
    with torch.no_grad():
        second = run_all()
    assert len(emulated_cuda_graphs) >= 3                   # the no_grad call reused them
    assert all(torch.equal(a, b) for a, b in zip(first, second))
