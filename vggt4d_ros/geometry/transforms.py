"""Rigid transforms (SE(3)) on numpy arrays and torch tensors.

Conventions used everywhere in this package:

* A pose matrix maps points from one frame to another and its name says which:
  ``cam_from_world`` ([..., 4, 4] or [..., 3, 4]) maps world points into the camera frame
  (``X_cam = R X_world + t``, the "extrinsic" of VGGT/OpenCV); ``world_from_cam`` is its
  inverse (its translation column is the camera centre in the world frame).
* ``compose(a_from_b, b_from_c) -> a_from_c`` (matrix product, right factor applied first).
* Quaternions are ``(x, y, z, w)`` (ROS / scipy order, scalar LAST), unit norm, and the
  sign is canonicalised to ``w >= 0``.
* Units: translations in metres (or the model's unknown scale), angles in radians.

Every function accepts numpy arrays or torch tensors and returns the same kind.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from scipy.spatial.transform import Rotation

Array = Union[np.ndarray, torch.Tensor]


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _check_mat(x: Array, name: str, rows: tuple[int, ...] = (3, 4)) -> None:
    if x.ndim < 2 or x.shape[-1] != 4 or x.shape[-2] not in rows:
        raise ValueError(f"{name}: expected shape [..., {'|'.join(map(str, rows))}, 4], "
                         f"got {tuple(x.shape)}")


def to_homogeneous(mat: Array) -> Array:
    """[..., 3, 4] or [..., 4, 4] -> [..., 4, 4] (bottom row ``0 0 0 1`` appended if missing)."""
    _check_mat(mat, "to_homogeneous")
    if mat.shape[-2] == 4:
        return mat
    if _is_torch(mat):
        bottom = torch.zeros(*mat.shape[:-2], 1, 4, dtype=mat.dtype, device=mat.device)
        bottom[..., 0, 3] = 1
        return torch.cat([mat, bottom], dim=-2)
    bottom = np.zeros(mat.shape[:-2] + (1, 4), dtype=mat.dtype)
    bottom[..., 0, 3] = 1
    return np.concatenate([mat, bottom], axis=-2)


def to_3x4(mat: Array) -> Array:
    """[..., 4, 4] or [..., 3, 4] -> [..., 3, 4] (drops the homogeneous row)."""
    _check_mat(mat, "to_3x4")
    return mat[..., :3, :]


def make_se3(rot: Array, trans: Array) -> Array:
    """Rotation [..., 3, 3] and translation [..., 3] -> homogeneous [..., 4, 4]."""
    if rot.shape[-2:] != (3, 3) or trans.shape[-1] != 3 or rot.shape[:-2] != trans.shape[:-1]:
        raise ValueError(f"make_se3: rot {tuple(rot.shape)} / trans {tuple(trans.shape)} mismatch")
    if _is_torch(rot):
        top = torch.cat([rot, trans[..., :, None]], dim=-1)
    else:
        top = np.concatenate([rot, np.asarray(trans)[..., :, None]], axis=-1)
    return to_homogeneous(top)


def invert_se3(mat: Array) -> Array:
    """Inverse of a rigid transform, exploiting R^-1 = R^T.

    ``invert_se3(cam_from_world) -> world_from_cam``. Input [..., 3, 4] or [..., 4, 4];
    output has the SAME row count as the input.
    """
    _check_mat(mat, "invert_se3")
    rot = mat[..., :3, :3]
    trans = mat[..., :3, 3]
    rot_t = rot.transpose(-1, -2) if _is_torch(rot) else np.swapaxes(rot, -1, -2)
    trans_inv = -(rot_t @ trans[..., :, None])[..., 0]
    out = make_se3(rot_t, trans_inv)
    return out if mat.shape[-2] == 4 else out[..., :3, :]


def compose(a_from_b: Array, b_from_c: Array) -> Array:
    """``a_from_c = a_from_b ∘ b_from_c`` for [..., 3|4, 4] inputs (broadcasting) -> [..., 4, 4]."""
    _check_mat(a_from_b, "compose(a_from_b)")
    _check_mat(b_from_c, "compose(b_from_c)")
    return to_homogeneous(a_from_b) @ to_homogeneous(b_from_c)


def transform_points(a_from_b: Array, points_b: Array) -> Array:
    """Apply a rigid transform [..., 3|4, 4] to points [..., N, 3] (same leading dims).

    Returns [..., N, 3]."""
    _check_mat(a_from_b, "transform_points")
    if points_b.shape[-1] != 3:
        raise ValueError("transform_points: points must be [..., N, 3], "
                         f"got {tuple(points_b.shape)}")
    rot = a_from_b[..., :3, :3]
    trans = a_from_b[..., :3, 3]
    rot_t = rot.transpose(-1, -2) if _is_torch(rot) else np.swapaxes(rot, -1, -2)
    return points_b @ rot_t + trans[..., None, :]


def camera_center(cam_from_world: Array) -> Array:
    """Camera centre in world coordinates [..., 3] from ``cam_from_world`` [..., 3|4, 4]:
    c = -R^T t."""
    return invert_se3(cam_from_world)[..., :3, 3]


def quat_xyzw_from_rotmat(rot: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] in (x, y, z, w) order, w >= 0."""
    rot = np.asarray(rot, dtype=np.float64)
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"quat_xyzw_from_rotmat: expected [..., 3, 3], got {rot.shape}")
    lead = rot.shape[:-2]
    quat = Rotation.from_matrix(rot.reshape(-1, 3, 3)).as_quat()  # scipy: scalar last
    quat = np.where(quat[:, 3:4] < 0, -quat, quat)
    return quat.reshape(lead + (4,))


