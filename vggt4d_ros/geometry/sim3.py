"""Similarity transforms Sim(3) and the (weighted, robust) Umeyama estimator.

A ``Sim3`` maps points of a *source* frame into a *destination* frame:
``X_dst = scale · R · X_src + t``. In the streaming engine the source is a window's own
gauge (VGGT's first-frame-at-identity world, unknown scale) and the destination is the
odometry frame, so the stitcher names it ``odom_from_window``.

Umeyama (1991): closed-form least-squares similarity between two corresponding point sets,
with per-point weights here. Degenerate inputs (fewer than 3 usable points, non-finite
values, zero spread, collinear points: rotation about the line is unobservable) raise
``DegenerateSim3Error`` with the reason, instead of returning a silently wrong transform.
Coplanar points are NOT degenerate (a plane fixes the rotation; the reflection case is
handled by the determinant correction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

#: relative singular-value threshold below which the cross-covariance is called rank deficient
_RANK_EPS = 1e-9


class DegenerateSim3Error(ValueError):
    """The point sets do not determine a similarity transform; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(f"degenerate Sim(3) input: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Sim3:
    """``X_dst = scale · rotation @ X_src + translation`` (scale > 0, rotation in SO(3))."""

    scale: float
    rotation: np.ndarray      # [3, 3]
    translation: np.ndarray   # [3]

    @staticmethod
    def identity() -> "Sim3":
        return Sim3(1.0, np.eye(3), np.zeros(3))

    def matrix(self) -> np.ndarray:
        """Homogeneous [4, 4] matrix ``[[s R, t], [0, 1]]``."""
        out = np.eye(4)
        out[:3, :3] = self.scale * self.rotation
        out[:3, 3] = self.translation
        return out

    def apply(self, points_src: np.ndarray) -> np.ndarray:
        """Points [..., 3] in the source frame -> [..., 3] in the destination frame."""
        points_src = np.asarray(points_src)
        return (self.scale * points_src @ self.rotation.T + self.translation).astype(
            np.result_type(points_src.dtype, np.float32), copy=False)

    def inverse(self) -> "Sim3":
        """``src_from_dst``."""
        rot_t = self.rotation.T
        return Sim3(1.0 / self.scale, rot_t, -(rot_t @ self.translation) / self.scale)

    def compose(self, other: "Sim3") -> "Sim3":
        """``self ∘ other``: apply ``other`` first (``a_from_b.compose(b_from_c) = a_from_c``)."""
        return Sim3(self.scale * other.scale, self.rotation @ other.rotation,
                    self.scale * (self.rotation @ other.translation) + self.translation)

    def transform_world_from_cam(self, world_from_cam_src: np.ndarray) -> np.ndarray:
        """Re-express camera poses ``world_from_cam`` [..., 3|4, 4] given in the source world
        in the destination world -> [..., 4, 4]. The camera frame stays rigid (its depth
        scales by ``scale``): R' = R_sim R, c' = s R_sim c + t."""
        world_from_cam_src = np.asarray(world_from_cam_src, dtype=np.float64)
        out = np.zeros(world_from_cam_src.shape[:-2] + (4, 4))
        out[..., :3, :3] = self.rotation @ world_from_cam_src[..., :3, :3]
        centre = world_from_cam_src[..., :3, 3]
        out[..., :3, 3] = self.scale * centre @ self.rotation.T + self.translation
        out[..., 3, 3] = 1.0
        return out


def _validate(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray]):
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"umeyama_sim3: src and dst must both be [N, 3], "
                         f"got {src.shape} and {dst.shape}")
    if weights is None:
        w = np.ones(len(src))
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != src.shape[0]:
            raise ValueError(f"umeyama_sim3: weights must be [N], "
                             f"got {w.shape} for N={src.shape[0]}")
        if np.any(w < 0):
            raise ValueError("umeyama_sim3: weights must be >= 0")
    finite = np.isfinite(src).all(1) & np.isfinite(dst).all(1) & np.isfinite(w)
    if not finite.all():
        raise DegenerateSim3Error(f"{int((~finite).sum())} non-finite points or weights")
    return src, dst, w


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray] = None,
                 with_scale: bool = True) -> Sim3:
    """Weighted least-squares similarity with ``dst ≈ s R src + t``.

    Args:
        src, dst: corresponding points [N, 3] (any units; dst's units define the output's).
        weights: [N] non-negative (e.g. confidences); None = uniform.
        with_scale: False fixes s = 1 (rigid SE(3) fit).
    Returns: ``Sim3``. Raises ``DegenerateSim3Error`` (a ValueError) on degenerate input.
    """
    src, dst, w = _validate(src, dst, weights)
    used = w > 0
    if int(used.sum()) < 3:
        raise DegenerateSim3Error(f"need >= 3 points with positive weight, got {int(used.sum())}")
    src, dst, w = src[used], dst[used], w[used] / w[used].sum()

    mu_src = w @ src
    mu_dst = w @ dst
    src_c = src - mu_src
    dst_c = dst - mu_dst
    var_src = float(w @ (src_c ** 2).sum(1))
    var_dst = float(w @ (dst_c ** 2).sum(1))
    extent = max(float(np.abs(src).max()), float(np.abs(dst).max()), 1e-300)
    if var_src <= (1e-12 * extent) ** 2 or var_dst <= (1e-12 * extent) ** 2:
        raise DegenerateSim3Error("zero spread (all points coincide)")
    # Collinearity of either set: its second principal variance vanishes.
    for name, pts_c in (("src", src_c), ("dst", dst_c)):
        sv = np.linalg.svd(pts_c * np.sqrt(w)[:, None], compute_uv=False)
        if sv[1] <= 1e-6 * sv[0]:
            raise DegenerateSim3Error(
                f"{name} points are collinear (rotation about the line unobservable)")

    cov = (dst_c * w[:, None]).T @ src_c            # [3, 3] cross-covariance
    u, d, vt = np.linalg.svd(cov)
    if d[1] <= _RANK_EPS * d[0]:
        raise DegenerateSim3Error("cross-covariance rank < 2")
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0                                # avoid a reflection
    rot = (u * sign) @ vt
    scale = float((d * sign).sum() / var_src) if with_scale else 1.0
    if not np.isfinite(scale) or scale <= 0:
        raise DegenerateSim3Error(f"non-positive scale {scale}")
    trans = mu_dst - scale * rot @ mu_src
    return Sim3(scale, rot, trans)


