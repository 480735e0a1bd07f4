"""Pose encoding "absT_quaR_FoV" <-> camera matrices, and rotation <-> quaternion.

Encoding [..., 9] = translation t (3) | quaternion q (4, x y z w, scalar LAST) | FoV (h, w)
in radians. Extrinsic [..., 3, 4] = [R(q) | t] is camera-from-world (OpenCV optical axes:
x right, y down, z forward). Intrinsic [..., 3, 3]: fy = (H/2) / tan(fov_h/2),
fx = (W/2) / tan(fov_w/2), principal point (W/2, H/2), pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def quat_to_mat(quat: torch.Tensor) -> torch.Tensor:
    """Quaternion [..., 4] (x, y, z, w; need not be unit) -> rotation [..., 3, 3].

    Uses 2/|q|² so a non-normalised quaternion maps to the rotation of its normalisation
    (the camera head's output is not normalised).
    """
    if quat.shape[-1] != 4:
        raise ValueError(f"quaternion must have 4 components (x,y,z,w), got {quat.shape[-1]}")
    x, y, z, w = quat.unbind(-1)
    two_s = 2.0 / (quat * quat).sum(-1)
    m = torch.stack([
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    ], dim=-1)
    return m.reshape(quat.shape[:-1] + (3, 3))


def mat_to_quat(rot: torch.Tensor) -> torch.Tensor:
    """Rotation [..., 3, 3] -> unit quaternion [..., 4] (x, y, z, w) with w >= 0.

    Numerically stable: of the four algebraically equivalent formulas, the one with the
    largest denominator (|4·component|) is used per matrix.
    """
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"rotation must be [..., 3, 3], got {tuple(rot.shape)}")
    m = rot.reshape(rot.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4·(w², x², y², z²) from the trace identities, clamped against round-off.
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                      1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)
    r = torch.sqrt(torch.clamp(sq, min=0.0))                     # 2·|w|, 2·|x|, 2·|y|, 2·|z|
    # Candidate (w, x, y, z)·(2·|component|)·2 for each choice of the largest component.
    cand = torch.stack([
        torch.stack([r[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, r[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, r[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, r[..., 3] ** 2], dim=-1),
    ], dim=-2)                                                   # [..., 4 choices, 4]
    cand = cand / (2.0 * r[..., None].clamp(min=0.1))
    best = F.one_hot(r.argmax(dim=-1), num_classes=4).to(cand.dtype)[..., None]
    wxyz = (cand * best).sum(dim=-2)
    wxyz = wxyz / wxyz.norm(dim=-1, keepdim=True)
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)           # canonical sign: w >= 0
    return torch.cat([wxyz[..., 1:], wxyz[..., :1]], dim=-1)


def _check_hw(image_size_hw: Sequence[int]) -> Tuple[float, float]:
    if len(image_size_hw) != 2 or min(int(v) for v in image_size_hw) <= 0:
        raise ValueError(f"image_size_hw must be (H, W) > 0 pixels, got {tuple(image_size_hw)}")
    return float(image_size_hw[0]), float(image_size_hw[1])


def pose_encoding_to_extri_intri(pose_encoding: torch.Tensor,
                                 image_size_hw: Optional[Sequence[int]] = None,
                                 build_intrinsics: bool = True
                                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """pose_encoding [..., 9] -> (extrinsic [..., 3, 4] camera-from-world,
    intrinsic [..., 3, 3] in pixels of an H x W image, or None)."""
    if pose_encoding.shape[-1] != 9:
        raise ValueError(f"absT_quaR_FoV encoding has 9 values, got {pose_encoding.shape[-1]}")
    t = pose_encoding[..., :3]
    rot = quat_to_mat(pose_encoding[..., 3:7])
    extrinsic = torch.cat([rot, t[..., None]], dim=-1)
    if not build_intrinsics:
        return extrinsic, None
    if image_size_hw is None:
        raise ValueError("image_size_hw (H, W) is needed to build intrinsics")
    h, w = _check_hw(image_size_hw)
    fy = (h / 2.0) / torch.tan(pose_encoding[..., 7] / 2.0)
    fx = (w / 2.0) / torch.tan(pose_encoding[..., 8] / 2.0)
    intrinsic = torch.zeros(pose_encoding.shape[:-1] + (3, 3), dtype=pose_encoding.dtype,
                            device=pose_encoding.device)
    intrinsic[..., 0, 0] = fx
    intrinsic[..., 1, 1] = fy
    intrinsic[..., 0, 2] = w / 2
    intrinsic[..., 1, 2] = h / 2
    intrinsic[..., 2, 2] = 1.0
    return extrinsic, intrinsic


def extri_intri_to_pose_encoding(extrinsic: torch.Tensor, intrinsic: torch.Tensor,
                                 image_size_hw: Sequence[int]) -> torch.Tensor:
    """extrinsic [..., 3, 4] (camera-from-world), intrinsic [..., 3, 3] (pixels of an H x W
    image) -> pose encoding [..., 9] (t, quaternion xyzw, fov_h, fov_w in radians)."""
    if extrinsic.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError("extrinsic must be [..., 3, 4] or [..., 4, 4], got "
                         f"{tuple(extrinsic.shape)}")
    if intrinsic.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsic must be [..., 3, 3], got {tuple(intrinsic.shape)}")
    h, w = _check_hw(image_size_hw)
    quat = mat_to_quat(extrinsic[..., :3, :3])
    t = extrinsic[..., :3, 3]
    fov_h = 2 * torch.atan((h / 2) / intrinsic[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / intrinsic[..., 0, 0])
    return torch.cat([t, quat, fov_h[..., None], fov_w[..., None]], dim=-1)
