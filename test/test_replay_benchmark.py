"""vggt4d-benchmark on tiny fixture datasets (TUM and DAVIS layouts) with the GT predictor."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vggt4d_ros.tools import benchmark as bm
from vggt4d_ros.tools import replay as rp
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, rotation_to_quaternion_xyzw

W, H, N = 84, 56, 12


def _world(seed: int) -> SynthWorld:
    return SynthWorld(SynthConfig(width=W, height=H, num_frames=N, num_objects=1, seed=seed))


def _write_tum_sequence(seq: Path, world: SynthWorld) -> None:
    (seq / "rgb").mkdir(parents=True)
    rgb, gt = ["# timestamp filename"], ["# timestamp tx ty tz qx qy qz qw"]
    for f in world:
        t = f"{f.stamp_ns // 10**9}.{f.stamp_ns % 10**9:09d}"
        cv2.imwrite(str(seq / "rgb" / f"{t}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
        rgb.append(f"{t} rgb/{t}.png")
        wfc = np.linalg.inv(f.cam_from_world)
        q = rotation_to_quaternion_xyzw(wfc[:3, :3])
        gt.append(f"{t} " + " ".join(f"{v:.9f}" for v in (*wfc[:3, 3], *q)))
    (seq / "rgb.txt").write_text("\n".join(rgb) + "\n")
    (seq / "groundtruth.txt").write_text("\n".join(gt) + "\n")


def _factory(worlds: dict[str, SynthWorld]):
    def make(name: str, src) -> GroundTruthPredictor:
        return GroundTruthPredictor(worlds[name], index_of_key=lambda k: src.start + k * src.stride,
                                    depth_noise=0.0, rot_noise_deg=0.0, trans_noise=0.0)
    return make


def test_benchmark_tum_protocol_table(tmp_path: Path) -> None:
    root = tmp_path / "tum"
    worlds = {}
    names = ["rgbd_dataset_freiburg3_walking_xyz", "rgbd_dataset_freiburg3_sitting_static"]
    for k, name in enumerate(names):
        worlds[name] = _world(10 + k)
        _write_tum_sequence(root / name, worlds[name])
    settings = rp.ReplaySettings(checkpoint="ground_truth", window=3, stride=2, viz=False)
    rep = bm.run_benchmark(root, "tum", tmp_path / "out", settings,
                           predictor_factory=_factory(worlds), progress=False, log=lambda s: None)
    rows = {r["name"]: r for r in rep["sequences"]}
    assert set(rows) == set(worlds)
    for r in rows.values():
        assert r["status"] == "ok", r["status"]
        assert r["frames"] == 4                      # TUM protocol: stride 3 → 12 frames → 4
        assert r["metrics"]["ATE"] < 1e-3 and r["metrics"]["RPE-r (deg)"] < 0.1
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| sequence | frames | ATE | RPE-t | RPE-r (deg) | status |" in md
    assert "| **mean** |" in md and "first 270 frames at stride 3" in md
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved["mean"]["ATE"] == pytest.approx(np.mean([r["metrics"]["ATE"]
                                                          for r in rows.values()]))


def test_benchmark_davis_masks_and_failed_sequence(tmp_path: Path) -> None:
    root = tmp_path / "DAVIS"
    worlds = {"cows": _world(21)}
    seq = root / "JPEGImages" / "480p" / "cows"
    ann = root / "Annotations" / "480p" / "cows"
    seq.mkdir(parents=True)
    ann.mkdir(parents=True)
    for f in worlds["cows"]:
        cv2.imwrite(str(seq / f"{f.index:05d}.jpg"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 100])
        cv2.imwrite(str(ann / f"{f.index:05d}.png"), f.mask.astype(np.uint8) * 255)
    (root / "JPEGImages" / "480p" / "empty").mkdir()          # a broken sequence
    settings = rp.ReplaySettings(checkpoint="random_tiny", window=4, stride=2)
    rep = bm.run_benchmark(root, "davis2017", tmp_path / "out", settings,
                           predictor_factory=_factory(worlds), progress=False, log=lambda s: None)
    rows = {r["name"]: r for r in rep["sequences"]}
    assert rows["empty"]["status"].startswith("failed: no frames")
    cows = rows["cows"]
    assert cows["status"] == "ok" and cows["frames"] == N
    assert cows["metrics"]["J mean"] > 0.95 and cows["metrics"]["J&F"] > 0.9
    assert "ATE" not in cows["metrics"]
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "random weights: geometry is meaningless" in md
    report = (tmp_path / "out" / "cows" / "eval" / "report.md").read_text()
    assert "## Pictures" in report and "map_topdown.png" in report


def test_benchmark_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = bm.main([str(tmp_path / "none"), "--dataset", "tum", "--out", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err
    (tmp_path / "tum").mkdir()
    code = bm.main([str(tmp_path / "tum"), "--dataset", "tum", "--out", str(tmp_path / "o")])
    assert code == 2 and "no tum sequences" in capsys.readouterr().err


def test_benchmark_cli_random_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """CLI end to end with the real predictor on tiny random weights (labelled table)."""
    pytest.importorskip("vggt4d_ros.stream.factory",
                        reason="stream.factory (build_predictor) has not landed yet")
    root = tmp_path / "tum"
    _write_tum_sequence(root / "rgbd_dataset_freiburg3_walking_static", _world(5))
    code = bm.main([str(root), "--dataset", "tum", "--out", str(tmp_path / "o"),
                    "--checkpoint", "random_tiny", "--window", "3", "--stride", "2",
                    "--resolution", "84", "--device", "cpu", "--no-viz", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "1/1 sequences ok" in out
    md = (tmp_path / "o" / "benchmark.md").read_text()
    assert "random weights: geometry is meaningless" in md
    assert "| rgbd_dataset_freiburg3_walking_static | 4 |" in md


def test_benchmark_loads_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences share one model; each gets its own predictor (fresh token cache)."""
    pytest.importorskip("vggt4d_ros.stream.factory",
                        reason="stream.factory (build_predictor) has not landed yet")
    calls = []
    real = rp.make_predictor

    def counting(settings):
        calls.append(settings.checkpoint)
        return real(settings)

    monkeypatch.setattr(rp, "make_predictor", counting)
    make = bm._shared_model_factory(rp.ReplaySettings(checkpoint="random_tiny", device="cpu"))
    a, b = make("s1", None), make("s2", None)
    assert calls == ["random_tiny"] and a is not b and a.pipeline is b.pipeline
    assert b.random_weights and b.image_width == a.image_width
