"""Pose matrices <-> geometry_msgs, and the frame conventions of the node (REP-103/105).

Naming: ``a_from_b`` is the 4x4 homogeneous matrix that maps points in frame ``b`` to frame
``a`` (``p_a = a_from_b @ p_b``); it is also the pose of ``b`` expressed in ``a`` — exactly
what a TF ``a -> b`` (header.frame_id = a, child_frame_id = b) carries. Quaternions are in
ROS order ``(x, y, z, w)``. Units: metres (up to the model's scale), radians.

Frames: VGGT poses live in *optical* axes (x right, y down, z forward). Bodies in ROS use
x forward, y left, z up (REP-103). ``LINK_FROM_OPTICAL`` rotates optical axes into body axes.
The node's frames are ``odom -> base_link -> <camera optical frame>``; the engine's world is
the optical frame of its first camera, mapped into ``odom`` so that base_link starts at the
identity (see :class:`vggt4d_ros.stream.odom.OdomFrames`).
"""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Pose, Quaternion, Transform, TransformStamped, Vector3
from scipy.spatial.transform import Rotation

from vggt4d_ros.geometry.transforms import invert_se3
# The frame and covariance conventions are ROS-free (shared with the offline replay); re-exported
# here for the node and its tests.
from vggt4d_ros.stream.odom import (LINK_FROM_OPTICAL, OdomFrames, as_se3, rotate_covariance,
                                    sanitize_covariance)

__all__ = ["LINK_FROM_OPTICAL", "OdomFrames", "rotate_covariance", "sanitize_covariance",
           "invert", "quat_xyzw_from_matrix", "matrix_from_quat_xyzw", "matrix_from_xyz_rpy",
           "matrix_to_pose", "pose_to_matrix", "matrix_to_transform", "transform_to_matrix",
           "make_transform_stamped"]

def invert(a_from_b: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (or similarity-free) 4x4 transform: ``b_from_a``."""
    return invert_se3(as_se3(a_from_b))


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
    m = as_se3(a_from_b)
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
