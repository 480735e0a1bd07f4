"""``build_predictor``: the VGGT4D window predictor used by the ROS node and the tools.

``Vggt4dWindowPredictor`` adapts ``dynamic.pipeline.Vggt4dPipeline`` to the engine's
``WindowPredictor`` contract:

* uint8 RGB ``[S,H0,W0,3]`` → float ``[S,3,H,W]`` in [0, 1] at the model's working resolution:
  width ``image_width`` (a multiple of 14), height ``round(H0·W/W0 / 14)·14`` — a plain resize
  (PIL bicubic, as the official preprocessing) WITHOUT cropping, so the whole field of view is
  kept; the predicted intrinsics refer to this H x W image and the engine resizes its output
  images to the same size, so pixels, depth and intrinsics stay consistent;
* per-frame DINO patch tokens are cached by frame key (bounded LRU) and handed to the pipeline
  when its ``__call__`` accepts ``patch_tokens=`` (frames shared by consecutive windows are then
  embedded once); without that support the cache stays unused;
* the resized uint8 frames are cached on the device by frame key as well (a frame shared
  by consecutive windows is resized and uploaded once);
* outputs → numpy ``WindowPrediction``.

``checkpoint="random_tiny"`` builds the tiny VGGT of ``../shared/golden/vggt/config.json``
(same numbers in ``TINY_VGGT_CONFIG`` when the file is absent) with RANDOM weights seeded by
``seed``: for tests and demos only — random weights: geometry is meaningless.

The model packages are imported lazily, so ``stream/`` imports without them.
"""
from __future__ import annotations

import inspect
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from vggt4d_ros.stream.predictor import WindowPrediction

RANDOM_TINY = "random_tiny"
RANDOM_WEIGHTS_LABEL = "random weights: geometry is meaningless"
PATCH = 14
_GOLDEN_DIR = Path(os.environ.get("VGGT4D_GOLDEN",
                                  Path(__file__).resolve().parents[3] / "shared" / "golden"))
GOLDEN_TINY_CONFIG = _GOLDEN_DIR / "vggt" / "config.json"

#: The tiny random-weight VGGT (same numbers as ../shared/golden/vggt/config.json).
TINY_VGGT_CONFIG: dict[str, Any] = {
    "embed_dim": 64, "depth": 24, "num_heads": 4, "mlp_ratio": 4.0, "num_register_tokens": 4,
    "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "qk_norm": True,
    "aa_order": ["frame", "global"], "aa_block_size": 1, "patch_size": 14, "img_size": 518,
    "rope_freq": 100, "init_values": 0.01,
    "patch_embed": {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4,
                    "num_register_tokens": 4, "interpolate_antialias": True,
                    "interpolate_offset": 0.0, "init_values": 1.0, "img_size": 518,
                    "patch_size": 14},
    "camera_head": {"dim_in": 128, "trunk_depth": 4, "num_heads": 4, "mlp_ratio": 4,
                    "init_values": 0.01},
    "dpt": {"dim_in": 128, "features": 32, "out_channels": [16, 32, 64, 64],
            "intermediate_layer_idx": [4, 11, 17, 23]},
    "track_head": {"dim_in": 128, "patch_size": 14, "features": 32, "iters": 4, "hidden_size": 64,
                   "corr_levels": 7, "corr_radius": 4, "stride": 2,
                   "feature_extractor": {"features": 32, "out_channels": [16, 32, 64, 64],
                                         "feature_only": True, "down_ratio": 2,
                                         "pos_embed": False}},
}


NUMERICS = ("fast", "official")      # PredictorConfig.numerics


