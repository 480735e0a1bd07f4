"""vggt4d-eval end to end on a synthetic ground-truth folder with constructed predictions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from vggt4d_ros.tools import metrics as M
from vggt4d_ros.tools.eval import main
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gt") / "scene"
    cfg = SynthConfig(width=64, height=40, num_frames=8, num_objects=2, seed=2)
    write_outputs(SynthWorld(cfg), out)
    return out


def _sim3_copy(traj: M.Trajectory, s: float) -> np.ndarray:
    R = Rotation.from_rotvec([0.4, -0.2, 1.0]).as_matrix()
    p = traj.poses.copy()
    p[:, :3, :3] = R @ p[:, :3, :3]
    p[:, :3, 3] = s * traj.poses[:, :3, 3] @ R.T + np.array([3.0, -1.0, 0.5])
    return p


def test_eval_known_numbers(tmp_path: Path, gt_dir: Path) -> None:
    pred = tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    (pred / "depth").mkdir()
    gt = M.read_tum(gt_dir / "groundtruth.txt")
    M.write_tum(pred / "trajectory.txt", gt.stamps_ns, _sim3_copy(gt, 0.2))
    expected_j = []
    for i in range(8):
        g = np.asarray(Image.open(gt_dir / "masks" / f"{i:06d}.png")) > 127
        p = g.copy()
        extra = np.zeros_like(g)
        extra[:, :5] = True                       # a left strip, minus any GT pixels in it
        extra &= ~g
        p |= extra
        expected_j.append(g.sum() / (g.sum() + extra.sum()))
        Image.fromarray(p.astype(np.uint8) * 255).save(pred / "masks" / f"{i:06d}.png")
        d = np.load(gt_dir / "depth" / f"{i:06d}.npz")["depth"]
        np.savez(pred / "depth" / f"{i:06d}.npz", depth=3.0 * d)
    out = tmp_path / "report"
    assert main([str(pred), "--gt", str(gt_dir), "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["trajectory"]["ate_rmse"] < 1e-6
    assert res["trajectory"]["scale"] == pytest.approx(5.0, rel=1e-6)
    assert res["trajectory"]["matched"] == 8
    assert np.allclose(res["masks"]["J_per_frame"], expected_j)
    assert res["masks"]["J_mean"] == pytest.approx(np.mean(expected_j))
    assert res["masks"]["matched_by"] == "name"
    assert res["depth"]["abs_rel"] < 1e-6          # 3x depth, median-aligned
    for name in ("report.md", "trajectory_topdown.png", "ate_per_frame.png",
                 "masks_per_frame.png", "depth_per_frame.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "ATE RMSE" in md and "J (IoU)" in md and "AbsRel" in md
    # unaligned depth: 3x too far -> AbsRel exactly 2
    assert main([str(pred), "--gt", str(gt_dir), "--out", str(out), "--depth-align", "none",
                 "--no-plots"]) == 0
    assert json.loads((out / "metrics.json").read_text())["depth"]["abs_rel"] == pytest.approx(2.0)
    assert not (out / "trajectory_topdown.png").exists()      # report folder replaced


def test_eval_stamp_named_resized_masks_and_png_depth(tmp_path: Path, gt_dir: Path) -> None:
    """Files named by stamp (ns), masks at twice the resolution, depth as 16-bit mm PNG."""
    pred = tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    (pred / "depth").mkdir()
    stamps = np.load(gt_dir / "gt.npz")["stamps_ns"]
    for i, s in enumerate(stamps[:5]):
        g = np.asarray(Image.open(gt_dir / "masks" / f"{i:06d}.png"))
        big = np.repeat(np.repeat(g, 2, 0), 2, 1)
        Image.fromarray(big).save(pred / "masks" / f"{s}.png")
        d = np.load(gt_dir / "depth" / f"{i:06d}.npz")["depth"]
        Image.fromarray(np.round(d * 1000).astype(np.uint16)).save(pred / "depth" / f"{s}.png")
    out = tmp_path / "r"
    assert main([str(pred), "--gt", str(gt_dir), "--out", str(out), "--depth-align", "none"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["masks"]["matched_by"] == "stamp" and res["masks"]["frames"] == 5
    assert res["masks"]["J_mean"] == 1.0 and res["masks"]["F_mean"] == 1.0
    assert res["depth"]["abs_rel"] < 1e-3          # millimetre quantisation only
    assert "trajectory" not in res


def test_eval_against_tum_file(tmp_path: Path, gt_dir: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = M.read_tum(gt_dir / "groundtruth.txt")
    p = gt.poses.copy()
    p[:, :3, 3] += [0.0, 0.3, 0.4]
    M.write_tum(pred / "trajectory.txt", gt.stamps_ns, p)
    assert main([str(pred), "--gt", str(gt_dir / "groundtruth.txt"), "--align", "none",
                 "--out", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert res["trajectory"]["ate_rmse"] == pytest.approx(0.5, rel=1e-6)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggt4d_ros.tools.eval", *args],
                          capture_output=True, text=True, timeout=120)


def test_eval_bad_input_exit_2(tmp_path: Path, gt_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (str(tmp_path / "missing"), str(gt_dir), "not found"),
        (str(empty), str(gt_dir), "no trajectory.txt"),
        (str(empty), str(tmp_path / "nogt"), "not found"),
    ]
    for pred, gt, msg in cases:
        r = _run(pred, "--gt", gt)
        assert r.returncode == 2, r.stderr
        errs = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(errs) == 1 and msg in errs[0], r.stderr
    assert not (empty / "eval").exists()


def test_eval_uses_replay_frames_index_for_strided_output(tmp_path: Path, gt_dir: Path) -> None:
    """Replay names its outputs 000000.. by processed index; frames.txt maps them to stamps.
    With stride 2, pred 000001 is GT frame 2, not GT frame 000001."""
    pred = tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    stamps = np.load(gt_dir / "gt.npz")["stamps_ns"]
    lines = ["# index stamp_ns window state source_name"]
    for k, i in enumerate(range(0, 8, 2)):
        g = Image.open(gt_dir / "masks" / f"{i:06d}.png")
        g.save(pred / "masks" / f"{k:06d}.png")
        lines.append(f"{k} {stamps[i]} 0 TRACKING {i:06d}")
    (pred / "frames.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert main([str(pred), "--gt", str(gt_dir), "--out", str(out), "--no-plots"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["masks"]["matched_by"] == "frames.txt stamp" and res["masks"]["frames"] == 4
    assert res["masks"]["J_mean"] == 1.0
    # without frames.txt the names would pair 000001 with GT frame 1: a different mask
    (pred / "frames.txt").unlink()
    assert main([str(pred), "--gt", str(gt_dir), "--out", str(out), "--no-plots"]) == 0
    assert json.loads((out / "metrics.json").read_text())["masks"]["J_mean"] < 1.0


def test_eval_against_ground_truth_bag(tmp_path: Path) -> None:
    """GT poses can come from a bag's /ground_truth/odom (the synth bag, read via datasets)."""
    world = SynthWorld(SynthConfig(width=32, height=24, num_frames=5, num_objects=1, seed=7))
    scene = write_outputs(world, tmp_path / "scene", folder=True, bags=["mcap"])
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = M.read_tum(scene / "groundtruth.txt")
    M.write_tum(pred / "trajectory.txt", gt.stamps_ns, _sim3_copy(gt, 2.5))
    assert main([str(pred), "--gt", str(scene / "bag_mcap"), "--out", str(tmp_path / "r"),
                 "--no-plots"]) == 0
    res = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert res["trajectory"]["matched"] == 5 and res["trajectory"]["ate_rmse"] < 1e-6
