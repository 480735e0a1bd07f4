"""Sim(3) stitching of a window (own gauge & scale) onto the running odometry frame.

Correspondences come for free from pixel identity: an ANCHOR frame (a frame of the new
window that was already emitted — the overlap with the previous window, or a keyframe) has
a stored estimate (depth, intrinsics, ``world_from_cam`` in the odometry frame). The same
pixel back-projected with the window's prediction gives the source point, with the stored
estimate the destination point. Only pixels that are static in BOTH estimates, have valid
depth and pass the confidence floor are used, subsampled to a fixed budget per frame, weighted
by confidence; a robust Umeyama (MAD outlier rejection) gives ``odom_from_window``.

Failure (→ engine state LOST) when: fewer than ``min_points`` correspondences, degenerate
Sim(3), inlier fraction below ``min_inlier_fraction``, relative residual above
``max_residual`` (RMS 3-D error divided by the median anchor depth, dimensionless), or a
scale outside ``scale_range``.

Re-anchoring after a failure (documented policy, see ``reanchor``): a new trajectory segment
starts from the last good pose — the newest TRUSTED anchor frame in the window keeps its
odometry pose (depth ratio fixes the scale); if the window holds no trusted anchor, the
window's first frame is placed at the last good pose (hold).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from vggt4d_ros.geometry.sim3 import DegenerateSim3Error, Sim3, robust_umeyama_sim3
from vggt4d_ros.geometry.transforms import invert_se3, rotation_angle, to_homogeneous

#: Documented covariance range: variances in odometry units² (x, y, z) and rad² (rotations).
COV_MIN_VAR = 1e-6
COV_MAX_VAR = 1e3


@dataclass
class FrameRecord:
    """What the engine keeps of an emitted frame to anchor later windows on it.

    image [H0,W0,3] uint8 (input resolution, re-fed to the predictor), image_small [H,W,3]
    uint8 (predictor resolution), depth [H,W] float32 in ODOMETRY scale, conf [H,W], mask
    [H,W] bool (dynamic), intrinsic [3,3] (H x W pixels), world_from_cam [4,4] (odometry frame).
    ``valid``: the prediction was finite. ``trusted``: it came from a window that aligned
    (TRACKING) or from the first window of a sequence.
    """

    key: int
    stamp_ns: int
    frame_id: str
    image: np.ndarray
    image_small: np.ndarray
    depth: np.ndarray
    conf: np.ndarray
    mask: np.ndarray
    intrinsic: np.ndarray
    world_from_cam: np.ndarray
    valid: bool
    trusted: bool
    median_depth: float = float("nan")


@dataclass
class AlignParams:
    """Thresholds of the alignment (see module docstring)."""

    points_per_frame: int = 1024
    min_points: int = 64
    min_inlier_fraction: float = 0.5
    # Relative RMS 3-D residual. The GT predictor with 1 % depth noise gives ~0.015, a garbage
    # window 0.6+; VGGT's cross-window depth disagreement on real scenes is expected to be a few
    # percent, so 0.1 leaves room (calibrate with a VGGT-1B run on a real bag).
    max_residual: float = 0.1
    k_mad: float = 3.0
    min_confidence: float = 0.0
    scale_range: tuple[float, float] = (1e-3, 1e3)


@dataclass
class AlignResult:
    """``odom_from_window`` (None when failed), relative residual, inlier fraction, number of
    correspondences, failure ``reason`` ("" if ok) and ``scale_drift`` (see ``align_window``)."""

    ok: bool
    odom_from_window: Optional[Sim3]
    residual: float = float("nan")
    inlier_fraction: float = 0.0
    num_points: int = 0
    reason: str = ""
    scale_drift: float = 0.0
    per_anchor_scale: list[float] = field(default_factory=list)


def unproject_pixels(depth: np.ndarray, u: np.ndarray, v: np.ndarray, intrinsic: np.ndarray,
                     world_from_cam: np.ndarray) -> np.ndarray:
    """Back-project pixels to world points [N,3].

    depth [N] (camera z), u, v [N] integer pixel coordinates (same convention as
    ``geometry.unproject.depth_to_world_points`` with ``pixel_offset=0``), intrinsic [3,3],
    world_from_cam [3|4,4]: X_cam = d K⁻¹[u,v,1], X_world = R X_cam + c.
    """
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    x_cam = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], axis=1)
    return x_cam @ world_from_cam[:3, :3].T + world_from_cam[:3, 3]


def valid_depth(depth: np.ndarray) -> np.ndarray:
    """bool mask of usable depth values (finite and > 0)."""
    return np.isfinite(depth) & (depth > 0)


def prediction_frame_valid(extrinsic: np.ndarray, depth: np.ndarray,
                           intrinsic: Optional[np.ndarray] = None,
                           min_valid_fraction: float = 0.01) -> bool:
    """A predicted frame is usable if its pose is finite with a proper rotation, its
    intrinsics (if given) finite with positive focal lengths, and at least
    ``min_valid_fraction`` of its depth is valid."""
    if not np.isfinite(extrinsic).all():
        return False
    if intrinsic is not None and not (np.isfinite(intrinsic).all()
                                      and intrinsic[0, 0] > 0 and intrinsic[1, 1] > 0):
        return False
    det = np.linalg.det(extrinsic[:3, :3])
    if not (0.9 < det < 1.1):
        return False
    return float(valid_depth(depth).mean()) >= min_valid_fraction


def _sample_pairs(pred, win_idx: int, rec: FrameRecord, rng: np.random.Generator,
                  params: AlignParams):
    """Correspondences of one anchor frame: (src [n,3] window gauge, dst [n,3] odom,
    weights [n], dst depth [n], window depth [n])."""
    d_win = pred.depth[win_idx]
    if d_win.shape != rec.depth.shape:
        raise ValueError(f"anchor resolution {rec.depth.shape} != window resolution {d_win.shape}")
    conf_w, conf_r = pred.depth_conf[win_idx], rec.conf
    ok = (valid_depth(d_win) & valid_depth(rec.depth) & ~pred.mask[win_idx] & ~rec.mask
          & (conf_w >= params.min_confidence) & (conf_r >= params.min_confidence)
          & np.isfinite(conf_w) & np.isfinite(conf_r))
    idx = np.flatnonzero(ok.ravel())
    if len(idx) > params.points_per_frame:
        idx = np.sort(rng.choice(idx, params.points_per_frame, replace=False))
    v, u = np.divmod(idx, d_win.shape[1])
    world_from_cam_win = invert_se3(to_homogeneous(pred.extrinsic[win_idx]))
    d_src = d_win.ravel()[idx].astype(np.float64)
    d_dst = rec.depth.ravel()[idx].astype(np.float64)
    src = unproject_pixels(d_src, u, v, pred.intrinsic[win_idx], world_from_cam_win)
    dst = unproject_pixels(d_dst, u, v, rec.intrinsic, rec.world_from_cam)
    w = np.sqrt(np.maximum(conf_w.ravel()[idx], 0) * np.maximum(conf_r.ravel()[idx], 0))
    return src, dst, w.astype(np.float64), d_dst, d_src


def align_window(pred, anchors: Sequence[tuple[int, FrameRecord]], params: AlignParams,
                 rng: np.random.Generator) -> AlignResult:
    """Estimate ``odom_from_window`` from the anchor frames of a window.

    pred: validated ``WindowPrediction``; anchors: (index in the window, stored record) for
    every anchor frame with a valid record and prediction.

    ``scale_drift``: log of (scale implied by the newest anchor frame / scale implied by the
    oldest one), each the median of stored depth / aligned window depth over its inliers.
    0 when the window agrees with the past; its sign tells whether the newest part of the
    trajectory is shrinking (< 0) or growing (> 0) relative to the older anchors.
    """
    parts = [_sample_pairs(pred, wi, rec, rng, params) for wi, rec in anchors]
    if not parts:
        return AlignResult(False, None, reason="no anchor frames")
    owner = np.concatenate([np.full(len(p[0]), k) for k, p in enumerate(parts)])
    src, dst, w, d_dst, d_win = (np.concatenate([p[i] for p in parts]) for i in range(5))
    n = len(src)
    if n < params.min_points:
        return AlignResult(False, None, num_points=n,
                           reason=f"too few static points ({n} < {params.min_points})")
    # cap single-pixel dominance: weights clipped at 10x their median, then normalised
    w = np.minimum(w, 10.0 * max(float(np.median(w)), 1e-12))
    if not np.any(w > 0):
        w = np.ones(n)
    med_depth = float(np.median(d_dst))
    try:
        fit = robust_umeyama_sim3(src, dst, w, k_mad=params.k_mad, min_threshold=1e-3 * med_depth)
    except DegenerateSim3Error as exc:
        return AlignResult(False, None, num_points=n, reason=f"degenerate Sim(3): {exc.reason}")
    residual = fit.residual_rms / max(med_depth, 1e-12)
    sim = fit.sim3
    per_anchor = []
    for k in range(len(parts)):
        sel = fit.inliers & (owner == k)
        ratio = np.median(d_dst[sel] / (sim.scale * d_win[sel])) if sel.any() else np.nan
        per_anchor.append(float(ratio))
    finite = [s for s in per_anchor if np.isfinite(s) and s > 0]
    drift = float(np.log(finite[-1] / finite[0])) if len(finite) >= 2 else 0.0
    result = AlignResult(True, sim, residual, fit.inlier_fraction, n, "", drift, per_anchor)
    lo, hi = params.scale_range
    if not (lo <= sim.scale <= hi):
        result.ok, result.reason = False, f"scale {sim.scale:.3g} outside [{lo}, {hi}]"
    elif fit.inlier_fraction < params.min_inlier_fraction:
        result.ok = False
        result.reason = (f"inlier fraction {fit.inlier_fraction:.2f} "
                         f"< {params.min_inlier_fraction}")
    elif not residual <= params.max_residual:
        result.ok, result.reason = False, f"residual {residual:.3g} > {params.max_residual}"
    return result


def sim3_mapping_pose(world_from_cam_win: np.ndarray, world_from_cam_odom: np.ndarray,
                      scale: float) -> Sim3:
    """The Sim(3) ``odom_from_window`` with the given scale that maps one camera's window
    pose exactly onto its odometry pose (R = R_odom R_winᵀ, t = c_odom − s R c_win)."""
    rot = world_from_cam_odom[:3, :3] @ world_from_cam_win[:3, :3].T
    trans = world_from_cam_odom[:3, 3] - scale * rot @ world_from_cam_win[:3, 3]
    return Sim3(float(scale), rot, trans)


def depth_ratio(depth_num: np.ndarray, depth_den: np.ndarray) -> float:
    """Median of depth_num / depth_den over pixels valid in both; NaN if none."""
    ok = valid_depth(depth_num) & valid_depth(depth_den)
    if not ok.any():
        return float("nan")
    return float(np.median(depth_num[ok] / depth_den[ok]))


def reanchor(pred, anchors: Sequence[tuple[int, FrameRecord]], frame_valid: Sequence[bool],
             last_good_world_from_cam: np.ndarray,
             last_good_median_depth: float) -> tuple[Sim3, str]:
    """``odom_from_window`` after a failed alignment (new segment from the last good pose).

    1. newest trusted anchor whose prediction is valid: keeps its odometry pose; scale = median
       depth ratio (stored / predicted) on that frame;
    2. else the window's first valid frame is placed AT ``last_good_world_from_cam`` (hold),
       scale = last good median depth / its median predicted depth;
    3. else identity (every frame of the window is invalid; the engine holds the pose anyway).
    Returns (sim3, description of the choice).
    """
    for wi, rec in reversed(list(anchors)):
        if rec.trusted and frame_valid[wi]:
            scale = depth_ratio(rec.depth, pred.depth[wi])
            scale = scale if np.isfinite(scale) and scale > 0 else 1.0
            wfc = invert_se3(to_homogeneous(pred.extrinsic[wi]))
            return sim3_mapping_pose(wfc, rec.world_from_cam, scale), f"anchor frame key {rec.key}"
    for wi, ok in enumerate(frame_valid):
        if ok:
            d = pred.depth[wi]
            med = float(np.median(d[valid_depth(d)]))
            good = np.isfinite(last_good_median_depth) and med > 0
            scale = last_good_median_depth / med if good else 1.0
            wfc = invert_se3(to_homogeneous(pred.extrinsic[wi]))
            return sim3_mapping_pose(wfc, last_good_world_from_cam, scale), "hold at last good pose"
    return Sim3.identity(), "no valid frame"


def overlap_disagreement(odom_from_window: Sim3, pred,
                         anchors: Sequence[tuple[int, FrameRecord]]) -> tuple[float, float]:
    """RMS camera-centre distance (odometry units) and RMS rotation angle (rad) between the
    aligned window poses of the anchor frames and their stored odometry poses."""
    if not anchors:
        return 0.0, 0.0
    dt, dr = [], []
    for wi, rec in anchors:
        world_from_cam_win = invert_se3(to_homogeneous(pred.extrinsic[wi]))
        aligned = odom_from_window.transform_world_from_cam(world_from_cam_win)
        dt.append(np.linalg.norm(aligned[:3, 3] - rec.world_from_cam[:3, 3]))
        dr.append(float(rotation_angle(aligned[:3, :3].T @ rec.world_from_cam[:3, :3])))
    return float(np.sqrt(np.mean(np.square(dt)))), float(np.sqrt(np.mean(np.square(dr))))


def pose_covariance(residual: float, trans_disagreement: float, rot_disagreement: float,
                    median_depth: float, lost: bool) -> np.ndarray:
    """Diagonal 6x6 pose covariance (x, y, z in odometry units², then rotation about x, y, z in
    rad², odometry frame — the ROS Odometry order).

    var_xyz = (residual · median_depth)² + trans_disagreement² + (1e-3 · median_depth)²
    var_rot = residual² + rot_disagreement² + (1e-3)²
    every variance clamped into [COV_MIN_VAR, COV_MAX_VAR]; LOST → COV_MAX_VAR everywhere.
    Never 0, never 1e308, never NaN.
    """
    if lost:
        return np.diag(np.full(6, COV_MAX_VAR))
    d = median_depth if np.isfinite(median_depth) and median_depth > 0 else 1.0
    r = residual if np.isfinite(residual) else 0.0
    var_t = (r * d) ** 2 + trans_disagreement ** 2 + (1e-3 * d) ** 2
    var_r = r ** 2 + rot_disagreement ** 2 + 1e-6
    var = np.array([var_t] * 3 + [var_r] * 3)
    var = np.where(np.isfinite(var), var, COV_MAX_VAR)
    return np.diag(np.clip(var, COV_MIN_VAR, COV_MAX_VAR))
