"""Evaluation metrics: trajectories (TUM I/O, ATE, RPE), dynamic masks (J, F), depth.

Trajectories are lists of world_from_cam poses [N,4,4] (the camera pose in the world, metres)
with stamps in integer nanoseconds. TUM lines are ``timestamp tx ty tz qx qy qz qw`` of
world_from_cam, timestamp in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.spatial.transform import Rotation


# --------------------------------------------------------------------------- TUM I/O
@dataclass
class Trajectory:
    """stamps_ns [N] int64; poses [N,4,4] float64 world_from_cam (metres)."""

    stamps_ns: np.ndarray
    poses: np.ndarray

    def __post_init__(self) -> None:
        self.stamps_ns = np.asarray(self.stamps_ns, dtype=np.int64).reshape(-1)
        self.poses = np.asarray(self.poses, dtype=np.float64)
        if self.poses.shape != (self.stamps_ns.size, 4, 4):
            raise ValueError(f"poses must be [N,4,4] for N={self.stamps_ns.size} stamps, "
                             f"got {self.poses.shape}")

    def __len__(self) -> int:
        return int(self.stamps_ns.size)

    @property
    def positions(self) -> np.ndarray:
        """[N,3] camera centres in the world (metres)."""
        return self.poses[:, :3, 3]


def _format_stamp(ns: int) -> str:
    """Exact decimal seconds of integer nanoseconds (no float rounding)."""
    ns = int(ns)
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _parse_stamp(text: str) -> int:
    """Integer nanoseconds of a decimal seconds string (exact for up to 9 decimals)."""
    t = text.strip()
    neg = t.startswith("-")
    t = t.lstrip("+-")
    if "e" in t.lower():
        return int(round(float(text) * 1e9))
    whole, _, frac = t.partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    return -ns if neg else ns


def write_tum(path: str | Path, stamps_ns: Sequence[int], world_from_cam: np.ndarray) -> None:
    """Write a TUM trajectory file: ``timestamp tx ty tz qx qy qz qw`` per pose.

    world_from_cam [N,4,4] (camera pose in the world), stamps in nanoseconds.
    """
    poses = np.asarray(world_from_cam, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(stamps_ns) != poses.shape[0]:
        raise ValueError(f"need [N,4,4] poses and N stamps, got {poses.shape} and {len(stamps_ns)}")
    q = Rotation.from_matrix(poses[:, :3, :3]).as_quat()   # x y z w
    q[q[:, 3] < 0] *= -1.0
    lines = ["# timestamp tx ty tz qx qy qz qw (world_from_cam)"]
    for s, T, qq in zip(stamps_ns, poses, q):
        vals = " ".join(f"{v:.9f}" for v in (*T[:3, 3], *qq))
        lines.append(f"{_format_stamp(s)} {vals}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_tum(path: str | Path) -> Trajectory:
    """Read a TUM trajectory (``#`` comments and blank lines skipped, commas allowed)."""
    stamps, poses = [], []
    for ln, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 8:
            raise ValueError(f"{path}:{ln}: expected 8 values (t tx ty tz qx qy qz qw), "
                             f"got {len(parts)}")
        vals = [float(v) for v in parts[1:]]
        q = np.array(vals[3:])
        if not np.isfinite(vals).all() or np.linalg.norm(q) < 1e-9:
            raise ValueError(f"{path}:{ln}: invalid pose values")
        T = np.eye(4)
        T[:3, :3] = Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()
        T[:3, 3] = vals[:3]
        stamps.append(_parse_stamp(parts[0]))
        poses.append(T)
    return Trajectory(np.array(stamps, dtype=np.int64), np.array(poses).reshape(-1, 4, 4))


# --------------------------------------------------------------------------- association
def associate(pred: Trajectory, gt: Trajectory, max_dt_ns: int = 20_000_000
              ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i_pred [M], i_gt [M]) matching each predicted stamp to the nearest GT
    stamp within ``max_dt_ns`` (each GT pose used at most once, greedy by |dt|)."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    order = np.argsort(gt.stamps_ns, kind="stable")
    gs = gt.stamps_ns[order]
    right = np.searchsorted(gs, pred.stamps_ns)
    cand = []
    for i, (s, r) in enumerate(zip(pred.stamps_ns, right)):
        for j in {max(r - 1, 0), min(r, len(gs) - 1)}:     # the neighbours on both sides
            dt = abs(int(gs[j]) - int(s))
            if dt <= max_dt_ns:
                cand.append((dt, i, int(order[j])))
    used_p, used_g, pairs = set(), set(), []
    for dt, i, j in sorted(cand):
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            pairs.append((i, j))
    pairs.sort()
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int)
    ip, ig = zip(*pairs)
    return np.array(ip), np.array(ig)


