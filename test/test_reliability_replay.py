"""Hostile-but-decodable input through the REPLAY tool (rosbag -> run_replay, real tiny random
VGGT4D on the CPU): grayscale camera, duplicate stamp, image size change mid-stream, a bag loop
(stamps jump back), NaN camera_info, a camera standing still and a 1 h forward stamp jump all
complete with defined, counted behaviour and finite outputs. (Undecodable messages — unknown
encoding, truncated data, corrupt bag — are a one-line error, exit 2, nothing written:
test_replay_cli.py.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rosbags")
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from vggt4d_ros.tools import replay as rp  # noqa: E402

TS = get_typestore(Stores.ROS2_KILTED)
T0 = 1_700_000_000_000_000_000
DT = 33_333_333


def _header(stamp_ns: int) -> Any:
    return TS.types["std_msgs/msg/Header"](
        stamp=TS.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9,
                                                      nanosec=stamp_ns % 10**9),
        frame_id="cam")


def _image(stamp_ns: int, img: np.ndarray) -> Any:
    enc = "mono8" if img.ndim == 2 else "rgb8"
    h, w = img.shape[:2]
    return TS.types["sensor_msgs/msg/Image"](
        header=_header(stamp_ns), height=h, width=w, encoding=enc, is_bigendian=0,
        step=img[0].size, data=np.ascontiguousarray(img).reshape(-1))


def _info(stamp_ns: int, k: list[float], h: int, w: int) -> Any:
    RoI = TS.types["sensor_msgs/msg/RegionOfInterest"]
    return TS.types["sensor_msgs/msg/CameraInfo"](
        header=_header(stamp_ns), height=h, width=w, distortion_model="plumb_bob",
        d=np.zeros(5), k=np.array(k, np.float64), r=np.eye(3).reshape(-1), p=np.zeros(12),
        binning_x=0, binning_y=0,
        roi=RoI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def _texture(i: int, h: int, w: int, gray: bool = False) -> np.ndarray:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=(h, w + 200, 3), dtype=np.uint8)
    img = np.ascontiguousarray(base[:, 3 * i: 3 * i + w])
    return img.mean(axis=2).astype(np.uint8) if gray else img


def _write_bag(path: Path, frames: list[tuple[int, np.ndarray]], nan_info_at: int) -> None:
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        ci = w.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=TS)
        cc = w.add_connection("/cam/camera_info", "sensor_msgs/msg/CameraInfo", typestore=TS)
        t_bag = T0
        for j, (stamp, img) in enumerate(frames):
            t_bag += DT                                  # bag time keeps increasing
            h, wd = img.shape[:2]
            k = [40.0, 0, wd / 2, 0, 40.0, h / 2, 0, 0, 1.0]
            if j == nan_info_at:
                k = [float("nan"), 0, wd / 2, 0, float("inf"), h / 2, 0, 0, 1.0]
            w.write(cc, t_bag, TS.serialize_cdr(_info(stamp, k, h, wd),
                                                "sensor_msgs/msg/CameraInfo"))
            w.write(ci, t_bag, TS.serialize_cdr(_image(stamp, img), "sensor_msgs/msg/Image"))


def test_replay_survives_hostile_but_decodable_input(tmp_path):
    frames: list[tuple[int, np.ndarray]] = []
    for i in range(8):                                   # grayscale camera
        frames.append((T0 + i * DT, _texture(i, 42, 56, gray=True)))
    frames.append((T0 + 7 * DT, _texture(8, 42, 56, gray=True)))      # duplicate stamp
    for i in range(8, 14):                               # camera standing still (same image)
        frames.append((T0 + i * DT, _texture(8, 42, 56, gray=True)))
    for i in range(14, 20):                              # 1 h forward jump, continues
        frames.append((T0 + 3600 * 10**9 + i * DT, _texture(i, 42, 56, gray=True)))
    for i in range(20, 26):                              # size change mid-stream (RGB, 84x63)
        frames.append((T0 + 3600 * 10**9 + i * DT, _texture(i, 63, 84)))
    for i in range(6):                                   # bag loop: stamps jump back 1 h
        frames.append((T0 + i * DT, _texture(i, 63, 84)))
    bag = tmp_path / "hostile_bag"
    _write_bag(bag, frames, nan_info_at=3)
    out = tmp_path / "out"
    code = rp.main([str(bag), "--out", str(out), "--window", "4", "--stride", "2",
                    "--checkpoint", "random_tiny", "--device", "cpu", "--resolution", "56",
                    "--no-viz", "--quiet"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    n = len(frames)
    assert s["frames"]["received"] == n
    assert s["frames"]["dropped_by_reason"] == {"duplicate": 1}
    assert s["frames"]["processed"] == n - 1
    assert s["resets"] == {"image_size_changed": 1, "stamp_backwards": 1}
    traj = np.loadtxt(out / "trajectory.txt", ndmin=2)
    assert len(traj) == n - 1 and np.isfinite(traj).all()
    rows = (out / "frames.txt").read_text().split("\n")
    states = {r.split()[3] for r in rows if r.strip() and not r.startswith("#")}
    assert states <= {"TRACKING", "LOST", "RESET", "WAITING"}


def _oom_scene(tmp_path):
    from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs
    world = SynthWorld(SynthConfig(width=56, height=42, num_frames=10, num_objects=1, seed=0))
    return world, write_outputs(world, tmp_path / "scene", folder=True)


def test_replay_cuda_oom_shrinks_the_window_like_the_node(tmp_path, monkeypatch):
    """An injected CUDA OOM for windows of more than 3 frames: the replay retries the window on
    its newest 3 frames (min = stride + 1) and keeps that size - the node's fallback - and
    finishes with every frame written and the fallback's counters in summary.json."""
    import torch
    from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
    world, scene = _oom_scene(tmp_path)
    sizes = []

    class OomAbove3(GroundTruthPredictor):
        def predict(self, images, frame_keys):
            sizes.append(len(frame_keys))
            if len(frame_keys) > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return super().predict(images, frame_keys)
    monkeypatch.setattr(rp, "make_predictor",
                        lambda settings: OomAbove3(world, index_of_key=lambda k: k))
    out = tmp_path / "out"
    code = rp.main([str(scene), "--out", str(out), "--window", "4", "--stride", "2", "--quiet",
                    "--no-viz"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert sizes[:2] == [4, 3] and max(sizes[2:]) == 3
    assert s["predictor"] == "OomAbove3"
    assert s["oom_fallback"]["oom_retries"] == 1 and s["oom_fallback"]["window_limit"] == 3
    assert s["frames"]["received"] == 10
    assert s["frames"]["processed"] + s["frames"]["dropped"] == 10
    assert len(list((out / "depth").iterdir())) == s["frames"]["processed"] >= 9


def test_replay_cuda_oom_even_at_the_smallest_window_is_one_line_and_nothing_written(
        tmp_path, monkeypatch, capsys):
    """A window that does not fit even at --min-window: one line naming the way out, exit 1,
    no partial output folder (an offline tool stops; the node drops the window instead)."""
    import torch
    _, scene = _oom_scene(tmp_path)

    class Oom:
        label = ""

        def predict(self, images, frame_keys):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(rp, "make_predictor", lambda settings: Oom())
    out = tmp_path / "out"
    code = rp.main([str(scene), "--out", str(out), "--window", "4", "--stride", "2", "--quiet",
                    "--no-viz", "--min-window", "2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1, err
    assert "WindowTooLargeError" in err[0] and "min_window_size=2" in err[0]
    assert "--resolution" in err[0]
    assert not out.exists()


def test_replay_rejects_a_min_window_outside_the_window(tmp_path, capsys):
    _, scene = _oom_scene(tmp_path)
    code = rp.main([str(scene), "--out", str(tmp_path / "o"), "--window", "4", "--stride", "2",
                    "--min-window", "5"])
    assert code == 2 and "--min-window" in capsys.readouterr().err