def rotmat_from_quat_xyzw(quat: np.ndarray) -> np.ndarray:
    """Quaternions [..., 4] in (x, y, z, w) order (normalised here) -> rotations [..., 3, 3]."""
    quat = np.asarray(quat, dtype=np.float64)
    if quat.shape[-1] != 4:
        raise ValueError(f"rotmat_from_quat_xyzw: expected [..., 4], got {quat.shape}")
    norm = np.linalg.norm(quat, axis=-1, keepdims=True)
    if np.any(~np.isfinite(norm)) or np.any(norm < 1e-12):
        raise ValueError("rotmat_from_quat_xyzw: zero or non-finite quaternion")
    lead = quat.shape[:-1]
    return Rotation.from_quat((quat / norm).reshape(-1, 4)).as_matrix().reshape(lead + (3, 3))


def rotation_angle(rot: np.ndarray) -> np.ndarray:
    """Geodesic angle (radians, in [0, pi]) of rotation matrices [..., 3, 3]."""
    rot = np.asarray(rot, dtype=np.float64)
    cos = (np.trace(rot, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.arccos(np.clip(cos, -1.0, 1.0))


def rotvec_from_rotmat(rot: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> axis-angle vectors [..., 3] (radians)."""
    rot = np.asarray(rot, dtype=np.float64)
    lead = rot.shape[:-2]
    return Rotation.from_matrix(rot.reshape(-1, 3, 3)).as_rotvec().reshape(lead + (3,))


def rotmat_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    """Axis-angle vectors [..., 3] (radians) -> rotation matrices [..., 3, 3]."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    lead = rotvec.shape[:-1]
    return Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix().reshape(lead + (3, 3))


def pose_to_tqxyzw(world_from_cam: np.ndarray) -> np.ndarray:
    """``world_from_cam`` [..., 3|4, 4] -> [..., 7] = (tx, ty, tz, qx, qy, qz, qw) (TUM order)."""
    world_from_cam = np.asarray(world_from_cam, dtype=np.float64)
    _check_mat(world_from_cam, "pose_to_tqxyzw")
    return np.concatenate([world_from_cam[..., :3, 3],
                           quat_xyzw_from_rotmat(world_from_cam[..., :3, :3])], axis=-1)


def tqxyzw_to_pose(tq: np.ndarray) -> np.ndarray:
    """[..., 7] = (tx, ty, tz, qx, qy, qz, qw) -> homogeneous pose [..., 4, 4] (same direction)."""
    tq = np.asarray(tq, dtype=np.float64)
    if tq.shape[-1] != 7:
        raise ValueError(f"tqxyzw_to_pose: expected [..., 7], got {tq.shape}")
    return make_se3(rotmat_from_quat_xyzw(tq[..., 3:]), tq[..., :3])