def try_umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray] = None,
                     with_scale: bool = True) -> tuple[Optional[Sim3], str]:
    """``umeyama_sim3`` that returns ``(None, reason)`` instead of raising on degenerate input."""
    try:
        return umeyama_sim3(src, dst, weights, with_scale), ""
    except DegenerateSim3Error as exc:
        return None, exc.reason


@dataclass
class RobustSim3Result:
    """Outcome of ``robust_umeyama_sim3``.

    ``residual_rms``: weighted RMS of |dst − sim(src)| over the inliers (dst units).
    ``inliers``: bool [N] of the input points. ``iterations``: refits done.
    """

    sim3: Sim3
    inliers: np.ndarray
    residual_rms: float
    inlier_fraction: float
    iterations: int
    residuals: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def robust_umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray] = None,
                        with_scale: bool = True, k_mad: float = 3.0, max_iters: int = 5,
                        min_threshold: float = 0.0) -> RobustSim3Result:
    """Umeyama with iterative outlier rejection.

    Each iteration fits on the current inliers, computes residual norms r_i for ALL points
    and keeps ``r_i <= max(median(r) + k_mad · 1.4826 · MAD(r), min_threshold)`` (statistics over
    the current inliers), until the inlier set stops changing or ``max_iters`` refits.

    Args: as ``umeyama_sim3``; ``k_mad`` > 0; ``min_threshold`` (dst units) keeps a noise
    floor so that near-perfect data is not trimmed to nothing.
    Raises ``DegenerateSim3Error`` when the (remaining) inliers are degenerate.
    """
    if k_mad <= 0 or max_iters < 1:
        raise ValueError("robust_umeyama_sim3: need k_mad > 0 and max_iters >= 1, "
                         f"got {k_mad}, {max_iters}")
    src, dst, w = _validate(src, dst, weights)
    inliers = w > 0
    sim = umeyama_sim3(src[inliers], dst[inliers], w[inliers], with_scale)
    iters = 1
    resid = np.linalg.norm(dst - sim.apply(src), axis=1)
    while iters < max_iters:
        r_in = resid[inliers]
        med = float(np.median(r_in))
        mad = float(np.median(np.abs(r_in - med)))
        thr = max(med + k_mad * 1.4826 * mad, min_threshold)
        new_inliers = (resid <= thr) & (w > 0)
        if int(new_inliers.sum()) < 3 or np.array_equal(new_inliers, inliers):
            break
        inliers = new_inliers
        sim = umeyama_sim3(src[inliers], dst[inliers], w[inliers], with_scale)
        resid = np.linalg.norm(dst - sim.apply(src), axis=1)
        iters += 1
    w_in = w[inliers]
    rms = float(np.sqrt((w_in * resid[inliers] ** 2).sum() / w_in.sum()))
    return RobustSim3Result(sim, inliers, rms, float(inliers.sum()) / len(src), iters, resid)
