"""Image preprocessing identical to the official ``load_and_preprocess_images``.

Inputs: file paths, PIL images or numpy arrays (HxWx3 uint8 RGB; HxWx4 uint8 RGBA; HxW or
HxWx1 uint8 grey). RGBA is alpha-composited on white, everything is converted to RGB, EXIF
orientation is applied, then:
- ``crop`` (default): width -> 518, height -> round(h·518/w / 14)·14 (PIL bicubic), centre-crop
  the height to 518 if taller.
- ``pad``: the longer side -> 518, the other rounded to a multiple of 14, resize (PIL bicubic),
  pad with white (1.0) to 518x518, centred.
Values / 255. Frames that end up with different sizes are padded with white (centred) to the
largest height and width. Output [S, 3, H, W] float32 in [0, 1], H and W multiples of 14.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, np.ndarray]
PATCH = 14


def _to_pil(item: Any, index: int) -> Image.Image:
    """One input -> PIL image (any mode); ValueError naming the index and the problem."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"image {index}: file not found: {path}")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image {index}: cannot read {path} as an image ({exc})") from exc
        return img
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"image {index}: numpy images must be uint8 RGB (HxWx3), got dtype "
                             f"{item.dtype}")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        if item.ndim == 2:
            mode = "L"
        elif item.ndim == 3 and item.shape[2] == 3:
            mode = "RGB"
        elif item.ndim == 3 and item.shape[2] == 4:
            mode = "RGBA"
        else:
            raise ValueError(f"image {index}: expected an HxWx3 (RGB), HxWx4 (RGBA) or HxW array, "
                             f"got shape {item.shape}")
        if min(item.shape[:2]) == 0:
            raise ValueError(f"image {index}: empty image of shape {item.shape}")
        return Image.fromarray(np.ascontiguousarray(item), mode=mode)
    raise ValueError(f"image {index}: unsupported type {type(item).__name__} (use a path, a PIL "
                     "image or an HxWx3 uint8 array)")


def _target_size(width: int, height: int, mode: str, target: int) -> Tuple[int, int]:
    """(new_width, new_height) before cropping / padding; Python round() as the reference."""
    if mode == "pad" and height > width:
        return round(width * (target / height) / PATCH) * PATCH, target
    if mode == "pad":
        return target, round(height * (target / width) / PATCH) * PATCH
    return target, round(height * (target / width) / PATCH) * PATCH


def _pad_white(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre img [3, h, w] on a white [3, height, width] canvas (extra pixel bottom/right)."""
    dh, dw = height - img.shape[1], width - img.shape[2]
    if dh <= 0 and dw <= 0:
        return img
    top, left = dh // 2, dw // 2
    return F.pad(img, (left, dw - left, top, dh - top), mode="constant", value=1.0)


def preprocess_one(item: ImageLike, mode: str = "crop", target_size: int = 518,
                   index: int = 0) -> torch.Tensor:
    """One image -> [3, H, W] float32 in [0, 1] (before cross-frame padding)."""
    img = ImageOps.exif_transpose(_to_pil(item, index))
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    width, height = img.size
    new_w, new_h = _target_size(width, height, mode, target_size)
    if new_w < PATCH or new_h < PATCH:
        raise ValueError(f"image {index}: size {width}x{height} (WxH) is too elongated for mode "
                         f"{mode!r}: it would be resized to {new_w}x{new_h}, below one "
                         f"{PATCH}-pixel patch")
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div(255.0)
    if mode == "crop" and new_h > target_size:
        start = (new_h - target_size) // 2
        x = x[:, start:start + target_size, :]
    if mode == "pad":
        x = _pad_white(x, target_size, target_size)
    return x


def preprocess_images(images: Sequence[ImageLike] | ImageLike, mode: str = "crop",
                      target_size: int = 518) -> torch.Tensor:
    """Images -> [S, 3, H, W] float32 in [0, 1] ready for ``VGGT`` (see module docstring).

    A single path / PIL image / array is treated as a list of one.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if target_size < PATCH or target_size % PATCH:
        raise ValueError(f"target_size must be a positive multiple of {PATCH}, got {target_size}")
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)          # [S, H, W, C] stack
        else:
            images = [images]
    items: List[Any] = list(images)
    if not items:
        raise ValueError("at least one image is required")
    frames = [preprocess_one(it, mode, target_size, i) for i, it in enumerate(items)]
    h = max(f.shape[1] for f in frames)
    w = max(f.shape[2] for f in frames)
    return torch.stack([_pad_white(f, h, w) for f in frames])
