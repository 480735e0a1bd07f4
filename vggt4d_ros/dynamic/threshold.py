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

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

OTSU_CLASSES: Tuple[int, ...] = (2, 3, 4)
OTSU_BINS = 256


def upsample_map(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) ``[S, h, w]`` -> ``[S, H, W]`` float32."""
    if x.dim() != 3:
        raise ValueError(f"expected [S, h, w], got {tuple(x.shape)}")
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def _class_score(values: Tensor, thresholds: Tensor) -> float:
    """Population variance of the class means / sqrt(n) (empty classes are skipped)."""
    cls = torch.bucketize(values, thresholds, right=True)  # == np.digitize(values, thr)
    n = thresholds.numel() + 1
    counts = torch.bincount(cls, minlength=n).double()
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(
        0, cls, values.double())
    means = sums[counts > 0] / counts[counts > 0]
    return float(means.var(unbiased=False) / np.sqrt(n))


def multiotsu_reference(values: np.ndarray, classes: int, nbins: int = OTSU_BINS) -> np.ndarray:
    """scikit-image multi-Otsu thresholds (``classes - 1`` ascending floats)."""
    from skimage.filters import threshold_multiotsu  # lazy: optional heavy import

    return np.asarray(threshold_multiotsu(values, classes=classes, nbins=nbins))


def multiotsu_torch(values: Tensor, classes: int, nbins: int = OTSU_BINS) -> Tensor:
    """Multi-Otsu thresholds ``[classes-1]`` from a torch histogram, exact DP over bins.

    Histogram: ``nbins`` equal bins over ``[min, max]``; thresholds are bin centres of the last
    bin of each lower class (scikit-image convention). Maximises ``Σ_k w_k μ_k²`` (equivalent
    to the between-class variance) over all contiguous partitions with non-empty bin ranges.
    """
    v = values.reshape(-1).float()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        raise ValueError("multi-Otsu needs at least two distinct values")
    hist = torch.histc(v, bins=nbins, min=lo, max=hi).double()
    p = hist / hist.sum()
    idx = torch.arange(nbins, dtype=torch.float64, device=v.device)
    c0 = torch.cat([p.new_zeros(1), p.cumsum(0)])            # [nbins+1] prefix weights
    c1 = torch.cat([p.new_zeros(1), (p * idx).cumsum(0)])    # prefix first moments
    # cost[a, b] for the half-open bin range [a, b): (Σ p x)^2 / Σ p
    w = c0[None, :] - c0[:, None]
    m = c1[None, :] - c1[:, None]
    cost = torch.where(w > 1e-15, m * m / w.clamp_min(1e-15), torch.zeros_like(w))
    invalid = torch.ones_like(cost, dtype=torch.bool).triu(1).logical_not()  # need a < b
    cost = cost.masked_fill(invalid, float("-inf"))
    best = cost[0].clone()                                   # one class covering [0, b)
    back = []
    for _ in range(classes - 1):
        total = best[:, None] + cost                         # [a, b]
        best, arg = total.max(dim=0)
        back.append(arg)
    # backtrack from b = nbins
    cuts = []
    b = nbins
    for arg in reversed(back):
        a = int(arg[b])
        cuts.append(a)
        b = a
    cuts = sorted(cuts)
    centres = lo + (torch.arange(nbins, device=v.device, dtype=torch.float64) + 0.5) \
        * (hi - lo) / nbins
    return centres[torch.tensor(cuts, device=v.device) - 1].float()


def adaptive_threshold(values: Tensor, classes: Sequence[int] = OTSU_CLASSES,
                       nbins: int = OTSU_BINS, backend: str = "reference") -> float:
    """Spec §4 adaptive threshold over all pixels of ``values`` (any shape).

    Returns the highest threshold of the best-scoring class count. A constant map has no
    threshold: returns +inf (nothing is dynamic).
    """
    v = values.reshape(-1).float()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError("threshold input must be non-empty and finite")
    if float(v.max()) <= float(v.min()):
        return float("inf")
    best_score, best_thr = -np.inf, float("inf")
    v_np = v.detach().cpu().numpy() if backend == "reference" else None
    for n in classes:
        if backend == "reference":
            try:
                thr = torch.from_numpy(multiotsu_reference(v_np, n, nbins)).to(v.device).float()
            except ValueError:  # fewer distinct histogram values than classes
                continue
        elif backend == "fast":
            thr = multiotsu_torch(v, n, nbins)
        else:
            raise ValueError(f"threshold backend must be 'reference' or 'fast', got {backend!r}")
        score = _class_score(v, thr)
        if score > best_score:
            best_score, best_thr = score, float(thr.max())
    return best_thr
