"""Early-stage intervention: Key suppression of dynamic tokens in shallow layers (spec §5).

A patch token is dynamic if ANY pixel of its 14×14 patch is in the coarse mask (max-pool 14,
stride 14, ``> 0.5``). Special tokens (camera + registers) are never dynamic. In layers 0-4
(frame AND global block of each) dynamic tokens are removed from the keys/values of every
query; the model's :class:`~vggt4d_ros.model.hooks.AttentionControl` implements the
suppression, this module only builds its inputs. Deeper layers run untouched.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_SIZE = 14
#: Layers whose frame and global blocks get the key suppression (spec §5).
INTERVENTION_LAYERS: Tuple[int, ...] = (0, 1, 2, 3, 4)


def token_dynamic_mask(pixel_mask: Tensor, patch_size: int = PATCH_SIZE) -> Tensor:
    """Pixel mask ``[S, H, W]`` (bool/float) -> dynamic patch tokens ``[S, N]`` bool.

    ``N = (H/14)·(W/14)``, token index ``y·w + x``. H and W must be multiples of the patch size.
    """
    if pixel_mask.dim() != 3:
        raise ValueError(f"expected a pixel mask [S, H, W], got {tuple(pixel_mask.shape)}")
    s, h, w = pixel_mask.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {patch_size}")
    pooled = F.max_pool2d(pixel_mask[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return (pooled > 0.5).reshape(s, -1)


def key_keep_from_tokens(dynamic_tokens: Tensor, num_special: int = 5) -> Tensor:
    """Dynamic tokens ``[S, N]`` -> ``AttentionControl.key_keep`` ``[1, S, P+N]`` bool.

    True = may be attended to; the P special tokens are always True.
    """
    if dynamic_tokens.dim() != 2:
        raise ValueError(f"expected dynamic tokens [S, N], got {tuple(dynamic_tokens.shape)}")
    s = dynamic_tokens.shape[0]
    special = torch.ones(s, num_special, dtype=torch.bool, device=dynamic_tokens.device)
    return torch.cat([special, ~dynamic_tokens.bool()], dim=1)[None]


def build_intervention_control(pixel_mask: Tensor,
                               layers: Iterable[int] = INTERVENTION_LAYERS,
                               num_special: int = 5, patch_size: int = PATCH_SIZE):
    """``AttentionControl`` for pass 2 from the coarse pixel mask ``[S, H, W]``.

    Returns ``(control, dynamic_tokens [S, N])``. An all-static mask yields a control whose
    ``key_keep`` is all True (the model then runs its plain attention path).
    """
    from ..model.hooks import AttentionControl  # lazy: keeps this module testable alone

    dyn = token_dynamic_mask(pixel_mask, patch_size)
    keep = key_keep_from_tokens(dyn, num_special)
    control = AttentionControl(key_keep=keep, key_mask_layers=set(int(i) for i in layers))
    return control, dyn
