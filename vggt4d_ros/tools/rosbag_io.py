"""rosbag2 helpers on top of the pure-Python ``rosbags`` typestore (no ROS runtime needed).

Shared by the synthetic-world CLI, the replay tool and the tests. Everything here builds
``rosbags`` message dataclasses (ROS 2 Kilted typestore), never rclpy messages — the node
layer (ros/) has its own rclpy-side converters.

* message builders from numpy: Image, CameraInfo, Odometry, PoseStamped, Path,
  TransformStamped / TFMessage, PointCloud2;
* message -> numpy: ``image_to_numpy`` / ``image_to_rgb`` (honours step / row padding and
  endianness), ``pointcloud2_to_numpy``;
* ``BagWriter`` (streaming, atomic: writes into a temporary folder next to the target and
  renames it into place only when closed without error), ``write_bag``, ``read_bag``,
  ``bag_topics``.

Poses: ``*_from_*`` [4,4] homogeneous rigid transforms in metres; an Odometry / TF
``parent_from_child`` is the pose of the child frame expressed in the parent frame.
Stamps: integer nanoseconds.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

STORAGES = ("sqlite3", "mcap")
_BAG_VERSION = 9          # rosbag2 metadata version written by Jazzy/Kilted

# encoding -> (numpy dtype, channels)
IMAGE_ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3), "bgr8": ("u1", 3), "rgba8": ("u1", 4), "bgra8": ("u1", 4),
    "mono8": ("u1", 1), "8UC1": ("u1", 1), "8UC3": ("u1", 3),
    "mono16": ("u2", 1), "16UC1": ("u2", 1), "32FC1": ("f4", 1),
    # packed 4:2:2, two bytes per pixel: UYVY (ROS "yuv422") and YUYV ("yuv422_yuy2")
    "yuv422": ("u1", 2), "uyvy": ("u1", 2), "yuv422_yuy2": ("u1", 2), "yuyv": ("u1", 2),
}
#: Encodings :func:`image_to_rgb` turns into RGB (everything but float depth).
RGB_ENCODINGS = tuple(e for e in IMAGE_ENCODINGS if e != "32FC1")
# sensor_msgs/PointField datatypes
_PF_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
_PF_FLOAT32 = 7

_TYPESTORE = None


# --------------------------------------------------------------------------- typestore
def get_ros2_typestore(msg_dirs: Sequence[str | Path] = (), package: str = "vggt4d_ros"):
    """ROS 2 Kilted typestore; with ``msg_dirs``, a fresh one that also knows the
    ``<package>/msg/<Name>`` types defined by the ``*.msg`` files found there."""
    global _TYPESTORE
    if not msg_dirs:
        if _TYPESTORE is None:
            _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
        return _TYPESTORE
    store = get_typestore(Stores.ROS2_KILTED)
    add: dict[str, Any] = {}
    for d in msg_dirs:
        for f in sorted(Path(d).glob("*.msg")):
            add.update(get_types_from_msg(f.read_text(), f"{package}/msg/{f.stem}"))
    store.register(add)
    return store


def _cls(name: str, typestore=None):
    return (typestore or get_ros2_typestore()).types[name]


# --------------------------------------------------------------------------- basics
def stamp_msg(stamp_ns: int, typestore=None):
    """builtin_interfaces/Time from integer nanoseconds (>= 0)."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise ValueError(f"stamp must be >= 0 ns, got {stamp_ns}")
    return _cls("builtin_interfaces/msg/Time", typestore)(sec=stamp_ns // 1_000_000_000,
                                                        nanosec=stamp_ns % 1_000_000_000)


def stamp_to_ns(stamp) -> int:
    """Integer nanoseconds of a builtin_interfaces/Time."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def header_msg(stamp_ns: int, frame_id: str, typestore=None):
    """std_msgs/Header."""
    return _cls("std_msgs/msg/Header", typestore)(stamp=stamp_msg(stamp_ns, typestore),
                                                  frame_id=frame_id)


def _quat_xyzw(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w), w >= 0, of a rotation matrix [3,3]."""
    from scipy.spatial.transform import Rotation
    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_quat()
    return -q if q[3] < 0 else q


def _quat_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_quat([x, y, z, w]).as_matrix()


def _check_pose(T: np.ndarray, name: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"{name} must be [4,4] or [3,4], got {T.shape}")
    if not np.isfinite(T).all():
        raise ValueError(f"{name} has non-finite entries")
    return T


