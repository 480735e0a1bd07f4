"""Attention hooks for VGGT4D: capture per-layer Q/K and suppress keys in chosen layers.

``AttentionControl`` is passed to ``VGGT.forward`` / ``Aggregator.forward``; ``control=None``
takes the plain path (no callbacks, no masks, nothing allocated). Layers are the aggregator
layers 0..depth-1; each layer has one frame block and one global block.

Q/K handed to ``on_qk(kind, layer, q, k)`` are [B', heads, T, d] AFTER q_norm/k_norm and AFTER
RoPE: frame blocks B' = B·S, T = P+N; global blocks B' = B, T = S·(P+N), frame-major.
The callback runs inside the forward (on the model's device) and must reduce what it needs at
once without keeping references.

Key suppression: ``key_keep`` [B, S, P+N] bool, True = the token may serve as key/value. In
every layer of ``key_mask_layers`` (frame AND global block) dropped tokens are removed from K
and V for every query (queries of dropped tokens still attend to the kept ones). Special tokens
(camera + registers) are always kept, whatever ``key_keep`` says, so no query loses all keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set, Tuple

import torch

from .layers.attention import KeySelection, QKCallback

QKHook = Callable[[str, int, torch.Tensor, torch.Tensor], None]
KINDS = ("frame", "global")


@dataclass
class AttentionControl:
    """Per-forward instructions for the attention blocks (all fields optional)."""

    capture: Dict[str, Set[int]] = field(default_factory=dict)
    on_qk: Optional[QKHook] = None
    key_keep: Optional[torch.Tensor] = None
    key_mask_layers: Set[int] = field(default_factory=set)
    encoder_features: bool = False

    def validate(self, batch: int, frames: int, tokens: int, depth: int) -> None:
        """Raise ValueError when the control does not fit a [B=batch, S=frames, T=tokens] run."""
        for kind, layers in self.capture.items():
            if kind not in KINDS:
                raise ValueError(f"AttentionControl.capture: unknown kind {kind!r}, use {KINDS}")
            bad = sorted(i for i in layers if not 0 <= int(i) < depth)
            if bad:
                raise ValueError(f"AttentionControl.capture[{kind!r}]: layers {bad} outside "
                                 f"0..{depth - 1}")
        if any(self.capture.values()) and self.on_qk is None:
            raise ValueError("AttentionControl.capture is set but on_qk is None")
        bad = sorted(i for i in self.key_mask_layers if not 0 <= int(i) < depth)
        if bad:
            raise ValueError(f"AttentionControl.key_mask_layers {bad} outside 0..{depth - 1}")
        if self.key_mask_layers and self.key_keep is None:
            raise ValueError("AttentionControl.key_mask_layers is set but key_keep is None")
        if self.key_keep is not None:
            kk = self.key_keep
            if not isinstance(kk, torch.Tensor) or kk.dtype != torch.bool:
                raise ValueError("AttentionControl.key_keep must be a bool tensor [B, S, P+N]")
            if tuple(kk.shape) != (batch, frames, tokens):
                raise ValueError(f"AttentionControl.key_keep has shape {tuple(kk.shape)}, "
                                 f"expected [B, S, P+N] = {(batch, frames, tokens)}")

    def qk_callback(self, kind: str, layer: int) -> Optional[QKCallback]:
        """The callback for one block, or None when that block is not captured."""
        if self.on_qk is None or layer not in self.capture.get(kind, ()):
            return None
        hook = self.on_qk
        return lambda q, k: hook(kind, layer, q, k)

    def key_selections(self, num_special: int, device: torch.device
                       ) -> Tuple[Optional[KeySelection], Optional[KeySelection]]:
        """(frame selection, global selection) for the masked layers; (None, None) if unused."""
        if not self.key_mask_layers or self.key_keep is None:
            return None, None
        keep = self.key_keep.to(device=device).clone()
        keep[:, :, :num_special] = True                  # special tokens are always keys
        b, s, t = keep.shape
        return _selection(keep.reshape(b * s, t)), _selection(keep.reshape(b, s * t))


def _selection(keep: torch.Tensor) -> Optional[KeySelection]:
    """keep [R, T] bool -> KeySelection for R attention rows.

    Equal kept counts over rows (always the case for one batch row) -> gathered index [R, K],
    which keeps the attention dense and fused-kernel friendly. Unequal counts (frame attention,
    frames with different numbers of dynamic tokens) -> boolean SDPA mask [R, 1, 1, T].
    """
    counts = keep.sum(dim=1)
    if bool((counts == keep.shape[1]).all()):
        return None                                       # nothing dropped: plain attention
    if bool((counts == counts[0]).all()):
        idx = keep.nonzero()[:, 1].reshape(keep.shape[0], int(counts[0]))
        return KeySelection(index=idx)
    return KeySelection(mask=keep[:, None, None, :])
