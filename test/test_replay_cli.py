"""vggt4d-replay CLI: bad input → one-line error, exit 2, nothing written; success path."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vggt4d_ros.tools import replay as rp
from vggt4d_ros.tools import rosbag_io as bio
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = rp.main(argv)
    return code, capsys.readouterr().err


def _assert_clean_failure(code: int, err: str, out: Path, needle: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[-1].startswith("vggt4d-replay: error:"), err
    assert needle in lines[-1], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_replay_cli_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, err = _run([str(tmp_path / "nope"), "--out", str(out), "--quiet"], capsys)
    _assert_clean_failure(code, err, out, "not found")


def test_replay_cli_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code, err = _run([str(tmp_path / "empty"), "--out", str(out), "--quiet"], capsys)
    _assert_clean_failure(code, err, out, "empty")


def test_replay_cli_corrupt_bag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bag = tmp_path / "bag"
    bag.mkdir()
    (bag / "metadata.yaml").write_text("not: [a, rosbag2")
    (bag / "bag_0.db3").write_bytes(b"\x00garbage" * 64)
    out = tmp_path / "out"
    code, err = _run([str(bag), "--out", str(out), "--quiet"], capsys)
    _assert_clean_failure(code, err, out, "cannot open bag")


def test_replay_cli_bag_without_image_topic(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    bag = tmp_path / "bag"
    bio.write_bag(bag, [("/odom", 5, bio.odometry_msg(np.eye(4), 5, "odom", "base_link")),
                        ("/chatter_info", 6, bio.camera_info_msg(np.eye(3), 4, 4, 6, "cam"))])
    out = tmp_path / "out"
    code, err = _run([str(bag), "--out", str(out), "--quiet"], capsys)
    _assert_clean_failure(code, err, out, "no image topic; available: /chatter_info "
                                          "[sensor_msgs/msg/CameraInfo], /odom")
    code, err = _run([str(bag), "--out", str(out), "--quiet", "--topic", "/cam"], capsys)
    _assert_clean_failure(code, err, out, "not in bag")


def test_replay_cli_unknown_encoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bag = tmp_path / "bag"
    msg = bio.image_msg(np.zeros((4, 6, 3), np.uint8), 7, "cam")
    msg.encoding = "bayer_grbg8"
    bio.write_bag(bag, [("/cam/image", 7, msg)])
    out = tmp_path / "out"
    code, err = _run([str(bag), "--out", str(out), "--quiet"], capsys)
    _assert_clean_failure(code, err, out, "unsupported image encoding 'bayer_grbg8'")


def test_replay_cli_bad_settings_and_existing_output(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    img = tmp_path / "imgs"
    img.mkdir()
    cv2.imwrite(str(img / "a.png"), np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "out"
    code, err = _run([str(img), "--out", str(out), "--window", "4", "--stride", "4"], capsys)
    _assert_clean_failure(code, err, out, "--stride")
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run([str(img), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "not an empty folder" in err
    assert (out / "keep.txt").read_text() == "precious"


def _synth_folder(tmp_path: Path, n: int) -> tuple[SynthWorld, Path]:
    from vggt4d_ros.tools.synth import write_outputs
    world = SynthWorld(SynthConfig(width=84, height=56, num_frames=n, num_objects=1, seed=1))
    return world, write_outputs(world, tmp_path / "scene", folder=True)


def test_replay_cli_error_mid_stream_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    world, scene = _synth_folder(tmp_path, 8)
    (scene / "rgb" / "000006.png").write_bytes(b"broken")       # fails after 2 windows ran
    monkeypatch.setattr(rp, "make_predictor", lambda s: GroundTruthPredictor(
        world, index_of_key=lambda k: k))
    out = tmp_path / "out"
    code, err = _run([str(scene), "--out", str(out), "--quiet", "--window", "4", "--stride",
                      "2"], capsys)
    _assert_clean_failure(code, err, out, "000006.png")


def test_replay_cli_success(tmp_path: Path, capsys: pytest.CaptureFixture,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    world, scene = _synth_folder(tmp_path, 8)
    monkeypatch.setattr(rp, "make_predictor", lambda s: GroundTruthPredictor(
        world, index_of_key=lambda k: k))
    out = tmp_path / "out"
    code = rp.main([str(scene), "--out", str(out), "--window", "4", "--stride", "2",
                    "--no-viz", "--checkpoint", "random_tiny"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "frame/s" in captured.err                                 # tqdm rate + ETA
    assert "random weights: geometry is meaningless" in captured.out
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"]["processed"] == 8 and s["weights"].startswith("random weights")
    assert (out / "bag" / "metadata.yaml").is_file()


def test_replay_cli_random_tiny_model_is_deterministic(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The real predictor (stream.factory, tiny random VGGT + VGGT4D) twice → same bytes."""
    pytest.importorskip("vggt4d_ros.stream.factory",
                        reason="stream.factory (build_predictor) has not landed yet")
    _, scene = _synth_folder(tmp_path, 6)
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        code = rp.main([str(scene), "--out", str(out), "--checkpoint", "random_tiny",
                        "--window", "4", "--stride", "2", "--resolution", "84", "--device", "cpu",
                        "--no-viz", "--quiet"])
        assert code == 0, capsys.readouterr().err
        outs.append(out)
    a, b = outs
    for rel in ("trajectory.txt", "frames.txt", "static_map.ply",
                *[f"masks/{i:06d}.png" for i in range(6)],
                *[f"depth/{i:06d}.npz" for i in range(6)]):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in outs)
    sa.pop("timings"), sb.pop("timings")
    assert sa == sb and sa["weights"] == "random weights: geometry is meaningless"
    assert sa["predictor"] == "Vggt4dWindowPredictor"


def test_replay_cli_video_input(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    world = SynthWorld(SynthConfig(width=84, height=56, num_frames=6, num_objects=1, seed=2))
    video = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (84, 56))
    for f in world:
        vw.write(cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    vw.release()
    monkeypatch.setattr(rp, "make_predictor", lambda s: GroundTruthPredictor(
        world, index_of_key=lambda k: k))
    out = tmp_path / "out"
    code = rp.main([str(video), "--out", str(out), "--window", "4", "--stride", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["input"]["kind"] == "video" and s["frames"]["processed"] == 6
    stamps = [int(ln.split()[1]) for ln in (out / "frames.txt").read_text().splitlines()[1:]]
    assert stamps == [i * 100_000_000 for i in range(6)]          # 10 fps container


def test_replay_cli_missing_checkpoint_is_bad_input(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("vggt4d_ros.stream.factory",
                        reason="stream.factory (build_predictor) has not landed yet")
    _, scene = _synth_folder(tmp_path, 3)
    out = tmp_path / "out"
    code, err = _run([str(scene), "--out", str(out), "--quiet", "--checkpoint",
                      str(tmp_path / "weights.safetensors"), "--device", "cpu"], capsys)
    _assert_clean_failure(code, err, out, "weights.safetensors")
