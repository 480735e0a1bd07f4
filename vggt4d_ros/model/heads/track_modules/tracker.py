"""Iterative point tracker of VGGT's track head (official name: BaseTrackerPredictor).

Given per-frame feature maps and query points in the first frame, it refines all frames' track
positions ``iters`` times: local correlations (pyramid) + flow code + track features go through
the update transformer, which outputs coordinate and feature deltas. The first frame's
positions are pinned to the queries. Visibility and confidence come from the final features.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .blocks import CorrPyramid, EfficientUpdateFormer
from .modules import Mlp
from .utils import flow_embed, grid_sincos_embed, sample_points


class TrackerPredictor(nn.Module):
    """CoTracker/VGGSfM-style iterative tracker.

    Args (official names):
        stride: feature maps are ``stride`` times smaller than the query-point pixel frame.
        corr_levels, corr_radius: correlation pyramid (7 levels, radius 4 in VGGT).
        latent_dim: feature channels C of the maps (= track head ``features``).
        hidden_size: width of the update transformer and correlation MLP (384).
        use_spaceatt, depth: cross-track attention on, 6 time/space stages.
        max_scale: pixels; flows are also fed raw, divided by it.
        predict_conf: add the confidence predictor.
    """

    def __init__(self, stride: int = 1, corr_levels: int = 5, corr_radius: int = 4,
                 latent_dim: int = 128, hidden_size: int = 384, use_spaceatt: bool = True,
                 depth: int = 6, max_scale: int = 518, predict_conf: bool = True) -> None:
        super().__init__()
        if latent_dim % 4:
            raise ValueError(f"latent_dim must be a multiple of 4, got {latent_dim}")
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.hidden_size = hidden_size
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        # input = [flow code (C) + 2 x raw flow (4) | correlation code (C) | track features (C)]
        self.transformer_dim = 3 * latent_dim + 4
        # slot 0: query frame, slot 1: every other frame
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0, time_depth=depth,
            input_dim=self.transformer_dim, hidden_size=hidden_size,
            output_dim=latent_dim + 2, mlp_ratio=4.0, add_space_attn=use_spaceatt)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(self, query_points: torch.Tensor, fmaps: torch.Tensor, iters: int = 6,
                apply_sigmoid: bool = True
                ) -> Tuple[List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Track the queries through all frames.

        Args:
            query_points: [B, N, 2] pixel (x, y) in frame 0, in the image frame
                (``stride`` x the feature-map resolution).
            fmaps: [B, S, C, HH, WW] feature maps.
            iters: refinement iterations.
        Returns:
            coord_preds: list (one per iteration) of [B, S, N, 2] pixel (x, y), image frame;
            vis: [B, S, N] (in [0, 1] with apply_sigmoid); conf: [B, S, N] or None.
        """
        if query_points.ndim != 3 or query_points.shape[-1] != 2:
            raise ValueError(f"query_points must be [B, N, 2], got {tuple(query_points.shape)}")
        if fmaps.ndim != 5 or fmaps.shape[2] != self.latent_dim:
            raise ValueError(f"fmaps must be [B, S, {self.latent_dim}, H, W], got {tuple(fmaps.shape)}")
        B, N, _ = query_points.shape
        _, S, C, HH, WW = fmaps.shape
        if N == 0:
            raise ValueError("query_points holds no point; pass at least one (x, y)")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        if fmaps.shape[0] != B:
            raise ValueError(f"batch of query_points ({B}) and fmaps ({fmaps.shape[0]}) differ")

        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        queries = query_points.to(fmaps.dtype) / float(self.stride)       # feature-map pixels
        coords = queries[:, None].expand(B, S, N, 2).clone()              # start at the query

        query_feat = sample_points(fmaps[:, 0], queries)                 # [B, N, C]
        track_feats = query_feat[:, None].expand(B, S, N, C)             # [B, S, N, C]
        corr_fn = CorrPyramid(fmaps, num_levels=self.corr_levels, radius=self.corr_radius)

        # Loop-invariant inputs: position code of the query and the frame-role token.
        pos_grid = grid_sincos_embed(self.transformer_dim, HH, WW, device=fmaps.device, dtype=fmaps.dtype)
        pos_code = sample_points(pos_grid.expand(B, -1, -1, -1), queries)  # [B, N, D]
        ref = torch.cat([self.query_ref_token[:, :1],
                         self.query_ref_token[:, 1:2].expand(-1, S - 1, -1)], dim=1)  # [1, S, D]
        static_code = pos_code[:, :, None] + ref[:, None].to(fmaps.dtype)           # [B, N, S, D]

        coord_preds: List[torch.Tensor] = []
        for _ in range(iters):
            coords = coords.detach()
            corr = self.corr_mlp(corr_fn.sample(track_feats, coords))               # [B, S, N, C]
            flows = coords - coords[:, :1]                                           # [B, S, N, 2]
            flows_bn = flows.permute(0, 2, 1, 3).reshape(B * N, S, 2)
            flow_code = torch.cat([flow_embed(flows_bn, self.flows_emb_dim),
                                   flows_bn / self.max_scale, flows_bn / self.max_scale], dim=-1)
            x = torch.cat([flow_code.reshape(B, N, S, -1),
                           corr.permute(0, 2, 1, 3),
                           track_feats.permute(0, 2, 1, 3)], dim=-1) + static_code   # [B, N, S, D]
            delta = self.updateformer(x)                                             # [B, N, S, C+2]
            d_coords = delta[..., :2].permute(0, 2, 1, 3)
            d_feats = delta[..., 2:].permute(0, 2, 1, 3).reshape(-1, C)
            track_feats = (self.ffeat_updater(self.ffeat_norm(d_feats))
                           + track_feats.reshape(-1, C)).reshape(B, S, N, C)
            coords = coords + d_coords
            # Frame 0 is the query frame: its positions stay the queries.
            coords = torch.cat([queries[:, None], coords[:, 1:]], dim=1)
            coord_preds.append(coords * self.stride)

        vis = self.vis_predictor(track_feats).squeeze(-1)
        conf = self.conf_predictor(track_feats).squeeze(-1) if self.predict_conf else None
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        return coord_preds, vis, conf