# --------------------------------------------------------------------------- ATE / RPE (evo)
ALIGNMENTS = ("sim3", "se3", "scale", "none")


@dataclass
class TrajectoryScores:
    """ATE and RPE of a predicted trajectory against ground truth (metres, degrees).

    ``ate_per_frame`` [M]: translation error of each matched pose after alignment;
    ``scale``, ``rotation`` [3,3], ``translation`` [3]: the alignment gt ≈ s R pred + t.
    RPE is computed on the aligned prediction (so it is in GT units) for ``rpe_delta`` frames.
    """

    alignment: str
    matched: int
    ate_rmse: float
    ate_mean: float
    ate_median: float
    ate_max: float
    ate_per_frame: np.ndarray
    rpe_trans_rmse: float
    rpe_trans_mean: float
    rpe_rot_rmse_deg: float
    rpe_rot_mean_deg: float
    rpe_delta: int
    scale: float
    rotation: np.ndarray
    translation: np.ndarray
    aligned_poses: np.ndarray          # [M,4,4] prediction after alignment (world_from_cam)
    gt_poses: np.ndarray               # [M,4,4] matched ground truth
    stamps_ns: np.ndarray              # [M] stamps of the matched predictions
    dropped_nonfinite: int = 0         # predicted poses with NaN/inf, left out
    note: str = ""                     # e.g. why the alignment fell back to centroids

    def summary(self) -> dict:
        """JSON-ready scalars."""
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in self.__dict__.items()
                if isinstance(v, (int, float, str, np.floating, np.integer))}


def _evo_traj(poses: np.ndarray, stamps_ns: np.ndarray):
    from evo.core.trajectory import PoseTrajectory3D
    t0 = int(stamps_ns[0])    # relative seconds keep full float64 precision
    return PoseTrajectory3D(poses_se3=[p.copy() for p in poses],
                            timestamps=(stamps_ns - t0).astype(np.float64) * 1e-9)


def trajectory_scores(pred: Trajectory, gt: Trajectory, alignment: str = "sim3",
                      rpe_delta: int = 1, max_dt_ns: int = 20_000_000) -> TrajectoryScores:
    """ATE (RMSE of camera-centre errors after alignment) and RPE, computed with ``evo``.

    alignment: "sim3" (Umeyama with scale; monocular), "se3" (rigid), "scale" (scale only),
    "none". Poses are world_from_cam; stamps matched within ``max_dt_ns``.
    """
    import copy

    from evo.core import metrics as em
    from evo.core.units import Unit
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    finite = np.isfinite(pred.poses).all(axis=(1, 2))
    dropped = int((~finite).sum())
    if dropped:
        pred = Trajectory(pred.stamps_ns[finite], pred.poses[finite])
    ip, ig = associate(pred, gt, max_dt_ns)
    need = 3 if alignment in ("sim3", "se3") else 1
    if len(ip) < need:
        raise ValueError(f"only {len(ip)} predicted poses match ground-truth stamps "
                         f"(within {max_dt_ns / 1e6:g} ms); {alignment} needs >= {need}")
    stamps = pred.stamps_ns[ip]
    est = _evo_traj(pred.poses[ip], stamps)
    ref = _evo_traj(gt.poses[ig], stamps)
    aligned = copy.deepcopy(est)
    s, R, t = 1.0, np.eye(3), np.zeros(3)
    note = ""
    if alignment != "none":
        from evo.core.geometry import GeometryException
        try:
            R, t, s = aligned.align(ref, correct_scale=alignment == "sim3",
                                    correct_only_scale=alignment == "scale")
        except GeometryException as exc:
            # degenerate prediction (e.g. the camera never moves): no rotation/scale is
            # determined, the best alignment left is moving the centroids together
            t = ref.positions_xyz.mean(axis=0) - aligned.positions_xyz.mean(axis=0)
            shift = np.eye(4)
            shift[:3, 3] = t
            aligned.transform(shift)          # left-multiplied: world change X' = X + t
            note = f"{alignment} alignment impossible ({exc}); aligned centroids only"
    ape = em.APE(em.PoseRelation.translation_part)
    ape.process_data((ref, aligned))
    err = np.asarray(ape.error, dtype=np.float64)
    rpe_t = rpe_r = np.zeros(0)
    if len(ip) > rpe_delta:
        rt = em.RPE(em.PoseRelation.translation_part, delta=rpe_delta, delta_unit=Unit.frames,
                    all_pairs=False)
        rt.process_data((ref, aligned))
        rr = em.RPE(em.PoseRelation.rotation_angle_deg, delta=rpe_delta, delta_unit=Unit.frames,
                    all_pairs=False)
        rr.process_data((ref, aligned))
        rpe_t, rpe_r = np.asarray(rt.error), np.asarray(rr.error)

    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(x ** 2))) if x.size else float("nan")

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if x.size else float("nan")

    return TrajectoryScores(
        alignment=alignment, matched=int(len(ip)), ate_rmse=rms(err), ate_mean=mean(err),
        ate_median=float(np.median(err)), ate_max=float(err.max()), ate_per_frame=err,
        rpe_trans_rmse=rms(rpe_t), rpe_trans_mean=mean(rpe_t), rpe_rot_rmse_deg=rms(rpe_r),
        rpe_rot_mean_deg=mean(rpe_r), rpe_delta=int(rpe_delta), scale=float(s),
        rotation=np.asarray(R), translation=np.asarray(t),
        aligned_poses=np.stack(aligned.poses_se3), gt_poses=gt.poses[ig], stamps_ns=stamps,
        dropped_nonfinite=dropped, note=note)