def pose_msg(T: np.ndarray, typestore=None):
    """geometry_msgs/Pose of a rigid transform [4,4] (parent_from_child, metres)."""
    T = _check_pose(T, "pose")
    q = _quat_xyzw(T[:3, :3])
    P = _cls("geometry_msgs/msg/Point", typestore)
    Q = _cls("geometry_msgs/msg/Quaternion", typestore)
    return _cls("geometry_msgs/msg/Pose", typestore)(
        position=P(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
        orientation=Q(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def pose_to_matrix(pose) -> np.ndarray:
    """[4,4] from a geometry_msgs/Pose (or Transform: translation/rotation)."""
    p = getattr(pose, "position", None) or pose.translation
    q = getattr(pose, "orientation", None) or pose.rotation
    T = np.eye(4)
    T[:3, :3] = _quat_to_matrix(q.x, q.y, q.z, q.w)
    T[:3, 3] = [p.x, p.y, p.z]
    return T


# --------------------------------------------------------------------------- images
def image_msg(image: np.ndarray, stamp_ns: int, frame_id: str, encoding: str | None = None,
              typestore=None):
    """sensor_msgs/Image from an array (no row padding, little endian).

    image: [H,W,3] uint8 (default rgb8), [H,W,4] uint8 (rgba8), [H,W] uint8 (mono8),
    [H,W] uint16 (16UC1, e.g. depth in mm), [H,W] float32 (32FC1, e.g. depth in metres).
    """
    a = np.asarray(image)
    if encoding is None:
        encoding = {(np.dtype("u1"), 3): "rgb8", (np.dtype("u1"), 4): "rgba8",
                    (np.dtype("u1"), 1): "mono8", (np.dtype("u2"), 1): "16UC1",
                    (np.dtype("f4"), 1): "32FC1"}.get((a.dtype, 1 if a.ndim == 2 else a.shape[-1]))
        if encoding is None:
            raise ValueError(f"no default image encoding for dtype {a.dtype}, shape {a.shape}")
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; "
                         f"known: {sorted(IMAGE_ENCODINGS)}")
    dt, ch = IMAGE_ENCODINGS[encoding]
    want_ndim = 2 if ch == 1 else 3
    if a.ndim != want_ndim or (ch > 1 and a.shape[-1] != ch) or a.dtype != np.dtype(dt):
        want = "[H,W]" if ch == 1 else f"[H,W,{ch}]"
        raise ValueError(f"{encoding} needs a {want} {np.dtype(dt)} array, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    data = np.ascontiguousarray(a.astype(np.dtype(dt).newbyteorder("<"), copy=False))
    return _cls("sensor_msgs/msg/Image", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore), height=h, width=w, encoding=encoding,
        is_bigendian=0, step=w * ch * np.dtype(dt).itemsize,
        data=np.frombuffer(data.tobytes(), dtype=np.uint8))


def image_to_numpy(msg) -> np.ndarray:
    """Array of an Image in its own encoding: [H,W] for 1 channel, else [H,W,C].

    Honours ``step`` (row padding) and ``is_bigendian``; returns native-endian data.
    """
    enc = msg.encoding
    if enc not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding {enc!r}; known: {sorted(IMAGE_ENCODINGS)}")
    dt, ch = IMAGE_ENCODINGS[enc]
    dtype = np.dtype(dt).newbyteorder(">" if msg.is_bigendian else "<")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row = w * ch * dtype.itemsize
    buf = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data,
                        dtype=np.uint8)
    if step < row or buf.size < step * (h - 1) + row:
        raise ValueError(f"image data too short: {h}x{w} {enc} needs step >= {row} and "
                         f"{step * (h - 1) + row} bytes, got step {step}, {buf.size} bytes")
    if h == 0 or w == 0:
        return np.zeros((h, w) if ch == 1 else (h, w, ch), dtype=np.dtype(dt))
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1))
    out = np.ascontiguousarray(rows).view(dtype).astype(np.dtype(dt), copy=False)
    return out.reshape((h, w) if ch == 1 else (h, w, ch))


