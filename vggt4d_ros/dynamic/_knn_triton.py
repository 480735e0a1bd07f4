"""Triton kernel for the first stage of the refinement's kNN (CUDA only; imported lazily).

For every query point and every block of G reference points of its frame, the minimum squared
distance (from coordinate differences, float32). A program holds ``BLOCK_Q`` queries in
registers and walks the frame's reference blocks, so each reference block is loaded once per
program instead of once per query, and the ``[S, Q, R]`` distance matrix never exists.
Triton ships with PyTorch's CUDA wheels; the CPU path of refine_fast does not import this.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_min_kernel(q_ptr, r_ptr, out_ptr, num_q, num_blocks,
                      G: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid_q = tl.program_id(0)
    frame = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = offs_q < num_q
    q_base = q_ptr + frame * num_q * 3 + offs_q * 3
    qx = tl.load(q_base + 0, mask=valid, other=0.0)
    qy = tl.load(q_base + 1, mask=valid, other=0.0)
    qz = tl.load(q_base + 2, mask=valid, other=0.0)
    offs_g = tl.arange(0, G)
    r_frame = r_ptr + frame * num_blocks * G * 3
    out_base = out_ptr + frame * num_q * num_blocks + offs_q * num_blocks
    for b in range(0, num_blocks):
        r_base = r_frame + (b * G + offs_g) * 3
        dx = qx[:, None] - tl.load(r_base + 0)[None, :]
        dy = qy[:, None] - tl.load(r_base + 1)[None, :]
        dz = qz[:, None] - tl.load(r_base + 2)[None, :]
        d2 = dx * dx + dy * dy + dz * dz
        tl.store(out_base + b, tl.min(d2, axis=1), mask=valid)


def block_min_sq_dists(queries: torch.Tensor, ref_blocks: torch.Tensor) -> torch.Tensor:
    """``queries [S, Q, 3]``, ``ref_blocks [S, B, G, 3]`` float32 CUDA -> ``[S, Q, B]``.

    Entry ``[s, q, b]`` = min over g of ``|queries[s, q] - ref_blocks[s, b, g]|²``.
    G must be a power of two (refine_fast chooses it so).
    """
    s, q, _ = queries.shape
    b, g = ref_blocks.shape[1:3]
    queries = queries.float().contiguous()
    ref_blocks = ref_blocks.float().contiguous()
    out = torch.empty(s, q, b, dtype=torch.float32, device=queries.device)
    if q == 0 or b == 0:
        return out
    block_q = 64
    grid = (triton.cdiv(q, block_q), s)
    _block_min_kernel[grid](queries, ref_blocks, out, q, b, G=g, BLOCK_Q=block_q)
    return out
