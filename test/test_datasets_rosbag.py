"""rosbag2 input source: topic choice, encodings, stamps, CameraInfo, GT odometry, bad bags."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from vggt4d_ros.tools.datasets import InputError, image_msg_to_rgb, open_source

TS = get_typestore(Stores.ROS2_KILTED)
H, W = 6, 8


def _header(stamp_ns: int, frame: str = "cam") -> Any:
    Time = TS.types["builtin_interfaces/msg/Time"]
    Header = TS.types["std_msgs/msg/Header"]
    return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame)


def _image(stamp_ns: int, rgb: np.ndarray, encoding: str = "rgb8", pad: int = 0) -> Any:
    Image = TS.types["sensor_msgs/msg/Image"]
    h, w, _ = rgb.shape
    if encoding == "bgr8":
        rgb = rgb[..., ::-1]
    rows = np.zeros((h, w * 3 + pad), np.uint8)
    rows[:, : w * 3] = rgb.reshape(h, w * 3)
    return Image(header=_header(stamp_ns), height=h, width=w, encoding=encoding, is_bigendian=0,
                 step=w * 3 + pad, data=rows.reshape(-1))


def _rgb(i: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10 * i, 7, 250
    return img


def _write_bag(path: Path, msgs: list[tuple[str, str, int, Any]],
               storage: StoragePlugin = StoragePlugin.SQLITE3) -> None:
    """msgs: (topic, msgtype, bag_time_ns, message)."""
    with Writer(path, version=9, storage_plugin=storage) as w:
        conns: dict[str, Any] = {}
        for topic, msgtype, t, msg in msgs:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=TS)
            w.write(conns[topic], t, TS.serialize_cdr(msg, msgtype))


def _camera_info(stamp_ns: int, fx: float) -> Any:
    CameraInfo = TS.types["sensor_msgs/msg/CameraInfo"]
    RoI = TS.types["sensor_msgs/msg/RegionOfInterest"]
    return CameraInfo(header=_header(stamp_ns), height=H, width=W, distortion_model="plumb_bob",
                      d=np.zeros(5), k=np.array([fx, 0, 4, 0, fx, 3, 0, 0, 1.0]),
                      r=np.eye(3).reshape(-1), p=np.zeros(12), binning_x=0, binning_y=0,
                      roi=RoI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def _odom(stamp_ns: int, x: float) -> Any:
    T = TS.types
    pose = T["geometry_msgs/msg/Pose"](
        position=T["geometry_msgs/msg/Point"](x=x, y=0.0, z=0.0),
        orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
    return T["nav_msgs/msg/Odometry"](
        header=_header(stamp_ns, "world"), child_frame_id="cam",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](
            twist=T["geometry_msgs/msg/Twist"](
                linear=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
            covariance=np.zeros(36)))


@pytest.mark.parametrize("storage", [StoragePlugin.SQLITE3, StoragePlugin.MCAP])
def test_datasets_rosbag_reads_images_info_gt(tmp_path: Path, storage: StoragePlugin) -> None:
    bag = tmp_path / "bag"
    base = 1_700_000_000_000_000_000
    msgs = [("/camera/camera_info", "sensor_msgs/msg/CameraInfo", base, _camera_info(base, 50.0))]
    for i in range(4):
        stamp = base + i * 33_000_000
        enc = "bgr8" if i % 2 else "rgb8"
        msgs.append(("/camera/image_raw", "sensor_msgs/msg/Image", stamp + 5_000_000,
                     _image(stamp, _rgb(i), enc, pad=4 * (i % 2))))
        msgs.append(("/gt/odom", "nav_msgs/msg/Odometry", stamp, _odom(stamp, 0.5 * i)))
    _write_bag(bag, msgs, storage)
    src = open_source(bag)            # GT topic found automatically by its name
    assert open_source(bag, gt_topic=None).has_gt_pose is False
    assert src.kind == "rosbag" and len(src) == 4 and src.has_gt_pose
    frames = list(src)
    for i, f in enumerate(frames):
        assert f.stamp_ns == base + i * 33_000_000           # header stamp, not bag time
        np.testing.assert_array_equal(f.image, _rgb(i))
        assert f.intrinsic[0, 0] == 50.0
        assert f.world_from_cam[0, 3] == pytest.approx(0.5 * i)
    assert len(open_source(bag, stride=2)) == 2


def test_datasets_rosbag_topic_choice_and_errors(tmp_path: Path) -> None:
    two = tmp_path / "two"
    _write_bag(two, [("/a/image", "sensor_msgs/msg/Image", 1, _image(1, _rgb(1))),
                     ("/b/image", "sensor_msgs/msg/Image", 2, _image(2, _rgb(2)))])
    with pytest.raises(InputError, match="several image topics.*--topic"):
        open_source(two)
    f = next(iter(open_source(two, topic="/b/image")))
    np.testing.assert_array_equal(f.image, _rgb(2))
    with pytest.raises(InputError, match="not in bag.*/a/image"):
        open_source(two, topic="/c/image")

    none = tmp_path / "none"
    _write_bag(none, [("/odom", "nav_msgs/msg/Odometry", 1, _odom(1, 0.0))])
    with pytest.raises(InputError,
                       match=r"no image topic; available: /odom \[nav_msgs/msg/Odometry\]"):
        open_source(none)


def test_datasets_rosbag_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9\n")
    (bad / "bad_0.db3").write_bytes(b"garbage" * 10)
    with pytest.raises(InputError, match="cannot open bag"):
        open_source(bad)
    single = tmp_path / "x.mcap"
    single.write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 30)
    with pytest.raises(InputError):
        open_source(single)


def test_datasets_rosbag_unknown_encoding(tmp_path: Path) -> None:
    bag = tmp_path / "bag"
    msg = _image(1, _rgb(0))
    msg.encoding = "bayer_rggb8"
    _write_bag(bag, [("/cam", "sensor_msgs/msg/Image", 1, msg)])
    with pytest.raises(InputError, match="unsupported image encoding 'bayer_rggb8'"):
        list(open_source(bag))


def test_datasets_image_msg_encodings() -> None:
    Image = TS.types["sensor_msgs/msg/Image"]
    grey = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 700
    for big in (0, 1):
        data = grey.astype(">u2" if big else "<u2").tobytes()
        m = Image(header=_header(1), height=H, width=W, encoding="mono16", is_bigendian=big,
                  step=W * 2, data=np.frombuffer(data, np.uint8))
        out = image_msg_to_rgb(m)
        np.testing.assert_array_equal(out[..., 1], (grey >> 8).astype(np.uint8))
    bgra = np.dstack([_rgb(3)[..., ::-1], np.full((H, W), 9, np.uint8)])
    m = Image(header=_header(1), height=H, width=W, encoding="bgra8", is_bigendian=0,
              step=W * 4, data=bgra.reshape(-1))
    np.testing.assert_array_equal(image_msg_to_rgb(m), _rgb(3))
    uyvy = cv2.cvtColor(np.full((H, W, 3), 128, np.uint8), cv2.COLOR_RGB2YUV)
    packed = np.zeros((H, W, 2), np.uint8)
    packed[..., 0] = 128
    packed[..., 1] = uyvy[..., 0]
    m = Image(header=_header(1), height=H, width=W, encoding="yuv422", is_bigendian=0,
              step=W * 2, data=packed.reshape(-1))
    assert np.abs(image_msg_to_rgb(m).astype(int) - 128).max() <= 2
    short = Image(header=_header(1), height=H, width=W, encoding="rgb8", is_bigendian=0,
                  step=W * 3, data=np.zeros(10, np.uint8))
    with pytest.raises(InputError, match="corrupt"):
        image_msg_to_rgb(short)
    Comp = TS.types["sensor_msgs/msg/CompressedImage"]
    ok, png = cv2.imencode(".png", cv2.cvtColor(_rgb(5), cv2.COLOR_RGB2BGR))
    c = Comp(header=_header(1), format="png", data=png.reshape(-1))
    np.testing.assert_array_equal(image_msg_to_rgb(c), _rgb(5))
