"""Feature-clustered dynamic map (VGGT4D spec §3).

Encoder features ``F`` (DINOv2 normalised patch tokens of pass 1, all frames flattened) are
clustered with k-means (k = 64, seed 42); every token takes the mean saliency of its cluster;
the result is min-max normalised per frame.

Two backends:

* ``"reference"`` - scikit-learn ``KMeans(n_clusters=k, random_state=seed)`` with its defaults
  (k-means++, ``n_init="auto"`` = 1 run, ``max_iter=300``, ``tol=1e-4``). Reproduces the golden
  labels exactly. Runs on the host (one device->host copy of ``[S·N, C]`` features).
* ``"fast"`` - :func:`kmeans_torch`: greedy k-means++ seeding and Lloyd iterations in torch,
  seeded, on the features' device (GPU when available). Different random stream than
  scikit-learn, so labels differ; the coarse mask agrees to the IoU measured in the tests.

Degenerate input: fewer tokens than clusters -> k is reduced to the number of tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .saliency import minmax_normalize

NUM_FEATURE_CLUSTERS = 64
KMEANS_SEED = 42


def kmeans_reference(points: np.ndarray, k: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """scikit-learn k-means labels ``[M]`` int64 of ``points [M, C]`` (golden-equivalent)."""
    from sklearn.cluster import KMeans  # lazy: optional heavy import

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"expected points [M>0, C], got {points.shape}")
    k = min(k, points.shape[0])
    km = KMeans(n_clusters=k, random_state=seed).fit(points)
    return km.labels_.astype(np.int64)


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances ``[M, K]`` between ``x [M, C]`` and ``c [K, C]`` (>= 0)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None]
    return d.clamp_min_(0.0)


def kmeans_plusplus_torch(x: Tensor, k: int, generator: torch.Generator,
                          n_local_trials: Optional[int] = None) -> Tensor:
    """Greedy k-means++ seeding: centres ``[k, C]`` chosen among the rows of ``x [M, C]``.

    Each step samples ``2 + ln k`` candidates proportionally to the current squared distance
    and keeps the one that lowers the potential most (the greedy variant of Arthur &
    Vassilvitskii that scikit-learn also uses).
    """
    m = x.shape[0]
    trials = n_local_trials or (2 + int(math.log(k)))
    first = torch.randint(m, (1,), generator=generator, device=generator.device)
    centres = [x[first]]
    closest = _sq_dists(x, centres[0]).squeeze(1)
    for _ in range(1, k):
        pot = closest.sum()
        if not torch.isfinite(pot) or pot <= 0:
            # all remaining points coincide with a centre: take any (distinct index) point
            cand = torch.randint(m, (trials,), generator=generator, device=generator.device)
        else:
            cand = torch.multinomial(closest / pot, trials, replacement=True,
                                     generator=generator)
        d_cand = torch.minimum(_sq_dists(x, x[cand]), closest[:, None])  # [M, trials]
        best = torch.argmin(d_cand.sum(0))
        centres.append(x[cand[best]][None])
        closest = d_cand[:, best]
    return torch.cat(centres, 0)


def kmeans_torch(x: Tensor, k: int, seed: int = KMEANS_SEED, max_iter: int = 300,
                 tol: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """Lloyd k-means on ``x [M, C]`` (on x's device, fp32) -> ``(labels [M], centres [k, C])``.

    ``tol`` is relative to the mean feature variance, as in scikit-learn. Empty clusters are
    re-seeded with the point farthest from its centre.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected points [M>0, C], got {tuple(x.shape)}")
    x = x.float()
    k = min(k, x.shape[0])
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    centres = kmeans_plusplus_torch(x, k, gen)
    abs_tol = tol * x.var(dim=0).mean()
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        d = _sq_dists(x, centres)
        labels = d.argmin(1)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if bool(empty.any()):
            far = d.gather(1, labels[:, None]).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = ((new - centres) ** 2).sum()
        centres = new
        if shift <= abs_tol:
            break
    labels = _sq_dists(x, centres).argmin(1)
    return labels, centres


def cluster_features(features: Tensor, k: int = NUM_FEATURE_CLUSTERS, seed: int = KMEANS_SEED,
                     backend: str = "reference") -> Tensor:
    """Cluster labels of encoder features.

    Args:
        features: ``[S, N, C]`` (or ``[M, C]``) patch-token features.
        backend: ``"reference"`` (scikit-learn) or ``"fast"`` (torch, on the device).
    Returns:
        int64 labels with the leading shape of ``features`` (``[S, N]``), on its device.
    """
    lead = features.shape[:-1]
    flat = features.reshape(-1, features.shape[-1])
    if backend == "reference":
        lab = kmeans_reference(flat.detach().float().cpu().numpy(), k, seed)
        labels = torch.from_numpy(lab).to(features.device)
    elif backend == "fast":
        labels, _ = kmeans_torch(flat.detach(), k, seed)
    else:
        raise ValueError(f"cluster backend must be 'reference' or 'fast', got {backend!r}")
    return labels.reshape(lead)


def cluster_mean_map(saliency: Tensor, labels: Tensor) -> Tensor:
    """Replace every token's saliency by its cluster's mean, then min-max per frame.

    Args:
        saliency: ``[S, h, w]`` (or ``[S, N]``) dynamic map.
        labels: int64 cluster labels, same shape (labels shared across frames).
    Returns:
        ``[S, h, w]`` float32 in [0, 1].
    """
    if saliency.shape != labels.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape")
    flat_lab = labels.reshape(-1).long()
    flat_sal = saliency.reshape(-1).float()
    k = int(flat_lab.max()) + 1
    sums = torch.zeros(k, dtype=flat_sal.dtype, device=flat_sal.device).index_add_(
        0, flat_lab, flat_sal)
    counts = torch.bincount(flat_lab, minlength=k).to(flat_sal.dtype)
    means = sums / counts.clamp_min(1)
    per_token = means[flat_lab].reshape(saliency.shape)
    return minmax_normalize(per_token, dims=tuple(range(1, saliency.dim())))
