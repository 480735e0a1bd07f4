"""Camera head: iterative pose-encoding refinement from the camera token of the last layer.

For camera tokens c [B, S, 2C] (LayerNorm ``token_norm``) and k = 0..iters-1:
  inp = embed_pose(empty_pose_tokens) at k = 0, else embed_pose(previous encoding, detached)
  (shift, scale, gate) = poseLN_modulation(inp)              # SiLU -> Linear(2C, 3·2C)
  x = gate · (adaln_norm(c) · (1 + scale) + shift) + c        # adaLN, no-affine LN eps 1e-6
  x = trunk(x); delta = pose_branch(trunk_norm(x))            # Mlp 2C -> C -> 9
  enc_k = delta (k = 0) or enc_{k-1} + delta;  output activate_pose(enc_k)
Note: the camera tokens c stay the same in every iteration (only the modulation changes), and
the accumulation uses the raw (pre-activation) encoding.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ..config import CameraHeadConfig
from ..layers.block import Block
from ..layers.mlp import Mlp
from .head_act import activate_pose


class CameraHead(nn.Module):
    """aggregated tokens -> list of ``num_iterations`` pose encodings [B, S, 9]."""

    def __init__(self, cfg: CameraHeadConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if cfg.pose_encoding_type != "absT_quaR_FoV":
            raise ValueError(f"unsupported pose encoding {cfg.pose_encoding_type!r}")
        d = cfg.dim_in
        self.cfg = cfg
        self.target_dim = 9
        self.token_norm = nn.LayerNorm(d, eps=norm_eps)
        self.trunk = nn.Sequential(*[
            Block(d, cfg.num_heads, cfg.mlp_ratio, qk_norm=False, init_values=cfg.init_values,
                  norm_eps=norm_eps)
            for _ in range(cfg.trunk_depth)
        ])
        self.trunk_norm = nn.LayerNorm(d, eps=norm_eps)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, d)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.adaln_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(d, d // 2, self.target_dim)

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor],
                num_iterations: int | None = None) -> List[torch.Tensor]:
        """aggregated_tokens_list[-1] [B, S, T, 2C] -> list of [B, S, 9] (last = final)."""
        iters = self.cfg.num_iterations if num_iterations is None else num_iterations
        tokens = aggregated_tokens_list[-1]
        cam = self.token_norm(tokens[:, :, 0])                       # [B, S, 2C]
        b, s, _ = cam.shape
        normed = self.adaln_norm(cam)                                # loop-invariant
        enc = None
        outs: List[torch.Tensor] = []
        for _ in range(iters):
            if enc is None:
                inp = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                enc = enc.detach()
                inp = self.embed_pose(enc)
            shift, scale, gate = self.poseLN_modulation(inp).chunk(3, dim=-1)
            x = gate * (normed * (1 + scale) + shift) + cam
            x = self.trunk(x)
            delta = self.pose_branch(self.trunk_norm(x))
            enc = delta if enc is None else enc + delta
            outs.append(activate_pose(enc, self.cfg.trans_act, self.cfg.quat_act,
                                      self.cfg.fl_act))
        return outs
