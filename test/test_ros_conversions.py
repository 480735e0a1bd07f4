"""Message <-> numpy conversions of the ROS edge: images (encodings, padding, endianness, bad
input), PointCloud2, pose/TF conversions and frame conventions, stamp matching, path
confinement. Real message classes, no mocks."""
import array
import os

import numpy as np
import pytest

pytest.importorskip("rclpy")
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import Pose  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from vggt4d_ros.ros import image_conv as ic  # noqa: E402
from vggt4d_ros.ros import pointcloud as pc  # noqa: E402
from vggt4d_ros.ros import transforms as tr  # noqa: E402
from vggt4d_ros.ros.paths import PathEscapeError, confine, open_confined  # noqa: E402
from vggt4d_ros.ros.stamp_match import StampCache, stamp_to_ns  # noqa: E402

pytestmark = pytest.mark.ros
RNG = np.random.default_rng(0)


def _img(h, w, enc, payload: bytes, step, bigendian=False):
    m = Image(height=h, width=w, encoding=enc, step=step, is_bigendian=int(bigendian))
    m.data = ic.bytes_to_uint8_array(payload)
    return m


def _padded(rows: np.ndarray, pad: int) -> tuple[bytes, int]:
    """Rows [H, row_bytes] uint8 → bytes with `pad` junk bytes after each row, and the step."""
    h, rb = rows.shape
    out = np.full((h, rb + pad), 0xAB, np.uint8)
    out[:, :rb] = rows
    return out.tobytes(), rb + pad


RGB = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_input_encodings_to_rgb(enc, pad):
    h, w = RGB.shape[:2]
    if enc == "rgb8":
        src, want = RGB, RGB
    elif enc == "bgr8":
        src, want = RGB[..., ::-1], RGB
    elif enc == "rgba8":
        src, want = np.dstack([RGB, np.full((h, w), 9, np.uint8)]), RGB
    elif enc == "bgra8":
        src, want = np.dstack([RGB[..., ::-1], np.full((h, w), 9, np.uint8)]), RGB
    else:
        src, want = RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=2)
    payload, step = _padded(np.ascontiguousarray(src).reshape(h, -1), pad)
    out = ic.image_to_rgb(_img(h, w, enc, payload, step))
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, want)


def _yuv_of(rgb):
    """Exact 4:2:2 packing of a colour image whose pixel pairs share chroma."""
    r, g, b = [rgb[..., i].astype(np.float64) for i in range(3)]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = (b - y) / 1.772 + 128
    v = (r - y) / 1.402 + 128
    u2, v2 = u[:, 0::2], v[:, 0::2]
    return np.rint(y).astype(np.uint8), np.rint(u2).astype(np.uint8), np.rint(v2).astype(np.uint8)