def image_to_rgb(msg) -> np.ndarray:
    """[H,W,3] uint8 RGB of an Image in any of ``RGB_ENCODINGS`` (8UC3 read as BGR, as
    cv_bridge does; 16-bit grey keeps its high byte) or of a CompressedImage (PNG/JPEG).

    ValueError for unsupported encodings, undecodable or too-short data.
    """
    import cv2  # lazy: only colour conversions need OpenCV

    if hasattr(msg, "format") and not hasattr(msg, "encoding"):        # CompressedImage
        bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot decode CompressedImage (format '{msg.format}')")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    enc = msg.encoding
    if enc not in RGB_ENCODINGS:
        raise ValueError(f"unsupported image encoding '{enc}' (supported: "
                         f"{', '.join(RGB_ENCODINGS)}, CompressedImage)")
    a = image_to_numpy(msg)
    if enc == "rgb8":
        return a
    if enc in ("mono16", "16UC1"):
        a = (a >> 8).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    code = {"bgr8": cv2.COLOR_BGR2RGB, "8UC3": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB,
            "bgra8": cv2.COLOR_BGRA2RGB, "yuv422": cv2.COLOR_YUV2RGB_UYVY,
            "uyvy": cv2.COLOR_YUV2RGB_UYVY, "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2,
            "yuyv": cv2.COLOR_YUV2RGB_YUY2}[enc]
    return cv2.cvtColor(np.ascontiguousarray(a), code)