# --------------------------------------------------------------------------- masks (DAVIS J & F)
def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"masks must be [H,W] of the same shape, got {p.shape} and {g.shape}")
    return p, g


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J = |P ∩ G| / |P ∪ G| of two [H,W] masks (1.0 when both are empty)."""
    p, g = _check_pair(pred, gt)
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else np.count_nonzero(p & g) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """[H,W] bool: pixels whose label differs from the right, lower or lower-right
    neighbour (a one-pixel boundary as in the DAVIS protocol; outside = same label)."""
    m = np.asarray(mask).astype(bool)
    b = np.zeros_like(m)
    b[:, :-1] |= m[:, :-1] != m[:, 1:]
    b[:-1, :] |= m[:-1, :] != m[1:, :]
    b[:-1, :-1] |= m[:-1, :-1] != m[1:, 1:]
    return b


def _dilate_disk(b: np.ndarray, radius: int) -> np.ndarray:
    import cv2
    if radius <= 0:
        return b.copy()
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.uint8)
    return cv2.dilate(b.astype(np.uint8), disk) > 0


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Contour accuracy F (DAVIS): F-measure of boundary precision/recall, where a boundary
    pixel matches if the other boundary lies within ``ceil(bound_th * image diagonal)``
    pixels (``bound_th >= 1`` = that many pixels)."""
    p, g = _check_pair(pred, gt)
    radius = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.hypot(*p.shape)))
    bp, bg = boundary_map(p), boundary_map(g)
    n_p, n_g = np.count_nonzero(bp), np.count_nonzero(bg)
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0     # precision or recall is 0 (DAVIS: P=1,R=0 or P=0,R=1 -> F=0)
    precision = np.count_nonzero(bp & _dilate_disk(bg, radius)) / n_p
    recall = np.count_nonzero(bg & _dilate_disk(bp, radius)) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(values: Sequence[float], n_bins: int = 4) -> dict[str, float]:
    """mean, recall (fraction of frames > 0.5) and decay (mean of the first quarter of the
    frames minus mean of the last quarter) of per-frame J or F values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    bins = np.array_split(x, min(n_bins, x.size))
    return {"mean": float(x.mean()), "recall": float(np.mean(x > 0.5)),
            "decay": float(bins[0].mean() - bins[-1].mean())}


@dataclass
class MaskScores:
    """Per-frame J and F [S] and their DAVIS statistics."""

    j: np.ndarray
    f: np.ndarray
    j_stats: dict
    f_stats: dict

    def summary(self) -> dict:
        return {"frames": int(self.j.size),
                **{f"J_{k}": v for k, v in self.j_stats.items()},
                **{f"F_{k}": v for k, v in self.f_stats.items()},
                "JF_mean": float((self.j_stats["mean"] + self.f_stats["mean"]) / 2)}


def mask_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                bound_th: float = 0.008) -> MaskScores:
    """J and F per frame for paired [H,W] masks, plus mean / recall / decay."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted masks for {len(gts)} ground-truth masks")
    j = np.array([mask_iou(p, g) for p, g in zip(preds, gts)])
    f = np.array([boundary_f(p, g, bound_th) for p, g in zip(preds, gts)])
    return MaskScores(j, f, davis_statistics(j), davis_statistics(f))


