"""Gram-matrix dynamic saliency from global-attention Q/K (VGGT4D spec §1-2).

For a reference frame ``t`` and its source frames ``W(t) = {t±2, t±4, t±6} ∩ [0, S-1]`` the
spec defines the similarity tensor ``G[s, l, h, i, j] = <A[t, l, h, i], B[s, l, h, j]>``
(no 1/sqrt(d), no softmax) over patch tokens only, and two reductions of it:

* mean map  ``m(i) = mean_{(l,h), s, j} G``
* std map   ``v(i) = std_j( mean_{(l,h), s} G )``   (unbiased, N-1)

each min-max normalised over the frame's N tokens with ``+1e-6`` in the denominator.
Both are linear in the source tokens before the j-reduction, so we average the sources first
and never materialise ``G``:

* mean: ``m(i) = Σ_{l,h} <A[t,l,h,i], mean_{s,j} B[s,l,h,j]> / (|Λ| n_h)`` -> only the
  per-frame token mean of B is needed per layer.
* std: ``mean_{(l,h),s} G[., i, j] = Σ_{l,h} <A[t,l,h,i], mean_s B[s,l,h,j]> / (|Λ| n_h)``
  -> one ``[N, N]`` product per frame and layer, accumulated across the layers of the set.

:class:`GramSaliencyReducer` receives the model's ``on_qk`` callbacks for the 11 global layers
and reduces each layer as soon as it is produced, on the tensors' device, in float32.
:func:`naive_saliency_maps` is the literal (slow) form, kept for tests.

Choice (documented, not in the official code): a frame whose window ``W(t)`` is empty (only
possible for ``S <= 3``) uses every other frame as its sources instead of producing NaN; with
``S == 1`` there is no source at all and every map is zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: Temporal source offsets of the spec (fixed, no stride scaling).
WINDOW_OFFSETS: Tuple[int, ...] = (2, 4, 6)
#: Special tokens (camera + 4 registers) before the patches of every frame.
NUM_SPECIAL_TOKENS = 5
#: Denominator guard of every min-max normalisation (spec §2).
MINMAX_EPS = 1e-6


@dataclass(frozen=True)
class SaliencyMapSpec:
    """One statistic of spec §2: ``A·Bᵀ`` over the global layers ``layers``.

    ``a``/``b`` are ``"q"`` or ``"k"``; ``reduction`` is ``"mean"`` or ``"std"``.
    """

    name: str
    a: str
    b: str
    layers: Tuple[int, ...]
    reduction: str


#: The five maps of spec §2 (name, A, B, layers, reduction).
DEFAULT_MAP_SPECS: Tuple[SaliencyMapSpec, ...] = (
    SaliencyMapSpec("mean1", "q", "q", (3, 4, 5, 6, 7), "mean"),
    SaliencyMapSpec("var1", "q", "q", (18, 19), "std"),
    SaliencyMapSpec("mean2", "q", "q", (17, 18, 19, 20, 21), "mean"),
    SaliencyMapSpec("mean3", "k", "k", (0,), "mean"),
    SaliencyMapSpec("var3", "q", "k", (0,), "std"),
)


def needed_layers(specs: Sequence[SaliencyMapSpec] = DEFAULT_MAP_SPECS) -> Tuple[int, ...]:
    """Sorted global-attention layers the maps need (11 for the defaults)."""
    return tuple(sorted({layer for s in specs for layer in s.layers}))


def source_weights(num_frames: int, offsets: Sequence[int] = WINDOW_OFFSETS,
                   device: Optional[torch.device] = None) -> Tensor:
    """Row-stochastic source-averaging matrix ``[S, S]``: ``w[t, s] = 1/|W(t)|`` for ``s ∈ W(t)``.

    ``W(t) = {t ± o for o in offsets} ∩ [0, S-1]``. An empty window (``S <= 3``) falls back to
    all other frames; ``S == 1`` gives a zero row (no source exists).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    w = torch.zeros(num_frames, num_frames, dtype=torch.float32)
    for t in range(num_frames):
        src = sorted({t + sgn * o for o in offsets for sgn in (-1, 1)
                      if 0 <= t + sgn * o < num_frames})
        if not src:
            src = [s for s in range(num_frames) if s != t]
        if src:
            w[t, src] = 1.0 / len(src)
    return w.to(device) if device is not None else w


