"""Feature-clustered dynamic map (VGGT4D spec §3).

Encoder features ``F`` (DINOv2 normalised patch tokens of pass 1, all frames flattened) are
clustered with k-means (k = 64, seed 42); every token takes the mean saliency of its cluster;
the result is min-max normalised per frame.

Two backends:

* ``"reference"`` - scikit-learn ``KMeans(n_clusters=k, random_state=seed)`` with its defaults
  (k-means++, ``n_init="auto"`` = 1 run, ``max_iter=300``, ``tol=1e-4``). Reproduces the golden
  labels exactly. Runs on the host (one device->host copy of ``[S·N, C]`` features).
* ``"fast"`` - :func:`kmeans_torch`: the same algorithm and random stream as scikit-learn
  (greedy k-means++ with numpy ``RandomState(seed)`` draws, Lloyd), computed in torch on the
  features' device (GPU when available) in float64; labels equal scikit-learn's unless float
  rounding flips a near-tie (equal on the golden features and every test case).

Degenerate input: fewer tokens than clusters -> k is reduced to the number of tokens.
"""
from __future__ import annotations

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


def _sq_dists(x: Tensor, c: Tensor, x_sq: Optional[Tensor] = None) -> Tensor:
    """Squared Euclidean distances ``[M, K]`` (float64) between ``x [M, C]`` and ``c [K, C]``
    (both float64; ``x_sq`` = precomputed ``|x|²`` per row)."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = x_sq[:, None] - (x @ c.T) * 2.0 + (c * c).sum(1)[None]
    return d.clamp_min_(0.0)


def kmeans_plusplus_torch(x: Tensor, k: int, rng: np.random.RandomState,
                          n_local_trials: Optional[int] = None,
                          x_sq: Optional[Tensor] = None,
                          host_dtype: Optional[np.dtype] = None) -> Tensor:
    """Greedy k-means++ seeding -> indices ``[k]`` of the chosen rows of ``x [M, C]``.

    The first centre is ``rng.choice(M)`` (uniform weights); every further step draws
    ``2 + ln k`` candidates with probability proportional to the squared distance to the
    closest centre (inverse CDF of the running potential) and keeps the candidate that lowers
    the potential most. Random numbers come from the numpy ``RandomState`` (drawn up front: the
    same stream as one draw per step) and the cumulative sum is taken on the host in
    ``host_dtype`` (the input precision, default float32 unless x is float64 without one), so
    the draws are those scikit-learn makes for the same seed; distances are computed in
    float64 on ``x``'s device. One small device->host copy per step (the running distances).
    """
    m = x.shape[0]
    if host_dtype is None:
        host_dtype = np.float64 if x.dtype == torch.float64 else np.float32
    x = x.double()
    if x_sq is None:
        x_sq = (x * x).sum(1)
    trials = n_local_trials or (2 + int(np.log(k)))
    weights = np.ones(m, dtype=host_dtype)
    first = int(rng.choice(m, p=weights / weights.sum()))
    uniforms = rng.uniform(size=(max(k - 1, 0), trials))
    closest = _sq_dists(x, x[first:first + 1], x_sq)[:, 0]
    # device state [M + 1]: running closest distances, then the potential (one copy per step)
    state = torch.cat([closest, closest.sum()[None]])
    chosen = [torch.tensor(first, device=x.device)]
    for step in range(1, k):
        host = state.cpu().numpy()                            # the step's one host sync
        draws = uniforms[step - 1] * float(host[m])
        cand = np.minimum(np.searchsorted(np.cumsum(host[:m].astype(host_dtype)), draws), m - 1)
        cand_t = torch.from_numpy(cand).to(x.device, non_blocking=True)
        d_cand = torch.minimum(_sq_dists(x, x[cand_t], x_sq), state[:m, None])   # [M, T]
        pots = d_cand.sum(0)                                            # [trials]
        best = torch.argmin(pots)
        state = torch.cat([d_cand[:, best], pots[best, None]])
        chosen.append(cand_t[best])
    return torch.stack(chosen)


def _relocate_empty(x: Tensor, labels: Tensor, dist: Tensor, sums: Tensor,
                    counts: Tensor) -> None:
    """Empty clusters take the points farthest from their centre, in place (rare path)."""
    empty = torch.nonzero(counts == 0).flatten()
    own = dist.gather(1, labels[:, None]).squeeze(1)
    far = torch.argsort(own, descending=True)[:empty.numel()]
    for e, p in zip(empty.tolist(), far.tolist()):
        old = int(labels[p])
        sums[old] -= x[p]
        counts[old] -= 1
        sums[e] = x[p]
        counts[e] = 1


def kmeans_torch(x: Tensor, k: int, seed: int = KMEANS_SEED, max_iter: int = 300,
                 tol: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """k-means on ``x [M, C]`` in torch on x's device -> ``(labels [M], centres [k, C])``.

    Same algorithm and random stream as scikit-learn's ``KMeans(k, random_state=seed)``
    (defaults: data centred, greedy k-means++, one run, Lloyd until the labels stop changing or
    the squared centre shift <= ``tol`` × mean feature variance, then a final assignment), with
    distances and centres in float64. Labels therefore equal scikit-learn's except where float
    rounding flips a near-tie (none in the tests). Centres are returned in x's dtype.

    Cost: cluster sums are one matrix product with the one-hot assignment (deterministic, no
    atomics); each Lloyd iteration reads its stopping tests (strict convergence, the previous
    centre shift, empty clusters) in ONE small device->host copy.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected points [M>0, C], got {tuple(x.shape)}")
    in_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    host_dtype = np.float64 if in_dtype == torch.float64 else np.float32
    x = x.to(in_dtype)
    abs_tol = x.var(dim=0, unbiased=False).mean().double() * tol
    x = (x - x.mean(dim=0)).double()              # centred, as scikit-learn does
    m = x.shape[0]
    k = min(k, m)
    x_sq = (x * x).sum(1)
    rng = np.random.RandomState(seed)
    centres = x[kmeans_plusplus_torch(x, k, rng, x_sq=x_sq, host_dtype=host_dtype)]
    previous: Optional[Tensor] = None
    shift = torch.full((), float("inf"), dtype=torch.float64, device=x.device)
    rows = torch.arange(k, device=x.device)[:, None]
    labels = torch.zeros(m, dtype=torch.long, device=x.device)
    for it in range(max_iter + 1):
        dist = _sq_dists(x, centres, x_sq)
        labels = dist.argmin(1)
        onehot = (rows == labels[None]).double()                        # [k, M]
        counts = onehot.sum(1)
        same = ((labels == previous).all() if previous is not None
                else torch.zeros((), dtype=torch.bool, device=x.device))
        flags = torch.stack([shift <= abs_tol, same, (counts == 0).any()]).tolist()
        if flags[0] or flags[1] or it == max_iter:
            break                     # shift: labels of the new centres; same: converged
        sums = onehot @ x
        if flags[2]:
            _relocate_empty(x, labels, dist, sums, counts)
        new = sums / counts.clamp_min(1)[:, None]
        shift = ((new - centres) ** 2).sum()
        centres, previous = new, labels
    return labels, centres.to(in_dtype)


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
