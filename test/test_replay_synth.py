"""Replay of a synthetic bag with the ground-truth predictor: every output, valid and readable."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from vggt4d_ros.geometry.sim3 import umeyama_sim3
from vggt4d_ros.geometry.voxel import read_ply
from vggt4d_ros.tools import replay as rp
from vggt4d_ros.tools.datasets import open_source
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.metrics import read_tum
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs

N_FRAMES, W, H = 12, 112, 70
SETTINGS = dict(checkpoint="ground_truth", window=6, stride=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthWorld, Path]:
    world = SynthWorld(SynthConfig(width=W, height=H, num_frames=N_FRAMES, num_objects=1, seed=3))
    out = tmp_path_factory.mktemp("synth") / "scene"
    write_outputs(world, out, folder=True, bags=["sqlite3"])
    return world, out


def _replay(world: SynthWorld, src_path: Path, out: Path, **kw) -> rp.ReplayResult:
    # noise-free ground truth: outputs must then match the synthetic world almost exactly
    pred = GroundTruthPredictor(world, index_of_key=lambda k: k, seed=0, depth_noise=0.0,
                                rot_noise_deg=0.0, trans_noise=0.0)
    settings = rp.ReplaySettings(**{**SETTINGS, **kw})
    return rp.run_replay(open_source(src_path), out, settings, predictor=pred, progress=False)


@pytest.fixture(scope="module")
def replayed(synth: tuple[SynthWorld, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    world, scene = synth
    out = tmp_path_factory.mktemp("replay") / "out"
    _replay(world, scene / "bag_sqlite3", out)
    return out


def test_replay_writes_every_output(replayed: Path, synth: tuple[SynthWorld, Path]) -> None:
    world, _ = synth
    for rel in ("bag/metadata.yaml", "trajectory.txt", "static_map.ply", "summary.json",
                "frames.txt", "gt/groundtruth.txt", "viz/map_topdown.png",
                "viz/map_perspective.png", "viz/overlays.gif"):
        assert (replayed / rel).is_file(), rel
    names = [f"{i:06d}" for i in range(N_FRAMES)]
    assert sorted(p.stem for p in (replayed / "masks").glob("*.png")) == names
    assert sorted(p.stem for p in (replayed / "depth").glob("*.npz")) == names
    assert sorted(p.stem for p in (replayed / "viz" / "overlay").glob("*.png")) == names
    for d in ("depth", "confidence"):
        assert len(list((replayed / "viz" / d).glob("*.png"))) == N_FRAMES
    # no temporary folder left next to the output
    assert [p.name for p in replayed.parent.iterdir()] == ["out"]

    s = json.loads((replayed / "summary.json").read_text())
    assert s["frames"] == {"received": N_FRAMES, "processed": N_FRAMES, "dropped": 0,
                           "dropped_by_reason": {}}
    assert s["windows"] >= 3 and sum(s["states"].values()) == N_FRAMES
    assert s["weights"] == "checkpoint ground_truth"
    assert set(s["timings"]["stages_s"]) >= {"engine", "read", "write", "viz"}
    assert s["settings"]["window"] == 6 and s["input"]["kind"] == "rosbag"


def test_replay_trajectory_and_masks_match_ground_truth(replayed: Path,
                                                       synth: tuple[SynthWorld, Path]) -> None:
    world, scene = synth
    seq = world.render_all()
    traj = read_tum(replayed / "trajectory.txt")
    assert len(traj) == N_FRAMES
    np.testing.assert_array_equal(traj.stamps_ns, seq.stamp_ns)       # stamps of the source
    gt_pos = np.stack([np.linalg.inv(t)[:3, 3] for t in seq.cam_from_world])
    sim = umeyama_sim3(traj.positions, gt_pos)
    ate = np.sqrt(np.mean(np.sum((sim.apply(traj.positions) - gt_pos) ** 2, axis=1)))
    path_len = np.linalg.norm(np.diff(gt_pos, axis=0), axis=1).sum()
    assert ate < 0.01 * path_len, (ate, path_len)
    # relative rotations agree (catches inverted pose direction, which Sim(3) cannot absorb)
    for i in (3, 7, 11):
        rel_pred = np.linalg.inv(traj.poses[0][:3, :3]) @ traj.poses[i][:3, :3]
        rel_gt = seq.cam_from_world[0][:3, :3] @ seq.cam_from_world[i][:3, :3].T
        ang = np.degrees(np.arccos(np.clip((np.trace(rel_pred.T @ rel_gt) - 1) / 2, -1, 1)))
        assert ang < 1.0, ang
    m = cv2.imread(str(replayed / "masks" / "000005.png"), cv2.IMREAD_UNCHANGED)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    gt_m = cv2.imread(str(scene / "masks" / "000005.png"), cv2.IMREAD_UNCHANGED) > 0
    if m.shape == gt_m.shape and gt_m.any():
        iou = ((m > 0) & gt_m).sum() / ((m > 0) | gt_m).sum()
        assert iou > 0.7
    z = np.load(replayed / "depth" / "000005.npz")
    assert z["depth"].dtype == np.float32 and z["depth"].shape == m.shape
    assert z["intrinsic"].shape == (3, 3) and np.isfinite(z["depth"]).any()
    gt_traj = read_tum(replayed / "gt" / "groundtruth.txt")
    np.testing.assert_allclose(gt_traj.positions, gt_pos, atol=1e-6)


def test_replay_bag_reads_back_with_node_topics(replayed: Path) -> None:
    with AnyReader([replayed / "bag"]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        counts: dict[str, int] = {}
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
        assert types["/vggt4d/odom"] == "nav_msgs/msg/Odometry"
        assert types["/tf"] == "tf2_msgs/msg/TFMessage"
        assert types["/vggt4d/path"] == "nav_msgs/msg/Path"
        assert types["/vggt4d/dynamic_mask"] == "sensor_msgs/msg/Image"
        assert types["/vggt4d/dynamic_mask/camera_info"] == "sensor_msgs/msg/CameraInfo"
        assert types["/vggt4d/depth"] == types["/vggt4d/depth_static"] == "sensor_msgs/msg/Image"
        assert types["/vggt4d/confidence"] == "sensor_msgs/msg/Image"
        assert types["/vggt4d/static_points"] == "sensor_msgs/msg/PointCloud2"
        assert types["/vggt4d/static_map"] == "sensor_msgs/msg/PointCloud2"
        for t in ("/vggt4d/odom", "/tf", "/vggt4d/path", "/vggt4d/dynamic_mask",
                  "/vggt4d/depth", "/vggt4d/confidence", "/vggt4d/depth_static"):
            assert counts[t] == N_FRAMES, t
        assert counts["/tf_static"] == 1 and counts["/vggt4d/static_map"] == 1
        assert counts["/vggt4d/static_points"] == counts["/vggt4d/status"] >= 3
        assert types["/vggt4d/status"] == "vggt4d_ros/msg/Status"
        traj = read_tum(replayed / "trajectory.txt")
        odom_stamps, first_depth, twists = [], None, []
        conns = [c for c in reader.connections if c.topic in
                 ("/vggt4d/odom", "/tf", "/vggt4d/dynamic_mask", "/vggt4d/depth_static")]
        for conn, t, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == "/vggt4d/odom":
                st = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                assert st == t                                      # log time = header stamp
                assert msg.header.frame_id == "odom" and msg.child_frame_id == "base_link"
                odom_stamps.append(st)
                cov = np.asarray(msg.pose.covariance).reshape(6, 6)
                assert np.all(np.isfinite(cov)) and np.all(np.diag(cov) > 0)
                tw = msg.twist.twist
                twists.append(([tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x,
                                tw.angular.y, tw.angular.z],
                               np.diag(np.asarray(msg.twist.covariance).reshape(6, 6))))
            elif conn.topic == "/tf":
                tf = msg.transforms[0]
                assert (tf.header.frame_id, tf.child_frame_id) == ("odom", "base_link")
            elif conn.topic == "/vggt4d/dynamic_mask":
                assert msg.encoding == "mono8"
            elif first_depth is None:
                assert msg.encoding == "32FC1"
                first_depth = msg
        assert odom_stamps == list(traj.stamps_ns)
        # the node's twist rule: first frame unknown (1e6), later ones estimated, all finite
        assert np.allclose(twists[0][1], 1e6) and np.all(np.array(twists[0][0]) == 0)
        known = [t for t, var in twists if np.all(var < 1e6)]
        assert len(known) >= N_FRAMES // 2 and np.all(np.isfinite(known))
        assert np.abs(known).max() > 0
    # base_link starts at the identity of odom (REP-105, like the node)
    with AnyReader([replayed / "bag"]) as reader:
        conn = [c for c in reader.connections if c.topic == "/vggt4d/odom"]
        _, _, raw = next(reader.messages(connections=conn))
        p = reader.deserialize(raw, "nav_msgs/msg/Odometry").pose.pose
        assert abs(p.position.x) + abs(p.position.y) + abs(p.position.z) < 1e-9
        assert p.orientation.w == pytest.approx(1.0)


def test_replay_ply_loads(replayed: Path) -> None:
    ply = read_ply(replayed / "static_map.ply")
    s = json.loads((replayed / "summary.json").read_text())
    assert len(ply["points"]) == s["static_map_points"] > 100
    assert np.isfinite(ply["points"]).all() and ply["colors"].dtype == np.uint8


def _strip_timings(p: Path) -> dict:
    s = json.loads(p.read_text())
    s.pop("timings")
    return s


def test_replay_is_deterministic(synth: tuple[SynthWorld, Path], replayed: Path,
                                 tmp_path: Path) -> None:
    world, scene = synth
    again = tmp_path / "again"
    _replay(world, scene / "bag_sqlite3", again)
    for rel in ("trajectory.txt", "frames.txt", "static_map.ply", "gt/groundtruth.txt",
                *[f"masks/{i:06d}.png" for i in range(N_FRAMES)],
                *[f"depth/{i:06d}.npz" for i in range(N_FRAMES)]):
        assert (again / rel).read_bytes() == (replayed / rel).read_bytes(), rel
    assert _strip_timings(again / "summary.json") == _strip_timings(replayed / "summary.json")


def test_serial_replay_writes_the_same_as_the_pipelined_default(
        synth: tuple[SynthWorld, Path], replayed: Path, tmp_path: Path) -> None:
    world, scene = synth
    serial = tmp_path / "serial"
    _replay(world, scene / "bag_sqlite3", serial, pipelined=False)
    for rel in ("trajectory.txt", "frames.txt", "static_map.ply",
                *[f"masks/{i:06d}.png" for i in range(N_FRAMES)],
                *[f"depth/{i:06d}.npz" for i in range(N_FRAMES)]):
        assert (serial / rel).read_bytes() == (replayed / rel).read_bytes(), rel
    a, b = _strip_timings(serial / "summary.json"), _strip_timings(replayed / "summary.json")
    assert a["settings"].pop("pipelined") is False and b["settings"].pop("pipelined") is True
    assert a == b


def test_replay_folder_input_mcap_and_png16_depth(synth: tuple[SynthWorld, Path],
                                                  tmp_path: Path) -> None:
    world, scene = synth
    out = tmp_path / "o"
    res = _replay(world, scene, out, storage="mcap", depth_format="png16", viz=False)
    assert res.summary["input"]["kind"] == "synth"
    assert any((out / "bag").glob("*.mcap")) and not (out / "viz").exists()
    d = cv2.imread(str(out / "depth" / "000003.png"), cv2.IMREAD_UNCHANGED)
    assert d.dtype == np.uint16 and d.max() > 0
    assert len(list((out / "gt" / "masks").glob("*.png"))) == N_FRAMES
    assert len(list((out / "gt" / "depth").glob("*.npz"))) == N_FRAMES


def test_replay_random_weights_label(synth: tuple[SynthWorld, Path], tmp_path: Path) -> None:
    world, scene = synth
    out = tmp_path / "r"
    res = _replay(world, scene / "bag_sqlite3", out, checkpoint="random_tiny")
    assert res.summary["weights"] == "random weights: geometry is meaningless"
    # every picture gets the label banner on top of the unchanged picture
    plain = rp.run_replay(open_source(scene / "bag_sqlite3"), tmp_path / "p",
                          rp.ReplaySettings(**SETTINGS),
                          predictor=GroundTruthPredictor(world, index_of_key=lambda k: k,
                                                         depth_noise=0.0, rot_noise_deg=0.0,
                                                         trans_noise=0.0),
                          progress=False).out_dir
    for rel in ("viz/overlay/000004.png", "viz/map_topdown.png", "viz/depth/000004.png"):
        a = cv2.imread(str(out / rel)).astype(int)
        b = cv2.imread(str(plain / rel)).astype(int)
        assert a.shape[0] > b.shape[0] and np.array_equal(a[-b.shape[0]:], b), rel


def test_replay_applies_the_node_input_rules(tmp_path: Path) -> None:
    """A repeated stamp is dropped and counted (as the node does), the rest is processed."""
    from vggt4d_ros.tools import rosbag_io as bio
    world = SynthWorld(SynthConfig(width=84, height=56, num_frames=8, num_objects=1, seed=4))
    pred = GroundTruthPredictor(world, depth_noise=0.0, rot_noise_deg=0.0, trans_noise=0.0)
    msgs = []
    for i in range(8):
        f = pred.render(i)                     # registers image -> index for the predictor
        msgs.append(("/cam/image", f.stamp_ns, bio.image_msg(f.image, f.stamp_ns, "cam")))
        if i == 2:                             # the driver repeats frame 2 with its stamp
            msgs.append(("/cam/image", f.stamp_ns, bio.image_msg(f.image, f.stamp_ns, "cam")))
    bio.write_bag(tmp_path / "bag", msgs)
    res = rp.run_replay(open_source(tmp_path / "bag"), tmp_path / "out",
                        rp.ReplaySettings(window=4, stride=2, viz=False), predictor=pred,
                        progress=False)
    s = res.summary
    assert s["frames"]["received"] == 9 and s["frames"]["processed"] == 8
    assert s["frames"]["dropped"] == 1 and list(s["frames"]["dropped_by_reason"]) == ["duplicate"]
    assert s["dropped_frames"][0]["index"] == 3
    assert len(read_tum(res.out_dir / "trajectory.txt")) == 8
    names = sorted(p.stem for p in (res.out_dir / "masks").glob("*.png"))
    assert names == ["000000", "000001", "000002", "000004", "000005", "000006", "000007",
                     "000008"]
