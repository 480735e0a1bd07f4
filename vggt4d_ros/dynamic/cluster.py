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

import contextlib
import threading
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import cuda_graph
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
                          host_dtype: Optional[np.dtype] = None,
                          graphs: Optional["_KMeansGraphs"] = None) -> Tensor:
    """Greedy k-means++ seeding -> indices ``[k]`` of the chosen rows of ``x [M, C]``.

    The first centre is ``rng.choice(M)`` (uniform weights); every further step draws
    ``2 + ln k`` candidates with probability proportional to the squared distance to the
    closest centre (inverse CDF of the running potential) and keeps the candidate that lowers
    the potential most. Random numbers come from the numpy ``RandomState`` (drawn up front: the
    same stream as one draw per step) and the cumulative sum is taken on the host in
    ``host_dtype`` (the input precision, default float32 unless x is float64 without one), so
    the draws are those scikit-learn makes for the same seed; distances are computed in
    float64 on ``x``'s device. One small device->host copy per step (the running distances);
    with ``graphs`` (CUDA) the device part of a step is one CUDA-graph replay.
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
    if graphs is not None:
        graphs.seed_state.copy_(state)
        state = graphs.seed_state
    for step in range(1, k):
        host = state.cpu().numpy()                            # the step's one host sync
        draws = uniforms[step - 1] * float(host[m])
        cand = np.minimum(np.searchsorted(np.cumsum(host[:m].astype(host_dtype)), draws), m - 1)
        cand_t = torch.from_numpy(cand).to(x.device, non_blocking=True)
        if graphs is not None and cand.shape[0] == graphs.trials:
            graphs.seed_candidates.copy_(cand_t)
            graphs.seed_step()
            chosen.append(graphs.seed_choice.clone())
            continue
        state, chosen_idx = _seed_step(x, x_sq, state, cand_t)
        chosen.append(chosen_idx)
    return torch.stack(chosen)


def _seed_step(x: Tensor, x_sq: Tensor, state: Tensor, cand: Tensor) -> Tuple[Tensor, Tensor]:
    """One greedy k-means++ step on the device -> (new state ``[M + 1]`` = closest distances
    and potential, the chosen row of x as a 0-dim tensor): of the candidates ``cand [T]``, the
    one that lowers the potential most. Only gathers (no indexing by a device scalar, which
    must not synchronise inside a CUDA graph)."""
    m = x.shape[0]
    d_cand = torch.minimum(_sq_dists(x, x[cand], x_sq), state[:m, None])     # [M, T]
    pots = d_cand.sum(0)                                                     # [T]
    best = torch.argmin(pots).view(1)
    new_state = torch.cat([d_cand.gather(1, best.expand(m, 1))[:, 0], pots.gather(0, best)])
    return new_state, cand.gather(0, best)[0]


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


class _LloydState:
    """Device state of scikit-learn's Lloyd loop, advanced without host synchronisation.

    ``step()`` does one iteration in place: assign (``labels``), then - unless the loop has
    stopped (``done``: previous centre shift <= tol, labels unchanged, or ``max_iter`` updates)
    - move the centres to their cluster means. A stopped state is left unchanged by further
    steps, so the host may run several steps between two reads of ``done``. An iteration that
    would have to relocate an empty cluster (the rare branch) is NOT done right: it sets
    ``empty``, and the caller redoes the block from ``save()``'s copy on the eager path.
    """

    def __init__(self, m: int, c: int, k: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.x = torch.zeros(m, c, **f64)
        self.x_sq = torch.zeros(m, **f64)
        self.centres = torch.zeros(k, c, **f64)
        self.previous = torch.full((m,), -1, dtype=torch.long, device=device)
        self.labels = torch.zeros(m, dtype=torch.long, device=device)
        self.shift = torch.zeros((), **f64)
        self.abs_tol = torch.zeros((), **f64)
        self.iters = torch.zeros((), dtype=torch.long, device=device)
        self.max_iter = torch.zeros((), dtype=torch.long, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.empty = torch.zeros((), dtype=torch.bool, device=device)
        self.rows = torch.arange(k, device=device)[:, None]
        self._saved: Tuple[Tensor, ...] = tuple(t.clone() for t in self._mutable())

    def _mutable(self) -> Tuple[Tensor, ...]:
        return self.centres, self.previous, self.shift, self.iters, self.done

    def load_points(self, x: Tensor) -> None:
        """Centred float64 points ``[M, C]`` (and their ``|x|²``) into the static buffers."""
        self.x.copy_(x)
        torch.sum(self.x * self.x, dim=1, out=self.x_sq)

    def start(self, centres: Tensor, abs_tol: Tensor, max_iter: int) -> None:
        """Start the Lloyd loop from the seeded ``centres [k, C]``."""
        self.centres.copy_(centres)
        self.previous.fill_(-1)
        self.shift.fill_(float("inf"))
        self.abs_tol.copy_(abs_tol)
        self.iters.zero_()
        self.max_iter.fill_(max_iter)
        self.done.zero_()
        self.empty.zero_()

    def save(self) -> None:
        for dst, src in zip(self._saved, self._mutable()):
            dst.copy_(src)

    def restore(self) -> None:
        for dst, src in zip(self._mutable(), self._saved):
            dst.copy_(src)
        self.empty.zero_()

    def step(self, relocate: bool = False) -> None:
        """One Lloyd iteration. ``relocate`` (eager only: it reads the device on the host):
        an iteration that meets an empty cluster relocates it, as scikit-learn does, instead
        of setting ``empty``."""
        dist = _sq_dists(self.x, self.centres, self.x_sq)
        labels = dist.argmin(1)
        onehot = (self.rows == labels[None]).double()                   # [k, M]
        counts = onehot.sum(1)
        stop = (self.done | (self.shift <= self.abs_tol) | (labels == self.previous).all()
                | (self.iters >= self.max_iter))
        sums = onehot @ self.x
        if not relocate:
            self.empty |= ~stop & (counts == 0).any()
        elif bool(~stop & (counts == 0).any()):
            _relocate_empty(self.x, labels, dist, sums, counts)
        new = sums / counts.clamp_min(1)[:, None]
        shift = ((new - self.centres) ** 2).sum()
        self.labels.copy_(labels)
        self.centres.copy_(torch.where(stop, self.centres, new))
        self.shift.copy_(torch.where(stop, self.shift, shift))
        self.previous.copy_(torch.where(stop, self.previous, labels))
        self.iters += (~stop).long()
        self.done.copy_(stop)


def _lloyd_eager(st: _LloydState) -> None:
    """scikit-learn's Lloyd loop from ``st`` with the empty-cluster relocation (host reads
    every iteration) until it stops; leaves the final labels and centres in ``st``."""
    while not bool(st.done):
        st.step(relocate=True)


LLOYD_BLOCK = 8            # Lloyd iterations per CUDA-graph replay (one host read each)
_GRAPH_CACHE_SIZE = 2      # window shapes whose graphs (and float64 point copy) are kept


class _KMeansGraphs:
    """CUDA graphs of one k-means shape: a block of ``LLOYD_BLOCK`` Lloyd steps and one
    k-means++ step, over static buffers. Replaying them costs two launches instead of ~15
    per Lloyd iteration and ~13 per seeding step (the loops were launch-bound: ~9.6 ms of GPU
    work in ~38 ms on an H100 at 16 frames)."""

    def __init__(self, m: int, c: int, k: int, trials: int, device: torch.device) -> None:
        self.lock = threading.Lock()
        self.trials = trials
        self.state = _LloydState(m, c, k, device)
        self.seed_state = torch.zeros(m + 1, dtype=torch.float64, device=device)
        self.seed_candidates = torch.zeros(trials, dtype=torch.long, device=device)
        self.seed_choice = torch.zeros((), dtype=torch.long, device=device)
        st = self.state

        def lloyd_block() -> None:
            st.save()
            for _ in range(LLOYD_BLOCK):
                st.step()

        def seed_step() -> None:
            new, choice = _seed_step(st.x, st.x_sq, self.seed_state, self.seed_candidates)
            self.seed_state.copy_(new)
            self.seed_choice.copy_(choice)

        self.lloyd = cuda_graph.capture(lloyd_block, device)
        self.seed_step = cuda_graph.capture(seed_step, device)


_graphs: "cuda_graph.GraphCache[_KMeansGraphs]" = \
    cuda_graph.GraphCache(_GRAPH_CACHE_SIZE, "feature_kmeans")


def _kmeans_graphs(m: int, c: int, k: int, trials: int,
                   device: torch.device) -> Optional[_KMeansGraphs]:
    """The cached graphs of this shape (least recently used shapes evicted); None if capture
    failed in this process (eager path)."""
    return _graphs.get((m, c, k, trials, device.index),
                       lambda: _KMeansGraphs(m, c, k, trials, device))


def kmeans_torch(x: Tensor, k: int, seed: int = KMEANS_SEED, max_iter: int = 300,
                 tol: float = 1e-4, cuda_graphs: bool = False,
                 block: int = 1) -> Tuple[Tensor, Tensor]:
    """k-means on ``x [M, C]`` in torch on x's device -> ``(labels [M], centres [k, C])``.

    Same algorithm and random stream as scikit-learn's ``KMeans(k, random_state=seed)``
    (defaults: data centred, greedy k-means++, one run, Lloyd until the labels stop changing or
    the squared centre shift <= ``tol`` × mean feature variance, then a final assignment), with
    distances and centres in float64. Labels therefore equal scikit-learn's except where float
    rounding flips a near-tie (none in the tests). Centres are returned in x's dtype.

    Cost: cluster sums are one matrix product with the one-hot assignment (deterministic, no
    atomics). On CUDA (``cuda_graphs``) the Lloyd loop runs as CUDA-graph replays of
    ``LLOYD_BLOCK`` iterations with one small host read each (a stopped loop idles through
    the rest of its block), and each seeding step's device part is one replay; elsewhere
    ``block`` iterations (default 1) per host read. Same arithmetic either way.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected points [M>0, C], got {tuple(x.shape)}")
    in_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    host_dtype = np.float64 if in_dtype == torch.float64 else np.float32
    x = x.to(in_dtype)
    abs_tol = x.var(dim=0, unbiased=False).mean().double() * tol
    x = (x - x.mean(dim=0)).double()              # centred, as scikit-learn does
    m, c = x.shape
    k = min(k, m)
    trials = 2 + int(np.log(k))
    graphs = (_kmeans_graphs(m, c, k, trials, x.device)
              if cuda_graphs and cuda_graph.usable(x) else None)
    with graphs.lock if graphs is not None else contextlib.nullcontext():
        st = graphs.state if graphs is not None else _LloydState(m, c, k, x.device)
        st.load_points(x)
        rng = np.random.RandomState(seed)
        seeds = kmeans_plusplus_torch(st.x, k, rng, x_sq=st.x_sq, host_dtype=host_dtype,
                                      graphs=graphs)
        st.start(st.x[seeds], abs_tol, max_iter)
        while True:
            if graphs is not None:
                graphs.lloyd()                          # save() + LLOYD_BLOCK steps
            else:
                st.save()
                for _ in range(block):
                    st.step()
            done, empty = torch.stack([st.done, st.empty]).tolist()
            if empty:                                   # rare: redo with the relocation
                st.restore()
                _lloyd_eager(st)
                break
            if done:
                break
        return st.labels.clone(), st.centres.to(in_dtype, copy=True)   # not the static buffer


