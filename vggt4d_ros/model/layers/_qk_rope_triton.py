"""Triton kernel: qk-norm + 2-D RoPE (+ cast) of a block's q and k in one pass (CUDA only;
lazy import).

The compiled block function left this as two kernels per block (a LayerNorm kernel writing
float32 q/k, then a RoPE kernel reading them back and casting): inductor cannot fuse the RoPE
into the normalisation, because rotate-half reads the row at other positions. Here a program
normalises ``BLOCK_T`` tokens of one head and rotates them while the row is in registers:
the rotated partner of channel j is computed from a second load of the same (cached) row at
the partner's index, using rot(LN(x))_j = sign_j · LN(x)_{π(j)}.

Same maths as ``layers.fused.attention_inputs`` (LayerNorm over the head dim in float32,
biased variance; RoPE in float32; one rounding to the output dtype), up to float rounding of
the reductions. Triton ships with PyTorch's CUDA wheels; CPU code never imports this.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["t"])
def _qk_norm_rope_kernel(qkv_ptr, q_out_ptr, k_out_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr,
                         cos_ptr, sin_ptr, t, heads, eps,
                         D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_ROPE: tl.constexpr):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    c = heads * D
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = tok < t
    offs = tl.arange(0, D)
    # rotate-half partner of channel j within each quarter pair: [a, b, c, d] -> [-b, a, -d, c]
    quarter = D // 4
    first = (offs % (2 * quarter)) < quarter
    partner = tl.where(first, offs + quarter, offs - quarter)
    sign = tl.where(first, -1.0, 1.0)
    row = batch * t * 3 * c + tok.to(tl.int64) * 3 * c            # [BLOCK_T] qkv row starts
    out_row = ((batch * heads + head) * t + tok.to(tl.int64)) * D  # [BLOCK_T] output rows
    m2 = inb[:, None]
    if HAS_ROPE:
        cs = tok.to(tl.int64)[:, None] * D
        cos = tl.load(cos_ptr + cs + offs[None, :], mask=m2, other=1.0)
        sin = tl.load(sin_ptr + cs + offs[None, :], mask=m2, other=0.0)
    for which in tl.static_range(2):                              # 0: q, 1: k
        if which == 0:
            w_ptr = qw_ptr
            b_ptr = qb_ptr
            o_ptr = q_out_ptr
        else:
            w_ptr = kw_ptr
            b_ptr = kb_ptr
            o_ptr = k_out_ptr
        base = qkv_ptr + row[:, None] + which * c + head * D
        x = tl.load(base + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = x - mean[:, None]
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs).to(tl.float32)
        b = tl.load(b_ptr + offs).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        if HAS_ROPE:
            xp = tl.load(base + partner[None, :], mask=m2, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + partner).to(tl.float32)
            bp = tl.load(b_ptr + partner).to(tl.float32)
            yp = (xp - mean[:, None]) * rstd[:, None] * wp[None, :] + bp[None, :]
            y = y * cos + sign[None, :] * yp * sin
        tl.store(o_ptr + out_row[:, None] + offs[None, :],
                 y.to(o_ptr.dtype.element_ty), mask=m2)


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, qn_w: torch.Tensor, qn_b: torch.Tensor,
                 kn_w: torch.Tensor, kn_b: torch.Tensor, eps: float,
                 cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                 out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B', T, 3C] (the qkv projection's output) -> q, k [B', heads, T, d] in
    ``out_dtype`` (LayerNorm over d with the q/k weights, then RoPE with cos/sin [T, d]
    float32 if given) and v [B', heads, T, d] (a view of qkv)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    q = torch.empty(b, num_heads, t, d, device=qkv.device, dtype=out_dtype)
    k = torch.empty_like(q)
    has_rope = cos is not None
    if has_rope:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        if cos.shape != (t, d):
            raise ValueError(f"RoPE tables must be [{t}, {d}], got {tuple(cos.shape)}")
    block_t = 32
    grid = (triton.cdiv(t, block_t), num_heads, b)
    _qk_norm_rope_kernel[grid](qkv, q, k, qn_w, qn_b, kn_w, kn_b,
                               cos if has_rope else q, sin if has_rope else q,
                               t, num_heads, eps, D=d, BLOCK_T=block_t, HAS_ROPE=has_rope,
                               num_warps=4)
    v = qkv.reshape(b, t, 3, num_heads, d)[:, :, 2].permute(0, 2, 1, 3)
    return q, k, v
