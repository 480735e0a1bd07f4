"""rosbag_io: message builders, image/pointcloud conversions and bag round trips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vggt4d_ros.tools import rosbag_io as bio
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, _frame_bag_messages


@pytest.fixture(scope="module")
def frames():
    w = SynthWorld(SynthConfig(width=48, height=32, num_frames=4, num_objects=2, seed=1))
    return w, [w.render(i) for i in range(4)]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_round_trip_identical_arrays_and_stamps(tmp_path: Path, frames, storage: str) -> None:
    world, fs = frames
    msgs = [m for f in fs for m in _frame_bag_messages(world, f)]
    path = bio.write_bag(tmp_path / "bag", msgs, storage=storage)
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]     # temp folder removed
    topics = bio.bag_topics(path)
    assert topics["/camera/image_raw"].msgtype == "sensor_msgs/msg/Image"
    assert topics["/camera/image_raw"].count == 4
    assert topics["/ground_truth/odom"].msgtype == "nav_msgs/msg/Odometry"
    back = list(bio.read_bag(path))
    assert len(back) == len(msgs)
    images = [(s, m) for t, s, m in back if t == "/camera/image_raw"]
    infos = [m for t, _, m in back if t == "/camera/camera_info"]
    odoms = [m for t, _, m in back if t == "/ground_truth/odom"]
    for f, (stamp, im), info, od in zip(fs, images, infos, odoms):
        assert stamp == f.stamp_ns == bio.stamp_to_ns(im.header.stamp)
        assert im.encoding == "rgb8" and im.header.frame_id == "camera_optical_frame"
        assert np.array_equal(bio.image_to_rgb(im), f.image)
        assert np.array_equal(np.asarray(info.k).reshape(3, 3), f.intrinsic)
        assert (info.width, info.height) == (48, 32)
        assert bio.stamp_to_ns(od.header.stamp) == f.stamp_ns
        assert od.header.frame_id == "world" and od.child_frame_id == "camera_optical_frame"
        assert np.allclose(bio.pose_to_matrix(od.pose.pose), f.world_from_cam, atol=1e-12)
        tw = od.twist.twist
        assert np.allclose([tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y,
                            tw.angular.z], world.camera_twist_at(world.time_s(f.index)))


def test_read_bag_topic_filter_and_missing_topic(tmp_path: Path, frames) -> None:
    world, fs = frames
    path = bio.write_bag(tmp_path / "b", list(_frame_bag_messages(world, fs[0])), storage="mcap")
    only = list(bio.read_bag(path, topics=["/camera/camera_info"]))
    assert [t for t, _, _ in only] == ["/camera/camera_info"]
    with pytest.raises(KeyError, match="available"):
        list(bio.read_bag(path, topics=["/nope"]))
    with pytest.raises(FileNotFoundError):
        list(bio.read_bag(tmp_path / "missing"))


def test_bag_writer_is_atomic_on_error(tmp_path: Path) -> None:
    target = tmp_path / "bag"
    with pytest.raises(RuntimeError):
        with bio.BagWriter(target, "sqlite3") as w:
            w.write("/x", 1, bio.header_msg(1, "a"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        bio.write_bag(tmp_path, [], storage="sqlite3")
    with pytest.raises(ValueError, match="storage"):
        bio.BagWriter(tmp_path / "c", "rosbag1")


@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_image_to_rgb_all_encodings_with_row_padding(enc: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    if enc == "mono8":
        arr, want = rgb[..., 0].copy(), np.repeat(rgb[..., :1], 3, axis=2)
    elif enc == "rgb8":
        arr, want = rgb, rgb
    elif enc == "bgr8":
        arr, want = rgb[..., ::-1].copy(), rgb
    elif enc == "rgba8":
        arr, want = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], 2), rgb
    else:
        arr, want = np.concatenate([rgb[..., ::-1], np.full((5, 7, 1), 9, np.uint8)], 2), rgb
    msg = bio.image_msg(arr, 5, "cam", enc)
    assert np.array_equal(bio.image_to_rgb(msg), want)
    # re-pack with 3 bytes of padding per row
    row = msg.step
    padded = np.zeros((5, row + 3), np.uint8)
    padded[:, :row] = np.asarray(msg.data).reshape(5, row)
    padded[:, row:] = 77
    msg.step = row + 3
    msg.data = padded.reshape(-1)
    assert np.array_equal(bio.image_to_rgb(msg), want)


def test_image_float_and_16bit_and_big_endian() -> None:
    d = np.linspace(0.1, 9.0, 12, dtype=np.float32).reshape(3, 4)
    m = bio.image_msg(d, 0, "cam")
    assert m.encoding == "32FC1" and np.array_equal(bio.image_to_numpy(m), d)
    mm = (d * 1000).astype(np.uint16)
    m16 = bio.image_msg(mm, 0, "cam")
    assert m16.encoding == "16UC1"
    m16.is_bigendian = 1
    m16.data = np.frombuffer(mm.astype(">u2").tobytes(), np.uint8)
    assert np.array_equal(bio.image_to_numpy(m16), mm)


def test_image_bad_input() -> None:
    with pytest.raises(ValueError, match="encoding"):
        bio.image_msg(np.zeros((2, 2, 3), np.uint8), 0, "c", "yuv9000")
    with pytest.raises(ValueError):
        bio.image_msg(np.zeros((2, 2), np.uint8), 0, "c", "rgb8")
    m = bio.image_msg(np.zeros((4, 4, 3), np.uint8), 0, "c")
    m.data = m.data[:10]
    with pytest.raises(ValueError, match="too short"):
        bio.image_to_numpy(m)
    with pytest.raises(ValueError):
        bio.stamp_msg(-1)


def test_pointcloud2_round_trip_through_bag(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    conf = rng.random(50).astype(np.float32)
    msg = bio.pointcloud2_msg(pts, 7, "odom", colors=cols, fields={"confidence": conf})
    path = bio.write_bag(tmp_path / "pc", [("/pc", 7, msg)], storage="mcap")
    (_, _, back), = list(bio.read_bag(path))
    arrs = bio.pointcloud2_to_numpy(back)
    assert np.array_equal(np.stack([arrs["x"], arrs["y"], arrs["z"]], 1), pts)
    assert np.array_equal(arrs["colors"], cols)
    assert np.array_equal(arrs["confidence"], conf)
    assert [f.name for f in back.fields] == ["x", "y", "z", "rgb", "confidence"]


def test_path_tf_odometry_messages_serialise(tmp_path: Path) -> None:
    T = np.eye(4)
    T[:3, 3] = [1.0, 2.0, 3.0]
    path_m = bio.path_msg([(1, T), (2, T)], 2, "odom")
    tf = bio.tf_message([bio.transform_stamped_msg(T, 2, "odom", "base_link")])
    od = bio.odometry_msg(T, 2, "odom", "base_link", pose_covariance=np.eye(6) * 0.01)
    p = bio.write_bag(tmp_path / "b", [("/path", 2, path_m), ("/tf", 2, tf), ("/odom", 2, od)],
                      storage="sqlite3")
    back = {t: m for t, _, m in bio.read_bag(p)}
    assert len(back["/path"].poses) == 2
    assert np.allclose(bio.pose_to_matrix(back["/tf"].transforms[0].transform), T)
    assert back["/tf"].transforms[0].child_frame_id == "base_link"
    assert np.allclose(np.asarray(back["/odom"].pose.covariance).reshape(6, 6), np.eye(6) * 0.01)


def test_custom_msg_dir_registers_types(tmp_path: Path) -> None:
    (tmp_path / "Foo.msg").write_text("std_msgs/Header header\nuint8 state\nstring text\n")
    store = bio.get_ros2_typestore([tmp_path])
    Foo = store.types["vggt4d_ros/msg/Foo"]
    m = Foo(header=bio.header_msg(3, "x", store), state=2, text="hi")
    p = bio.write_bag(tmp_path / "bag", [("/foo", 3, m)], storage="mcap", typestore=store)
    (_, s, back), = list(bio.read_bag(p, typestore=store))
    assert s == 3 and back.state == 2 and back.text == "hi"


def test_image_to_rgb_8uc3_is_bgr_and_16bit_keeps_high_byte() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    m = bio.image_msg(rgb[..., ::-1].copy(), 0, "cam", "bgr8")
    m.encoding = "8UC3"                       # cv_bridge reads 8UC3 as BGR
    assert np.array_equal(bio.image_to_rgb(m), rgb)
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    out = bio.image_to_rgb(bio.image_msg(grey, 0, "cam", "16UC1"))
    assert np.array_equal(out[..., 2], (grey >> 8).astype(np.uint8))
    with pytest.raises(ValueError, match="unsupported image encoding '32FC1'"):
        bio.image_to_rgb(bio.image_msg(grey.astype(np.float32), 0, "cam"))
