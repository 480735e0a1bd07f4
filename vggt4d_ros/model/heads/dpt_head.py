"""DPT dense head of VGGT (depth map, point map, and the track head's feature extractor).

Reads four layers of aggregator tokens (patch tokens only), turns each into a feature map at a
different stride (x4 up, x2 up, x1, x2 down relative to the 14-px patch grid), fuses them
coarse-to-fine with RefineNet blocks and predicts a per-pixel value plus confidence
(``../shared/spec/VGGT_ARCH.md`` item 8). Parameter names equal the official checkpoint keys
under ``depth_head.`` / ``point_head.`` / ``track_head.feature_extractor.``.

Numerics: the head always runs in float32 with autocast disabled (as the official model does),
whatever dtype the tokens come in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .head_utils import activate_head, add_uv_pos_embed

if TYPE_CHECKING:  # config types only for annotations; no import cycle at runtime
    from ..config import DPTConfig

# nn.functional.interpolate indexes with int32 on some backends; split the batch beyond this.
_INTERP_MAX_ELEMENTS = 1_610_612_736


def interpolate_bilinear(x: torch.Tensor, size: Tuple[int, int], align_corners: bool = True
                         ) -> torch.Tensor:
    """Bilinear resize of [N, C, h, w] to [N, C, *size], split over N when the output is huge."""
    n_out = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n_out <= _INTERP_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    chunks = torch.chunk(x, chunks=n_out // _INTERP_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=align_corners)
                      for c in chunks], dim=0)


class ResidualConvUnit(nn.Module):
    """ReLU -> conv3x3 -> ReLU -> conv3x3, plus skip.

    QUIRK kept for checkpoint fidelity: the official unit applies its first ReLU *in place* to
    the input, so the skip connection adds ReLU(x), not x. We compute that explicitly (without
    mutating the caller's tensor): out = conv2(relu(conv1(relu(x)))) + relu(x).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, F, h, w] -> [N, F, h, w]."""
        x = F.relu(x)
        out = self.conv2(F.relu(self.conv1(x)))
        return out + x


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (coarse [+ RCU(skip)]) -> RCU -> bilinear resize -> 1x1 conv.

    ``has_residual=False`` (the coarsest block, refinenet4) has no skip input and no
    ``resConfUnit1``. Resizing uses ``size`` when given, else doubles the resolution; bilinear
    with align_corners=True.
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.has_residual = has_residual
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x (and skip): [N, F, h, w] -> [N, F, *size] (or [N, F, 2h, 2w])."""
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block needs a skip feature map")
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        x = interpolate_bilinear(x, tuple(size), align_corners=True)
        return self.out_conv(x)


class _Scratch(nn.Module):
    """Container whose attribute names reproduce the official ``scratch.*`` checkpoint keys."""

    def __init__(self, in_channels: Sequence[int], features: int, feature_only: bool,
                 output_dim: int) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(in_channels[0], features, 3, 1, 1, bias=False)
        self.layer2_rn = nn.Conv2d(in_channels[1], features, 3, 1, 1, bias=False)
        self.layer3_rn = nn.Conv2d(in_channels[2], features, 3, 1, 1, bias=False)
        self.layer4_rn = nn.Conv2d(in_channels[3], features, 3, 1, 1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        head_features_2 = 32  # fixed width of the last hidden conv in the official head
        if feature_only:
            self.output_conv1 = nn.Conv2d(features, features, 3, 1, 1)
        else:
            self.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
            self.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, head_features_2, 3, 1, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_features_2, output_dim, 1, 1, 0),
            )


class DPTHead(nn.Module):
    """Dense prediction head over VGGT aggregator tokens.

    Args (names as in the official constructor):
        dim_in: token width 2C (2048 for VGGT-1B).
        patch_size: pixels per patch (14).
        output_dim: output channels incl. confidence (depth 2, points 4).
        activation: value activation ("exp" for depth, "inv_log" for points).
        conf_activation: confidence activation ("expp1").
        features: fusion width (256; 128 in the track head).
        out_channels: widths of the four projections ([256, 512, 1024, 1024]).
        intermediate_layer_idx: aggregator layers read ([4, 11, 17, 23]).
        pos_embed: add the sinusoidal uv embedding (ratio 0.1) after the projections and
            after the final upsampling.
        feature_only: stop after the upsampling and return features (track head).
        down_ratio: the output is (14h / down_ratio, 14w / down_ratio) pixels.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPTHead needs exactly 4 out_channels and 4 intermediate layers, got "
                             f"{list(out_channels)} and {list(intermediate_layer_idx)}")
        if not feature_only and output_dim < 2:
            raise ValueError(f"output_dim must be >= 2 (values + confidence), got {output_dim}")
        if down_ratio < 1:
            raise ValueError(f"down_ratio must be >= 1, got {down_ratio}")
        self.patch_size = int(patch_size)
        self.output_dim = int(output_dim)
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = bool(pos_embed)
        self.feature_only = bool(feature_only)
        self.down_ratio = int(down_ratio)
        self.intermediate_layer_idx = tuple(int(i) for i in intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        oc = list(out_channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4, padding=0),  # stride 14/4
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2, padding=0),  # stride 14/2
            nn.Identity(),                                                           # stride 14
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),           # stride 28
        ])
        self.scratch = _Scratch(oc, features, self.feature_only, self.output_dim)

    @classmethod
    def from_config(cls, cfg: "DPTConfig", output_dim: int = 4, activation: str = "inv_log",
                    conf_activation: str = "expp1") -> "DPTHead":
        """Build from a :class:`vggt4d_ros.model.config.DPTConfig` (depth: output_dim 2, "exp")."""
        return cls(dim_in=cfg.dim_in, patch_size=cfg.patch_size, output_dim=output_dim,
                   activation=activation, conf_activation=conf_activation, features=cfg.features,
                   out_channels=cfg.out_channels, intermediate_layer_idx=cfg.intermediate_layer_idx,
                   pos_embed=cfg.pos_embed, feature_only=cfg.feature_only, down_ratio=cfg.down_ratio)

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor], images: torch.Tensor,
                patch_start_idx: int, frames_chunk_size: Optional[int] = 8,
                autocast_dtype: Optional[torch.dtype] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Run the head, a chunk of frames at a time (chunking has no numerical effect).

        Args:
            aggregated_tokens_list: per-layer tokens, each [B, S, P+N, dim_in] (P special tokens
                first, then N = h*w patch tokens in row-major order).
            images: [B, S, 3, H, W] (only the shape is used).
            patch_start_idx: P (5 for VGGT).
            frames_chunk_size: frames per chunk; None or >= S processes all at once.
            autocast_dtype: None (default, official) runs the head in float32 with autocast
                off; a dtype (e.g. torch.bfloat16) runs its convolutions under autocast in
                that dtype (faster on GPUs; outputs are still returned as float32).
        Returns:
            feature_only: features [B, S, features, H/down_ratio, W/down_ratio].
            else: (values [B, S, H, W, output_dim-1], conf [B, S, H, W]).
        """
        self._check_inputs(aggregated_tokens_list, images, patch_start_idx)
        S = images.shape[1]
        if frames_chunk_size is not None and frames_chunk_size <= 0:
            raise ValueError(f"frames_chunk_size must be positive or None, got {frames_chunk_size}")
        # Heads run in fp32 even inside a bf16 autocast region (official behaviour), unless
        # the caller opts into reduced-precision heads.
        device_type = "cuda" if images.is_cuda else "cpu"
        ctx = (torch.autocast(device_type=device_type, enabled=False) if autocast_dtype is None
               else torch.autocast(device_type=device_type, dtype=autocast_dtype))
        with ctx:
            step = S if frames_chunk_size is None else frames_chunk_size
            parts = [self._forward_frames(aggregated_tokens_list, images, patch_start_idx,
                                          s, min(s + step, S))
                     for s in range(0, S, step)]
        if len(parts) == 1:   # no copy when one chunk holds every frame
            part = parts[0]
            return part.float() if self.feature_only else (part[0].float(), part[1].float())
        if self.feature_only:
            return torch.cat(parts, dim=1).float()
        return (torch.cat([p[0] for p in parts], dim=1).float(),
                torch.cat([p[1] for p in parts], dim=1).float())

    def _check_inputs(self, tokens: Sequence[torch.Tensor], images: torch.Tensor,
                      patch_start_idx: int) -> None:
        if images.ndim != 5:
            raise ValueError(f"images must be [B, S, 3, H, W], got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch size {self.patch_size}")
        need = max(self.intermediate_layer_idx)
        if len(tokens) <= need:
            raise ValueError(f"DPTHead reads layer {need} but got only {len(tokens)} token layers")
        n_patch = (H // self.patch_size) * (W // self.patch_size)
        for i in self.intermediate_layer_idx:
            t = tokens[i]
            if t is None:
                raise ValueError(f"DPTHead reads aggregator layer {i}, which was not kept")
            if t.ndim != 4 or t.shape[0] != B or t.shape[1] != S or t.shape[2] != patch_start_idx + n_patch:
                raise ValueError(f"tokens of layer {i} must be [B={B}, S={S}, {patch_start_idx}+{n_patch}, C], "
                                 f"got {tuple(t.shape)}")

    def _forward_frames(self, tokens: Sequence[torch.Tensor], images: torch.Tensor,
                        patch_start_idx: int, s0: int, s1: int
                        ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Frames s0..s1-1 of every batch element; shapes as in :meth:`forward`."""
        B, _, _, H, W = images.shape
        S = s1 - s0
        ph, pw = H // self.patch_size, W // self.patch_size
        maps: List[torch.Tensor] = []
        for k, layer in enumerate(self.intermediate_layer_idx):
            x = tokens[layer][:, s0:s1, patch_start_idx:].float()
            x = self.norm(x.reshape(B * S, ph * pw, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(B * S, -1, ph, pw)
            x = self.projects[k](x)
            if self.pos_embed:
                x = add_uv_pos_embed(x, W, H)
            maps.append(self.resize_layers[k](x))

        out = self._fuse(maps)
        size = (int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio))
        out = interpolate_bilinear(out, size, align_corners=True)
        if self.pos_embed:
            out = add_uv_pos_embed(out, W, H)
        if self.feature_only:
            return out.reshape(B, S, *out.shape[1:])
        out = self.scratch.output_conv2(out)
        values, conf = activate_head(out, self.activation, self.conf_activation)
        return values.reshape(B, S, *values.shape[1:]), conf.reshape(B, S, *conf.shape[1:])

    def _fuse(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """RefineNet fusion from the coarsest (layer 4) to the finest map (layer 1) -> output_conv1."""
        sc = self.scratch
        l1, l2, l3, l4 = sc.layer1_rn(maps[0]), sc.layer2_rn(maps[1]), sc.layer3_rn(maps[2]), sc.layer4_rn(maps[3])
        out = sc.refinenet4(l4, size=tuple(l3.shape[2:]))
        out = sc.refinenet3(out, l3, size=tuple(l2.shape[2:]))
        out = sc.refinenet2(out, l2, size=tuple(l1.shape[2:]))
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