def minmax_normalize(x: Tensor, dims: Sequence[int] = (-1,)) -> Tensor:
    """``(x - min) / (max - min + 1e-6)`` over ``dims`` (spec §2)."""
    lo = x.amin(dim=tuple(dims), keepdim=True)
    hi = x.amax(dim=tuple(dims), keepdim=True)
    return (x - lo) / (hi - lo + MINMAX_EPS)


def combine_maps(maps: Mapping[str, Tensor]) -> Tensor:
    """Dynamic map ``D = (1-mean1)(1-var1) mean2 (1-mean3) var3``, min-max normalised.

    Maps have shape ``[..., N]``; normalisation is over the last dim (one frame's tokens).
    """
    d = (1 - maps["mean1"]) * (1 - maps["var1"]) * maps["mean2"] * (1 - maps["mean3"]) \
        * maps["var3"]
    return minmax_normalize(d)


def split_global_patch_tokens(x: Tensor, num_frames: int,
                              patch_start_idx: int = NUM_SPECIAL_TOKENS) -> Tensor:
    """Global q or k ``[B, n_h, S·(P+N), d]`` -> patch tokens ``[B, S, n_h, N, d]`` float32."""
    if x.dim() != 4:
        raise ValueError(f"expected q/k of shape [B, n_h, T, d], got {tuple(x.shape)}")
    b, nh, t, d = x.shape
    if t % num_frames != 0:
        raise ValueError(f"token count {t} is not divisible by num_frames={num_frames}")
    per_frame = t // num_frames
    if per_frame <= patch_start_idx:
        raise ValueError(f"{per_frame} tokens per frame leave no patch tokens "
                         f"after {patch_start_idx} special tokens")
    x = x.view(b, nh, num_frames, per_frame, d)[:, :, :, patch_start_idx:]
    return x.permute(0, 2, 1, 3, 4).float()


