"""Track head of VGGT: DPT feature extractor + iterative point tracker.

Parameter names equal the official checkpoint keys under ``track_head.``
(``feature_extractor.*`` is a feature-only :class:`DPTHead`, ``tracker.*`` the tracker).
Runs in float32 with autocast disabled, like the other heads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .dpt_head import DPTHead
from .track_modules.tracker import TrackerPredictor

if TYPE_CHECKING:
    from ..config import TrackHeadConfig


class TrackHead(nn.Module):
    """Tracks query points of frame 0 through all frames.

    Args (official names):
        dim_in: token width 2C.
        patch_size: pixels per patch (14).
        features: feature-map channels (128 for VGGT-1B).
        iters: tracker refinement iterations (4).
        predict_conf: also predict a per-point confidence.
        stride: feature maps are this many times smaller than the image (2).
        corr_levels, corr_radius: correlation pyramid (7, 4).
        hidden_size: tracker transformer width (384).
        pos_embed: uv embedding inside the feature extractor (False for VGGT-1B's checkpoint).
        out_channels, intermediate_layer_idx: of the feature extractor (defaults = VGGT-1B).
        down_ratio: feature extractor output down-sampling (2).
    """

    def __init__(self, dim_in: int, patch_size: int = 14, features: int = 128, iters: int = 4,
                 predict_conf: bool = True, stride: int = 2, corr_levels: int = 7,
                 corr_radius: int = 4, hidden_size: int = 384, pos_embed: bool = False,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
                 down_ratio: int = 2) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.iters = iters
        self.feature_extractor = DPTHead(
            dim_in=dim_in, patch_size=patch_size, features=features, out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx, feature_only=True,
            down_ratio=down_ratio, pos_embed=pos_embed)
        self.tracker = TrackerPredictor(
            latent_dim=features, predict_conf=predict_conf, stride=stride,
            corr_levels=corr_levels, corr_radius=corr_radius, hidden_size=hidden_size)

    @classmethod
    def from_config(cls, cfg: "TrackHeadConfig") -> "TrackHead":
        """Build from a :class:`vggt4d_ros.model.config.TrackHeadConfig`."""
        fe = cfg.feature_extractor
        return cls(dim_in=cfg.dim_in, patch_size=cfg.patch_size, features=cfg.features,
                   iters=cfg.iters, predict_conf=cfg.predict_conf, stride=cfg.stride,
                   corr_levels=cfg.corr_levels, corr_radius=cfg.corr_radius,
                   hidden_size=cfg.hidden_size, pos_embed=fe.pos_embed,
                   out_channels=fe.out_channels, intermediate_layer_idx=fe.intermediate_layer_idx,
                   down_ratio=fe.down_ratio)

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor], images: torch.Tensor,
                patch_start_idx: int, query_points: torch.Tensor, iters: Optional[int] = None
                ) -> Tuple[List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            aggregated_tokens_list: per-layer tokens [B, S, P+N, dim_in].
            images: [B, S, 3, H, W].
            patch_start_idx: P.
            query_points: [B, Q, 2] or [Q, 2] pixel (x, y) in frame 0 (image resolution).
            iters: overrides ``self.iters``.
        Returns:
            tracks: list (one per iteration) of [B, S, Q, 2] pixels; vis [B, S, Q] in [0, 1];
            conf [B, S, Q] in [0, 1] (None without predict_conf).
        """
        if query_points.ndim == 2:
            query_points = query_points[None]
        if query_points.ndim != 3 or query_points.shape[-1] != 2:
            raise ValueError(f"query_points must be [B, Q, 2] or [Q, 2], got {tuple(query_points.shape)}")
        if images.ndim != 5 or query_points.shape[0] != images.shape[0]:
            raise ValueError(f"query_points batch {query_points.shape[0]} does not match images "
                             f"{tuple(images.shape)}")
        with torch.autocast(device_type="cuda" if images.is_cuda else "cpu", enabled=False):
            fmaps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)
            return self.tracker(query_points.float(), fmaps.float(),
                                iters=self.iters if iters is None else iters)