@dataclass
class PredictorConfig:
    """What ``build_predictor`` needs (filled from ROS parameters or CLI flags).

    checkpoint: local .safetensors file/folder, Hugging Face id, or ``"random_tiny"``.
    device: "cpu" | "cuda" | "cuda:N" | "auto". dtype: "auto" (bf16 autocast on CUDA, fp32 on
    CPU) | "float32" | "bfloat16" | "float16" (mapped to bf16 autocast, with a warning).
    image_width: working width in pixels (multiple of 14). cluster_backend: "torch" (fast) |
    "sklearn" (reference) — or the pipeline's own names "fast" | "reference". numerics:
    "fast" (the pipeline's defaults: bf16 DPT heads and the GEMM-fused tanh GELU on CUDA) |
    "official" (``Vggt4dConfig.official_recipe()``: float32 heads, exact GELU).
    """

    checkpoint: str = "facebook/VGGT-1B"
    device: str = "auto"
    dtype: str = "auto"
    image_width: int = 518
    seed: int = 0
    dynamic: bool = True
    refine: bool = True
    cluster_backend: str = "torch"
    cuda_graphs: bool = True             # Vggt4dConfig.cuda_graphs (CUDA-graph k-means)
    numerics: str = "fast"               # "fast" | "official" (Vggt4dConfig.official_recipe)
    token_cache_size: int = 64
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if self.image_width < PATCH or self.image_width % PATCH:
            raise ValueError(f"image_width must be a positive multiple of {PATCH}, "
                             f"got {self.image_width}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.cluster_backend not in ("torch", "sklearn", "fast", "reference"):
            raise ValueError(f"cluster_backend must be torch|sklearn, got {self.cluster_backend!r}")
        if self.token_cache_size < 0:
            raise ValueError(f"token_cache_size must be >= 0, got {self.token_cache_size}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {'|'.join(NUMERICS)}, "
                             f"got {self.numerics!r}")

    @property
    def random_weights(self) -> bool:
        return str(self.checkpoint).startswith("random")


def working_size(height: int, width: int, image_width: int) -> tuple[int, int]:
    """Model input size (H, W) for an input of height x width pixels: W = image_width, H =
    the aspect-preserving height rounded to a multiple of 14 (at least 14)."""
    h = max(PATCH, int(round(height * image_width / width / PATCH)) * PATCH)
    return h, image_width


class Vggt4dWindowPredictor:
    """``WindowPredictor`` over a ``Vggt4dPipeline`` (see the module docstring)."""

    def __init__(self, pipeline, image_width: int = 518, device: str = "cpu",
                 token_cache_size: int = 64, label: str = ""):
        import torch
        self.pipeline = pipeline
        self.image_width = int(image_width)
        self.device = torch.device(device)
        self.label = label                     # e.g. RANDOM_WEIGHTS_LABEL, shown by the tools
        self.random_weights = label == RANDOM_WEIGHTS_LABEL
        self._cache: OrderedDict[int, Any] = OrderedDict()   # frame key -> patch tokens [N, C]
        self._cache_size = int(token_cache_size)
        self._cache_shape: Optional[tuple[int, int]] = None
        self._image_cache: OrderedDict[int, Any] = OrderedDict()   # key -> uint8 [H, W, 3]
        self._image_cache_key: Optional[tuple] = None   # (input size, working size) of it
        try:
            params = inspect.signature(pipeline.__call__).parameters
        except (TypeError, ValueError):
            params = {}
        self.supports_token_cache = ("patch_tokens" in params and self._cache_size > 0
                                     and callable(getattr(pipeline, "embed_patches", None)))
        self.cache_hits = 0
        self.cache_misses = 0

    def to_tensor(self, images: np.ndarray, frame_keys: Optional[Sequence[int]] = None):
        """uint8 [S,H0,W0,3] -> float32 [S,3,H,W] in [0, 1] on the device (working resolution).

        With ``frame_keys``, each frame's resized uint8 image stays on the device under its
        key (bounded LRU, as the token cache): a frame shared by consecutive windows is
        resized (PIL, on the prediction thread) and uploaded once."""
        import torch
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [S,H,W,3], got {images.dtype} {images.shape}")
        if frame_keys is not None and len(frame_keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(frame_keys)} frame keys")
        hw = working_size(images.shape[1], images.shape[2], self.image_width)
        if frame_keys is None or self._cache_size <= 0:
            x = self._upload([self._resized(im, hw) for im in images])
        else:
            if self._image_cache_key != (images.shape[1:3], hw):
                self._image_cache.clear()            # input or working size changed: stale
                self._image_cache_key = (images.shape[1:3], hw)
            missing = [i for i, k in enumerate(frame_keys) if k not in self._image_cache]
            if missing:
                up = self._upload([self._resized(images[i], hw) for i in missing])
                for j, i in enumerate(missing):
                    self._image_cache[frame_keys[i]] = up[j]
            x = torch.stack([self._image_cache[k] for k in frame_keys])
            _touch(self._image_cache, frame_keys, self._cache_size)
        return x.permute(0, 3, 1, 2).float().div_(255.0)

    @staticmethod
    def _resized(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        if image.shape[:2] == hw:
            return image
        return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))

    def _upload(self, images: list[np.ndarray]):
        """uint8 [S,H,W,3] on the device."""
        import torch
        return torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(self.device)

    def _patch_tokens(self, x, frame_keys: Sequence[int]):
        """Cached DINO patch tokens [S, N, C] for the window (embedding only the new frames)."""
        import torch
        shape = tuple(x.shape[-2:])
        if shape != self._cache_shape:           # resolution changed: cached tokens are stale
            self._cache.clear()
            self._cache_shape = shape
        missing = [i for i, k in enumerate(frame_keys) if k not in self._cache]
        if missing:
            # the pipeline's own embedding (pass 1's autocast): cached == recomputed tokens
            tok = self.pipeline.embed_patches(x[missing])
            for j, i in enumerate(missing):
                self._cache[frame_keys[i]] = tok[j]
        self.cache_misses += len(missing)
        self.cache_hits += len(frame_keys) - len(missing)
        out = torch.stack([self._cache[k] for k in frame_keys])
        _touch(self._cache, frame_keys, self._cache_size)
        return out

    def clear_caches(self) -> None:
        """Forget every cached frame (patch tokens and resized images)."""
        self._cache.clear()
        self._image_cache.clear()

    def predict(self, images: np.ndarray, frame_keys: Sequence[int]) -> WindowPrediction:
        """images [S,H0,W0,3] uint8 RGB -> WindowPrediction at the working resolution."""
        if len(frame_keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(frame_keys)} frame keys")
        t0 = time.perf_counter()
        keys = list(frame_keys)
        x = self.to_tensor(images, keys)
        t1 = time.perf_counter()
        if self.supports_token_cache:
            res = self.pipeline(x, patch_tokens=self._patch_tokens(x, keys))
        else:
            res = self.pipeline(x)
        t2 = time.perf_counter()

        def np_(t):
            return t.detach().float().cpu().numpy()

        timings = {f"pipeline_{k}": float(v) for k, v in dict(res.timings).items()}
        timings.update(preprocess_s=t1 - t0, pipeline_s=t2 - t1)
        return WindowPrediction(extrinsic=np_(res.extrinsic).astype(np.float64),
                                intrinsic=np_(res.intrinsic).astype(np.float64),
                                depth=np_(res.depth), depth_conf=np_(res.depth_conf),
                                mask=res.mask.detach().cpu().numpy().astype(bool), timings=timings)


