"""The engine's outputs in the robot's odometry frames, without ROS (REP-103 / REP-105).

Shared by the node (ros/) and the offline replay (tools/), so both publish the same poses,
clouds and covariances. ``a_from_b`` maps points of frame ``b`` into frame ``a`` (it is the
pose of ``b`` in ``a``). VGGT poses live in *optical* axes (x right, y down, z forward);
bodies use x forward, y left, z up. Units: metres (up to the model's scale), radians.
"""
from __future__ import annotations

import numpy as np

from vggt4d_ros.geometry.transforms import invert_se3, rotvec_from_rotmat

#: Variance reported for a twist that could not be estimated (first frame of a sequence, a
#: held pose, a gap): large but finite, as robot_localization expects.
UNKNOWN_TWIST_VARIANCE = 1e6

#: Rotation (4x4) from camera optical axes (x right, y down, z fwd) to camera body axes
#: (x fwd, y left, z up): ``camera_link_from_camera_optical``.
LINK_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0, 0.0],
                              [-1.0, 0.0, 0.0, 0.0],
                              [0.0, -1.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 1.0]])


def as_se3(mat: np.ndarray) -> np.ndarray:
    """A finite pose matrix as float64 ``[4, 4]`` (a ``[3, 4]`` one gets its bottom row);
    ValueError otherwise."""
    m = np.asarray(mat, dtype=np.float64)
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"expected a finite [4,4] or [3,4] pose matrix, got shape {m.shape}")
    return m


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


def covariance_in_base(cov_cam: np.ndarray | None, base_from_cam: np.ndarray) -> np.ndarray:
    """Engine covariance (camera axes: x y z rx ry rz) -> base_link axes, sanitised."""
    rot = np.asarray(base_from_cam, dtype=np.float64)[:3, :3]
    return sanitize_covariance(rotate_covariance(sanitize_covariance(cov_cam), rot))


class OdomFrames:
    """The engine's world -> the node's frames (REP-105).

    The engine's world is the optical frame of the first camera of the sequence, at the
    identity; so ``odom_from_world = base_from_cam`` and base_link starts at the identity of
    odom: ``odom_from_base = base_from_cam @ world_from_cam @ cam_from_base``.

    Args:
        base_from_cam: 4x4, pose of the camera *optical* frame in base_link.
    """

    def __init__(self, base_from_cam: np.ndarray = LINK_FROM_OPTICAL) -> None:
        self.base_from_cam = as_se3(base_from_cam)
        self.cam_from_base = invert_se3(self.base_from_cam)
        self.odom_from_world = self.base_from_cam

    def odom_from_cam(self, world_from_cam: np.ndarray) -> np.ndarray:
        """4x4 pose of the camera optical frame in odom."""
        w_c = np.asarray(world_from_cam, dtype=np.float64).reshape(4, 4)
        return self.odom_from_world @ w_c

    def odom_from_base(self, world_from_cam: np.ndarray) -> np.ndarray:
        """4x4 pose of base_link in odom for a camera pose (world_from_cam) of the engine.
        Non-finite input gives a non-finite result (callers check)."""
        return self.odom_from_cam(world_from_cam) @ self.cam_from_base

    def points_to_odom(self, points_world: np.ndarray) -> np.ndarray:
        """``[M,3]`` engine-world points -> odom, float32 ``[M,3]``."""
        p = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        m = self.odom_from_world
        return (p @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


class TwistEstimator:
    """Velocity of the body (``base_link``) from consecutive odometry poses, for the twist of
    nav_msgs/Odometry (REP-105: expressed in the child frame).

    Backward difference between the previous and the current trusted frame of the same
    sequence: ``v = R_cur^T (t_cur - t_prev) / dt`` (odometry units per second - the model's
    scale, like the poses) and ``w = log(R_prev^T R_cur) / dt`` (rad/s). Variances: the two
    poses' variances (diagonal of their base-frame covariances) summed, over ``dt²``. Unknown
    (zero twist, variance :data:`UNKNOWN_TWIST_VARIANCE`) for the first frame of a sequence,
    after an untrusted frame (held or re-anchored pose), or across a gap over ``max_gap_s``.
    """

    def __init__(self, max_gap_s: float = 1.0) -> None:
        if max_gap_s <= 0:
            raise ValueError(f"max_gap_s must be > 0, got {max_gap_s}")
        self.max_gap_s = max_gap_s
        self._prev: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        self._prev = None

    def update(self, stamp_ns: int, sequence: int, odom_from_base: np.ndarray,
               cov_base: np.ndarray, trusted: bool) -> tuple[np.ndarray, np.ndarray]:
        """-> (twist [6] = vx vy vz wx wy wz, covariance [6, 6]) for this frame."""
        pose = np.asarray(odom_from_base, dtype=np.float64)
        var = np.diag(np.asarray(cov_base, dtype=np.float64).reshape(6, 6))
        ok = trusted and bool(np.all(np.isfinite(pose)) and np.all(np.isfinite(var)))
        prev, self._prev = self._prev, ((stamp_ns, sequence, pose, var) if ok else None)
        unknown = np.zeros(6), np.eye(6) * UNKNOWN_TWIST_VARIANCE
        if not ok or prev is None or prev[1] != sequence:
            return unknown
        dt = (stamp_ns - prev[0]) * 1e-9
        if not 0.0 < dt <= self.max_gap_s:
            return unknown
        rot_prev, rot = prev[2][:3, :3], pose[:3, :3]
        linear = rot.T @ (pose[:3, 3] - prev[2][:3, 3]) / dt
        angular = rotvec_from_rotmat(rot_prev.T @ rot) / dt
        cov = sanitize_covariance(np.diag((prev[3] + var) / dt ** 2),
                                  ceiling=UNKNOWN_TWIST_VARIANCE)
        return np.concatenate([linear, angular]), cov
