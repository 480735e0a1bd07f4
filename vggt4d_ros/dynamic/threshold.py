"""Upsampling and adaptive multi-Otsu threshold of the clustered map (VGGT4D spec §4).

The ``[S, h, w]`` map is upsampled bilinearly (align_corners False) to ``[S, H, W]``. For
n = 2, 3, 4 classes the multi-Otsu thresholds (256-bin histogram of ALL pixels of all frames)
split the pixels into classes (``digitize``); the score is the population variance of the
class means divided by ``sqrt(n)``; the best-scoring n wins and its highest threshold is the
threshold. ``M0 = map > threshold``.

Backends: ``"reference"`` uses scikit-image ``threshold_multiotsu`` on the host (golden
equivalent); ``"fast"`` builds the histogram with torch on the map's device and finds the
optimal thresholds by exact dynamic programming over the histogram bins (same objective:
maximum between-class variance), so it differs only on numerical near-ties.
"""
from __future__ import annotations

import math
import threading
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_graph

OTSU_CLASSES: Tuple[int, ...] = (2, 3, 4)
OTSU_BINS = 256


def upsample_map(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) ``[S, h, w]`` -> ``[S, H, W]`` float32."""
    if x.dim() != 3:
        raise ValueError(f"expected [S, h, w], got {tuple(x.shape)}")
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def _class_score(values: Tensor, thresholds: Tensor) -> Tensor:
    """Population variance of the class means / sqrt(n) (empty classes are skipped).

    ``values`` [M] float, ``thresholds`` [n-1] ascending. A value v is in class
    ``#{t <= v}`` (= ``np.digitize(values, thresholds)``). Returns a 0-dim float64 tensor on
    the values' device; no host synchronisation (per-class masked sums, no atomics).
    """
    n = thresholds.numel() + 1
    cls = (values[:, None] >= thresholds[None, :]).sum(1)
    v64 = values.double()
    zero = torch.zeros((), dtype=torch.float64, device=values.device)
    counts = torch.stack([(cls == c).sum() for c in range(n)]).double()
    sums = torch.stack([torch.where(cls == c, v64, zero).sum() for c in range(n)])
    present = counts > 0
    means = sums / counts.clamp_min(1)
    k = present.sum().double()
    centre = torch.where(present, means, zero).sum() / k
    var = torch.where(present, (means - centre) ** 2, zero).sum() / k
    return var / math.sqrt(n)


def multiotsu_reference(values: np.ndarray, classes: int, nbins: int = OTSU_BINS) -> np.ndarray:
    """scikit-image multi-Otsu thresholds (``classes - 1`` ascending floats)."""
    from skimage.filters import threshold_multiotsu  # lazy: optional heavy import

    return np.asarray(threshold_multiotsu(values, classes=classes, nbins=nbins))


def _histogram(v: Tensor, lo: Tensor, hi: Tensor, nbins: int) -> Tensor:
    """``nbins`` equal-width bin counts of ``v`` over ``[lo, hi]`` (0-dim tensors, no sync),
    the last bin closed (``np.histogram`` / ``torch.histc`` convention). float64 ``[nbins]``."""
    width = (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)
    idx = ((v - lo) / width * nbins).floor().long().clamp_(0, nbins - 1)
    # integer scatter-add, not bincount: bincount sizes its output from max(idx), which it
    # reads on the host on CUDA; integer sums are exact and order-independent
    return torch.zeros(nbins, dtype=torch.long, device=v.device).scatter_add_(
        0, idx, torch.ones_like(idx)).double()


def _multiotsu_cuts(hist: Tensor, classes: Sequence[int]) -> List[Tensor]:
    """Optimal multi-Otsu cuts for every class count, one dynamic programme over bins.

    Maximises ``Σ_k w_k μ_k²`` (= the between-class variance) over all contiguous partitions
    of the bins into non-empty bin ranges. Returns, per entry of ``classes``, the ``n-1``
    ascending cut positions (the first bin of each upper class) as a long tensor; no host
    synchronisation (back-tracking by ``gather``: indexing by a 0-dim device tensor may read
    it on the host).
    """
    nbins = hist.numel()
    p = hist / hist.sum().clamp_min(1)
    idx = torch.arange(nbins, dtype=torch.float64, device=hist.device)
    c0 = torch.cat([p.new_zeros(1), p.cumsum(0)])            # [nbins+1] prefix weights
    c1 = torch.cat([p.new_zeros(1), (p * idx).cumsum(0)])    # prefix first moments
    # cost[a, b] for the half-open bin range [a, b): (Σ p x)^2 / Σ p
    w = c0[None, :] - c0[:, None]
    m = c1[None, :] - c1[:, None]
    cost = torch.where(w > 1e-15, m * m / w.clamp_min(1e-15), torch.zeros_like(w))
    invalid = torch.ones_like(cost, dtype=torch.bool).triu(1).logical_not()  # need a < b
    cost = cost.masked_fill(invalid, float("-inf"))
    best = cost[0].clone()                                   # one class covering [0, b)
    back: List[Tensor] = []
    for _ in range(max(classes) - 1):
        total = best[:, None] + cost                         # [a, b]
        best, arg = total.max(dim=0)
        back.append(arg)
    out = []
    for n in classes:
        b = torch.full((1,), nbins, dtype=torch.long, device=hist.device)
        cuts = []
        for arg in reversed(back[:n - 1]):
            b = arg.gather(0, b)
            cuts.append(b)
        out.append(torch.cat(cuts[::-1]) if cuts else b.new_zeros(0))
    return out


def _multiotsu_thresholds(v: Tensor, lo: Tensor, hi: Tensor, classes: Sequence[int],
                          nbins: int) -> List[Tensor]:
    """Per entry of ``classes``, the ``n-1`` multi-Otsu thresholds (float32, ascending) of
    ``v`` over its range ``[lo, hi]``: bin centres of the last bin of each lower class
    (scikit-image convention). No host synchronisation."""
    i = torch.arange(nbins, dtype=torch.float64, device=lo.device)
    centres = lo.double() + (i + 0.5) * (hi.double() - lo.double()) / nbins
    return [centres[cuts - 1].float()
            for cuts in _multiotsu_cuts(_histogram(v, lo, hi, nbins), classes)]


def multiotsu_torch(values: Tensor, classes: int, nbins: int = OTSU_BINS) -> Tensor:
    """Multi-Otsu thresholds ``[classes-1]`` from a torch histogram, exact DP over bins.

    Histogram: ``nbins`` equal bins over ``[min, max]``; thresholds are bin centres of the last
    bin of each lower class (scikit-image convention). Raises ValueError on a constant input.
    """
    v = values.reshape(-1).float()
    lo, hi = torch.aminmax(v)
    if not float(hi) > float(lo):
        raise ValueError("multi-Otsu needs at least two distinct values")
    return _multiotsu_thresholds(v, lo, hi, (classes,), nbins)[0]


def adaptive_threshold(values: Tensor, classes: Sequence[int] = OTSU_CLASSES,
                       nbins: int = OTSU_BINS, backend: str = "reference",
                       as_tensor: bool = False) -> Union[float, Tensor]:
    """Spec §4 adaptive threshold over all pixels of ``values`` (any shape).

    Returns the highest threshold of the best-scoring class count (ties: the smaller count).
    A constant map has no threshold: +inf (nothing is dynamic). ``as_tensor`` returns a 0-dim
    float32 tensor on the values' device instead of a float; with ``backend="fast"`` the whole
    computation then runs without a host synchronisation (input validation included: a
    non-finite input gives a NaN threshold instead of the ValueError of the float form).
    """
    if backend not in ("reference", "fast"):
        raise ValueError(f"threshold backend must be 'reference' or 'fast', got {backend!r}")
    v = values.reshape(-1).float()
    if v.numel() == 0:
        raise ValueError("threshold input must be non-empty and finite")
    if backend == "fast":
        thr = _adaptive_threshold_fast(v, tuple(classes), nbins)
        if as_tensor:
            return thr
        if not bool(torch.isfinite(v).all()):
            raise ValueError("threshold input must be non-empty and finite")
        return float(thr)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("threshold input must be non-empty and finite")
    best_score, best_thr = -np.inf, float("inf")
    if float(v.max()) > float(v.min()):
        v_np = v.detach().cpu().numpy()
        for n in classes:
            try:
                thr = torch.from_numpy(multiotsu_reference(v_np, n, nbins)).to(v.device).float()
            except ValueError:  # fewer distinct histogram values than classes
                continue
            score = float(_class_score(v, thr))
            if score > best_score:
                best_score, best_thr = score, float(thr.max())
    return torch.tensor(best_thr, device=v.device) if as_tensor else best_thr


def _adaptive_threshold_fast(v: Tensor, classes: Tuple[int, ...], nbins: int) -> Tensor:
    """Sync-free fast backend of :func:`adaptive_threshold` (0-dim float32 tensor)."""
    lo, hi = torch.aminmax(v)
    thresholds = _multiotsu_thresholds(v, lo, hi, classes, nbins)
    scores = torch.stack([_class_score(v, t) for t in thresholds])
    tops = torch.stack([t.max() for t in thresholds])
    best = tops.gather(0, scores.argmax().view(1))[0]                    # first max wins
    bad = ~torch.isfinite(v).all()
    return torch.where(hi > lo, best, torch.full_like(best, float("inf"))).masked_fill(
        bad, float("nan"))


# --------------------------------------------------------------------------- coarse mask M0
def coarse_mask(saliency: Tensor, labels: Tensor, size: Tuple[int, int], num_clusters: int,
                classes: Sequence[int] = OTSU_CLASSES, nbins: int = OTSU_BINS,
                backend: str = "reference", cuda_graphs: bool = False) -> Tuple[Tensor, Tensor]:
    """Spec §3-4 after the clustering: cluster-mean map, bilinear upsampling to ``size`` and
    the adaptive threshold -> ``(threshold 0-dim float32, M0 [S, H, W] bool)``.

    ``saliency`` ``[S, h, w]`` float; ``labels`` ``[S, h, w]`` int64, all ``< num_clusters``.
    With ``backend="fast"`` nothing is read on the host; on CUDA with ``cuda_graphs`` the whole
    stage (~260 small kernels) is one cached CUDA-graph replay per window shape.
    """
    args = (size, num_clusters, tuple(classes), nbins, backend)
    if cuda_graphs and backend == "fast" and cuda_graph.usable(saliency):
        key = (tuple(saliency.shape), saliency.dtype, *args, saliency.device.index)
        graph = _coarse_graphs.get(key, lambda: _CoarseMaskGraph(saliency, labels, *args))
        if graph is not None:
            return graph.run(saliency, labels)
    return _coarse_mask(saliency, labels, *args)


def _coarse_mask(saliency: Tensor, labels: Tensor, size: Tuple[int, int], num_clusters: int,
                 classes: Tuple[int, ...], nbins: int, backend: str) -> Tuple[Tensor, Tensor]:
    from .cluster import cluster_mean_map
    up = upsample_map(cluster_mean_map(saliency, labels, num_clusters), size)
    thr = torch.as_tensor(adaptive_threshold(up, classes, nbins, backend=backend,
                                             as_tensor=True), device=up.device)
    return thr, up > thr


class _CoarseMaskGraph:
    """:func:`_coarse_mask` (fast backend) captured over static buffers of one shape."""

    def __init__(self, saliency: Tensor, labels: Tensor, *args) -> None:
        self.lock = threading.Lock()
        self.saliency = torch.zeros_like(saliency)
        self.labels = torch.zeros_like(labels)
        self.thr, self.mask = _coarse_mask(self.saliency, self.labels, *args)   # shapes

        def body() -> None:
            thr, mask = _coarse_mask(self.saliency, self.labels, *args)
            self.thr.copy_(thr)
            self.mask.copy_(mask)
        self.replay = cuda_graph.capture(body, saliency.device)

    def run(self, saliency: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        with self.lock:
            self.saliency.copy_(saliency)
            self.labels.copy_(labels)
            self.replay()
            return self.thr.clone(), self.mask.clone()


_coarse_graphs: "cuda_graph.GraphCache[_CoarseMaskGraph]" = \
    cuda_graph.GraphCache(2, "coarse_mask")
