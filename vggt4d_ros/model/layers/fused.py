"""Functional form of a transformer block for ``torch.compile`` (speed path, same maths).

``Block.forward`` calls module after module; every elementwise step (LayerNorm, RoPE,
LayerScale, residual add, GELU, dtype casts under autocast) is a separate kernel that re-reads
the activations. Here a block is split into two pure functions of tensors —
:func:`attention_inputs` (norm1 -> qkv -> qk-norm -> RoPE) and :func:`attention_output_mlp`
(proj -> LayerScale -> residual -> norm2 -> MLP -> LayerScale -> residual) — that
``torch.compile`` fuses into few kernels. The attention itself (SDPA, with the VGGT4D Q/K hook
and key selection) stays between them, outside the compiled regions.

Parameters are passed as arguments (not captured through ``self``), so one compiled graph
serves every block of the same shapes (frame blocks, global blocks, DINO blocks) instead of
one recompilation per block instance. Called without compilation the functions give the same
result as ``Block.forward`` (tested bit for bit on CPU).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _rotate_halves(x: Tensor) -> Tensor:
    a, b, c, d = x.chunk(4, dim=-1)
    return torch.cat([-b, a, -d, c], dim=-1)


def attention_inputs(x: Tensor, norm_w: Tensor, norm_b: Tensor, norm_eps: float,
                     qkv_w: Tensor, qkv_b: Optional[Tensor], num_heads: int,
                     qn_w: Optional[Tensor], qn_b: Optional[Tensor],
                     kn_w: Optional[Tensor], kn_b: Optional[Tensor], qk_eps: float,
                     cos: Optional[Tensor], sin: Optional[Tensor],
                     qk_dtype: Optional[torch.dtype] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """x [B', T, C] -> q, k, v [B', heads, T, d] (qk-norm and RoPE applied to q and k).

    ``qk_dtype``: cast q and k to it at the end. Under autocast the qk-norm LayerNorms run in
    float32, so q/k leave in float32 and SDPA casts them to the autocast dtype - a separate
    read and write of both per block (2.6 ms per 16-frame pass on an H100). Casting here
    fuses that into this function's kernels; same rounding, same values.
    """
    b, t, c = x.shape
    d = c // num_heads
    h = F.layer_norm(x, (c,), norm_w, norm_b, norm_eps)
    qkv = F.linear(h, qkv_w, qkv_b).reshape(b, t, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if qn_w is not None:
        q = F.layer_norm(q, (d,), qn_w, qn_b, qk_eps)
        k = F.layer_norm(k, (d,), kn_w, kn_b, qk_eps)
    if cos is not None:
        cq, sq = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cq + _rotate_halves(q) * sq
        ck, sk = cos.to(k.dtype), sin.to(k.dtype)
        k = k * ck + _rotate_halves(k) * sk
    if qk_dtype is not None:
        q, k = q.to(qk_dtype), k.to(qk_dtype)
    return q, k, v


def attention_qkv(x: Tensor, norm_w: Tensor, norm_b: Tensor, norm_eps: float, qkv_w: Tensor,
                  qkv_b: Optional[Tensor]) -> Tensor:
    """x [B', T, C] -> the qkv projection [B', T, 3C] of norm1(x): the part of
    :func:`attention_inputs` before the qk-norm, for the fused qk-norm + RoPE kernel."""
    c = x.shape[-1]
    return F.linear(F.layer_norm(x, (c,), norm_w, norm_b, norm_eps), qkv_w, qkv_b)


def attention_output_mlp(x: Tensor, attn: Tensor, proj_w: Tensor, proj_b: Optional[Tensor],
                         gamma1: Optional[Tensor], norm_w: Tensor, norm_b: Tensor,
                         norm_eps: float, fc1_w: Tensor, fc1_b: Optional[Tensor],
                         fc2_w: Tensor, fc2_b: Optional[Tensor], gamma2: Optional[Tensor],
                         gelu_epilogue: bool = False, mm_dtype: Optional[torch.dtype] = None
                         ) -> Tensor:
    """x [B', T, C] residual stream, attn [B', heads, T, d] SDPA output -> block output.

    ``gelu_epilogue``: the MLP's first layer and its GELU as :func:`linear_gelu_tanh` (the
    tanh approximation of GELU, fused into the GEMM on CUDA) instead of the exact GELU as a
    separate kernel; ``mm_dtype`` is the autocast dtype it must cast to itself.
    """
    b, t, c = x.shape
    y = F.linear(attn.transpose(1, 2).reshape(b, t, c), proj_w, proj_b)
    x = x + (y * gamma1 if gamma1 is not None else y)
    h = F.layer_norm(x, (c,), norm_w, norm_b, norm_eps)
    if gelu_epilogue:
        hidden = linear_gelu_tanh(h, fc1_w, fc1_b, mm_dtype)
    else:
        hidden = F.gelu(F.linear(h, fc1_w, fc1_b))
    y = F.linear(hidden, fc2_w, fc2_b)
    return x + (y * gamma2 if gamma2 is not None else y)


def linear_gelu_tanh(x: Tensor, w: Tensor, b: Optional[Tensor],
                     mm_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``gelu(x @ w.T + b, approximate="tanh")`` for x [..., in], w [out, in] -> [..., out].

    On CUDA one cuBLASLt GEMM whose epilogue adds the bias and applies the GELU in float32
    before the single rounding to the output dtype (``torch._addmm_activation``; its CUDA
    GELU is the tanh approximation, which is why this is not the exact GELU of the official
    MLP: |erf GELU - tanh GELU| < 5e-4, below bf16's resolution). The separate GELU kernel,
    a read and a write of the [tokens, 4C] hidden activations per block, goes away.
    ``mm_dtype`` (the autocast dtype, if any): the op is not on autocast's list, so the
    operands are cast here as autocast casts those of a linear layer. Elsewhere (CPU) the
    same maths unfused.
    """
    if mm_dtype is not None:
        x, w = x.to(mm_dtype), w.to(mm_dtype)
        b = b.to(mm_dtype) if b is not None else None
    if not x.is_cuda or b is None:
        return F.gelu(F.linear(x, w, b), approximate="tanh")
    lead = x.shape[:-1]
    y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
    return y.reshape(*lead, w.shape[0])


