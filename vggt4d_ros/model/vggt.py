"""VGGT: aggregator + camera head + DPT depth / point heads + track head.

State-dict keys equal the official facebook/VGGT-1B keys (``aggregator.*``, ``camera_head.*``,
``depth_head.*``, ``point_head.*``, ``track_head.*``).

Numerics: ``forward(..., autocast_dtype=torch.bfloat16)`` reproduces the official GPU
inference recipe: the aggregator runs under ``torch.autocast`` in that dtype (matmuls and
attention in bf16, LayerNorm/softmax statistics and the residual stream in float32) and every
head runs with autocast disabled on float32 tokens. ``autocast_dtype=None`` (default) runs
everything in the parameters' dtype (float32 on CPU: the golden-reference path).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

import torch
from torch import nn

from .aggregator import Aggregator
from .config import VGGTConfig
from .heads.camera_head import CameraHead
from .heads.dpt_head import DPTHead
from .heads.track_head import TrackHead
from .hooks import AttentionControl
from .pose_encoding import pose_encoding_to_extri_intri

if TYPE_CHECKING:
    from .layers.fused import FusedBlockFunctions

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEADS = ("camera", "depth", "point", "track")


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer (facebook/VGGT-1B layout).

    ``enable_track`` False leaves out the track head (no ``track_head.*`` parameters).
    """

    def __init__(self, config: Optional[VGGTConfig] = None, enable_camera: bool = True,
                 enable_depth: bool = True, enable_point: bool = True,
                 enable_track: bool = True) -> None:
        super().__init__()
        cfg = config or VGGTConfig.vggt_1b()
        self.config = cfg
        self.aggregator = Aggregator(cfg)
        self.camera_head = (CameraHead(cfg.camera_head, cfg.layer_norm_eps) if enable_camera
                            else None)
        self.depth_head = _build_dpt(cfg, 2, "exp") if enable_depth else None
        self.point_head = _build_dpt(cfg, 4, "inv_log") if enable_point else None
        self.track_head = _build_track(cfg) if enable_track else None
        self.fused_functions: Optional["FusedBlockFunctions"] = None  # use_fused_blocks

    # ------------------------------------------------------------------ speed options
    def use_fused_blocks(self, enabled: bool = True, compile: bool = False,
                         mode: Optional[str] = None, compile_heads: bool = True) -> "VGGT":
        """Run the aggregator's and the patch embed's blocks through ``layers/fused``.

        ``compile`` wraps the two block functions in ``torch.compile`` (one graph per block
        shape, shared by all blocks; the first forward per window shape pays the compile)
        and, with ``compile_heads``, the camera / depth / point heads' forwards (their
        elementwise steps fuse; same float32 maths up to rounding). ``enabled=False``
        restores the plain module path everywhere. Same maths either way.
        """
        from .layers.block import Block
        from .layers.fused import FusedBlockFunctions, _raise_recompile_limit
        fns = FusedBlockFunctions(compile=compile, mode=mode) if enabled else None
        self.fused_functions = fns          # its options are set per call (Vggt4dPipeline)
        for module in self.aggregator.modules():
            if isinstance(module, Block):
                module.fused = fns
        for head in (self.camera_head, self.depth_head, self.point_head):
            if head is None:
                continue
            head.__dict__.pop("forward", None)           # back to the class's eager forward
            if enabled and compile and compile_heads:
                _raise_recompile_limit(64)
                # an instance attribute shadows the class method; nn.Module.__call__ uses it
                head.forward = torch.compile(head.forward, dynamic=False, mode=mode)
        return self

    # ------------------------------------------------------------------ helpers
    def needed_layers(self, with_track: bool = False, dense: bool = True) -> set[int]:
        """Aggregator layers the enabled heads read (the rest need not be kept).

        ``dense`` False: the DPT heads will not run, so only the camera head's last layer."""
        layers = {self.config.depth - 1}
        if dense and (self.depth_head is not None or self.point_head is not None):
            layers |= set(self.config.dpt.intermediate_layer_idx)
        if with_track and self.track_head is not None:
            layers |= set(self.config.track_head.feature_extractor.intermediate_layer_idx)
        return layers

    @staticmethod
    def validate_images(images: Any, patch_size: int = 14) -> torch.Tensor:
        """Check images and return them as [B, S, 3, H, W]; ValueError naming the problem.

        A list/tuple of [3, H, W] frames is stacked if all frames have the same size.
        """
        if isinstance(images, (list, tuple)):
            if not images or not all(isinstance(f, torch.Tensor) for f in images):
                raise ValueError("a list of images must hold at least one [3, H, W] tensor")
            sizes = sorted({tuple(f.shape) for f in images})
            if len(sizes) > 1:
                raise ValueError(f"frames of different sizes {sizes}: bring them to one size "
                                 "first (preprocess_images pads them like the official loader)")
            images = torch.stack(list(images))
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype "
                             f"{images.dtype} (divide uint8 images by 255)")
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise ValueError("images must be [S, 3, H, W] or [B, S, 3, H, W], got shape "
                             f"{tuple(images.shape)}")
        b, s, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 (RGB) channels in dim -3, got {c} "
                             f"(shape {tuple(images.shape)}; channels-last input?)")
        if b < 1 or s < 1:
            raise ValueError(f"images hold no frame (shape {tuple(images.shape)})")
        if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
            raise ValueError(f"image height and width must be positive multiples of {patch_size}, "
                             f"got H={h}, W={w} (use preprocess_images)")
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):   # also catches NaN
            raise ValueError(f"image values must lie in [0, 1], got min {lo}, max {hi}")
        return images

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, query_points: Optional[torch.Tensor] = None,
                control: Optional[AttentionControl] = None,
                patch_tokens: Optional[torch.Tensor] = None,
                autocast_dtype: Optional[torch.dtype] = None,
                heads: Optional[Iterable[str]] = None,
                head_autocast_dtype: Optional[torch.dtype] = None,
                validate: bool = True) -> Dict[str, Any]:
        """Predict cameras, depth, point maps (and tracks) for S frames.

        images [S, 3, H, W] or [B, S, 3, H, W], float in [0, 1], H, W multiples of 14.
        query_points [N, 2] or [B, N, 2] pixel (x, y) in frame 0, optional.
        Returns dict: pose_enc [B,S,9], pose_enc_list (iterations), depth [B,S,H,W,1],
        depth_conf [B,S,H,W], world_points [B,S,H,W,3] (frame-0 world, i.e. camera 0),
        world_points_conf [B,S,H,W], images [B,S,3,H,W], extrinsic [B,S,3,4] (camera-from-world),
        intrinsic [B,S,3,3] (pixels); track/vis/conf with query_points;
        encoder_features [B·S, N, C_dino] when ``control.encoder_features``.

        ``heads`` limits which heads run, a subset of ``HEADS`` ("camera", "depth", "point",
        "track"); None runs every built head (a caller that only needs poses and depth, like
        VGGT4D's first pass, skips the point head and its aggregator layers are not kept).
        ``head_autocast_dtype`` (default None = the official fp32 heads) runs the DPT heads
        under autocast in that dtype instead — faster, numerically different (see
        docs/BENCHMARKS.md for the measured deviation).

        ``validate`` False skips :meth:`validate_images` (its value check reads the device on
        the host, which a CUDA-graph capture forbids): the caller has checked the images.
        """
        if validate:
            images = self.validate_images(images, self.config.patch_size)
        elif images.dim() == 4:
            images = images.unsqueeze(0)
        wanted = set(HEADS) if heads is None else set(heads)
        unknown = wanted - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        with_track = (query_points is not None and self.track_head is not None
                      and "track" in wanted)
        run_camera = self.camera_head is not None and "camera" in wanted
        run_depth = self.depth_head is not None and "depth" in wanted
        run_point = self.point_head is not None and "point" in wanted
        agg_ctx = (torch.autocast(images.device.type, dtype=autocast_dtype)
                   if autocast_dtype is not None else contextlib.nullcontext())
        with agg_ctx:
            agg = self.aggregator.run(images, control=control, patch_tokens=patch_tokens,
                                      keep_layers=self.needed_layers(
                                          with_track, dense=run_depth or run_point))
        tokens = agg.layers
        if autocast_dtype is not None:
            # Heads in float32, autocast off (the official recipe).
            tokens = [t.float() if t is not None else None for t in tokens]
            images_h = images.float()
            head_ctx = torch.autocast(images.device.type, enabled=False)
        else:
            images_h = images
            head_ctx = contextlib.nullcontext()
        out: Dict[str, Any] = {}
        dpt_kw = {} if head_autocast_dtype is None else {"autocast_dtype": head_autocast_dtype}
        with head_ctx:
            if run_camera:
                pose_list = self.camera_head(tokens)
                out["pose_enc"] = pose_list[-1]
                out["pose_enc_list"] = pose_list
                h, w = images.shape[-2:]
                out["extrinsic"], out["intrinsic"] = pose_encoding_to_extri_intri(
                    pose_list[-1], (h, w))
            if run_depth:
                depth, depth_conf = self.depth_head(tokens, images=images_h,
                                                    patch_start_idx=agg.patch_start_idx, **dpt_kw)
                out["depth"], out["depth_conf"] = depth, depth_conf
            if run_point:
                pts, pts_conf = self.point_head(tokens, images=images_h,
                                                patch_start_idx=agg.patch_start_idx, **dpt_kw)
                out["world_points"], out["world_points_conf"] = pts, pts_conf
            if with_track:
                track_list, vis, conf = self.track_head(
                    tokens, images=images_h, patch_start_idx=agg.patch_start_idx,
                    query_points=query_points.to(images_h.dtype))
                out["track"], out["track_list"] = track_list[-1], track_list
                out["vis"], out["conf"] = vis, conf
        out["images"] = images
        if control is not None and control.encoder_features:
            out["encoder_features"] = agg.patch_tokens
        return out


def _build_dpt(cfg: VGGTConfig, output_dim: int, activation: str) -> DPTHead:
    d = cfg.dpt
    return DPTHead(dim_in=2 * cfg.embed_dim, patch_size=d.patch_size, output_dim=output_dim,
                   activation=activation, conf_activation="expp1", features=d.features,
                   out_channels=list(d.out_channels),
                   intermediate_layer_idx=list(d.intermediate_layer_idx), pos_embed=d.pos_embed)


def _build_track(cfg: VGGTConfig) -> TrackHead:
    return TrackHead.from_config(cfg.track_head)
