"""vggt4d-synth CLI: outputs on disk, and one-line exit-2 errors on bad arguments."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt4d_ros.tools import rosbag_io as bio
from vggt4d_ros.tools.metrics import read_tum
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggt4d_ros.tools.synth", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [
    ["--width", "0"], ["--height", "-3"], ["--objects", "-1"], ["--objects", "4"],
    ["--frames", "0"], ["--fps", "0"], ["--no-folder"], ["--bag", "rosbag1"],
])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    r = _run("--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("usage")
             and not ln.startswith(" ")]
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    r = _run("--out", str(tmp_path), "--frames", "1", "--width", "8", "--height", "8")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_writes_folder_tum_and_both_bags(tmp_path: Path) -> None:
    out = tmp_path / "scene"
    assert main(["--out", str(out), "--width", "40", "--height", "24", "--frames", "3",
                 "--objects", "1", "--seed", "4", "--bag", "both"]) == 0
    world = SynthWorld(SynthConfig(width=40, height=24, num_frames=3, num_objects=1, seed=4))
    for i in range(3):
        f = world.render(i)
        assert np.array_equal(np.asarray(Image.open(out / "rgb" / f"{i:06d}.png")), f.image)
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{i:06d}.png")) > 127, f.mask)
        z = np.load(out / "depth" / f"{i:06d}.npz")
        assert np.array_equal(z["depth"], f.depth) and np.array_equal(z["object_id"], f.object_id)
    tum = read_tum(out / "groundtruth.txt")
    gt = np.load(out / "gt.npz")
    assert np.array_equal(tum.stamps_ns, gt["stamps_ns"])
    for i in range(3):
        assert tum.stamps_ns[i] == world.stamp_ns(i)
        assert np.allclose(tum.poses[i], np.linalg.inv(world.cam_from_world(i)), atol=1e-8)
    assert np.allclose(gt["intrinsics"][0], world.intrinsic)
    cam = json.loads((out / "camera.json").read_text())
    assert cam["width"] == 40 and cam["config"]["seed"] == 4
    for st in ("sqlite3", "mcap"):
        topics = bio.bag_topics(out / f"bag_{st}")
        assert {t: (i.msgtype, i.count) for t, i in topics.items()} == {
            "/camera/image_raw": ("sensor_msgs/msg/Image", 3),
            "/camera/camera_info": ("sensor_msgs/msg/CameraInfo", 3),
            "/ground_truth/odom": ("nav_msgs/msg/Odometry", 3)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp leftovers


def test_cli_bag_only(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = _run("--out", str(out), "--width", "16", "--height", "12", "--frames", "2",
             "--bag", "mcap", "--no-folder")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bag_mcap"]
