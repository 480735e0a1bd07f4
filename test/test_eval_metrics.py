"""Evaluation metrics on constructed cases with known answers (vggt4d_ros.tools.metrics)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vggt4d_ros.tools import metrics as M


def _gt_trajectory(n: int = 40, seed: int = 0) -> M.Trajectory:
    """A curved 3-D camera path (non-degenerate for Umeyama), world_from_cam."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, n)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = np.stack([2 * np.cos(t), np.sin(2 * t), 0.3 * t], 1)
    poses[:, :3, :3] = Rotation.from_rotvec(0.3 * rng.normal(size=(n, 3))).as_matrix()
    return M.Trajectory(1_000_000_000 + np.arange(n) * 33_333_333, poses)


def _sim3(s: float, rotvec, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = s * Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = t
    return T


def _apply_sim3(traj: M.Trajectory, s: float, rotvec, t) -> M.Trajectory:
    """World change X' = s R X + t applied to world_from_cam poses (rotation part stays
    orthonormal: R' = R R_wc, centre' = s R c + t)."""
    R = Rotation.from_rotvec(rotvec).as_matrix()
    out = traj.poses.copy()
    out[:, :3, :3] = R @ traj.poses[:, :3, :3]
    out[:, :3, 3] = s * traj.poses[:, :3, 3] @ R.T + t
    return M.Trajectory(traj.stamps_ns.copy(), out)


def test_tum_round_trip_exact_stamps(tmp_path: Path) -> None:
    gt = _gt_trajectory()
    M.write_tum(tmp_path / "t.txt", gt.stamps_ns, gt.poses)
    back = M.read_tum(tmp_path / "t.txt")
    assert np.array_equal(back.stamps_ns, gt.stamps_ns)
    assert np.allclose(back.poses, gt.poses, atol=1e-8)


def test_read_tum_rejects_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("1.0 0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        M.read_tum(tmp_path / "bad.txt")
    (tmp_path / "nanq.txt").write_text("1.0 0 0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="invalid"):
        M.read_tum(tmp_path / "nanq.txt")


def test_identical_trajectories_give_zero_errors() -> None:
    gt = _gt_trajectory()
    for align in M.ALIGNMENTS:
        sc = M.trajectory_scores(gt, gt, alignment=align)
        assert sc.matched == len(gt)
        assert sc.ate_rmse < 1e-9 and sc.rpe_trans_rmse < 1e-9 and sc.rpe_rot_rmse_deg < 1e-5


def test_sim3_transformed_copy_is_zero_after_sim3_alignment() -> None:
    gt = _gt_trajectory()
    pred = _apply_sim3(gt, 0.37, [0.3, -1.1, 0.5], [4.0, -2.0, 7.0])
    sc = M.trajectory_scores(pred, gt, alignment="sim3")
    assert sc.ate_rmse < 1e-9
    assert sc.scale == pytest.approx(1 / 0.37, rel=1e-9)
    assert sc.rpe_trans_rmse < 1e-9 and sc.rpe_rot_rmse_deg < 1e-5
    # rigid alignment cannot undo the scale: the error stays large
    assert M.trajectory_scores(pred, gt, alignment="se3").ate_rmse > 0.3


def test_se3_transformed_copy_is_zero_after_se3_alignment() -> None:
    gt = _gt_trajectory()
    pred = _apply_sim3(gt, 1.0, [0.2, 0.4, -0.9], [1.0, 2.0, 3.0])
    assert M.trajectory_scores(pred, gt, alignment="se3").ate_rmse < 1e-9
    assert M.trajectory_scores(pred, gt, alignment="none").ate_rmse > 1.0


def test_constant_offset_without_alignment_is_that_offset() -> None:
    gt = _gt_trajectory()
    pred = M.Trajectory(gt.stamps_ns, gt.poses.copy())
    offset = np.array([0.3, -0.4, 1.2])
    pred.poses[:, :3, 3] += offset
    sc = M.trajectory_scores(pred, gt, alignment="none")
    assert sc.ate_rmse == pytest.approx(np.linalg.norm(offset), rel=1e-12)
    assert np.allclose(sc.ate_per_frame, np.linalg.norm(offset))
    assert sc.rpe_trans_rmse < 1e-9           # relative motion is unchanged
    assert M.trajectory_scores(pred, gt, alignment="se3").ate_rmse < 1e-9


def test_alternating_offset_survives_se3_alignment() -> None:
    """A zero-mean ±d error along the GT path's normal cannot be aligned away."""
    n = 60
    t = np.linspace(0, 1, n)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = np.stack([10 * t, np.sin(6 * t), np.zeros(n)], 1)
    gt = M.Trajectory(np.arange(n) * 10**8, poses)
    pred = M.Trajectory(gt.stamps_ns, poses.copy())
    d = 0.05
    pred.poses[:, 2, 3] += d * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    sc = M.trajectory_scores(pred, gt, alignment="se3")
    assert sc.ate_rmse == pytest.approx(d, rel=0.02)


def test_rpe_rotation_of_known_drift() -> None:
    """Each step adds 1 degree of yaw to the prediction: RPE(1 frame) rotation = 1 degree."""
    n = 20
    gt_poses = np.tile(np.eye(4), (n, 1, 1))
    gt_poses[:, 0, 3] = np.arange(n) * 0.1
    pred = gt_poses.copy()
    yaw_deg = np.arange(n, dtype=float)[:, None]
    pred[:, :3, :3] = Rotation.from_euler("z", yaw_deg, degrees=True).as_matrix()
    stamps = np.arange(n) * 10**8
    sc = M.trajectory_scores(M.Trajectory(stamps, pred), M.Trajectory(stamps, gt_poses),
                             alignment="none")
    assert sc.rpe_rot_rmse_deg == pytest.approx(1.0, rel=1e-9)


def test_association_by_stamp_and_too_few_matches() -> None:
    gt = _gt_trajectory(10)
    sub = M.Trajectory(gt.stamps_ns[::3] + 5_000_000, gt.poses[::3])   # 5 ms late, every 3rd
    ip, ig = M.associate(sub, gt)
    assert np.array_equal(ig, np.arange(0, 10, 3)) and np.array_equal(ip, np.arange(4))
    far = M.Trajectory(gt.stamps_ns + 10**9, gt.poses)
    with pytest.raises(ValueError, match="match"):
        M.trajectory_scores(far, gt)
    with pytest.raises(ValueError, match="alignment"):
        M.trajectory_scores(gt, gt, alignment="sim2")


def test_mask_iou_known_value() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True          # 20 px
    b[2:6, 0:5] = True          # 20 px, overlap 10 -> union 30
    assert M.mask_iou(a, b) == pytest.approx(10 / 30)
    assert M.mask_iou(a, a) == 1.0
    assert M.mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert M.mask_iou(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError):
        M.mask_iou(a, np.zeros((3, 3), bool))


def test_boundary_f_tolerance() -> None:
    H, W = 200, 300                      # diagonal 360.6 -> tolerance ceil(2.88) = 3 px
    g = np.zeros((H, W), bool)
    g[50:150, 100:200] = True
    assert M.boundary_f(g, g) == 1.0
    shifted2 = np.roll(g, 2, axis=1)     # boundary 2 px away: within tolerance
    assert M.boundary_f(shifted2, g) == pytest.approx(1.0)
    shifted10 = np.roll(g, 10, axis=1)   # vertical edges 10 px off, horizontal edges overlap
    f10 = M.boundary_f(shifted10, g)
    assert 0.3 < f10 < 0.9
    far = np.zeros_like(g)
    far[0:20, 0:20] = True
    assert M.boundary_f(far, g) == 0.0
    assert M.boundary_f(np.zeros_like(g), np.zeros_like(g)) == 1.0
    assert M.boundary_f(np.zeros_like(g), g) == 0.0


def test_boundary_map_is_one_pixel_wide() -> None:
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    b = M.boundary_map(m)
    assert b[2, 1] and b[1, 2] and b[5, 5] and not b[3, 3] and not b[0, 0]


def test_davis_statistics() -> None:
    st = M.davis_statistics([1.0, 1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert st["mean"] == pytest.approx(0.6125)
    assert st["recall"] == pytest.approx(5 / 8)
    assert st["decay"] == pytest.approx(1.0 - 0.1)
    sc = M.mask_scores([np.ones((4, 4), bool)] * 3, [np.ones((4, 4), bool)] * 3)
    assert sc.summary()["J_mean"] == 1.0 and sc.summary()["F_mean"] == 1.0


def test_depth_abs_rel_known_values() -> None:
    rng = np.random.default_rng(0)
    gt = [rng.uniform(1, 5, (6, 8)) for _ in range(3)]
    # exact up to scale -> 0 after median or least-squares alignment
    pred = [0.25 * g for g in gt]
    for how in ("median", "lstsq", "scale_shift"):
        sc = M.depth_scores(pred, gt, alignment=how)
        assert sc.abs_rel < 1e-12 and sc.delta1 == 1.0
    assert M.depth_scores(pred, gt, alignment="median").scale[0] == pytest.approx(4.0)
    # 10 % too far everywhere, no alignment -> AbsRel 0.1, all within 1.25
    sc = M.depth_scores([1.1 * g for g in gt], gt, alignment="none")
    assert sc.abs_rel == pytest.approx(0.1) and sc.delta1 == 1.0
    # half the pixels 2x too far -> AbsRel 0.5, delta1 0.5
    p = [g.copy() for g in gt]
    for x in p:
        x[:, :4] *= 2.0
    sc = M.depth_scores(p, gt, alignment="none")
    assert sc.abs_rel == pytest.approx(0.5) and sc.delta1 == pytest.approx(0.5)


def test_depth_invalid_pixels_are_ignored_and_per_frame_scale() -> None:
    gt = [np.full((4, 4), 2.0), np.full((4, 4), 3.0)]
    gt[0][0, 0] = 0.0          # invalid
    gt[1][1, 1] = np.nan       # invalid
    pred = [np.full((4, 4), 1.0), np.full((4, 4), 6.0)]
    pred[0][0, 0] = 1e6        # would ruin AbsRel if it were counted
    sc = M.depth_scores(pred, gt, alignment="median", per_frame=True)
    assert sc.abs_rel < 1e-12 and sc.valid_pixels == 30
    assert np.allclose(sc.scale, [2.0, 0.5])
    with pytest.raises(ValueError):
        M.depth_scores(pred, gt, alignment="mean")


def test_degenerate_and_nonfinite_predictions_do_not_crash() -> None:
    gt = _gt_trajectory()
    still = M.Trajectory(gt.stamps_ns, np.tile(np.eye(4), (len(gt), 1, 1)))
    sc = M.trajectory_scores(still, gt, alignment="sim3")
    spread = np.sqrt(np.mean(np.sum((gt.positions - gt.positions.mean(0)) ** 2, axis=1)))
    assert sc.ate_rmse == pytest.approx(spread, rel=1e-9)     # best a point can do
    assert "centroids" in sc.note
    bad = M.Trajectory(gt.stamps_ns, gt.poses.copy())
    bad.poses[3, 0, 3] = np.nan
    sc = M.trajectory_scores(bad, gt, alignment="sim3")
    assert sc.dropped_nonfinite == 1 and sc.matched == len(gt) - 1 and sc.ate_rmse < 1e-9
