"""Multi-head self-attention with fused qkv, optional qk-norm, 2-D RoPE and key selection.

Official key names: ``qkv`` (Linear C -> 3C, bias), ``q_norm`` / ``k_norm`` (LayerNorm over
the head dim, affine; Identity when qk_norm is off), ``proj``. Softmax scale d^-0.5, computed by
``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient kernels on
GPU).

Hooks (VGGT4D, see ``model/hooks.py``): ``on_qk(q, k)`` receives q, k [B', heads, T, d] after
q_norm/k_norm and RoPE; ``keys`` restricts which tokens may serve as keys/values:
- ``KeySelection.index`` [B', K] long: the kept key positions, gathered from K and V. Same K
  for every batch row, so the attention stays a dense problem and fused kernels stay usable.
- ``KeySelection.mask`` [B', 1, 1, T] bool (True = attend): used when rows keep different
  numbers of keys (frame attention, one row per frame). Equivalent to -inf logits for the
  dropped keys; SDPA picks a kernel that supports masks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .rope import RopeTables, RotaryPositionEmbedding2D

QKCallback = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class KeySelection:
    """Which tokens act as keys/values. Exactly one of ``index`` / ``mask`` is set."""

    index: Optional[torch.Tensor] = None   # [B', K] int64, kept key positions (sorted)
    mask: Optional[torch.Tensor] = None    # [B', 1, 1, T] bool, True = may be attended to


class Attention(nn.Module):
    """Self-attention over x [B', T, C] -> [B', T, C]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables] = None,
                on_qk: Optional[QKCallback] = None,
                keys: Optional[KeySelection] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rows`` [R] long: only these query positions (every token still a key/value) ->
        [B', R, C]; ``on_qk`` then sees those q rows."""
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # [B', heads, T, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = RotaryPositionEmbedding2D.apply(q, rope)
            k = RotaryPositionEmbedding2D.apply(k, rope)
        if rows is not None:
            q = q.index_select(2, rows)
        out = attend(q, k, v, on_qk, keys)
        return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], c))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, on_qk: Optional[QKCallback],
           keys: Optional[KeySelection]) -> torch.Tensor:
    """Hook, key selection and fused SDPA: q, k, v [B', heads, T, d] -> [B', heads, T, d]."""
    if on_qk is not None:
        on_qk(q, k)
    mask = None
    if keys is not None:
        if keys.index is not None:
            k, v = _gather_tokens(k, keys.index), _gather_tokens(v, keys.index)
            with _any_length_kernels(q):
                return F.scaled_dot_product_attention(q, k, v)
        mask = keys.mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _any_length_kernels(q: torch.Tensor):
    """SDPA backends for gathered keys, whose count changes with every window: not cuDNN,
    which builds a new execution plan (runtime-compiled kernels) for each new key count - in a
    500-frame H100 stream pass 2 took 156 ms per window against 102 ms for a repeated window
    (run 30). FlashAttention-2 (then the memory-efficient kernel) has no per-shape setup."""
    if q.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B', heads, T, d], index [B', K] -> [B', heads, K, d]."""
    if index.shape[0] == 1:
        return x.index_select(2, index[0])
    idx = index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.gather(2, idx)
