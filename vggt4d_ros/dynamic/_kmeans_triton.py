"""Triton kernel for one Lloyd step of the refinement's batched k-means (CUDA only; lazy import).

One kernel per iteration instead of a ``[S, Q, k]`` distance bmm, a min, and two float
``scatter_add_`` calls: a program holds ``BLOCK_Q`` points of one frame, finds each point's
nearest active centre (exact coordinate differences) and writes, per centre, the sum of its
points and their count over this program's points. The caller adds the per-program partials
with one ``sum`` - a fixed order, so the centres are deterministic (the scatter-add's atomics
were not) - and the ``[S, Q, k]`` matrix never exists.
Triton ships with PyTorch's CUDA wheels; the CPU path of refine_fast does not import this.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


# not specialised on the query count (varies per window; see _knn_triton)
@triton.jit(do_not_specialize=["num_q"])
def _lloyd_step_kernel(x_ptr, valid_ptr, c_ptr, pen_ptr, part_ptr, lab_ptr, own_ptr, num_q,
                       K: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr):
    frame = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    inb = offs_q < num_q
    base = x_ptr + frame * num_q * 3 + offs_q * 3
    px = tl.load(base + 0, mask=inb, other=0.0)
    py = tl.load(base + 1, mask=inb, other=0.0)
    pz = tl.load(base + 2, mask=inb, other=0.0)
    ok = (tl.load(valid_ptr + frame * num_q + offs_q, mask=inb, other=0) != 0) & inb
    offs_k = tl.arange(0, KP)
    has_k = offs_k < K
    cb = c_ptr + frame * K * 3 + offs_k * 3
    cx = tl.load(cb + 0, mask=has_k, other=0.0)
    cy = tl.load(cb + 1, mask=has_k, other=0.0)
    cz = tl.load(cb + 2, mask=has_k, other=0.0)
    pen = tl.load(pen_ptr + frame * KP + offs_k)           # 0 active, +inf inactive/padding
    dx = px[:, None] - cx[None, :]
    dy = py[:, None] - cy[None, :]
    dz = pz[:, None] - cz[None, :]
    d = dx * dx + dy * dy + dz * dz + pen[None, :]
    lab = tl.argmin(d, axis=1)
    own = tl.min(d, axis=1)
    tl.store(lab_ptr + frame * num_q + offs_q, lab.to(tl.int64), mask=inb)
    tl.store(own_ptr + frame * num_q + offs_q, own, mask=inb)
    hit = ((lab[:, None] == offs_k[None, :]) & ok[:, None]).to(tl.float32)   # [BQ, KP]
    pb = part_ptr + (frame * tl.num_programs(0) + pid) * KP * 4 + offs_k * 4
    tl.store(pb + 0, tl.sum(hit * px[:, None], axis=0))
    tl.store(pb + 1, tl.sum(hit * py[:, None], axis=0))
    tl.store(pb + 2, tl.sum(hit * pz[:, None], axis=0))
    tl.store(pb + 3, tl.sum(hit, axis=0))


def centre_penalty(active: torch.Tensor) -> torch.Tensor:
    """``active [S, k]`` bool -> ``[S, KP]`` float32 for :func:`lloyd_step`: 0 for an active
    centre, +inf for an inactive one and for the padding up to the kernel's power-of-two
    centre count ``KP``. Constant over a k-means run: computed once, not per iteration."""
    s, k = active.shape
    pen = torch.full((s, max(16, triton.next_power_of_2(k))), float("inf"),
                     dtype=torch.float32, device=active.device)
    pen[:, :k] = torch.where(active, 0.0, float("inf"))
    return pen


def lloyd_step(x: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor,
               penalty: torch.Tensor, block_q: int = 128
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One assignment + centre-sum pass of every frame's k-means.

    Args: ``x [S, Q, 3]`` float32 CUDA points, ``valid [S, Q]`` bool or int8 (the points
    that count), ``centres [S, k, 3]``, ``penalty`` = :func:`centre_penalty` of the active
    centres ``[S, k]`` (inactive centres are never nearest).
    Returns ``(own, labels, sums, counts)``: ``own [S, Q]`` squared distance to the nearest
    active centre, ``labels [S, Q]`` int64 its index, ``sums [S, k, 3]`` the sum of the valid
    points of each centre, ``counts [S, k]`` their number. Labels and distances of invalid
    points are computed but not counted.
    """
    s, q, _ = x.shape
    k = centres.shape[1]
    kp = penalty.shape[1]
    dev = x.device
    labels = torch.empty(s, q, dtype=torch.int64, device=dev)
    own = torch.empty(s, q, dtype=torch.float32, device=dev)
    programs = max(1, triton.cdiv(q, block_q))
    part = torch.zeros(s, programs, kp, 4, dtype=torch.float32, device=dev)
    if q > 0:
        _lloyd_step_kernel[(programs, s)](
            x.contiguous(), valid.to(torch.int8).contiguous(), centres.float().contiguous(),
            penalty, part, labels, own, q, K=k, KP=kp, BLOCK_Q=block_q)
    tot = part.sum(1)                                                   # [S, KP, 4]
    return own, labels, tot[:, :k, :3], tot[:, :k, 3]