def warm_up(predictor, camera_hw: tuple[int, int], image_width: int, window: int,
            stride: int) -> float:
    """Run two synthetic windows through ``predictor`` at the working size of a camera of
    ``camera_hw`` (height, width) pixels: the first of ``window`` frames (all embedded, as a
    stream's first window), the second sharing ``window - stride`` of them (a steady-state
    window). On CUDA this compiles the model and captures its graphs for those shapes, which
    the first real windows would otherwise pay (~1-2 min on the H100). Frame keys are
    negative (never a real frame's); the predictor's per-frame caches are emptied after.
    Returns the seconds it took. Random images: the outputs are discarded."""
    t0 = time.perf_counter()
    h, w = working_size(camera_hw[0], camera_hw[1], image_width)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(window + stride, h, w, 3), dtype=np.uint8)
    keys = [-1 - i for i in range(window + stride)]
    predictor.predict(frames[:window], keys[:window])
    predictor.predict(frames[stride:], keys[stride:])
    clear = getattr(predictor, "clear_caches", None)
    if callable(clear):
        clear()
    return time.perf_counter() - t0


def _touch(cache: OrderedDict, keys: Sequence[int], size: int) -> None:
    """Mark ``keys`` most recently used; evict the oldest beyond ``max(size, len(keys))``."""
    for k in keys:
        cache.move_to_end(k)
    while len(cache) > max(size, len(keys)):
        cache.popitem(last=False)


def tiny_vggt_config():
    """``VGGTConfig`` of the tiny golden model (file if present, else the same numbers in code)."""
    from vggt4d_ros.model.config import VGGTConfig
    if GOLDEN_TINY_CONFIG.is_file():
        return VGGTConfig.from_json(GOLDEN_TINY_CONFIG)
    return VGGTConfig.from_dict(TINY_VGGT_CONFIG)


def _resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(config: PredictorConfig, device: str):
    """VGGT (no track head) on ``device``: random tiny weights or a strict checkpoint load."""
    import torch
    from vggt4d_ros.model.vggt import VGGT
    if config.random_weights:
        warnings.warn(f"checkpoint {config.checkpoint!r}: tiny VGGT with {RANDOM_WEIGHTS_LABEL}",
                      stacklevel=2)
        state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            model = VGGT(tiny_vggt_config(), enable_track=False)
        finally:
            torch.random.set_rng_state(state)
        return model.to(device).eval()
    from vggt4d_ros.model.checkpoint import load_vggt
    return load_vggt(config.checkpoint, device=device, skip_track_head=True,
                     local_files_only=config.local_files_only)


def build_predictor(config: Optional[PredictorConfig] = None) -> Vggt4dWindowPredictor:
    """The VGGT4D ``WindowPredictor`` described by ``config`` (see the module docstring)."""
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    config = config or PredictorConfig()
    device = _resolve_device(config.device)
    autocast = {"auto": "auto", "float32": "off", "bfloat16": "bf16",
                "float16": "bf16"}[config.dtype]
    if config.dtype == "float16":
        warnings.warn("dtype float16 is run as bfloat16 autocast (the VGGT recipe)", stacklevel=2)
    backend = {"torch": "fast", "sklearn": "reference"}.get(config.cluster_backend,
                                                            config.cluster_backend)
    make = Vggt4dConfig.official_recipe if config.numerics == "official" else Vggt4dConfig
    pipe = Vggt4dPipeline(build_model(config, device),
                          make(dynamic=config.dynamic, refine=config.refine,
                               cluster_backend=backend, autocast=autocast,
                               cuda_graphs=config.cuda_graphs))
    label = RANDOM_WEIGHTS_LABEL if config.random_weights else ""
    return Vggt4dWindowPredictor(pipe, config.image_width, device, config.token_cache_size, label)
