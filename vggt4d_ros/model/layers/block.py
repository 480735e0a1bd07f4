"""Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import Attention, KeySelection, QKCallback, attend
from .fused import FusedBlockFunctions
from .layer_scale import LayerScale
from .mlp import Mlp
from .rope import RopeTables


class Block(nn.Module):
    """Transformer block on x [B', T, C]; keys norm1, attn, ls1, norm2, mlp, ls2.

    ``init_values`` None/0 -> no LayerScale (Identity), as in the official blocks.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 init_values: Optional[float] = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # qk-norm LayerNorms use torch's default eps in every official block.
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

        self.fused: Optional[FusedBlockFunctions] = None   # set by VGGT.use_fused_blocks
        # FusedBlockFunctions.cast_weights: the linear weights cast to the autocast dtype,
        # (key, tensors); a plain attribute, not a buffer (never in the state dict)
        self._cast_cache: Optional[Tuple[tuple, Tuple[Optional[torch.Tensor], ...]]] = None

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables] = None,
                on_qk: Optional[QKCallback] = None,
                keys: Optional[KeySelection] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B', T, C] -> [B', T, C]; with ``rows`` [R] long only those tokens' outputs,
        [B', R, C] (all T tokens still act as keys/values: the same values as the full
        output's rows, without the other rows' attention queries and MLP)."""
        if self.fused is not None:
            return self._forward_fused(x, rope, on_qk, keys, rows)
        attn = self.attn(self.norm1(x), rope=rope, on_qk=on_qk, keys=keys, rows=rows)
        x = (x if rows is None else x.index_select(1, rows)) + self.ls1(attn)
        return x + self.ls2(self.mlp(self.norm2(x)))

    def _forward_fused(self, x: torch.Tensor, rope: Optional[RopeTables],
                       on_qk: Optional[QKCallback], keys: Optional[KeySelection],
                       rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same maths as ``forward`` through the (compilable) functions of ``layers/fused``."""
        a, fn = self.attn, self.fused
        qn = a.q_norm if isinstance(a.q_norm, nn.LayerNorm) else None
        kn = a.k_norm if isinstance(a.k_norm, nn.LayerNorm) else None
        mm_dtype = _autocast_dtype(x)
        qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b = self._linear_weights(
            mm_dtype if fn.cast_weights else None)
        qk_dtype = _sdpa_qk_dtype(x, on_qk)
        qkv_out = None
        if fn.qk_rope_kernel and qn is not None and kn is not None and _qk_kernel_usable(x):
            qkv = fn.attention_qkv(x, self.norm1.weight, self.norm1.bias, self.norm1.eps,
                                   qkv_w, qkv_b)
            # without a cast for SDPA, q/k stay float32 (what the qk-norm gives under autocast)
            qkv_out = _qk_norm_rope(qkv, a.num_heads, qn, kn, rope, qk_dtype or torch.float32)
        if qkv_out is not None:
            q, k, v = qkv_out
        else:
            q, k, v = fn.attention_inputs(
                x, self.norm1.weight, self.norm1.bias, self.norm1.eps, qkv_w, qkv_b,
                a.num_heads, qn.weight if qn else None, qn.bias if qn else None,
                kn.weight if kn else None, kn.bias if kn else None, qn.eps if qn else 1e-5,
                rope.cos if rope is not None else None, rope.sin if rope is not None else None,
                qk_dtype)
        if rows is not None:
            q, x = q.index_select(2, rows), x.index_select(1, rows)
        out = attend(q, k, v, on_qk, keys)
        g1 = self.ls1.gamma if isinstance(self.ls1, LayerScale) else None
        g2 = self.ls2.gamma if isinstance(self.ls2, LayerScale) else None
        # the fused GELU only where it is a cuBLASLt epilogue (CUDA, under autocast): the
        # float32 path (CPU, golden tests, the reference) keeps the exact GELU
        gelu_epilogue = fn.gelu_epilogue and mm_dtype is not None and x.is_cuda
        return fn.attention_output_mlp(
            x, out, proj_w, proj_b, g1, self.norm2.weight, self.norm2.bias, self.norm2.eps,
            fc1_w, fc1_b, fc2_w, fc2_b, g2, gelu_epilogue, mm_dtype)

    def _linear_weights(self, dtype: Optional[torch.dtype]) -> Tuple[Optional[torch.Tensor], ...]:
        """(qkv, proj, fc1, fc2) weights and biases; with ``dtype`` their copies in that dtype,
        cast once and kept (what autocast would produce in every call: same values).

        The copies are refreshed in place when a parameter changed (its version counter), so
        a CUDA graph that captured them reads the new values once an eager call refreshed
        them (a block that only replays inside a graph is never refreshed: load a new model
        to change weights)."""
        params = (self.attn.qkv.weight, self.attn.qkv.bias, self.attn.proj.weight,
                  self.attn.proj.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                  self.mlp.fc2.weight, self.mlp.fc2.bias)
        if dtype is None:
            return params
        key = (dtype, self.attn.qkv.weight.device,
               tuple(p._version if p is not None else -1 for p in params))
        cache = self._cast_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        # normal tensors even when first built under inference_mode: they are refreshed in
        # place, which inference tensors do not allow outside it
        with torch.inference_mode(False), torch.no_grad():
            if cache is not None and cache[0][:2] == key[:2]:
                for dst, p in zip(cache[1], params):         # same storage: graphs stay valid
                    if dst is not None:
                        dst.copy_(p)
                copies = cache[1]
            else:
                copies = tuple(p.detach().to(dtype) if p is not None else None
                               for p in params)
        self._cast_cache = (key, copies)
        return copies


