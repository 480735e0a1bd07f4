"""Triton kernels of the refinement's kNN (CUDA only; imported lazily).

For every query point and every block of G reference points of its frame, the minimum squared
distance (from coordinate differences, float32). A program holds ``BLOCK_Q`` queries in
registers and walks the frame's reference blocks, so each reference block is loaded once per
program instead of once per query, and the ``[S, Q, R]`` distance matrix never exists. The
second stage takes the kk blocks with the smallest minima and the kk nearest of their
members, both by repeated arg-min (a sort of the candidates cost twice as much: 19.9 vs
10.6 ms for the 16-frame window of run 21 on an H100, coarse mask 10.5 % of the pixels).
Triton ships with PyTorch's CUDA wheels; the CPU path of refine_fast does not import this.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# launch parameters (module-level so that a device probe can compare variants)
BLOCK_Q_MIN = 64        # queries per program, first stage
# second stage, queries per program: 8 -> 12.6 ms, 16 -> 15.0, 32 -> 24.4 (H100 run 25,
# 16 frames x 24,576 queries x 8,192 references)
BLOCK_Q_MEAN = 8
# second stage: kk arg-min steps (True: one sort of the candidates; 19.9 vs 10.6 ms for a
# 16-frame window, H100 run 21)
MEAN_BY_SORT = False


@triton.jit
def _load_queries(q_ptr, num_q, BLOCK_Q: tl.constexpr):
    """This program's frame, query offsets / validity and query coordinates."""
    frame = tl.program_id(1).to(tl.int64)
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = offs_q < num_q
    q_base = q_ptr + frame * num_q * 3 + offs_q * 3
    qx = tl.load(q_base + 0, mask=valid, other=0.0)
    qy = tl.load(q_base + 1, mask=valid, other=0.0)
    qz = tl.load(q_base + 2, mask=valid, other=0.0)
    return frame, offs_q, valid, qx, qy, qz


# ``do_not_specialize``: Triton otherwise compiles one variant per (num_q % 16 == 0, == 1) -
# a compile (seconds) in the middle of a stream when a window's query count first hits one
@triton.jit(do_not_specialize=["num_q"])
def _block_min_kernel(q_ptr, r_ptr, out_ptr, num_q, num_blocks: tl.constexpr,
                      G: tl.constexpr, BLOCK_Q: tl.constexpr):
    frame, offs_q, valid, qx, qy, qz = _load_queries(q_ptr, num_q, BLOCK_Q)
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
    block_q = BLOCK_Q_MIN
    grid = (triton.cdiv(q, block_q), s)
    _block_min_kernel[grid](queries, ref_blocks, out, q, num_blocks=b, G=g, BLOCK_Q=block_q)
    return out


@triton.jit(do_not_specialize=["num_q", "num_blocks"])
def _knn_mean_kernel(q_ptr, r_ptr, bmin_ptr, out_ptr, num_q, num_blocks, far_test_sq,
                     KK: tl.constexpr, KK_PAD: tl.constexpr, G: tl.constexpr,
                     B_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, SORT: tl.constexpr):
    frame, offs_q, valid, qx, qy, qz = _load_queries(q_ptr, num_q, BLOCK_Q)
    # 1) the KK blocks with the smallest minima (repeated arg-min; exact, ties by index)
    offs_b = tl.arange(0, B_PAD)
    bm = tl.load(bmin_ptr + frame * num_q * num_blocks + offs_q[:, None] * num_blocks
                 + offs_b[None, :], mask=valid[:, None] & (offs_b[None, :] < num_blocks),
                 other=float("inf"))
    offs_k = tl.arange(0, KK_PAD)
    sel = tl.zeros([BLOCK_Q, KK_PAD], dtype=tl.int32)
    for it in tl.static_range(KK):
        j = tl.argmin(bm, axis=1)
        sel = tl.where(offs_k[None, :] == it, j[:, None], sel)
        bm = tl.where(offs_b[None, :] == j[:, None], float("inf"), bm)
    # 2) exact squared distances to their KK·G members, then the KK smallest
    offs_g = tl.arange(0, G)
    ref = sel[:, :, None] * G + offs_g[None, None, :]                 # [BQ, KK_PAD, G]
    ok = valid[:, None, None] & (offs_k[None, :, None] < KK)
    r_frame = r_ptr + frame * num_blocks * G * 3
    dx = qx[:, None, None] - tl.load(r_frame + ref * 3 + 0, mask=ok, other=0.0)
    dy = qy[:, None, None] - tl.load(r_frame + ref * 3 + 1, mask=ok, other=0.0)
    dz = qz[:, None, None] - tl.load(r_frame + ref * 3 + 2, mask=ok, other=0.0)
    d2 = tl.where(ok, dx * dx + dy * dy + dz * dz, float("inf"))
    d2 = tl.reshape(d2, [BLOCK_Q, KK_PAD * G])
    offs_c = tl.arange(0, KK_PAD * G)
    if SORT:
        d2 = tl.sort(d2, dim=1)
        present = (offs_c[None, :] < KK) & (d2 < far_test_sq)
        dist = tl.sqrt(tl.where(present, d2, 0.0))
        total = tl.sum(dist, axis=1)
        count = tl.maximum(tl.sum(present.to(tl.float32), axis=1), 1.0)
    else:
        # the KK smallest by repeated arg-min (one entry removed per step, ties by index)
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        count = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for it in tl.static_range(KK):
            j = tl.argmin(d2, axis=1)
            m = tl.min(d2, axis=1)
            present = m < far_test_sq
            total += tl.where(present, tl.sqrt(m), 0.0)
            count += present.to(tl.float32)
            d2 = tl.where(offs_c[None, :] == j[:, None], float("inf"), d2)
        count = tl.maximum(count, 1.0)
    tl.store(out_ptr + frame * num_q + offs_q, total / count, mask=valid)


def knn_mean_from_block_min(queries: torch.Tensor, ref_blocks: torch.Tensor,
                            block_min: torch.Tensor, kk: int, far_test: float) -> torch.Tensor:
    """Second stage in one kernel -> ``[S, Q]`` mean distance to the kk nearest references.

    ``block_min [S, Q, B]`` from :func:`block_min_sq_dists`; references farther than
    ``far_test`` (padding) are ignored. Same rule as refine_fast's torch second stage:
    the kk blocks with the smallest minima hold every one of the kk nearest references.
    """
    s, q, _ = queries.shape
    b, g = ref_blocks.shape[1:3]
    out = torch.empty(s, q, dtype=torch.float32, device=queries.device)
    if q == 0:
        return out
    block_q = BLOCK_Q_MEAN
    grid = (triton.cdiv(q, block_q), s)
    _knn_mean_kernel[grid](queries.float().contiguous(), ref_blocks.float().contiguous(),
                           block_min.float().contiguous(), out, q, b, far_test * far_test,
                           KK=kk, KK_PAD=triton.next_power_of_2(kk), G=g,
                           B_PAD=triton.next_power_of_2(b), BLOCK_Q=block_q,
                           SORT=MEAN_BY_SORT)
    return out
