"""Batched, device-resident fast path of the mask refinement (VGGT4D spec §6).

Same algorithm as :func:`vggt4d_ros.dynamic.refine.refine_dynamic_mask` (read its docstring
for the rule), computed for all frames at once with padded tensors instead of per-frame /
per-cluster Python loops. Everything stays on the input device. By design the only host
synchronisation is one small read at the start (the largest per-frame number of coarse
points, which sizes the padded query batch, and the number of non-finite pixels for the
warning) - after it, no ``.item()``, ``bool(tensor)`` or data-dependent shape in this
module's code (Python loops run only over fixed counts: kNN chunks, k-means++ steps, Lloyd
iterations). Measured on an H200 with ``python -m vggt4d_ros.tools.refine_bench --sync-check``
(docs/BENCHMARKS.md, run 7): 3 synchronising calls per refinement, i.e. two more inside torch
ops that synchronise implicitly - not yet located; 46-55 ms for 16 frames at 518x294.

Differences from the reference path (all documented approximations):

1. **Statistical outlier removal** (Open3D rule, ``k = 20``, ``std_ratio = 2.5``). Exact kNN of
   every coarse point against all ``H·W`` points of its frame is replaced, per frame, by a
   fixed seeded random subsample ``R`` of ``ref_points`` finite points (default 8192):
   ``a_i`` = mean distance of point i to its k nearest points OF ``R`` (the point itself counts,
   at distance 0, when it belongs to ``R`` - as in Open3D, where it always does). The cloud
   statistics (mean, Bessel std over the denominator of all sampled points, ``a_i = 0`` adding
   0 to the sums) use the same rule applied to a seeded random sample of ``stats_points``
   finite points of the frame (default 4096, ``None`` = all; ``cfg.outlier_stats_samples``
   belongs to the reference path's torch-kNN option and is not used here) against the same
   ``R``, so the threshold ``mean + 2.5·std`` is consistent with the queries' ``a_i`` (both
   are inflated alike by the sparser ``R``; a query/sample lies in ``R`` with the same
   probability). Inlier iff ``0 < a_i < threshold``. Exact (= Open3D / the reference) when
   the frame has at most ``ref_points`` and at most ``stats_points`` finite points (or
   ``stats_points=None``); a test checks equality. Cost: ``S·(stats_points + Q)·ref_points``
   distances (Q = largest per-frame number of coarse points). Only coarse points get a
   decision (only they are clustered).
2. **k-means** (``k = 30``): batched k-means++ seeding (greedy, ``2 + ln k`` candidates per
   step, drawn up front from a torch generator seeded with ``cfg.seed`` - NOT scikit-learn's
   random stream), then ``kmeans_iters`` (default 30) Lloyd iterations without an early stop
   (no sync; on CUDA each iteration's assignment and centre sums are one Triton kernel,
   ``_kmeans_triton``, whose per-program partial sums make the centres deterministic - the
   torch path's scatter-add atomics were not; with ``cfg.cuda_graphs`` on CUDA all of it
   is one cached CUDA-graph replay, the query count padded to one of 2 sizes per octave so
   that windows share shapes); an empty
   cluster takes a point far from its centre (the first empty cluster of a
   frame the farthest point; the e-th the farthest point of the e-th of k strided blocks of
   points, blocks ranked by their farthest point - ``_block_farthest``, cheaper than a top-k per
   iteration). Labels therefore differ from scikit-learn's; the
   clustering is of similar quality. Frames with fewer inlier points than k use
   ``k = number of points`` (extra centres inactive).
3. Everything else (back-projection at pixel centres, projection into every other view,
   nearest depth / bilinear mask and RGB sampling with ``align_corners=True`` normalisation,
   in-bounds / ``z > 0`` / visibility-margin rules, the 5 % valid-fraction rule, the residual
   threshold, pixel scatter, morphology) is the reference rule, evaluated for all
   (target frame, source frame, point) triples at once and reduced per (frame, cluster) with
   ``scatter_add``.

Configuration: the rule constants of :class:`RefineConfig` are honoured (neighbours, std
ratio, clusters, seed, margin, valid fraction, threshold, kernels, pixel offset, boundary
sharpening - the latter runs refine.py's per-frame code and syncs); ``outlier_backend``,
``kmeans_backend`` and ``outlier_stats_samples`` are reference-path options and are ignored.
GPU cost is dominated by the kNN: ``S·(stats_points + Q)·ref_points`` squared distances from
one bmm plus a ``topk(20)`` per row; ``ref_points`` / ``stats_points`` are the knobs
(golden IoU vs the reference: 0.9916 at 8192/4096, 0.9901 at 4096/4096).

Degenerate cases are those of refine.py: ``S == 1`` -> coarse mask (warning); empty coarse
mask / no inlier -> empty frame; fewer points than clusters -> k = points; all-dynamic frames
stay dynamic; non-finite depth -> those pixels are static and never count as visible samples
(warning). Precision: float64 on CPU, float32 elsewhere (clouds are centred per frame first).
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..geometry.unproject import depth_to_world_points
from . import cuda_graph
from .refine import (RefineConfig, _dilate, _erode, boundary_sharpen, check_refine_inputs,
                     ellipse_kernel)

REF_POINTS = 8192          # kNN reference subsample per frame
STATS_POINTS = 4096        # per-frame sample for the outlier mean/std
KNN_GROUPED = True         # two-stage exact kNN selection (see _knn_indices)
KNN_GROUP = 0              # references per block (power of two); 0: ~16·k blocks
KMEANS_ITERS = 30          # fixed Lloyd iterations
USE_TRITON_KMEANS = True   # CUDA: fused Triton Lloyd step (False: the torch bmm/scatter path)
_FAR = 1e15                # coordinate of padded (invalid) reference points
_FAR_TEST = 1e14           # kNN distances above this are "no neighbour"
_CHUNK_ELEMS = 1 << 26     # distance-matrix entries per kNN chunk (all frames together)


# ------------------------------------------------------------------------- helpers
def _random_subset(valid: Tensor, count: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Per row of ``valid [S, N]`` a random subset of ``count`` valid indices (static shape).

    Returns ``(idx [S, count], ok [S, count])``; rows with fewer valid entries are padded with
    invalid indices (``ok`` False). Rows with ``<= count`` valid entries get ALL of them.
    """
    # one random order of the N columns, valid entries first (a stable one-byte sort): the
    # first ``count`` are a uniform random subset of each row's valid entries (cheaper than a
    # top-k over random keys)
    perm = torch.randperm(valid.shape[1], generator=gen, device=valid.device)
    order = torch.sort((~valid[:, perm]).to(torch.uint8), dim=1, stable=True).indices
    idx = perm[order[:, :count]]
    return idx, valid.gather(1, idx)