class FusedBlockFunctions:
    """The block functions (attention inputs, the qkv projection alone, attention output +
    MLP), compiled or not; shared by every block of a model.

    Three execution options, read by every block at each call (a pipeline sets them for its
    passes, so pipelines with different options can share one model):

    * ``gelu_epilogue`` - on CUDA under autocast, the MLP's GELU fused into its first GEMM,
      tanh approximation (:func:`linear_gelu_tanh`; a numerics change within bf16
      resolution; the float32 path keeps the exact GELU);
    * ``cast_weights`` - under autocast, keep each block's linear weights cast to the
      autocast dtype once (``Block`` caches them) instead of casting them in every call:
      the same values, one read of the float32 weights less per block and call, for the
      memory of a second (bf16) copy of the block weights;
    * ``qk_rope_kernel`` - on CUDA, a block with qk-norm and RoPE normalises and rotates its
      q/k in one Triton kernel (``_qk_rope_triton``) after the compiled :func:`attention_qkv`
      instead of inductor's two kernels (same maths up to the reductions' rounding).
    """

    def __init__(self, compile: bool = False, mode: Optional[str] = None) -> None:
        self.compiled = compile
        self.gelu_epilogue = False
        self.cast_weights = False
        self.qk_rope_kernel = False
        pre: Callable = attention_inputs
        qkv: Callable = attention_qkv
        post: Callable = attention_output_mlp
        if compile:
            # One graph per (block kind, window size): frame/global/DINO blocks of pass 1 and 2
            # at every window size the stream meets (regular, OOM-shrunk, final flush).
            # Dynamo's default of 8 graphs per function falls back to eager after two or
            # three window sizes (seen on the device); allow more.
            _raise_recompile_limit(64)
            pre = torch.compile(pre, dynamic=False, mode=mode)
            qkv = torch.compile(qkv, dynamic=False, mode=mode)
            post = torch.compile(post, dynamic=False, mode=mode)
        self.attention_inputs = pre
        self.attention_qkv = qkv
        self.attention_output_mlp = post


def _raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep up to ``limit`` graphs per compiled function (never lowers it)."""
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)
