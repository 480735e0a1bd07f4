"""Size configuration of VGGT: one dataclass tree for the full VGGT-1B and the tiny golden model.

``VGGTConfig.vggt_1b()`` gives facebook/VGGT-1B (1,797 state-dict keys, 1,256,537,516
parameters). ``VGGTConfig.from_json(path)`` reads the format of
``../shared/golden/vggt/config.json`` (the tiny random-weight model used by the tests).
Field names follow the constructor arguments of the official modules so that the numbers can
be compared one to one; every default here is the VGGT-1B value.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Tuple, Type, TypeVar

_T = TypeVar("_T")


@dataclass
class PatchEmbedConfig:
    """DINOv2 ViT with register tokens (VGGT-1B: ViT-L/14, 4 registers, 24 blocks)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    img_size: int = 518                 # pixels; pos-embed grid = img_size / patch_size = 37
    patch_size: int = 14                # pixels
    init_values: float = 1.0            # LayerScale init (DINO blocks)
    interpolate_antialias: bool = True  # bicubic pos-embed resize with antialias
    interpolate_offset: float = 0.0     # 0 -> interpolate with size= (exact target grid)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True

    @property
    def pos_grid(self) -> int:
        """Side of the stored square positional-embedding grid (37 for 518 / 14)."""
        return self.img_size // self.patch_size


@dataclass
class CameraHeadConfig:
    """Iterative camera head: adaLN-modulated trunk over the camera token (VGGT-1B: dim 2048)."""

    dim_in: int = 2048                  # = 2 * aggregator embed_dim (frame || global tokens)
    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01           # LayerScale init of the trunk blocks
    num_iterations: int = 4
    pose_encoding_type: str = "absT_quaR_FoV"
    trans_act: str = "linear"
    quat_act: str = "linear"
    fl_act: str = "relu"


@dataclass
class DPTConfig:
    """DPT dense head (depth / point map, and the track head's feature extractor)."""

    dim_in: int = 2048
    patch_size: int = 14
    features: int = 256
    out_channels: Tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: Tuple[int, int, int, int] = (4, 11, 17, 23)
    pos_embed: bool = True
    feature_only: bool = False
    down_ratio: int = 1


@dataclass
class TrackHeadConfig:
    """Track head: DPT feature extractor (features 128, down ratio 2) + iterative tracker."""

    dim_in: int = 2048
    patch_size: int = 14
    features: int = 128
    iters: int = 4
    predict_conf: bool = True
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    feature_extractor: DPTConfig = field(default_factory=lambda: DPTConfig(
        dim_in=2048, features=128, feature_only=True, down_ratio=2, pos_embed=False))


@dataclass
class VGGTConfig:
    """Whole-model sizes. Defaults = facebook/VGGT-1B."""

    embed_dim: int = 1024               # aggregator width C (tokens handed to heads are 2C)
    depth: int = 24                     # number of (frame block, global block) layers
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    qk_norm: bool = True
    aa_order: Tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    patch_size: int = 14
    img_size: int = 518
    rope_freq: float = 100.0
    init_values: float = 0.01           # LayerScale init of the aggregator blocks
    layer_norm_eps: float = 1e-5        # aggregator / camera-head LayerNorms use torch's default
    patch_embed: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)
    camera_head: CameraHeadConfig = field(default_factory=CameraHeadConfig)
    dpt: DPTConfig = field(default_factory=DPTConfig)
    track_head: TrackHeadConfig = field(default_factory=TrackHeadConfig)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads "
                             f"{self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("2-D RoPE needs a head dim divisible by 4 "
                             f"(got {self.embed_dim // self.num_heads})")
        if tuple(self.aa_order) != ("frame", "global") or self.aa_block_size != 1:
            raise ValueError("only aa_order ('frame', 'global') with aa_block_size 1 is supported "
                             f"(got {self.aa_order}, {self.aa_block_size})")
        if self.patch_embed.patch_size != self.patch_size:
            raise ValueError("patch_embed.patch_size must equal patch_size")
        self.aa_order = tuple(self.aa_order)

    @property
    def num_special_tokens(self) -> int:
        """Camera token + register tokens before the patches of every frame (5)."""
        return 1 + self.num_register_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def vggt_1b(cls) -> "VGGTConfig":
        """facebook/VGGT-1B (and VGGT-1B-Commercial): the defaults of every field."""
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VGGTConfig":
        """Build from a nested dict (golden config.json layout); unknown keys are ignored,
        missing keys keep the VGGT-1B default."""
        top = _pick(cls, data, skip={"patch_embed", "camera_head", "dpt", "track_head"})
        pe = _pick(PatchEmbedConfig, data.get("patch_embed", {}))
        cam = _pick(CameraHeadConfig, data.get("camera_head", {}))
        dpt = _pick(DPTConfig, data.get("dpt", {}))
        th_data = dict(data.get("track_head", {}))
        fe = _pick(DPTConfig, th_data.pop("feature_extractor", {}))
        th = _pick(TrackHeadConfig, th_data, skip={"feature_extractor"})
        if "dim_in" not in th_data.get("feature_extractor", {}):
            fe.setdefault("dim_in", th.get("dim_in", 2 * top.get("embed_dim", 1024)))
        fe.setdefault("patch_size", th.get("patch_size", 14))
        fe.setdefault("features", th.get("features", 128))
        fe.setdefault("feature_only", True)
        fe.setdefault("down_ratio", 2)
        fe.setdefault("pos_embed", False)
        return cls(
            **top,
            patch_embed=PatchEmbedConfig(**pe),
            camera_head=CameraHeadConfig(**cam),
            dpt=DPTConfig(**dpt),
            track_head=TrackHeadConfig(**th, feature_extractor=DPTConfig(**fe)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "VGGTConfig":
        """Read a config.json (e.g. ``../shared/golden/vggt/config.json``)."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"VGGT config file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"VGGT config {p} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"VGGT config {p} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(kind: Type[_T], data: Mapping[str, Any], skip: set[str] | None = None) -> dict:
    """Keep the keys of ``data`` that are fields of ``kind`` (tuples for list values)."""
    names = {f.name for f in fields(kind)} - (skip or set())
    out = {}
    for k, v in data.items():
        if k in names:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out