def _gather_points(points: Tensor, idx: Tensor) -> Tensor:
    """``points [S, N, 3]``, ``idx [S, Q]`` -> ``[S, Q, 3]``."""
    return points.gather(1, idx[..., None].expand(-1, -1, points.shape[-1]))


class _Fp32MatmulScope:
    """Disable TF32 for the distance matmuls while any thread is inside (a process-global
    flag, the legacy switch the project uses elsewhere). TF32's 10-bit mantissa would scramble
    the neighbour ranking. Nesting and concurrent users (e.g. two pipelines in one process)
    are counted, so the flag is restored - to what it was before the FIRST user entered -
    only when the LAST one leaves; meanwhile other threads' float32 matmuls run in full
    precision (slower, never less exact). If the flag cannot be read/set the matmuls run as
    configured."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Optional[bool] = None

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                try:
                    self._saved = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = False
                except (RuntimeError, AttributeError):   # a conflicting newer precision API
                    self._saved = None
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved is not None:
                    torch.backends.cuda.matmul.allow_tf32 = self._saved


_full_fp32_matmul = _Fp32MatmulScope()


def _knn_indices(d2: Tensor, kk: int, group: int) -> Tensor:
    """Indices ``[..., kk]`` of the kk smallest entries of ``d2 [..., R]`` (any order).

    ``group > 1`` (``R`` a multiple of it, ``R / group > kk``): exact two-stage selection -
    the minimum of every block of ``group`` columns, the kk blocks with the smallest minima
    (any block holding one of the kk smallest entries has its minimum among the kk smallest
    entries, so at most kk blocks qualify), then the kk smallest of those ``kk·group``
    candidates. Same result as one ``topk`` over R (up to ties), on ~R/4 columns.
    """
    if group <= 1:
        return d2.topk(kk, dim=-1, largest=False, sorted=False).indices
    lead, r = d2.shape[:-1], d2.shape[-1]
    blocks = d2.reshape(*lead, r // group, group)
    gsel = blocks.amin(-1).topk(kk, dim=-1, largest=False, sorted=False).indices  # [..., kk]
    cand = blocks.gather(-2, gsel[..., None].expand(*lead, kk, group))           # [..., kk, G]
    sub = cand.reshape(*lead, kk * group).topk(kk, dim=-1, largest=False, sorted=False).indices
    return gsel.gather(-1, sub // group) * group + sub % group


def _triton_knn(device: torch.device):
    """The Triton kNN kernels (``_knn_triton``) on CUDA, else None (portable torch path)."""
    if device.type != "cuda":
        return None
    try:
        from . import _knn_triton
    except ImportError:               # a CUDA build without Triton
        return None
    return _knn_triton


def _triton_kmeans(x: Tensor):
    """The Triton Lloyd-step kernel (``_kmeans_triton``) for float32 CUDA points, else None."""
    if x.device.type != "cuda" or x.dtype != torch.float32:
        return None
    try:
        from . import _kmeans_triton
    except ImportError:               # a CUDA build without Triton
        return None
    return _kmeans_triton


def _block_min_sq_dists(queries: Tensor, ref_blocks: Tensor) -> Tensor:
    """``[S, Q, B]``: per query, the smallest squared distance to each block of references
    (portable path: ``cdist`` on exact coordinate differences, in chunks)."""
    s, q, _ = queries.shape
    b, g = ref_blocks.shape[1:3]
    flat = ref_blocks.flatten(1, 2)
    chunk = max(1, (_CHUNK_ELEMS // 16) // max(1, s * b * g))
    out = []
    for i in range(0, q, chunk):
        d = torch.cdist(queries[:, i:i + chunk], flat,
                        compute_mode="donot_use_mm_for_euclid_dist")
        out.append(d.reshape(s, -1, b, g).amin(-1) ** 2)
    return torch.cat(out, 1) if out else queries.new_zeros(s, 0, b)


def _knn_mean_from_block_min(qc: Tensor, ref_blocks: Tensor, block_min: Tensor,
                             kk: int) -> Tensor:
    """Second stage: mean distance of ``qc [S, c, 3]`` to its kk nearest references.

    The kk blocks with the smallest minima (``block_min [S, c, B]``) hold every one of the
    kk nearest references (see :func:`_knn_indices`); their kk·G members are compared exactly
    (coordinate differences). References at ``_FAR`` (padding) are ignored.
    """
    s, c = qc.shape[:2]
    g = ref_blocks.shape[2]
    gsel = block_min.topk(kk, dim=-1, largest=False, sorted=False).indices       # [S, c, kk]
    rows = torch.arange(s, device=qc.device)[:, None, None]
    cand = ref_blocks[rows, gsel]                                              # [S, c, kk, G, 3]
    d2 = ((qc[:, :, None, None, :] - cand) ** 2).sum(-1).reshape(s, c, kk * g)
    kv = d2.topk(kk, dim=-1, largest=False, sorted=False).values.sqrt()        # [S, c, kk]
    present = kv < _FAR_TEST
    return torch.where(present, kv, torch.zeros_like(kv)).sum(2) / present.sum(2).clamp_min(1)


def _mean_knn_to_refs(queries: Tensor, refs: Tensor, k: int,
                      grouped: Optional[bool] = None) -> Tensor:
    """Mean distance of ``queries [S, Q, 3]`` to their k nearest ``refs [S, R, 3]``.

    Padded references sit at ``_FAR`` and are ignored (fewer than k real ones -> mean over
    those present). Two-stage exact selection over blocks of references (``grouped``, default
    ``KNN_GROUPED``; False: one block per reference, same result up to ties), distances from
    coordinate differences. CUDA: two Triton kernels (``_knn_triton``); elsewhere torch, the
    second stage in query chunks of bounded size.
    """
    s, q, _ = queries.shape
    r = refs.shape[1]
    kk = min(k, r)
    group = 1
    if KNN_GROUPED if grouped is None else grouped:
        # ~16·kk blocks: G·kk second-stage candidates stay small enough for a one-block top-k
        group = KNN_GROUP or 1 << max(0, int(math.log2(max(1, r // (16 * kk)))))
        if group > 1:
            pad = (-r) % group
            refs = torch.cat([refs, refs.new_full((s, pad, 3), _FAR)], 1) if pad else refs
            r = refs.shape[1]
            if r // group <= kk:
                group = 1
    ref_blocks = refs.reshape(s, r // group, group, 3)
    kernels = _triton_knn(queries.device)
    if kernels is not None:               # CUDA: two Triton kernels, nothing [S, Q, R] stored
        block_min = kernels.block_min_sq_dists(queries, ref_blocks)
        return kernels.knn_mean_from_block_min(queries, ref_blocks, block_min, kk, _FAR_TEST)
    block_min = _block_min_sq_dists(queries, ref_blocks)                 # [S, Q, B]
    # no torch.compile here: this runs on the pipeline's side thread, where a compilation
    # races with the main thread's compiled blocks (dynamo/FX tracing state is process-wide)
    chunk = max(1, _CHUNK_ELEMS // max(1, 3 * s * kk * group))
    out = [_knn_mean_from_block_min(queries[:, i:i + chunk], ref_blocks,
                                    block_min[:, i:i + chunk], kk)
           for i in range(0, q, chunk)]
    return torch.cat(out, dim=1) if out else queries.new_zeros(s, 0)


def batched_statistical_inliers(points: Tensor, finite: Tensor, query_idx: Tensor,
                                query_ok: Tensor, k: int = 20, std_ratio: float = 2.5,
                                ref_points: int = REF_POINTS,
                                stats_points: Optional[int] = None,
                                gen: Optional[torch.Generator] = None) -> Tensor:
    """Open3D-style inlier flags of the query points, all frames at once (see module doc).

    Args:
        points: ``[S, N, 3]`` per-frame clouds (non-finite entries allowed where ``finite``
            is False; they are ignored).
        finite: ``[S, N]`` bool, the points that form each frame's cloud.
        query_idx / query_ok: ``[S, Q]`` indices into N and their validity (padding).
        ref_points: size of the per-frame kNN reference subsample.
        stats_points: per-frame sample for the mean/std (``None`` = every finite point).
    Returns:
        ``[S, Q]`` bool (False on padding).
    """
    s, n, _ = points.shape
    if gen is None:
        gen = torch.Generator(device=points.device)
        gen.manual_seed(0)
    pts = torch.where(finite[..., None], points, torch.zeros_like(points))
    cnt = finite.sum(1, keepdim=True).clamp_min(1).to(pts.dtype)
    pts = pts - (pts.sum(1, keepdim=True) / cnt[..., None])             # centred per frame
    far = torch.full_like(pts, _FAR)
    ref_idx, ref_ok = _random_subset(finite, min(ref_points, n), gen)
    refs = torch.where(ref_ok[..., None], _gather_points(pts, ref_idx), far[:, :ref_idx.shape[1]])
    n_stat = n if stats_points is None else min(stats_points, n)
    st_idx, st_ok = _random_subset(finite, n_stat, gen)
    queries = torch.cat([_gather_points(pts, st_idx), _gather_points(pts, query_idx)], dim=1)
    a = _mean_knn_to_refs(queries, refs, k)
    a_st, a_q = a[:, :n_stat], a[:, n_stat:]
    m = st_ok.sum(1).to(pts.dtype)                                      # [S]
    pos = st_ok & (a_st > 0)
    mean = torch.where(pos, a_st, torch.zeros_like(a_st)).sum(1) / m.clamp_min(1)
    dev = torch.where(pos, (a_st - mean[:, None]) ** 2, torch.zeros_like(a_st)).sum(1)
    std = torch.sqrt(dev / (m - 1).clamp_min(1))
    thr = torch.where(m >= 2, mean + std_ratio * std, torch.zeros_like(mean))  # < 2 points: none
    return query_ok & (a_q > 0) & (a_q < thr[:, None])


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """``x [S, Q, 3]``, ``c [S, K, 3]`` -> squared distances ``[S, Q, K]``."""
    return ((x[:, :, None] - c[:, None]) ** 2).sum(-1)


def _block_farthest(dist: Tensor, count: int) -> Tensor:
    """Indices ``[S, count]`` of far points of ``dist [S, Q]``, farthest first.

    The Q entries are split into ``count`` strided blocks (block j = entries j, j + count,
    ...; each holds at least one real entry) and each block's maximum is kept: the first index
    is the exact farthest point, the others are the farthest of their blocks, all distinct (a
    cheap stand-in for a full top-``count``, which cost a multi-block radix select per Lloyd
    iteration although empty clusters are rare).
    """
    s, q = dist.shape
    count = min(count, q)
    pad = (-q) % count
    if pad:
        dist = torch.cat([dist, dist.new_full((s, pad), float("-inf"))], 1)
    val, arg = dist.reshape(s, -1, count).max(1)                        # [S, count]
    arg = arg * count + torch.arange(count, device=dist.device)
    order = val.argsort(dim=1, descending=True, stable=True)
    return arg.gather(1, order)


def batched_kmeans(x: Tensor, valid: Tensor, k: int, gen: torch.Generator,
                   iters: int = KMEANS_ITERS, cuda_graphs: bool = False) -> Tuple[Tensor, Tensor]:
    """k-means per frame on ``x [S, Q, 3]`` restricted to ``valid [S, Q]``.

    Returns ``(labels [S, Q] int64, active [S, k] bool)``; frame f uses
    ``min(k, #valid_f)`` centres (the others are inactive). Labels of padding are arbitrary.
    The random numbers (first-centre keys, candidate draws) are drawn up front from ``gen``;
    on CUDA (``cuda_graphs``) seeding and Lloyd iterations then run as ONE CUDA-graph replay
    (cached per shape; ~700 small kernels otherwise - the loop was launch-bound).
    """
    s, q, _ = x.shape
    trials = 2 + int(math.log(k)) if k > 1 else 1
    keys = torch.rand(s, q, generator=gen, device=x.device)
    draws = torch.rand(max(k - 1, 0), s, trials, generator=gen, device=x.device)
    graph = (_refine_kmeans_graph(s, q, k, trials, iters, x.dtype, x.device)
             if cuda_graphs and cuda_graph.usable(x) else None)
    if graph is not None:
        with graph.lock:
            labels, centres, saw_empty = graph.run(x, valid, keys, draws)
            lloyd = graph.lloyd
            if bool(saw_empty):                          # rare: redo with the relocation
                final, _ = lloyd.run(centres, relocate=True)
                labels = lloyd.assign(final)[1]
            return labels.clone(), lloyd.active.clone()
    centres = _seed_centres(x, valid, keys, draws, k)
    # Lloyd iterations (fixed count; no convergence test). Empty clusters are rare, and their
    # relocation is ~half of an iteration's kernels: run without it first and redo the
    # iterations with it only if a cluster ever emptied (identical result; one host read).
    lloyd = _LloydIterations(x, valid, k, iters)
    final, saw_empty = lloyd.run(centres, relocate=False)
    if bool(saw_empty):
        final, _ = lloyd.run(centres, relocate=True)
    return lloyd.assign(final)[1], lloyd.active


def _seed_centres(x: Tensor, valid: Tensor, keys: Tensor, draws: Tensor, k: int) -> Tensor:
    """Batched greedy k-means++ -> centres ``[S, k, 3]`` (fixed ``k - 1`` steps, no sync).

    ``keys [S, Q]`` uniform: the first centre is the valid point of smallest key; ``draws
    [k - 1, S, T]`` uniform: step j's T candidates (inverse CDF of the running potential, in
    float32 whatever x's dtype, so float32 and float64 runs see the same numbers); the
    candidate that lowers the potential most is kept.
    """
    s, q, _ = x.shape
    dev, dt = x.device, x.dtype
    w = valid.to(dt)
    rows = torch.arange(s, device=dev)
    first = torch.where(valid, keys, torch.full_like(keys, 2.0)).argmin(1)     # [S]
    centres = x.new_zeros(s, k, 3)
    centres[:, 0] = x[rows, first]
    closest = _sq_dist(x, centres[:, :1])[..., 0] * w                   # [S, Q]
    for j in range(1, k):
        cdf = closest.cumsum(1)
        u = draws[j - 1].to(dt) * cdf[:, -1:]
        cand = torch.searchsorted(cdf, u, right=True).clamp_max(q - 1)  # [S, T]
        cand = torch.where(valid.gather(1, cand), cand, first[:, None].expand_as(cand))
        xc = _gather_points(x, cand)                                    # [S, T, 3]
        d_c = torch.minimum(_sq_dist(xc, x), closest[:, None])          # [S, T, Q]
        best = (d_c * w[:, None]).sum(2).argmin(1)                      # [S]
        closest = d_c[rows, best] * w
        centres[:, j] = xc[rows, best]
    return centres


class _RefineKMeansGraph:
    """:func:`batched_kmeans`'s seeding + Lloyd iterations (without relocation) captured as
    one CUDA graph over static buffers of one shape ``[S, Q]``."""

    def __init__(self, s: int, q: int, k: int, trials: int, iters: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.lock = threading.Lock()
        self.x = torch.zeros(s, q, 3, dtype=dtype, device=device)
        self.valid = torch.zeros(s, q, dtype=torch.bool, device=device)
        self.keys = torch.zeros(s, q, device=device)
        self.draws = torch.zeros(max(k - 1, 0), s, trials, device=device)
        self.labels = torch.zeros(s, q, dtype=torch.long, device=device)
        self.centres = torch.zeros(s, k, 3, dtype=dtype, device=device)
        self.saw_empty = torch.zeros((), dtype=torch.bool, device=device)
        self.lloyd = _LloydIterations(self.x, self.valid, k, iters)

        def body() -> None:
            self.lloyd.refresh()
            centres = _seed_centres(self.x, self.valid, self.keys, self.draws, k)
            final, saw = self.lloyd.run(centres, relocate=False)
            self.centres.copy_(centres)
            self.labels.copy_(self.lloyd.assign(final)[1])
            self.saw_empty.copy_(saw)

        self.replay = cuda_graph.capture(body, device)

    def run(self, x: Tensor, valid: Tensor, keys: Tensor,
            draws: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(labels [S, Q], seeded centres [S, k, 3], saw_empty) - static buffers, caller holds
        ``lock`` while it reads them."""
        for dst, src in ((self.x, x), (self.valid, valid), (self.keys, keys),
                         (self.draws, draws)):
            dst.copy_(src)
        self.replay()
        return self.labels, self.centres, self.saw_empty


# 8 shapes = 4 octaves of query counts; their memory is < 3.5x the largest graph's
_refine_graphs: "cuda_graph.GraphCache[_RefineKMeansGraph]" = \
    cuda_graph.GraphCache(8, "refine_kmeans")


def _refine_kmeans_graph(s: int, q: int, k: int, trials: int, iters: int, dtype: torch.dtype,
                         device: torch.device) -> Optional[_RefineKMeansGraph]:
    """Cached graph of this shape (least recently used evicted; queries are padded to
    :func:`query_bucket` sizes so that windows of a stream share shapes); None if capture
    failed in this process (eager path)."""
    return _refine_graphs.get((s, q, k, trials, iters, dtype, device.index),
                              lambda: _RefineKMeansGraph(s, q, k, trials, iters, dtype, device))


def query_bucket(q: int, limit: int) -> int:
    """Padded query count: ``q`` rounded up to two sizes per octave (2^j and 1.5 * 2^j, at
    least 1024; <= 50 % padding), at most ``limit``. Few distinct shapes -> the cached CUDA
    graphs are reused: with 8 sizes per octave a 500-frame H100 stream re-captured the graph
    in 51 of 62 windows (~0.1 s each), which cost more than the graphs saved."""
    b = 1024
    while b < q:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3       # 2^j -> 1.5 * 2^j -> 2^(j+1)
    return min(limit, b)


class _LloydIterations:
    """Batched Lloyd iterations of :func:`batched_kmeans` (fixed count, no convergence test).

    ``run(centres, relocate)`` -> (final centres, whether any active cluster was ever empty).
    With ``relocate`` the e-th empty cluster of a frame takes the e-th of the block-wise
    farthest points (:func:`_block_farthest`); without, an empty cluster's centre is left
    wrong - callers only keep such a run when no cluster was ever empty, where both agree.
    """

    def __init__(self, x: Tensor, valid: Tensor, k: int, iters: int) -> None:
        s, q, _ = x.shape
        self.x, self.valid, self.k, self.iters = x, valid, k, iters
        self.lab_pad = torch.full((s, q), k, dtype=torch.long, device=x.device)
        self.kf = min(k, q)
        # CUDA float32: the fused Triton Lloyd step (_kmeans_triton); else torch
        self._kernel = _triton_kmeans(x) if USE_TRITON_KMEANS else None
        self.refresh()

    def refresh(self) -> None:
        """Recompute what derives from ``x`` / ``valid`` (after they changed in place)."""
        x, valid = self.x, self.valid
        # frame f uses min(k, #valid_f) centres
        self.active = torch.arange(self.k, device=x.device)[None] < valid.sum(1)[:, None]
        self.w = valid.to(x.dtype)
        if self._kernel is not None:
            self.valid_i8 = valid.to(torch.int8)
            self.penalty = self._kernel.centre_penalty(self.active)
            return
        self.x_aug = torch.cat([x, torch.ones_like(x[..., :1])], -1)      # [S, Q, 4]
        self.x_sq = (x * x).sum(-1)

    def assign(self, c: Tensor) -> Tuple[Tensor, Tensor]:
        """(squared distance to the nearest active centre, its index), both ``[S, Q]``."""
        if self._kernel is not None:
            return self._kernel.lloyd_step(self.x, self.valid_i8, c, self.penalty)[:2]
        # |x−c|² = |x|² + (|c|² − 2 x·c): one bmm [S, Q, k] (TF32 off; inactive -> +inf)
        c_aug = torch.cat([-2.0 * c, (c * c).sum(-1, keepdim=True)], -1).transpose(1, 2)
        with _full_fp32_matmul():
            d = torch.bmm(self.x_aug, c_aug).masked_fill(~self.active[:, None], float("inf"))
        best, lab = d.min(2)
        return best + self.x_sq, lab

    def step(self, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One assignment pass -> (``own [S, Q]`` as :meth:`assign`, per-centre sums of the
        valid points ``[S, k, 3]``, their counts ``[S, k]``)."""
        if self._kernel is not None:      # CUDA: one Triton kernel, deterministic sums
            own, _, sums, counts = self._kernel.lloyd_step(self.x, self.valid_i8, c,
                                                           self.penalty)
            return own, sums, counts
        own, labels = self.assign(c)
        lab = torch.where(self.valid, labels, self.lab_pad)
        # float scatter-add: a one-hot bmm instead (tiny [S, k, 4] output, long reduction)
        # took 39.5 ms for the k-means at Q = 24576 on an H100, ~3x this path; its atomics
        # make the sums' last bits order-dependent (labels only flip on exact near-ties)
        x, k, s = self.x, self.k, self.x.shape[0]
        sums = x.new_zeros(s, k + 1, 3).scatter_add_(1, lab[..., None].expand(-1, -1, 3), x)
        counts = x.new_zeros(s, k + 1).scatter_add_(1, lab, torch.ones_like(self.w))
        return own, sums[:, :k], counts[:, :k]

    def run(self, centres: Tensor, relocate: bool) -> Tuple[Tensor, Tensor]:
        x = self.x
        saw_empty = torch.zeros((), dtype=torch.bool, device=x.device)
        for _ in range(self.iters):
            own, sums, counts = self.step(centres)
            new = sums / counts[..., None].clamp_min(1)
            empty = self.active & (counts == 0)
            if not relocate:
                saw_empty = saw_empty | empty.any()
                centres = new
                continue
            # e-th empty cluster of a frame <- the e-th of kf block-wise farthest points
            far = _block_farthest(own.masked_fill(~self.valid, float("-inf")), self.kf)
            rank = (empty.long().cumsum(1) - 1).clamp(0, self.kf - 1)
            relocated = _gather_points(x, far.gather(1, rank))          # [S, k, 3]
            centres = torch.where(empty[..., None], relocated, new)
        return centres, saw_empty


def _sample_batched(img: Tensor, u: Tensor, v: Tensor, mode: str) -> Tensor:
    """``img [B, C, H, W]`` at pixel coords ``u, v [B, P]`` -> ``[B, C, P]`` (align_corners)."""
    h, w = img.shape[-2:]
    grid = torch.stack([u / (w - 1) * 2 - 1, v / (h - 1) * 2 - 1], dim=-1)[:, None]
    return F.grid_sample(img, grid, mode=mode, align_corners=True)[:, :, 0]


def _dynamic_points(pts: Tensor, colors: Tensor, labels: Tensor, valid: Tensor,
                    k: int, cam_from_world: Tensor, intrinsic: Tensor, depth: Tensor,
                    coarse: Tensor, images: Tensor, cfg: RefineConfig) -> Tensor:
    """Cross-view cluster test of all frames at once -> per-point dynamic flag ``[S, Q]``.

    pts ``[S_t, Q, 3]`` world; colors ``[S_t, Q, 3]``; labels/valid ``[S_t, Q]``;
    cam_from_world ``[S, 4, 4]``; intrinsic ``[S, 3, 3]``; depth ``[S, H, W]`` (NaN where not
    finite); coarse ``[S, H, W]`` bool; images ``[S, 3, H, W]``.
    """
    s, q, _ = pts.shape
    h, w = depth.shape[1:]
    dt = pts.dtype
    rot, trans = cam_from_world[:, :3, :3], cam_from_world[:, :3, 3]
    cam = torch.einsum("aij,tqj->atqi", rot, pts) + trans[:, None, None]   # [S_s, S_t, Q, 3]
    pix = torch.einsum("aij,atqj->atqi", intrinsic, cam)
    z = cam[..., 2]
    u = pix[..., 0] / z
    v = pix[..., 1] / z
    not_self = ~torch.eye(s, dtype=torch.bool, device=pts.device)[:, :, None]  # [S_s, S_t, 1]
    inb = (u > 0) & (u < w) & (v > 0) & (v < h) & (z > 0) & not_self & valid[None]
    u = torch.where(inb, u, torch.zeros_like(u)).reshape(s, s * q)
    v = torch.where(inb, v, torch.zeros_like(v)).reshape(s, s * q)
    d_s = _sample_batched(depth[:, None], u, v, "nearest")[:, 0].reshape(s, s, q)
    m_s = _sample_batched(coarse[:, None].to(dt), u, v, "bilinear")[:, 0].reshape(s, s, q)
    rgb_s = _sample_batched(images, u, v, "bilinear").reshape(s, 3, s, q)     # [S_s, 3, S_t, Q]
    counted = inb & (z - cfg.visibility_margin < d_s) & ~(m_s > 0.5)
    zero = torch.zeros_like(z)
    depth_err = torch.where(counted, (z - d_s).abs(), zero).sum(0)           # [S_t, Q]
    rgb_err = (colors.permute(2, 0, 1)[:, None] - rgb_s.transpose(0, 1)).abs().sum(0)
    rgb_err = torch.where(counted, rgb_err, zero).sum(0)                    # [S_t, Q]
    n_counted = counted.to(dt).sum(0)                                        # [S_t, Q]
    lab = torch.where(valid, labels, torch.full_like(labels, k))
    per = torch.stack([n_counted, depth_err, rgb_err, valid.to(dt)], 1)      # [S_t, 4, Q]
    sums = pts.new_zeros(s, 4, k + 1).scatter_add_(2, lab[:, None].expand(-1, 4, -1), per)
    cnt, dl, rl, size = sums[..., :k].unbind(1)                              # [S_t, k] each
    too_few = cnt < cfg.min_valid_fraction * (s - 1) * size
    denom = cnt.clamp_min(1)
    residual = dl / denom + (rl / denom) / 3
    dyn = too_few | (residual > cfg.residual_threshold)                      # [S_t, k]
    return dyn.gather(1, labels.clamp_max(k - 1)) & valid


# ------------------------------------------------------------------------- entry points
@dataclass
class RefinePrep:
    """Pose-free half of the batched refinement (:func:`prepare_refine_fast`).

    Statistical outlier removal and k-means only see distances between the points of one
    frame, which a rigid camera-to-world transform leaves unchanged; they therefore run on
    camera-frame clouds before the pass-2 poses exist (the pipeline overlaps them with pass 2)
    and :func:`finish_refine_fast` applies the poses. Tensors are on the input device.
    """

    cfg: RefineConfig
    shape: Tuple[int, int, int]          # S, H, W
    dtype: torch.dtype
    depth: Tensor                        # [S, H, W] working dtype (NaN where not finite)
    intrinsic: Tensor                    # [S, 3, 3]
    images: Tensor                       # [S, 3, H, W]
    coarse: Tensor                       # [S, H, W] bool
    cam_points: Optional[Tensor] = None  # [S, Q, 3] camera frame (queries; None: no query)
    idx: Optional[Tensor] = None         # [S, Q] pixel index of each query
    inliers: Optional[Tensor] = None     # [S, Q] bool
    labels: Optional[Tensor] = None      # [S, Q] int64 cluster of each query
    colors: Optional[Tensor] = None      # [S, Q, 3]
    single_frame: bool = False


def prepare_refine_fast(depth: Tensor, intrinsic: Tensor, coarse: Tensor, images: Tensor,
                        cfg: Optional[RefineConfig] = None, *,
                        ref_points: int = REF_POINTS,
                        stats_points: Optional[int] = STATS_POINTS,
                        kmeans_iters: int = KMEANS_ITERS,
                        dtype: Optional[torch.dtype] = None) -> RefinePrep:
    """Outlier removal + per-frame k-means on camera-frame clouds (no pose needed).

    Arguments as :func:`refine_dynamic_mask_fast` without ``cam_to_world``. Holds the module's
    one host synchronisation (the padded query size).
    """
    cfg = cfg or RefineConfig()
    s, h, w = check_refine_inputs(depth, intrinsic, None, coarse, images)
    dev = depth.device
    coarse = coarse.to(dev).bool()
    dt = dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    depth = depth.to(dt)
    intr = intrinsic.to(dev, dt)
    imgs = images.to(dev, dt)
    depth_safe = torch.where(torch.isfinite(depth), depth, torch.full_like(depth, float("nan")))
    prep = RefinePrep(cfg, (s, h, w), dt, depth_safe, intr, imgs, coarse)
    if s == 1:
        prep.single_frame = True
        return prep
    n = h * w
    eye = torch.eye(4, dtype=dt, device=dev).expand(s, 4, 4)
    cam = depth_to_world_points(depth, intr, eye, pixel_offset=cfg.pixel_offset)
    cam = cam.reshape(s, n, 3)                         # camera frame: identity pose
    finite = torch.isfinite(cam).all(-1) & torch.isfinite(depth).reshape(s, n)
    eligible = finite & coarse.reshape(s, n)
    # the single host sync: padded query size (+ the warning's count)
    q, n_bad = torch.stack([eligible.sum(1).max(), (~finite).sum()]).tolist()
    if n_bad:
        warnings.warn(f"{n_bad} pixels with non-finite depth/points are "
                      "treated as static in mask refinement", RuntimeWarning, stacklevel=2)
    if q == 0:
        return prep
    graphs = cfg.cuda_graphs and cuda_graph.usable(depth)
    if graphs:
        q = query_bucket(q, n)        # few distinct shapes: the k-means CUDA graph is reused
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    # eligible pixels first (stable: row-major order), padded to q per frame
    idx = torch.sort((~eligible).to(torch.uint8), dim=1, stable=True).indices[:, :q]
    q_ok = eligible.gather(1, idx)
    inl = batched_statistical_inliers(cam, finite, idx, q_ok, cfg.outlier_neighbors,
                                      cfg.outlier_std_ratio, ref_points, stats_points, gen)
    pts = _gather_points(cam, idx).masked_fill(~inl[..., None], 0.0)
    centre = pts.sum(1, keepdim=True) / inl.sum(1).clamp_min(1)[:, None, None].to(dt)
    labels, _ = batched_kmeans(pts - centre, inl, cfg.num_clusters, gen, kmeans_iters,
                               cuda_graphs=graphs)
    prep.cam_points, prep.idx, prep.inliers, prep.labels = pts, idx, inl, labels
    prep.colors = imgs.reshape(s, 3, n).gather(2, idx[:, None].expand(-1, 3, -1)).transpose(1, 2)
    return prep


def finish_refine_fast(prep: RefinePrep, cam_to_world: Tensor) -> Tensor:
    """Cross-view residual test with the poses, pixel scatter and morphology -> ``[S, H, W]``.

    ``cam_to_world`` ``[S, 4, 4]`` or ``[S, 3, 4]`` world-from-camera (pass-2 poses). No host
    synchronisation. Frames whose pose is not finite keep no dynamic pixel.
    """
    cfg = prep.cfg
    s, h, w = prep.shape
    if cam_to_world.shape[0] != s:
        raise ValueError("intrinsic must be [S,3,3] and cam_to_world [S,4,4] or [S,3,4]")
    if prep.single_frame:
        warnings.warn("mask refinement needs >= 2 frames; returning the coarse mask",
                      RuntimeWarning, stacklevel=2)
        return prep.coarse.clone()
    dev, dt = prep.depth.device, prep.dtype
    c2w = cam_to_world.to(dev, dt)
    if c2w.shape[1:] == (3, 4):           # bottom row built on the device (no host copy)
        c2w = torch.cat([c2w, F.pad(torch.zeros_like(c2w[:, :1, :3]), (0, 1), value=1.0)], 1)
    ell = ellipse_kernel(cfg.close_kernel).to(dev)
    square = torch.ones(cfg.dilate_kernel, cfg.dilate_kernel, dtype=torch.bool, device=dev)
    if prep.idx is None:
        raw = torch.zeros(s, h, w, dtype=torch.bool, device=dev)
    else:
        w2c = torch.linalg.inv_ex(c2w).inverse          # inv_ex: no error check -> no sync
        pose_ok = torch.isfinite(w2c).all(-1).all(-1)    # [S]
        inl = prep.inliers & pose_ok[:, None]
        rot, trans = w2c[:, :3, :3], w2c[:, :3, 3]
        # X_world = R^T (X_cam - t), as depth_to_world_points
        pts = torch.einsum("sji,sqj->sqi", rot, prep.cam_points - trans[:, None])
        pts = pts.masked_fill(~inl[..., None], 0.0)
        dyn = _dynamic_points(pts, prep.colors, prep.labels, inl, cfg.num_clusters,
                              w2c, prep.intrinsic, prep.depth, prep.coarse, prep.images, cfg)
        raw = torch.zeros(s, h * w, dtype=torch.bool, device=dev).scatter_(1, prep.idx, dyn)
        raw = raw.reshape(s, h, w)
    if cfg.boundary_sharpening:
        raw = boundary_sharpen(raw, prep.depth, prep.intrinsic, c2w, prep.images, cfg)
    # = refine.morphology_close_dilate, with the kernels already on the device
    return _dilate(_erode(_dilate(raw, ell), ell), square)


def refine_dynamic_mask_fast(depth: Tensor, intrinsic: Tensor, cam_to_world: Tensor,
                             coarse: Tensor, images: Tensor,
                             cfg: Optional[RefineConfig] = None, *,
                             ref_points: int = REF_POINTS,
                             stats_points: Optional[int] = STATS_POINTS,
                             kmeans_iters: int = KMEANS_ITERS,
                             dtype: Optional[torch.dtype] = None) -> Tensor:
    """Refined dynamic mask ``[S, H, W]`` bool, batched over frames (see module docstring).

    Arguments as :func:`vggt4d_ros.dynamic.refine.refine_dynamic_mask`; ``ref_points`` is
    the per-frame kNN reference subsample, ``stats_points`` the per-frame sample for the
    outlier statistics (``None`` = all points), ``kmeans_iters`` the fixed Lloyd count and
    ``dtype`` the working precision (default float64 on CPU, float32 elsewhere).
    = :func:`finish_refine_fast` (:func:`prepare_refine_fast` (...), ``cam_to_world``).
    """
    check_refine_inputs(depth, intrinsic, cam_to_world, coarse, images)
    prep = prepare_refine_fast(depth, intrinsic, coarse, images, cfg, ref_points=ref_points,
                               stats_points=stats_points, kmeans_iters=kmeans_iters,
                               dtype=dtype)
    return finish_refine_fast(prep, cam_to_world)
