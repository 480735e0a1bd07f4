"""The demo: weight selection with a clear fallback, and an end-to-end run on a tiny scene."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vggt4d_ros.tools import demo
from vggt4d_ros.tools import replay as rp
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor

LABEL = "random weights: geometry is meaningless"
TINY = ["--frames", "8", "--width", "84", "--height", "56", "--objects", "1",
        "--window", "4", "--stride", "2", "--quiet"]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty Hugging Face cache and an offline hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("VGGT4D_CHECKPOINT", raising=False)


def test_demo_weights_fall_back_when_unavailable(tmp_path: Path, offline_hub: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    c = demo.choose_weights(None)                        # default facebook/VGGT-1B, offline
    assert c.random and c.requested == "facebook/VGGT-1B"
    assert "cannot be reached" in c.fallback_reason
    text = demo.fallback_paragraph(c)
    assert "random weights: geometry is meaningless" in text and "facebook/VGGT-1B" in text
    c = demo.choose_weights(str(tmp_path / "missing.safetensors"))
    assert c.random and "not found" in c.fallback_reason
    monkeypatch.setenv("VGGT4D_CHECKPOINT", "random_tiny")
    c = demo.choose_weights(None)
    assert c.random and c.fallback_reason is None
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    c = demo.choose_weights(str(weights))
    assert not c.random and c.checkpoint == str(weights)


def _check_outputs(out: Path) -> None:
    report = out / "eval" / "report.md"
    text = report.read_text()
    assert text.startswith(f"> **{LABEL}**")
    assert "## Trajectory" in text and "## Dynamic masks" in text and "## Depth" in text
    assert "## Pictures" in text
    summary = json.loads((out / "replay" / "summary.json").read_text())
    assert summary["weights"] == LABEL
    assert json.loads((out / "demo.json").read_text())["weights"] == LABEL
    for rel in ("replay/trajectory.txt", "replay/static_map.ply", "replay/bag/metadata.yaml",
                "scene/bag_sqlite3/metadata.yaml", "eval/metrics.json"):
        assert (out / rel).is_file(), rel
    # every picture carries the label banner: yellow text on a dark band at the top
    eval_pics = sorted((out / "eval").glob("*.png"))
    assert len(eval_pics) >= 3                                   # trajectory, ATE, masks, depth
    for pic in [out / "replay" / "viz" / "map_topdown.png", *eval_pics,
                *sorted((out / "replay" / "viz" / "overlay").glob("*.png"))[:2]]:
        img = cv2.imread(str(pic))
        band = img[:12].astype(int)
        assert (band.max(axis=2) > 200).any(), pic               # yellow text present
        assert np.median(band) < 80, pic                         # on a dark banner


def test_demo_end_to_end_pipeline(tmp_path: Path, offline_hub: None,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    """Flow with the ground-truth predictor in place of the model (fast, exact geometry)."""
    made = []

    def fake(settings: rp.ReplaySettings) -> GroundTruthPredictor:
        from vggt4d_ros.tools.synth import SynthConfig, SynthWorld
        made.append(settings.checkpoint)
        world = SynthWorld(SynthConfig(width=84, height=56, num_frames=8, num_objects=1, seed=0))
        return GroundTruthPredictor(world, index_of_key=lambda k: k)

    monkeypatch.setattr(rp, "make_predictor", fake)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    assert made == ["random_tiny"]                               # fell back, said so
    assert "cannot be had here" in captured.out and LABEL in captured.out
    assert f"report: {out / 'eval' / 'report.md'}" in captured.out
    _check_outputs(out)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["masks"]["J_mean"] > 0.9                      # GT predictor → exact masks
    # re-running replaces the previous demo; a foreign folder is refused
    assert demo.main(["--out", str(out), *TINY]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    assert demo.main(["--out", str(other), *TINY]) == 2
    assert (other / "x.txt").read_text() == "keep"


def test_demo_end_to_end_random_tiny_model(tmp_path: Path, offline_hub: None,
                                           capsys: pytest.CaptureFixture) -> None:
    """The real pipeline (stream.factory, VGGT4D on tiny random weights) end to end."""
    pytest.importorskip("vggt4d_ros.stream.factory",
                        reason="stream.factory (build_predictor) has not landed yet")
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--checkpoint", "random_tiny", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_outputs(out)