def camera_info_msg(K: np.ndarray, width: int, height: int, stamp_ns: int, frame_id: str,
                    D: Sequence[float] | None = None, distortion_model: str = "plumb_bob",
                    typestore=None):
    """sensor_msgs/CameraInfo of a pinhole camera: K [3,3] pixels, P = [K | 0]."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K must be [3,3], got {K.shape}")
    P = np.zeros((3, 4))
    P[:, :3] = K
    roi = _cls("sensor_msgs/msg/RegionOfInterest", typestore)(
        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return _cls("sensor_msgs/msg/CameraInfo", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore), height=int(height), width=int(width),
        distortion_model=distortion_model,
        d=np.asarray(D if D is not None else [0.0] * 5, dtype=np.float64),
        k=K.reshape(9).copy(), r=np.eye(3).reshape(9), p=P.reshape(12),
        binning_x=0, binning_y=0, roi=roi)


# --------------------------------------------------------------------------- poses
def _covariance(cov: np.ndarray | None) -> np.ndarray:
    c = np.zeros(36) if cov is None else np.asarray(cov, dtype=np.float64).reshape(-1)
    if c.size != 36:
        raise ValueError(f"covariance must be [6,6], got {np.shape(cov)}")
    return c.copy()


def odometry_msg(parent_from_child: np.ndarray, stamp_ns: int, frame_id: str,
                 child_frame_id: str, pose_covariance: np.ndarray | None = None,
                 twist: Sequence[float] | None = None,
                 twist_covariance: np.ndarray | None = None, typestore=None):
    """nav_msgs/Odometry: pose of ``child_frame_id`` in ``frame_id`` ([4,4], metres);
    twist = (vx, vy, vz, wx, wy, wz) in the child frame (m/s, rad/s), default zero."""
    V3 = _cls("geometry_msgs/msg/Vector3", typestore)
    tw = np.zeros(6) if twist is None else np.asarray(twist, dtype=np.float64)
    twist_m = _cls("geometry_msgs/msg/Twist", typestore)(
        linear=V3(x=float(tw[0]), y=float(tw[1]), z=float(tw[2])),
        angular=V3(x=float(tw[3]), y=float(tw[4]), z=float(tw[5])))
    return _cls("nav_msgs/msg/Odometry", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore), child_frame_id=child_frame_id,
        pose=_cls("geometry_msgs/msg/PoseWithCovariance", typestore)(
            pose=pose_msg(parent_from_child, typestore), covariance=_covariance(pose_covariance)),
        twist=_cls("geometry_msgs/msg/TwistWithCovariance", typestore)(
            twist=twist_m, covariance=_covariance(twist_covariance)))


def pose_stamped_msg(parent_from_child: np.ndarray, stamp_ns: int, frame_id: str, typestore=None):
    """geometry_msgs/PoseStamped."""
    return _cls("geometry_msgs/msg/PoseStamped", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore),
        pose=pose_msg(parent_from_child, typestore))


def path_msg(poses: Iterable[tuple[int, np.ndarray]], stamp_ns: int, frame_id: str, typestore=None):
    """nav_msgs/Path from (stamp_ns, parent_from_child [4,4]) pairs."""
    return _cls("nav_msgs/msg/Path", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore),
        poses=[pose_stamped_msg(T, s, frame_id, typestore) for s, T in poses])


def transform_stamped_msg(parent_from_child: np.ndarray, stamp_ns: int, frame_id: str,
                          child_frame_id: str, typestore=None):
    """geometry_msgs/TransformStamped (``frame_id`` -> ``child_frame_id``)."""
    T = _check_pose(parent_from_child, "transform")
    q = _quat_xyzw(T[:3, :3])
    V3 = _cls("geometry_msgs/msg/Vector3", typestore)
    Q = _cls("geometry_msgs/msg/Quaternion", typestore)
    tf = _cls("geometry_msgs/msg/Transform", typestore)(
        translation=V3(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
        rotation=Q(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))
    return _cls("geometry_msgs/msg/TransformStamped", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore), child_frame_id=child_frame_id,
        transform=tf)


def tf_message(transforms: Sequence[Any], typestore=None):
    """tf2_msgs/TFMessage from TransformStamped messages."""
    return _cls("tf2_msgs/msg/TFMessage", typestore)(transforms=list(transforms))


# --------------------------------------------------------------------------- point clouds
def pointcloud2_msg(points: np.ndarray, stamp_ns: int, frame_id: str,
                    colors: np.ndarray | None = None,
                    fields: dict[str, np.ndarray] | None = None, typestore=None):
    """sensor_msgs/PointCloud2 (unorganised, height 1, little endian).

    points [M,3] metres in ``frame_id``; colors [M,3] uint8 RGB -> field ``rgb`` (FLOAT32
    holding the packed 0x00RRGGBB bits, the PCL/RViz convention); ``fields``: extra
    FLOAT32 fields name -> [M] (e.g. ``confidence``). Layout: x y z [rgb] [extra...].
    """
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be [M,3], got {pts.shape}")
    m = pts.shape[0]
    names: list[str] = ["x", "y", "z"]
    cols: list[np.ndarray] = [pts[:, 0], pts[:, 1], pts[:, 2]]
    if colors is not None:
        c = np.asarray(colors)
        if c.shape != (m, 3) or c.dtype != np.uint8:
            raise ValueError(f"colors must be [M,3] uint8, got {c.dtype} {c.shape}")
        packed = (c[:, 0].astype(np.uint32) << 16) | (c[:, 1].astype(np.uint32) << 8) | c[:, 2]
        names.append("rgb")
        cols.append(packed.view(np.float32))
    for name, arr in (fields or {}).items():
        a = np.asarray(arr, dtype=np.float32).reshape(-1)
        if a.size != m:
            raise ValueError(f"field {name!r} has {a.size} values for {m} points")
        names.append(name)
        cols.append(a)
    rec = np.empty(m, dtype=np.dtype({"names": names, "formats": ["<f4"] * len(names)}))
    for n, a in zip(names, cols):
        rec[n] = a
    PF = _cls("sensor_msgs/msg/PointField", typestore)
    pfields = [PF(name=n, offset=4 * i, datatype=_PF_FLOAT32, count=1) for i, n in enumerate(names)]
    return _cls("sensor_msgs/msg/PointCloud2", typestore)(
        header=header_msg(stamp_ns, frame_id, typestore), height=1, width=m, fields=pfields,
        is_bigendian=False, point_step=4 * len(names), row_step=4 * len(names) * m,
        data=np.frombuffer(rec.tobytes(), dtype=np.uint8), is_dense=True)


def pointcloud2_to_numpy(msg) -> dict[str, np.ndarray]:
    """Fields of a PointCloud2 as flat arrays (``rgb`` packed -> ``colors`` [M,3] uint8 too)."""
    end = ">" if msg.is_bigendian else "<"
    dt = np.dtype({"names": [f.name for f in msg.fields],
                   "formats": [end + _PF_DTYPES[f.datatype] for f in msg.fields],
                   "offsets": [f.offset for f in msg.fields], "itemsize": msg.point_step})
    n = int(msg.width) * int(msg.height)
    buf = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data,
                        dtype=np.uint8)
    rows = [buf[r * msg.row_step: r * msg.row_step + msg.width * msg.point_step]
            for r in range(msg.height)]
    rec = np.frombuffer(b"".join(r.tobytes() for r in rows), dtype=dt, count=n)
    out = {name: rec[name].astype(rec[name].dtype.newbyteorder("="), copy=True)
           for name in dt.names}
    if "rgb" in out:
        packed = out["rgb"].view(np.uint32)
        out["colors"] = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255],
                                 axis=1).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- bags
def _storage_plugin(storage: str) -> StoragePlugin:
    if storage not in STORAGES:
        raise ValueError(f"unknown bag storage {storage!r}; use one of {STORAGES}")
    return StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP


class BagWriter:
    """Streaming, atomic rosbag2 writer.

    Messages go into ``<parent>/.<name>.tmp-XXXX/<name>``; ``close()`` renames that bag
    folder to ``path``. On an exception inside ``with`` nothing is left at ``path``.
    Topics are created on first use with the message's own type (``__msgtype__``).
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3", typestore=None,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.storage = storage
        self.typestore = typestore or get_ros2_typestore()
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"bag output {self.path} already exists")
        self.overwrite = overwrite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plugin = _storage_plugin(storage)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        try:
            self._writer = Writer(self._tmp / self.path.name, version=_BAG_VERSION,
                                  storage_plugin=plugin)
            self._writer.open()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._conns: dict[str, Any] = {}
        self.count = 0

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic explicitly (so it exists even with zero messages)."""
        if topic not in self._conns:
            self._conns[topic] = self._writer.add_connection(topic, msgtype,
                                                             typestore=self.typestore)

    def write(self, topic: str, stamp_ns: int, msg: Any) -> None:
        """Append ``msg`` on ``topic`` with log time ``stamp_ns`` (nanoseconds)."""
        self.add_topic(topic, msg.__msgtype__)
        conn = self._conns[topic]
        if conn.msgtype != msg.__msgtype__:
            raise TypeError(f"topic {topic} has type {conn.msgtype}, got {msg.__msgtype__}")
        self._writer.write(conn, int(stamp_ns), self.typestore.serialize_cdr(msg, msg.__msgtype__))
        self.count += 1

    def close(self) -> Path:
        """Finish the bag and move it into place; returns its path."""
        self._writer.close()
        if self.path.exists():
            shutil.rmtree(self.path)           # only reachable with overwrite=True
        (self._tmp / self.path.name).rename(self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temp folder goes anyway
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_bag(path: str | Path, messages: Iterable[tuple[str, int, Any]],
              storage: str = "sqlite3", typestore=None, overwrite: bool = False) -> Path:
    """Write (topic, stamp_ns, msg) triples into a new bag at ``path`` (atomically)."""
    with BagWriter(path, storage, typestore, overwrite) as w:
        for topic, stamp_ns, msg in messages:
            w.write(topic, stamp_ns, msg)
    return Path(path)


@dataclass
class TopicInfo:
    """A topic of a bag: message type and message count."""

    msgtype: str
    count: int


def _open_reader(path: str | Path) -> Reader:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"bag {p} does not exist")
    if not (p / "metadata.yaml").is_file():
        raise ValueError(f"{p} is not a rosbag2 folder (no metadata.yaml)")
    return Reader(p)


def bag_topics(path: str | Path) -> dict[str, TopicInfo]:
    """Topics of a bag: name -> (msgtype, message count)."""
    with _open_reader(path) as r:
        out: dict[str, TopicInfo] = {}
        for c in r.connections:
            info = out.setdefault(c.topic, TopicInfo(c.msgtype, 0))
            info.count += c.msgcount
        return out


def read_bag(path: str | Path, topics: Sequence[str] | None = None,
             typestore=None) -> Iterator[tuple[str, int, Any]]:
    """Yield (topic, log stamp_ns, deserialised msg) in log-time order.

    ``topics``: only these (a missing one is an error that lists the available topics).
    """
    store = typestore or get_ros2_typestore()
    with _open_reader(path) as r:
        conns = list(r.connections)
        if topics is not None:
            have = {c.topic for c in conns}
            missing = [t for t in topics if t not in have]
            if missing:
                raise KeyError(f"topic(s) {missing} not in bag {path}; available: {sorted(have)}")
            conns = [c for c in conns if c.topic in set(topics)]
            if not conns:      # Reader.messages(()) would mean "all connections"
                return
        for conn, stamp, raw in r.messages(connections=conns):
            yield conn.topic, int(stamp), store.deserialize_cdr(raw, conn.msgtype)
