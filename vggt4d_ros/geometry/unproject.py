"""Depth maps -> world points (pinhole cameras, OpenCV optical axes: x right, y down, z forward).

Works on torch tensors (any device / dtype, result on the same device and dtype) and on numpy
arrays (result is a numpy array). Fully vectorised over frames and pixels.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def depth_to_world_points(depth: ArrayLike, intrinsic: ArrayLike, cam_from_world: ArrayLike,
                          pixel_offset: float = 0.0) -> ArrayLike:
    """Unproject per-pixel depth to world coordinates.

    For pixel (u, v) (u = column, v = row, integer indices + ``pixel_offset``):
    X_cam = d(u, v) * K^-1 [u, v, 1]^T (camera frame, z = d), X_world = R^T (X_cam - t) where
    [R | t] = ``cam_from_world`` maps world points into the camera frame.

    Args:
        depth: [S, H, W] or [S, H, W, 1] z-depth along the optical axis (metres, or the model's
            scale).
        intrinsic: [S, 3, 3] pinhole matrices in pixels.
        cam_from_world: [S, 3, 4] or [S, 4, 4] camera-from-world extrinsics.
        pixel_offset: 0.0 = official VGGT convention (pixel (0,0) at its corner index);
            0.5 = pixel centres (VGGT4D refinement).
    Returns:
        [S, H, W, 3] world points, same array type (and torch device/dtype) as ``depth``.
    """
    if isinstance(depth, np.ndarray):
        out = _unproject_torch(torch.from_numpy(np.asarray(depth)),
                               torch.from_numpy(np.asarray(intrinsic)),
                               torch.from_numpy(np.asarray(cam_from_world)), pixel_offset)
        return out.numpy()
    if not isinstance(depth, torch.Tensor):
        raise ValueError(f"depth must be a numpy array or torch tensor, got {type(depth).__name__}")
    K = intrinsic if isinstance(intrinsic, torch.Tensor) else torch.as_tensor(np.asarray(intrinsic))
    E = cam_from_world if isinstance(cam_from_world, torch.Tensor) else torch.as_tensor(np.asarray(cam_from_world))
    return _unproject_torch(depth, K.to(depth.device), E.to(depth.device), pixel_offset)


def _unproject_torch(depth: torch.Tensor, K: torch.Tensor, E: torch.Tensor,
                     pixel_offset: float) -> torch.Tensor:
    """Torch implementation; shapes as in :func:`depth_to_world_points`."""
    if depth.ndim == 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 3:
        raise ValueError(f"depth must be [S, H, W] or [S, H, W, 1], got {tuple(depth.shape)}")
    S, H, W = depth.shape
    if tuple(K.shape) != (S, 3, 3):
        raise ValueError(f"intrinsic must be [S={S}, 3, 3], got {tuple(K.shape)}")
    if E.ndim != 3 or E.shape[0] != S or tuple(E.shape[1:]) not in ((3, 4), (4, 4)):
        raise ValueError(f"cam_from_world must be [S={S}, 3, 4] or [S, 4, 4], got {tuple(E.shape)}")
    if not depth.is_floating_point():
        raise ValueError(f"depth must be floating point, got {depth.dtype}")
    dtype = depth.dtype
    K = K.to(dtype)
    E = E.to(dtype)
    u = torch.arange(W, device=depth.device, dtype=dtype) + pixel_offset
    v = torch.arange(H, device=depth.device, dtype=dtype) + pixel_offset
    fx, fy = K[:, 0, 0].view(S, 1, 1), K[:, 1, 1].view(S, 1, 1)
    cx, cy = K[:, 0, 2].view(S, 1, 1), K[:, 1, 2].view(S, 1, 1)
    skew = K[:, 0, 1].view(S, 1, 1)
    # K^-1 for an upper-triangular pinhole K (skew allowed): y = (v - cy)/fy, x = (u - cx - s*y)/fx
    y_n = (v.view(1, H, 1) - cy) / fy                                   # [S, H, 1]
    x_n = (u.view(1, 1, W) - cx - skew * y_n) / fx                      # [S, H, W]
    cam = torch.stack([x_n * depth, y_n.expand(S, H, W) * depth, depth], dim=-1)  # [S, H, W, 3]
    R, t = E[:, :3, :3], E[:, :3, 3]
    # X_world = R^T (X_cam - t); row-vector form: (X_cam - t) @ R
    return torch.einsum("shwi,sij->shwj", cam - t.view(S, 1, 1, 3), R)
