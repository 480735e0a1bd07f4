"""Batched fast mask refinement (dynamic/refine_fast.py): agreement with the reference path
(golden case, synthetic world), exact outlier rule on small clouds, k-means quality,
degenerate inputs and the backend hook."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vggt4d_ros.dynamic.pipeline import Vggt4dConfig
from vggt4d_ros.dynamic.refine import (RefineConfig, backproject_to_world,
                                       refine_dynamic_mask, statistical_inliers)
from vggt4d_ros.dynamic.refine_fast import (batched_kmeans, batched_statistical_inliers,
                                            refine_dynamic_mask_fast)

from refine_scenes import dilated_mask_scene, golden_inputs, iou


_iou = iou


@pytest.fixture(scope="module")
def seq10(golden_dir):
    g = load_file(str(golden_dir / "vggt4d" / "case_seq10.safetensors"))
    return g, golden_inputs(g)


@pytest.fixture(scope="module")
def synth_small():
    """6 frames 160×120, exact depth/poses; coarse mask = GT dilated by 4 px."""
    return dilated_mask_scene(160, 120, 6, 4)


# ------------------------------------------------------------------ agreement
def test_refine_fast_golden_agrees_with_reference(seq10):
    g, args = seq10
    fast = refine_dynamic_mask_fast(*args)
    ref = g["mask.refined"]            # = the reference path's output (IoU 1.0, other test)
    assert fast.shape == ref.shape and fast.dtype == torch.bool
    iou = _iou(fast, ref)
    per_frame = [_iou(a, b) for a, b in zip(fast, ref)]
    # measured: 0.9916 overall (defaults: 8192 ref points, 4096 stats points), frames >= 0.98
    assert iou >= 0.97 and min(per_frame) >= 0.95, (iou, per_frame)


def test_refine_fast_synthetic_agrees_with_reference(synth_small):
    depth, intr, c2w, coarse, images, gt = synth_small
    ref = refine_dynamic_mask(depth, intr, c2w, coarse, images)
    fast = refine_dynamic_mask_fast(depth, intr, c2w, coarse, images)
    iou = _iou(fast, ref)
    # measured (seed 0): IoU(fast, ref) 0.980; vs GT: coarse 0.638, ref 0.659, fast 0.651
    # (seeds 1/2: 0.968/0.968; 224×168×8 seeds 0-2: 0.965/0.962/0.957)
    assert ref.any() and iou >= 0.93, iou
    assert _iou(fast, gt) >= _iou(ref, gt) - 0.03
    assert _iou(fast, gt) > _iou(coarse, gt)         # still refines the dilated mask


def test_refine_fast_float32_agrees(synth_small):
    """float32 inputs (the GPU precision) give the same masks up to a few boundary pixels."""
    depth, intr, c2w, coarse, images, _ = synth_small
    a = refine_dynamic_mask_fast(depth, intr, c2w, coarse, images)
    b = refine_dynamic_mask_fast(depth.float(), intr.float(), c2w.float(), coarse,
                                 images.float(), dtype=torch.float32)
    assert _iou(a, b) >= 0.99, _iou(a, b)           # measured 1.000
    c2w34 = refine_dynamic_mask_fast(depth, intr, c2w[:, :3], coarse, images)
    assert torch.equal(c2w34, a)                    # [S,3,4] poses accepted


# ------------------------------------------------------------------ building blocks
def test_refine_fast_outliers_exact_on_small_clouds(synth_small):
    """Clouds smaller than the reference subsample and the stats sample: exactly the
    Open3D rule of the reference (scipy cKDTree), including non-finite points."""
    depth, intr, c2w, coarse, *_ = synth_small
    d = depth[:4, 30:78, 40:104].clone()                          # 48×64 = 3072 points
    d[1, :5] = float("nan")
    d[2, 10:12, 10:12] = float("inf")
    k = intr[:4].clone()
    k[:, 0, 2] -= 40
    k[:, 1, 2] -= 30
    world = backproject_to_world(d, k, c2w[:4]).reshape(4, -1, 3)
    finite = torch.isfinite(world).all(-1)
    n = world.shape[1]
    idx = torch.arange(n).expand(4, n)
    query = coarse[:4, 30:78, 40:104].reshape(4, -1) & finite
    ours = batched_statistical_inliers(world, finite, idx, query, 20, 2.5,
                                       ref_points=4096, stats_points=None)
    for f in range(4):
        sel = torch.nonzero(finite[f]).flatten()
        ref = torch.zeros(n, dtype=torch.bool)
        ref[sel] = torch.from_numpy(statistical_inliers(world[f, sel].numpy(), 20, 2.5))
        assert torch.equal(ours[f], ref & query[f]), f
    # tiny clouds: fewer points than neighbours, a single point, duplicates
    rng = np.random.default_rng(3)
    pts = torch.zeros(3, 40, 3, dtype=torch.float64)
    pts[0, :7] = torch.from_numpy(rng.normal(size=(7, 3)))
    pts[1, :1] = 1.0
    pts[2] = torch.from_numpy(np.concatenate([rng.normal(size=(30, 3)), np.zeros((10, 3))]))
    fin = torch.zeros(3, 40, dtype=torch.bool)
    fin[0, :7] = fin[1, :1] = True
    fin[2] = True
    idx = torch.arange(40).expand(3, 40)
    got = batched_statistical_inliers(pts, fin, idx, fin, 20, 2.5, stats_points=None)
    for f in range(3):
        sel = torch.nonzero(fin[f]).flatten()
        exp = torch.zeros(40, dtype=torch.bool)
        exp[sel] = torch.from_numpy(statistical_inliers(pts[f, sel].numpy(), 20, 2.5))
        assert torch.equal(got[f], exp), f


def test_refine_fast_grouped_knn_selection_is_exact():
    """Two-stage (block minima) kNN selection = one topk over all references."""
    from vggt4d_ros.dynamic.refine_fast import _knn_indices, _mean_knn_to_refs

    g = torch.Generator().manual_seed(0)
    d2 = torch.rand(4, 300, 1024, generator=g, dtype=torch.float64)
    for group in (8, 16, 32):
        a = _knn_indices(d2, 20, group).sort(-1).values
        b = d2.topk(20, -1, largest=False).indices.sort(-1).values
        assert torch.equal(a, b), group
    for r in (8192, 1000, 33, 7):
        q = torch.randn(2, 500, 3, generator=g, dtype=torch.float64)
        refs = torch.randn(2, r, 3, generator=g, dtype=torch.float64)
        refs[1, : r // 2] = 1e15                                   # padded references
        torch.testing.assert_close(_mean_knn_to_refs(q, refs, 20, grouped=True),
                                   _mean_knn_to_refs(q, refs, 20, grouped=False))


def test_refine_fast_outliers_subsampled_close_to_exact():
    """Large clouds (subsample active): flags agree with the exact rule almost everywhere."""
    rng = np.random.default_rng(0)
    big = np.concatenate([rng.normal(size=(20000, 3)), rng.normal(size=(200, 3)) * 6])
    exact = statistical_inliers(big, 20, 2.5)
    pts = torch.from_numpy(big)[None]
    fin = torch.ones(1, len(big), dtype=torch.bool)
    idx = torch.arange(len(big))[None]
    got = batched_statistical_inliers(pts, fin, idx, fin, 20, 2.5, ref_points=4096,
                                      stats_points=2048)
    assert (got[0].numpy() == exact).mean() > 0.98
    assert not got[0, 20000:].numpy().all()          # the scattered points are still caught


def test_refine_fast_kmeans_quality_and_padding():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    centres = rng.uniform(-10, 10, size=(30, 3))
    a = centres[rng.integers(0, 30, 3000)] + rng.normal(size=(3000, 3)) * 0.3
    x = torch.zeros(3, 3000, 3, dtype=torch.float64)
    valid = torch.zeros(3, 3000, dtype=torch.bool)
    x[0] = torch.from_numpy(a)
    valid[0] = True
    x[1, :1500] = torch.from_numpy(a[:1500])
    valid[1, :1500] = True
    x[2, :12] = torch.from_numpy(a[:12])                           # fewer points than k
    valid[2, :12] = True
    gen = torch.Generator().manual_seed(42)
    labels, active = batched_kmeans(x, valid, 30, gen)
    assert active.sum(1).tolist() == [30, 30, 12]

    def inertia(pts, lab):
        return sum(((pts[lab == c] - pts[lab == c].mean(0)) ** 2).sum()
                   for c in np.unique(lab))

    for f, m in ((0, 3000), (1, 1500)):
        lab = labels[f, :m].numpy()
        sk = KMeans(30, random_state=42).fit(a[:m])
        assert inertia(a[:m], lab) <= 1.10 * sk.inertia_, f
    assert len(np.unique(labels[2, :12].numpy())) == 12          # k = number of points
    assert labels[valid].max() < 30


# ------------------------------------------------------------------ degenerate inputs
def test_refine_fast_single_frame_and_empty(synth_small):
    depth, intr, c2w, coarse, images, _ = synth_small
    with pytest.warns(RuntimeWarning, match=">= 2 frames"):
        out = refine_dynamic_mask_fast(depth[:1], intr[:1], c2w[:1], coarse[:1], images[:1])
    assert torch.equal(out, coarse[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = refine_dynamic_mask_fast(depth[:3], intr[:3], c2w[:3],
                                       torch.zeros_like(coarse[:3]), images[:3])
    assert out.shape == coarse[:3].shape and not out.any()
    part = coarse[:3].clone()
    part[1] = False                                               # one empty frame
    out = refine_dynamic_mask_fast(depth[:3], intr[:3], c2w[:3], part, images[:3])
    assert not out[1].any()
    with pytest.raises(ValueError):
        refine_dynamic_mask_fast(depth[:3], intr[:3], c2w[:3], coarse[:2], images[:3])


def test_refine_fast_fewer_points_than_clusters(synth_small):
    depth, intr, c2w, coarse, images, _ = synth_small
    tiny = torch.zeros_like(coarse[:3])
    tiny[0, 60:63, 80:83] = True                                 # 9 pixels < 30 clusters
    tiny[2, 10, 10] = True                                       # 1 pixel: no inlier (a = 0)
    out = refine_dynamic_mask_fast(depth[:3], intr[:3], c2w[:3], tiny, images[:3])
    ref = refine_dynamic_mask(depth[:3], intr[:3], c2w[:3], tiny, images[:3])
    assert out.shape == tiny.shape and not out[1].any()
    assert not out[0, :30].any()
    assert torch.equal(out[2], ref[2])


def test_refine_fast_all_dynamic_frames(synth_small):
    depth, intr, c2w, coarse, images, _ = synth_small
    full = torch.ones_like(coarse[:3])
    out = refine_dynamic_mask_fast(depth[:3], intr[:3], c2w[:3], full, images[:3])
    assert out.float().mean() > 0.95


def test_refine_fast_nan_depth(synth_small):
    depth, intr, c2w, coarse, images, _ = synth_small
    bad = depth[:4].clone()
    bad[:, :15, :] = float("nan")
    bad[1, 40:50, 40:50] = float("inf")
    bad[2] = float("nan")                                         # a frame without depth
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = refine_dynamic_mask_fast(bad, intr[:4], c2w[:4], coarse[:4], images[:4])
    assert out.dtype == torch.bool and out.shape == coarse[:4].shape
    assert not out[2].any() and not out[:, :12].any()
    ref = refine_dynamic_mask(bad, intr[:4], c2w[:4], coarse[:4], images[:4])
    assert _iou(out, ref) >= 0.9


# ------------------------------------------------------------------ hook
def test_refine_backend_hook(synth_small):
    depth, intr, c2w, coarse, images, _ = synth_small
    args = (depth[:3], intr[:3], c2w[:3], coarse[:3], images[:3])
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fast = refine_dynamic_mask_fast(*args)
        assert torch.backends.cuda.matmul.allow_tf32      # the TF32 guard restores the flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(refine_dynamic_mask(*args, RefineConfig(backend="fast")), fast)
    ref = refine_dynamic_mask(*args)
    assert torch.equal(refine_dynamic_mask(*args, RefineConfig(backend="auto")), ref)  # CPU
    with pytest.raises(ValueError):
        refine_dynamic_mask(*args, RefineConfig(backend="gpu"))
    assert RefineConfig().backend == "reference"
    assert Vggt4dConfig().refine_backend == "auto"
    assert Vggt4dConfig().refine_config(torch.device("cpu")).backend == "reference"
    assert Vggt4dConfig().refine_config(torch.device("cuda")).backend == "fast"
    assert Vggt4dConfig().refine_config().backend == "reference"      # no device: reference
    assert Vggt4dConfig(refine_backend="fast").refine_config().backend == "fast"
    with pytest.raises(ValueError):
        Vggt4dConfig(refine_backend="gpu")


# ------------------------------------------------------------------ two-step form (pipeline)
def test_refine_fast_invariant_to_a_rigid_change_of_world(synth_small):
    """Outlier removal and clustering run on camera-frame clouds before the poses exist
    (prepare_refine_fast): moving the whole world by one rigid transform changes nothing."""
    depth, intr, c2w, coarse, images, _ = synth_small
    base = refine_dynamic_mask_fast(depth, intr, c2w, coarse, images)
    angle = 0.7
    t = torch.eye(4, dtype=c2w.dtype)
    t[:3, :3] = torch.tensor([[np.cos(angle), -np.sin(angle), 0.0],
                              [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    t[:3, 3] = torch.tensor([3.0, -1.5, 0.25])
    moved = refine_dynamic_mask_fast(depth, intr, t @ c2w, coarse, images)
    assert base.any()
    assert _iou(moved, base) >= 0.999


def test_refine_prepare_finish_equals_one_call(synth_small):
    from vggt4d_ros.dynamic.refine import prepare_refinement
    depth, intr, c2w, coarse, images, _ = synth_small
    for backend in ("fast", "reference"):
        cfg = RefineConfig(backend=backend)
        finish = prepare_refinement(depth, intr, coarse, images, cfg)
        assert torch.equal(finish(c2w), refine_dynamic_mask(depth, intr, c2w, coarse, images,
                                                            cfg))


def test_refine_fast_bad_pose_frame_stays_static(synth_small):
    """A frame whose pose is not finite keeps no dynamic pixel (its points have no world
    position), the other frames are still refined."""
    depth, intr, c2w, coarse, images, _ = synth_small
    bad = c2w.clone()
    bad[2] = float("nan")
    out = refine_dynamic_mask_fast(depth, intr, bad, coarse, images)
    assert out.shape == coarse.shape
    assert not out[2].any() and out.any()


def test_refine_fast_block_farthest():
    from vggt4d_ros.dynamic.refine_fast import _block_farthest
    g = torch.Generator().manual_seed(3)
    dist = torch.rand(4, 103, generator=g, dtype=torch.float64)
    dist[1, 50:] = float("-inf")                          # padding of a short frame
    far = _block_farthest(dist, 30)
    assert far.shape == (4, 30)
    assert torch.equal(far[:, 0], dist.argmax(1))          # the first is exactly the farthest
    for row in range(4):
        assert len(torch.unique(far[row])) == 30          # distinct points
        vals = dist[row, far[row]]
        assert torch.all(vals[:-1] >= vals[1:])           # farthest first


def test_refine_fast_random_subset_takes_all_valid_when_few():
    from vggt4d_ros.dynamic.refine_fast import _random_subset
    valid = torch.zeros(3, 50, dtype=torch.bool)
    valid[0, ::5] = True                                  # 10 valid < count
    valid[1] = True                                       # 50 valid > count
    gen = torch.Generator().manual_seed(0)
    idx, ok = _random_subset(valid, 20, gen)
    assert set(idx[0][ok[0]].tolist()) == set(range(0, 50, 5))
    assert ok[1].all() and len(torch.unique(idx[1])) == 20
    assert not ok[2].any()


def test_refine_fast_kmeans_lazy_relocation_is_exact():
    """batched_kmeans runs Lloyd without the empty-cluster relocation first and redoes it
    with relocation only when a cluster emptied: the labels equal an always-relocating run."""
    from vggt4d_ros.dynamic import refine_fast as rf
    g = torch.Generator().manual_seed(7)
    spread = torch.randn(3, 200, 3, generator=g, dtype=torch.float64)
    dup = torch.cat([torch.zeros(3, 100, 3, dtype=torch.float64),
                     torch.ones(3, 100, 3, dtype=torch.float64)], 1)    # 2 distinct points
    for x in (spread, dup):
        valid = torch.ones(3, 200, dtype=torch.bool)
        valid[1, 150:] = False
        labels, active = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(1))
        calls = []
        original = rf._LloydIterations.run

        def always(self, centres, relocate):
            calls.append(relocate)
            return original(self, centres, True)
        try:
            rf._LloydIterations.run = always
            ref, _ = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(1))
        finally:
            rf._LloydIterations.run = original
        assert torch.equal(labels[valid], ref[valid])
    # the duplicated cloud empties clusters: the relocating pass really ran there
    _, saw = rf._LloydIterations(dup, torch.ones(3, 200, dtype=torch.bool), 8, 3).run(
        torch.rand(3, 8, 3, dtype=torch.float64, generator=g), relocate=False)
    assert bool(saw)


def test_query_bucket_pads_to_few_shapes():
    """Padded query counts (CUDA: the k-means graph is cached per shape): never below q,
    at most 50 % (or up to 1024) more, capped at the pixel count, 2 sizes per octave."""
    from vggt4d_ros.dynamic.refine_fast import _refine_graphs, query_bucket
    sizes = set()
    for q in range(1, 70000, 37):
        b = query_bucket(q, 10 ** 6)
        assert q <= b <= max(1024, q * 1.5)
        sizes.add(b)
    assert query_bucket(5000, 4000) == 4000
    assert sorted(b for b in sizes if 16384 <= b < 65536) == [16384, 24576, 32768, 49152]
    # the cache holds a stream's usual spread of query counts (4 octaves) without re-capture
    assert _refine_graphs.capacity >= len([b for b in sizes if 4096 <= b < 65536])


def test_batched_kmeans_graph_path_equals_eager(emulated_cuda_graphs):
    """The refinement's k-means as one (emulated) graph replay over static buffers: the same
    labels as the eager path for the same generator, for two inputs of one shape (graph
    reused), and the relocation redo still runs when a cluster empties."""
    g = torch.Generator().manual_seed(2)
    for trial in range(2):
        x = torch.randn(3, 400, 3, generator=g, dtype=torch.float64)
        valid = torch.rand(3, 400, generator=g) < 0.7
        valid[2, 5:] = False                                # fewer points than clusters
        graph, act_g = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(trial),
                                      cuda_graphs=True)
        eager, act_e = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(trial))
        assert torch.equal(graph[valid], eager[valid]) and torch.equal(act_g, act_e)
    assert len(emulated_cuda_graphs) == 1
    dup = torch.zeros(2, 200, 3, dtype=torch.float64)
    dup[:, 100:] = 1.0                                      # two distinct points, 8 clusters
    ok = torch.ones(2, 200, dtype=torch.bool)
    graph, _ = batched_kmeans(dup, ok, 8, torch.Generator().manual_seed(0), cuda_graphs=True)
    eager, _ = batched_kmeans(dup, ok, 8, torch.Generator().manual_seed(0))
    assert torch.equal(graph, eager)


def test_fp32_matmul_scope_restores_the_flag_only_after_the_last_user():
    """Two threads inside the TF32-off scope at once (the side task next to the main thread):
    the flag stays off until both left and is then restored to its value before the first."""
    import threading

    from vggt4d_ros.dynamic.refine_fast import _Fp32MatmulScope
    scope = _Fp32MatmulScope()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        inside, release, seen = threading.Event(), threading.Event(), []

        def other():
            with scope():
                inside.set()
                release.wait(5)
        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(5)
        with scope():                                   # enters while the other is inside
            seen.append(torch.backends.cuda.matmul.allow_tf32)
        seen.append(torch.backends.cuda.matmul.allow_tf32)   # other still inside
        release.set()
        t.join(5)
        assert seen == [False, False] and torch.backends.cuda.matmul.allow_tf32 is True
        with scope():
            with scope():                               # nested
                pass
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_batched_kmeans_falls_back_to_eager_when_capture_fails(emulated_cuda_graphs,
                                                                monkeypatch):
    from vggt4d_ros.dynamic import cuda_graph

    def refuse(fn, device):
        raise RuntimeError("CUDA error: capture not supported")
    monkeypatch.setattr(cuda_graph, "capture", refuse)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 300, 3, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 300, generator=g) < 0.8
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed"):
        graph, _ = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(0),
                                  cuda_graphs=True)
    eager, _ = batched_kmeans(x, valid, 8, torch.Generator().manual_seed(0))
    assert torch.equal(graph[valid], eager[valid])