@pytest.mark.parametrize("enc", ["yuv422", "yuv422_yuy2"])
@pytest.mark.parametrize("pad", [0, 4])
def test_yuv422_variants(enc, pad):
    h, w = 4, 6
    rgb = np.repeat(RNG.integers(40, 216, (h, w // 2, 3), dtype=np.uint8), 2, axis=1)
    y, u, v = _yuv_of(rgb)
    q = np.empty((h, w // 2, 4), np.uint8)
    if enc == "yuv422":      # UYVY
        q[..., 0], q[..., 1], q[..., 2], q[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
    else:                    # YUYV
        q[..., 0], q[..., 1], q[..., 2], q[..., 3] = y[:, 0::2], u, y[:, 1::2], v
    payload, step = _padded(q.reshape(h, -1), pad)
    out = ic.image_to_rgb(_img(h, w, enc, payload, step))
    assert out.shape == (h, w, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 3


@pytest.mark.parametrize("bigendian", [False, True])
def test_depth_outputs_roundtrip_and_endianness(bigendian):
    depth = RNG.random((4, 5)).astype(np.float32)
    depth[0, 0] = np.nan
    m = ic.array_to_image(depth, stamp=Time(sec=3, nanosec=7), frame_id="cam",
                          bigendian=bigendian)
    assert m.encoding == "32FC1" and m.step == 20 and m.is_bigendian == int(bigendian)
    assert (m.header.frame_id, m.header.stamp.sec, m.header.stamp.nanosec) == ("cam", 3, 7)
    np.testing.assert_array_equal(ic.image_to_array(m), depth)
    mm = (RNG.random((3, 4)) * 60000).astype(np.uint16)
    np.testing.assert_array_equal(ic.image_to_array(ic.array_to_image(mm, bigendian=bigendian)),
                                  mm)
    # the same bytes interpreted with the other endianness flag give different numbers
    flipped = ic.array_to_image(mm, bigendian=bigendian)
    flipped.is_bigendian = int(not bigendian)
    assert not np.array_equal(ic.image_to_array(flipped), mm)


def test_padded_32fc1_and_mono8_output():
    d = RNG.random((3, 4)).astype(np.float32)
    payload, step = _padded(d.view(np.uint8).reshape(3, -1), 8)
    np.testing.assert_array_equal(ic.image_to_array(_img(3, 4, "32FC1", payload, step)), d)
    mask = (RNG.random((3, 4)) > 0.5).astype(np.uint8) * 255
    m = ic.array_to_image(mask)
    assert m.encoding == "mono8" and m.step == 4
    np.testing.assert_array_equal(ic.image_to_array(m), mask)


@pytest.mark.parametrize("msg,reason", [
    (_img(2, 2, "bayer_rggb8", b"\0" * 4, 2), "unsupported_encoding"),
    (_img(2, 2, "32FC1", b"\0" * 16, 8), "unsupported_encoding"),   # not a camera input
    (_img(0, 4, "rgb8", b"", 12), "zero_size"),
    (_img(4, 0, "rgb8", b"", 0), "zero_size"),
    (_img(4, 4, "rgb8", b"\0" * 47, 12), "truncated"),
    (_img(4, 4, "rgb8", b"\0" * 100, 11), "bad_step"),
    (_img(2, 3, "yuv422", b"\0" * 12, 6), "bad_step"),               # odd width
])
def test_bad_images_raise_with_reason(msg, reason):
    with pytest.raises(ic.ImageConversionError) as e:
        ic.image_to_rgb(msg)
    assert e.value.reason == reason and str(e.value)


def test_last_row_without_padding_is_accepted():
    rows = RGB.reshape(5, -1)
    payload, step = _padded(rows, 4)
    payload = payload[:-4]              # no padding after the last row
    np.testing.assert_array_equal(ic.image_to_rgb(_img(5, 6, "rgb8", payload, step)), RGB)


def test_pointcloud_roundtrip_and_rgb_packing():
    pts = RNG.normal(size=(50, 3)).astype(np.float32)
    cols = RNG.integers(0, 256, (50, 3), dtype=np.uint8)
    conf = RNG.random(50).astype(np.float32)
    m = pc.points_to_cloud(pts, cols, conf, frame_id="odom", stamp=Time(sec=1))
    assert [f.name for f in m.fields] == ["x", "y", "z", "rgb", "confidence"]
    assert m.point_step == 20 and m.row_step == 1000 and len(m.data) == 1000 and m.is_dense
    out = pc.cloud_to_arrays(m)
    np.testing.assert_array_equal(out["points"], pts)
    np.testing.assert_array_equal(out["colors"], cols)
    np.testing.assert_array_equal(out["confidence"], conf)
    # PCL packing: red 255 -> 0x00FF0000 bits
    assert pc.pack_rgb(np.array([[255, 0, 1]], np.uint8)).view(np.uint32)[0] == 0xFF0001


def test_pointcloud_reads_big_endian_and_padding():
    pts = RNG.normal(size=(4, 3)).astype(np.float32)
    rec = np.zeros(4, np.dtype({"names": ["z", "x", "y"], "formats": [">f4"] * 3,
                                "offsets": [0, 8, 12], "itemsize": 24}))
    rec["x"], rec["y"], rec["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    m = pc.points_to_cloud(pts, frame_id="odom")
    m.fields = [pc.PointField(name=n, offset=o, datatype=pc.PointField.FLOAT32, count=1)
                for n, o in (("z", 0), ("x", 8), ("y", 12))]
    m.is_bigendian, m.point_step, m.row_step = True, 24, 96
    m.data = array.array("B", rec.tobytes())
    np.testing.assert_array_equal(pc.cloud_to_arrays(m)["points"], pts)
    m.data = array.array("B", rec.tobytes()[:-1])
    with pytest.raises(pc.PointCloudError):
        pc.cloud_to_arrays(m)


def test_empty_pointcloud():
    m = pc.points_to_cloud(np.zeros((0, 3)), frame_id="odom")
    assert m.width == 0 and pc.cloud_to_arrays(m)["points"].shape == (0, 3)


def _random_pose():
    m = tr.matrix_from_xyz_rpy(RNG.normal(size=3), RNG.uniform(-3, 3, size=3))
    return m


def test_pose_transform_roundtrips():
    for _ in range(20):
        m = _random_pose()
        np.testing.assert_allclose(tr.pose_to_matrix(tr.matrix_to_pose(m)), m, atol=1e-12)
        np.testing.assert_allclose(tr.transform_to_matrix(tr.matrix_to_transform(m)), m,
                                   atol=1e-12)
        np.testing.assert_allclose(tr.invert(m) @ m, np.eye(4), atol=1e-12)
    p = tr.matrix_to_pose(tr.matrix_from_xyz_rpy([0, 0, 0], [0, 0, np.pi / 2]))
    # quaternion order x, y, z, w: yaw 90 deg = (0, 0, sin45, cos45)
    np.testing.assert_allclose([p.orientation.x, p.orientation.y, p.orientation.z,
                                p.orientation.w], [0, 0, np.sqrt(.5), np.sqrt(.5)], atol=1e-12)
    with pytest.raises(ValueError):
        bad = Pose()
        bad.orientation.w = 0.0               # zero quaternion
        tr.pose_to_matrix(bad)


def test_optical_to_body_convention():
    # a point 1 m in front of the camera (optical +z) is 1 m ahead in the body frame (+x);
    # optical +x (right) is body -y; optical +y (down) is body -z
    L = tr.LINK_FROM_OPTICAL
    np.testing.assert_allclose(L[:3, :3] @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(L[:3, :3] @ [1, 0, 0], [0, -1, 0])
    np.testing.assert_allclose(L[:3, :3] @ [0, 1, 0], [0, 0, -1])
    assert np.isclose(np.linalg.det(L[:3, :3]), 1.0)


def test_odom_frames_base_moves_forward_when_camera_moves_forward():
    base_from_cam = tr.matrix_from_xyz_rpy([0.2, 0, 0.5], [0, 0, 0]) @ tr.LINK_FROM_OPTICAL
    frames = tr.OdomFrames(base_from_cam)
    # the engine's first camera is at the identity: base_link starts at the odom origin
    np.testing.assert_allclose(frames.odom_from_base(np.eye(4)), np.eye(4), atol=1e-12)
    step = np.eye(4)
    step[2, 3] = 1.0                            # 1 m along the optical axis
    o_b = frames.odom_from_base(step)
    np.testing.assert_allclose(o_b[:3, 3], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(o_b[:3, :3], np.eye(3), atol=1e-12)
    turn = np.eye(4)                            # camera yaws left = rotation about optical -y
    turn[:3, :3] = tr.Rotation.from_euler("y", -np.pi / 2).as_matrix()
    np.testing.assert_allclose(tr.Rotation.from_matrix(frames.odom_from_base(turn)[:3, :3])
                               .as_euler("xyz"), [0, 0, np.pi / 2], atol=1e-9)
    # a point 2 m in front of the first camera lands 2 m ahead of the camera mount
    np.testing.assert_allclose(frames.points_to_odom(np.array([[0.0, 0.0, 2.0]]))[0],
                               [2.2, 0, 0.5], atol=1e-6)
    assert not np.all(np.isfinite(frames.odom_from_base(np.full((4, 4), np.nan))))


def test_covariance_sanitised():
    assert np.all(np.diag(tr.sanitize_covariance(np.zeros((6, 6)))) > 0)
    c = tr.sanitize_covariance(np.full((6, 6), np.inf))
    assert np.all(np.isfinite(c)) and c.max() < 1e300
    c = tr.sanitize_covariance(np.eye(6) * 1e308)
    assert c.max() <= 1e6
    r = tr.matrix_from_xyz_rpy([0, 0, 0], [0.3, 0.2, 0.1])[:3, :3]
    cov = np.diag([1., 2., 3., 4., 5., 6.])
    np.testing.assert_allclose(np.trace(tr.rotate_covariance(cov, r)), 21.0)


def test_stamp_cache_exact_tolerance_and_capacity():
    c = StampCache(capacity=3, tolerance_ns=5)
    for s in (100, 200, 300, 400):
        c.add(s, f"info{s}")
    assert len(c) == 3 and c.match(100) is None        # evicted
    assert c.match(200) == "info200"
    assert c.match(304) == "info300" and c.match(306) is None
    assert c.latest() == "info400"
    exact = StampCache(capacity=2)
    exact.add(10, "a")
    assert exact.match(11) is None and exact.match(10) == "a"
    assert stamp_to_ns(Time(sec=2, nanosec=5)) == 2_000_000_005
    with pytest.raises(ValueError):
        StampCache(capacity=0)


def test_path_confinement(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert confine("maps/a.ply", root) == (root / "maps" / "a.ply").resolve()
    assert confine(str(root / "b.txt"), root) == (root / "b.txt").resolve()
    for bad in ("../x.ply", "maps/../../x", "/etc/passwd", str(tmp_path / "x"), ""):
        with pytest.raises(PathEscapeError):
            confine(bad, root)
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(PathEscapeError):
        confine("escape/x.ply", root)
    outside = tmp_path / "victim.txt"
    os.symlink(outside, root / "link.txt")
    with pytest.raises(PathEscapeError):
        open_confined("link.txt", root)
    assert not outside.exists()
    with open_confined("deep/dir/ok.txt", root, "w") as f:
        f.write("ok")
    assert (root / "deep" / "dir" / "ok.txt").read_text() == "ok"


def test_confined_writes_follow_no_symlink_planted_after_the_check(tmp_path, monkeypatch):
    """The check-then-open race: a directory (or the file) replaced by a symlink to outside
    AFTER confine() accepted the path. The walk from the root's fd with O_NOFOLLOW refuses it;
    nothing is written outside."""
    from vggt4d_ros.ros import paths
    root, outside = tmp_path / "out", tmp_path / "outside"
    (root / "maps").mkdir(parents=True)
    outside.mkdir()
    real_confine = paths.confine

    def confine_then_swap(requested, root_):
        checked = real_confine(requested, root_)
        if (root / "maps").is_dir() and not (root / "maps").is_symlink():
            (root / "maps").rmdir()
            os.symlink(outside, root / "maps")           # the attacker's move, too late
        return checked
    monkeypatch.setattr(paths, "confine", confine_then_swap)
    for opener in (lambda: paths.open_confined("maps/a.ply", root, "wb"),
                   lambda: paths.write_confined("maps/a.ply", root).__enter__()):
        if (root / "maps").is_symlink():
            (root / "maps").unlink()
            (root / "maps").mkdir()                      # a fresh, honest directory
        with pytest.raises(OSError):                     # ELOOP / ENOTDIR, not followed
            opener()
        assert (root / "maps").is_symlink() and list(outside.iterdir()) == []


def test_write_confined_is_whole_or_nothing_and_replaces_a_planted_symlink(tmp_path,
                                                                         monkeypatch):
    from vggt4d_ros.ros import paths
    from vggt4d_ros.ros.paths import write_confined
    root = tmp_path / "out"
    root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    real_confine = paths.confine

    def confine_then_plant(requested, root_):
        checked = real_confine(requested, root_)
        os.symlink(victim, root / "map.ply")             # planted at the target name, too late
        return checked
    monkeypatch.setattr(paths, "confine", confine_then_plant)
    with write_confined("map.ply", root) as fh:
        fh.write(b"new map")
    monkeypatch.undo()
    assert victim.read_text() == "precious"              # the link was replaced, not followed
    assert not (root / "map.ply").is_symlink() and (root / "map.ply").read_bytes() == b"new map"
    with pytest.raises(RuntimeError):
        with write_confined("map.ply", root) as fh:
            fh.write(b"half")
            raise RuntimeError("writer failed")
    assert (root / "map.ply").read_bytes() == b"new map"   # old content kept
    assert sorted(p.name for p in root.iterdir()) == ["map.ply"]   # no temporary left
    for bad in ("../x", "/etc/passwd", ""):
        with pytest.raises(PathEscapeError):
            with write_confined(bad, root):
                pass
    with pytest.raises(ValueError):
        with write_confined("x", root, "a"):
            pass