_QK_KERNEL_FAILED = ""          # why the Triton qk-norm + RoPE kernel is off in this process


def _qk_kernel_usable(x: torch.Tensor) -> bool:
    """The Triton qk-norm + RoPE kernel runs on CUDA tensors, unless it failed to build in
    this process (a test under Triton's CPU interpreter patches this)."""
    return x.is_cuda and not _QK_KERNEL_FAILED


def _qk_norm_rope(qkv: torch.Tensor, num_heads: int, qn: nn.LayerNorm, kn: nn.LayerNorm,
                  rope: Optional[RopeTables], out_dtype: torch.dtype
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v from the Triton kernel; None (with ONE warning per process) if Triton cannot
    import or compile it here: the caller then runs the compiled torch functions (same
    maths), so a missing or broken Triton costs speed, never a window."""
    global _QK_KERNEL_FAILED
    try:
        from ._qk_rope_triton import qk_norm_rope
        return qk_norm_rope(qkv, num_heads, qn.weight, qn.bias, kn.weight, kn.bias, qn.eps,
                            rope.cos if rope is not None else None,
                            rope.sin if rope is not None else None, out_dtype)
    except torch.OutOfMemoryError:
        raise                                  # the stream's OOM handling needs to see it
    except Exception as exc:                   # ImportError, triton's CompilationError, ...
        _QK_KERNEL_FAILED = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        warnings.warn(f"qk-norm + RoPE Triton kernel unavailable ({_QK_KERNEL_FAILED}); "
                      "using the compiled torch functions (same maths)", RuntimeWarning,
                      stacklevel=3)
        return None


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype active for ``x``'s device, None when autocast is off there."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _sdpa_qk_dtype(x: torch.Tensor, on_qk: Optional[QKCallback]) -> Optional[torch.dtype]:
    """The dtype SDPA will cast q/k to (the autocast dtype), so that the fused block casts them
    itself; None when autocast is off or a hook reads q/k (VGGT4D's Gram statistics see the
    float32 q/k the official code captures)."""
    return None if on_qk is not None else _autocast_dtype(x)