class GramSaliencyReducer:
    """Streaming reducer of the global-attention Q/K into the five saliency statistics.

    Pass ``reducer.on_qk`` as ``AttentionControl.on_qk`` and ``reducer.capture`` as its
    ``capture``. Each needed layer is reduced immediately (fp32, on the tensors' device); the
    reducer keeps only ``[B, S, N]`` accumulators for mean maps and ``[B, S, N, N]`` for std
    maps, never the q/k themselves.

    Args:
        num_frames: S of the window (global tokens are frame-major ``S·(P+N)``).
        patch_start_idx: special tokens before the patches of every frame (5).
        offsets: temporal source offsets (±2, ±4, ±6).
        specs: the statistics to compute (spec §2 defaults).
    """

    def __init__(self, num_frames: int, patch_start_idx: int = NUM_SPECIAL_TOKENS,
                 offsets: Sequence[int] = WINDOW_OFFSETS,
                 specs: Sequence[SaliencyMapSpec] = DEFAULT_MAP_SPECS) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)
        self.patch_start_idx = int(patch_start_idx)
        self.offsets = tuple(offsets)
        self.specs = tuple(specs)
        self.layers = needed_layers(self.specs)
        self._weights: Optional[Tensor] = None
        self._acc: Dict[str, Tensor] = {}
        self._seen: Dict[str, set] = {s.name: set() for s in self.specs}

    @property
    def capture(self) -> Dict[str, set]:
        """``AttentionControl.capture`` value: only the global layers the maps need."""
        return {"global": set(self.layers)}

    def reset(self) -> None:
        """Drop all accumulated statistics (reuse the reducer for another window)."""
        self._acc.clear()
        self._seen = {s.name: set() for s in self.specs}

    def on_qk(self, kind: str, layer: int, q: Tensor, k: Tensor) -> None:
        """Model callback: q, k ``[B, n_h, S·(P+N), d]`` of one global block (frame-major)."""
        if kind != "global" or layer not in self.layers:
            return
        # called inside the model's (possibly bf16) autocast region: reduce in real fp32
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            tokens = {"q": split_global_patch_tokens(q, self.num_frames, self.patch_start_idx),
                      "k": split_global_patch_tokens(k, self.num_frames, self.patch_start_idx)}
            self.add_layer(layer, tokens["q"], tokens["k"])

    def add_layer(self, layer: int, q: Tensor, k: Tensor) -> None:
        """Accumulate one layer from patch tokens q, k ``[B, S, n_h, N, d]`` (any float dtype)."""
        if q.shape != k.shape or q.dim() != 5 or q.shape[1] != self.num_frames:
            raise ValueError(f"expected q, k [B, S={self.num_frames}, n_h, N, d], got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        q, k = q.float(), k.float()
        if self._weights is None or self._weights.device != q.device:
            self._weights = source_weights(self.num_frames, self.offsets, q.device)
        w = self._weights
        n_heads = q.shape[2]
        for spec in self.specs:
            if layer not in spec.layers or layer in self._seen[spec.name]:
                continue
            a = q if spec.a == "q" else k
            b = q if spec.b == "q" else k
            if spec.reduction == "mean":
                # mean over (s, j) of the sources = source-weighted per-frame token means
                src = torch.einsum("ts,bshd->bthd", w, b.mean(dim=3))
                contrib = torch.einsum("bthnd,bthd->btn", a, src) / n_heads
            elif spec.reduction == "std":
                src = torch.einsum("ts,bshnd->bthnd", w, b)
                contrib = torch.einsum("bthid,bthjd->btij", a, src) / n_heads
            else:
                raise ValueError(f"unknown reduction {spec.reduction!r}")
            if spec.name in self._acc:
                self._acc[spec.name] += contrib
            else:
                self._acc[spec.name] = contrib
            self._seen[spec.name].add(layer)

    @property
    def complete(self) -> bool:
        """True once every layer of every statistic has been seen."""
        return all(self._seen[s.name] == set(s.layers) for s in self.specs)

    def maps(self) -> Dict[str, Tensor]:
        """Normalised statistics and ``"dyn_map"``, each ``[B, S, N]`` float32 in [0, 1].

        Raises:
            RuntimeError: when a needed layer never arrived (hook not wired).
        """
        missing = {s.name: sorted(set(s.layers) - self._seen[s.name]) for s in self.specs
                   if self._seen[s.name] != set(s.layers)}
        if missing:
            raise RuntimeError(f"saliency statistics are missing global layers {missing}; "
                               "was the reducer passed as AttentionControl.on_qk?")
        out: Dict[str, Tensor] = {}
        for spec in self.specs:
            acc = self._acc[spec.name] / len(spec.layers)
            if spec.reduction == "std":
                acc = acc.std(dim=-1)  # unbiased over the source tokens j
            out[spec.name] = minmax_normalize(acc)
        out["dyn_map"] = combine_maps(out)
        return out


def naive_saliency_maps(q_layers: Mapping[int, Tensor], k_layers: Mapping[int, Tensor],
                        offsets: Sequence[int] = WINDOW_OFFSETS,
                        specs: Sequence[SaliencyMapSpec] = DEFAULT_MAP_SPECS
                        ) -> Dict[str, Tensor]:
    """Literal form of spec §2 for tests: materialises ``G[s, l, h, i, j]`` per frame.

    Args:
        q_layers, k_layers: layer -> patch tokens ``[S, n_h, N, d]``.
    Returns:
        name -> ``[S, N]`` float64 maps and ``"dyn_map"``.
    """
    any_layer = next(iter(q_layers.values()))
    num_frames = any_layer.shape[0]
    w = source_weights(num_frames, offsets)
    out: Dict[str, Tensor] = {}
    for spec in specs:
        a_all = torch.stack([(q_layers if spec.a == "q" else k_layers)[l].double()
                             for l in spec.layers], dim=1)  # [S, L, h, N, d]
        b_all = torch.stack([(q_layers if spec.b == "q" else k_layers)[l].double()
                             for l in spec.layers], dim=1)
        rows = []
        for t in range(num_frames):
            src = torch.nonzero(w[t] > 0).flatten()
            g = torch.einsum("lhid,slhjd->slhij", a_all[t], b_all[src])  # [|W|, L, h, N, N]
            if spec.reduction == "mean":
                rows.append(g.mean(dim=(0, 1, 2, 4)))
            else:
                rows.append(g.mean(dim=(0, 1, 2)).std(dim=-1))
        out[spec.name] = minmax_normalize(torch.stack(rows))
    out["dyn_map"] = combine_maps(out)
    return out


def golden_layer_tokens(tensors: Mapping[str, Tensor], layers: Iterable[int]
                        ) -> Tuple[Dict[int, Tensor], Dict[int, Tensor]]:
    """Pick ``qk.global_{q,k}.LNN`` ``[S, n_h, N, d]`` tensors from a golden-style dict."""
    q = {l: tensors[f"qk.global_q.L{l:02d}"] for l in layers}
    k = {l: tensors[f"qk.global_k.L{l:02d}"] for l in layers}
    return q, k