# --------------------------------------------------------------------------- depth
DEPTH_ALIGNMENTS = ("median", "lstsq", "scale_shift", "none")


@dataclass
class DepthScores:
    """AbsRel = mean |s·d + b − d*| / d*, δ1 = fraction of max(d/d*, d*/d) < 1.25, over valid
    pixels, after the alignment (s, b) (per sequence, or per frame with ``per_frame``)."""

    abs_rel: float
    delta1: float
    alignment: str
    scale: np.ndarray          # [S] scale applied per frame (all equal when per sequence)
    shift: np.ndarray          # [S] shift, metres (0 unless scale_shift)
    abs_rel_per_frame: np.ndarray
    delta1_per_frame: np.ndarray
    valid_pixels: int

    def summary(self) -> dict:
        return {"abs_rel": float(self.abs_rel), "delta1": float(self.delta1),
                "alignment": self.alignment, "valid_pixels": int(self.valid_pixels),
                "scale_mean": float(np.mean(self.scale))}


def _fit_depth(p: np.ndarray, g: np.ndarray, how: str) -> tuple[float, float]:
    """Scale (and shift) mapping predicted depth p onto ground truth g (1-D valid pixels)."""
    if how == "none" or p.size == 0:
        return 1.0, 0.0
    if how == "median":
        med = np.median(p)
        if med <= 0:
            raise ValueError("median predicted depth is not positive: cannot median-align")
        return float(np.median(g) / med), 0.0
    if how == "lstsq":
        den = float(p @ p)
        if den <= 0:
            raise ValueError("predicted depth is all zero: cannot least-squares-align")
        return float(p @ g) / den, 0.0
    A = np.stack([p, np.ones_like(p)], axis=1)
    (s, b), *_ = np.linalg.lstsq(A, g, rcond=None)
    return float(s), float(b)


def depth_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                 alignment: str = "median", per_frame: bool = False,
                 min_depth: float = 1e-3, max_depth: float | None = None) -> DepthScores:
    """Depth AbsRel and δ<1.25 of paired [H,W] depth maps (metres; GT <= 0, NaN = invalid).

    alignment: "median" (s = median(gt)/median(pred)), "lstsq" (s minimising Σ(s·p − g)²),
    "scale_shift" (s, b by least squares), "none". The fit uses the valid pixels pooled over
    the whole sequence, or each frame on its own with ``per_frame``.
    """
    if alignment not in DEPTH_ALIGNMENTS:
        raise ValueError(f"alignment must be one of {DEPTH_ALIGNMENTS}, got {alignment!r}")
    if len(preds) != len(gts) or not len(preds):
        raise ValueError(f"need the same non-zero number of maps, got {len(preds)} and {len(gts)}")
    ps, gs = [], []
    for p, g in zip(preds, gts):
        p = np.asarray(p, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if p.shape != g.shape:
            raise ValueError(f"depth shapes differ: {p.shape} vs {g.shape}")
        valid = np.isfinite(g) & (g > min_depth) & np.isfinite(p)
        if max_depth is not None:
            valid &= g < max_depth
        ps.append(p[valid])
        gs.append(g[valid])
    n = len(ps)
    if per_frame:
        fits = [_fit_depth(p, g, alignment) for p, g in zip(ps, gs)]
    else:
        fits = [_fit_depth(np.concatenate(ps), np.concatenate(gs), alignment)] * n
    abs_rel_f, d1_f, all_rel, all_d1 = [], [], [], []
    for (s, b), p, g in zip(fits, ps, gs):
        a = s * p + b
        rel = np.abs(a - g) / g
        ratio = np.maximum(np.maximum(a, 1e-12) / g, g / np.maximum(a, 1e-12))
        d1 = ratio < 1.25
        abs_rel_f.append(rel.mean() if rel.size else np.nan)
        d1_f.append(d1.mean() if d1.size else np.nan)
        all_rel.append(rel)
        all_d1.append(d1)
    rel = np.concatenate(all_rel)
    d1 = np.concatenate(all_d1)
    if rel.size == 0:
        raise ValueError("no valid ground-truth depth pixels")
    return DepthScores(abs_rel=float(rel.mean()), delta1=float(d1.mean()), alignment=alignment,
                       scale=np.array([f[0] for f in fits]), shift=np.array([f[1] for f in fits]),
                       abs_rel_per_frame=np.array(abs_rel_f), delta1_per_frame=np.array(d1_f),
                       valid_pixels=int(rel.size))