def cluster_features(features: Tensor, k: int = NUM_FEATURE_CLUSTERS, seed: int = KMEANS_SEED,
                     backend: str = "reference", cuda_graphs: bool = False) -> Tensor:
    """Cluster labels of encoder features.

    Args:
        features: ``[S, N, C]`` (or ``[M, C]``) patch-token features.
        backend: ``"reference"`` (scikit-learn) or ``"fast"`` (torch, on the device).
        cuda_graphs: fast backend on CUDA: Lloyd/seeding loops as CUDA-graph replays.
    Returns:
        int64 labels with the leading shape of ``features`` (``[S, N]``), on its device.
    """
    lead = features.shape[:-1]
    flat = features.reshape(-1, features.shape[-1])
    if backend == "reference":
        lab = kmeans_reference(flat.detach().float().cpu().numpy(), k, seed)
        labels = torch.from_numpy(lab).to(features.device)
    elif backend == "fast":
        labels, _ = kmeans_torch(flat.detach(), k, seed, cuda_graphs=cuda_graphs)
    else:
        raise ValueError(f"cluster backend must be 'reference' or 'fast', got {backend!r}")
    return labels.reshape(lead)


def cluster_mean_map(saliency: Tensor, labels: Tensor,
                     num_clusters: Optional[int] = None) -> Tensor:
    """Replace every token's saliency by its cluster's mean, then min-max per frame.

    Args:
        saliency: ``[S, h, w]`` (or ``[S, N]``) dynamic map.
        labels: int64 cluster labels, same shape (labels shared across frames).
        num_clusters: an upper bound of the labels (all < it), e.g. the k of the k-means:
            then nothing is read on the host (else ``labels.max()`` is).
    Returns:
        ``[S, h, w]`` float32 in [0, 1].
    """
    if saliency.shape != labels.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape")
    flat_lab = labels.reshape(-1).long()
    flat_sal = saliency.reshape(-1).float()
    k = num_clusters if num_clusters is not None else int(flat_lab.max()) + 1
    # per-cluster masked reductions, not index_add_: float atomics on CUDA add in a varying
    # order, so the same window could give a different threshold and mask from run to run
    # (seen on the device: a CUDA-graph replay and the eager call differed); a [k, N] mask is
    # small (64 x 12k tokens per 16-frame window) and integer counts are exact
    member = flat_lab[None, :] == torch.arange(k, device=flat_lab.device)[:, None]
    sums = torch.where(member, flat_sal[None, :], flat_sal.new_zeros(())).sum(1)
    counts = member.sum(1).to(flat_sal.dtype)
    means = sums / counts.clamp_min(1)
    per_token = means[flat_lab].reshape(saliency.shape)
    return minmax_normalize(per_token, dims=tuple(range(1, saliency.dim())))
