"""Pose matrices <-> geometry_msgs, and the frame conventions of the node (REP-103/105).

Naming: ``a_from_b`` is the 4x4 homogeneous matrix that maps points in frame ``b`` to frame
``a`` (``p_a = a_from_b @ p_b``); it is also the pose of ``b`` expressed in ``a`` — exactly
what a TF ``a -> b`` (header.frame_id = a, child_frame_id = b) carries. Quaternions are in
ROS order ``(x, y, z, w)``. Units: metres (up to the model's scale), radians.

Frames: VGGT poses live in *optical* axes (x right, y down, z forward). Bodies in ROS use
x forward, y left, z up (REP-103). ``LINK_FROM_OPTICAL`` rotates optical axes into body axes.
The node's frames are ``odom -> base_link -> <camera optical frame>``; the engine's world is
the optical frame of its first camera, mapped into ``odom`` so that base_link starts at the
identity (see :class:`OdomFrames`).
"""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Pose, Quaternion, Transform, TransformStamped, Vector3
from scipy.spatial.transform import Rotation

#: Rotation (4x4) from camera optical axes (x right, y down, z fwd) to camera body axes
#: (x fwd, y left, z up): ``camera_link_from_camera_optical``.
LINK_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0, 0.0],
                              [-1.0, 0.0, 0.0, 0.0],
                              [0.0, -1.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 1.0]])


def _as_se3(mat: np.ndarray) -> np.ndarray:
    m = np.asarray(mat, dtype=np.float64)
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"expected a finite [4,4] or [3,4] pose matrix, got shape {m.shape}")
    return m


def invert(a_from_b: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (or similarity-free) 4x4 transform: ``b_from_a``."""
    m = _as_se3(a_from_b)
    r, t = m[:3, :3], m[:3, 3]
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ t
    return out


def quat_xyzw_from_matrix(rot: np.ndarray) -> np.ndarray:
    """3x3 rotation (re-orthonormalised) → unit quaternion (x, y, z, w) with w >= 0."""
    q = Rotation.from_matrix(np.asarray(rot, dtype=np.float64)[:3, :3]).as_quat()
    return -q if q[3] < 0 else q


def matrix_from_quat_xyzw(q: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w), any non-zero norm → 3x3 rotation matrix."""
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (4,) or not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-12:
        raise ValueError(f"invalid quaternion {q}")
    return Rotation.from_quat(q).as_matrix()


def matrix_from_xyz_rpy(xyz, rpy) -> np.ndarray:
    """Translation (metres) + roll/pitch/yaw (radians, fixed axes X then Y then Z, as URDF)
    → 4x4 ``parent_from_child``."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", np.asarray(rpy, dtype=np.float64)).as_matrix()
    m[:3, 3] = np.asarray(xyz, dtype=np.float64)
    return m


def matrix_to_pose(a_from_b: np.ndarray) -> Pose:
    """4x4 ``a_from_b`` → geometry_msgs/Pose of ``b`` in ``a``."""
    m = _as_se3(a_from_b)
    q = quat_xyzw_from_matrix(m[:3, :3])
    p = Pose()
    p.position.x, p.position.y, p.position.z = (float(v) for v in m[:3, 3])
    p.orientation = Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))
    return p


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """geometry_msgs/Pose → 4x4 matrix."""
    o, p = pose.orientation, pose.position
    m = np.eye(4)
    m[:3, :3] = matrix_from_quat_xyzw(np.array([o.x, o.y, o.z, o.w]))
    m[:3, 3] = [p.x, p.y, p.z]
    return m


def matrix_to_transform(a_from_b: np.ndarray) -> Transform:
    """4x4 ``a_from_b`` → geometry_msgs/Transform (the TF a -> b)."""
    pose = matrix_to_pose(a_from_b)
    return Transform(translation=Vector3(x=pose.position.x, y=pose.position.y,
                                         z=pose.position.z),
                     rotation=pose.orientation)


def transform_to_matrix(tf: Transform) -> np.ndarray:
    """geometry_msgs/Transform → 4x4 matrix."""
    r, t = tf.rotation, tf.translation
    m = np.eye(4)
    m[:3, :3] = matrix_from_quat_xyzw(np.array([r.x, r.y, r.z, r.w]))
    m[:3, 3] = [t.x, t.y, t.z]
    return m


def make_transform_stamped(parent_from_child: np.ndarray, parent: str, child: str,
                           stamp) -> TransformStamped:
    """TF ``parent -> child`` (header.frame_id = parent) at ``stamp`` (builtin Time)."""
    msg = TransformStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = parent
    msg.child_frame_id = child
    msg.transform = matrix_to_transform(parent_from_child)
    return msg


def rotate_covariance(cov6: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Express a 6x6 (translation, rotation) covariance in a frame rotated by ``rot``
    (3x3, new_from_old): ``A cov A^T`` with ``A = diag(rot, rot)``."""
    a = np.zeros((6, 6))
    a[:3, :3] = rot
    a[3:, 3:] = rot
    return a @ np.asarray(cov6, dtype=np.float64) @ a.T


def sanitize_covariance(cov6: np.ndarray | None, floor: float = 1e-9,
                        ceiling: float = 1e6) -> np.ndarray:
    """A usable 6x6 covariance: symmetric, finite, diagonal clamped to ``[floor, ceiling]``.

    Never returns an all-zero matrix (claims perfect certainty) nor 1e308-style sentinels
    (breaks filters): non-finite or missing input becomes ``ceiling`` on the diagonal.
    """
    if cov6 is None:
        return np.eye(6) * ceiling
    c = np.asarray(cov6, dtype=np.float64).reshape(6, 6)
    if not np.all(np.isfinite(c)):
        return np.eye(6) * ceiling
    c = np.clip(c, -ceiling, ceiling)
    c = 0.5 * (c + c.T)
    d = np.clip(np.diag(c), floor, ceiling)
    off = c - np.diag(np.diag(c))
    # keep off-diagonals consistent with the clamped diagonal (|c_ij| <= sqrt(c_ii c_jj))
    lim = np.sqrt(np.outer(d, d))
    off = np.clip(off, -lim, lim)
    return off + np.diag(d)


class OdomFrames:
    """The engine's world → the node's frames (REP-105).

    The engine's world is the optical frame of the first camera of the sequence, at the
    identity; so ``odom_from_world = base_from_cam`` and base_link starts at the identity of
    odom: ``odom_from_base = base_from_cam @ world_from_cam @ cam_from_base``.

    Args:
        base_from_cam: 4x4, pose of the camera *optical* frame in base_link.
    """

    def __init__(self, base_from_cam: np.ndarray) -> None:
        self.base_from_cam = _as_se3(base_from_cam)
        self.cam_from_base = invert(self.base_from_cam)
        self.odom_from_world = self.base_from_cam

    def odom_from_base(self, world_from_cam: np.ndarray) -> np.ndarray:
        """4x4 pose of base_link in odom for a camera pose (world_from_cam) of the engine.
        Non-finite input gives a non-finite result (callers check)."""
        w_c = np.asarray(world_from_cam, dtype=np.float64).reshape(4, 4)
        return self.odom_from_world @ w_c @ self.cam_from_base

    def points_to_odom(self, points_world: np.ndarray) -> np.ndarray:
        """``[M,3]`` engine-world points → odom, float32 ``[M,3]``."""
        p = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        m = self.odom_from_world
        return (p @ m[:3, :3].T + m[:3, 3]).astype(np.float32)
