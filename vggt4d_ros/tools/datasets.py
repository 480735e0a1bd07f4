"""Input sources for offline replay and benchmarks: rosbag2, image folders, videos, datasets.

Every source yields :class:`Frame` objects in time order with a common interface::

    src = open_source("path/to/input", kind="auto", topic=None, stride=1, max_frames=None)
    len(src); src.name; src.kind; src.has_gt_pose; src.has_gt_mask; src.has_gt_depth
    for f in src:       # Frame
        f.index, f.stamp_ns, f.name, f.image [H,W,3] uint8 RGB,
        f.intrinsic [3,3] float64 pixels or None,
        f.world_from_cam [4,4] float64 (camera-to-world, OpenCV optical axes) or None,
        f.mask [H,W] bool (True = dynamic) or None,
        f.depth [H,W] float32 metres (0 = invalid) or None

Errors in the input (missing path, corrupt bag, no image topic, unknown encoding, empty folder,
unreadable image) raise :class:`InputError` with a one-line message that says what to do.

Poses are always returned as ``world_from_cam`` (camera-to-world) 4x4 matrices in the
dataset's own world frame and units; cameras use OpenCV optical axes (x right, y down,
z forward). Each reader converts the dataset's native convention, stated below.

Stamps: sources with real time stamps (rosbag2 header stamps, TUM/Bonn ``rgb.txt``) keep them;
all other sources get ``stamp_ns = round(i * 1e9 / fps)`` for the i-th frame of the sequence
*before* ``stride`` subsampling (so sub-sampled frames keep their true time), with the
dataset's nominal frame rate (override with ``fps=``).

Layouts (exact expected paths; ``<seq>`` = sequence folder given as INPUT):

* **rosbag2** (``kind="rosbag"``): a bag directory with ``metadata.yaml`` (sqlite3 ``*.db3`` or
  ``*.mcap`` storage) or a single ``.mcap`` / ``.db3`` file. Read with ``rosbags``. The image
  topic (``sensor_msgs/msg/Image`` or ``sensor_msgs/msg/CompressedImage``) is chosen
  automatically when it is unique, else by ``topic=``. Image encodings: rgb8, bgr8, rgba8, bgra8,
  mono8, mono16, 8UC1, 8UC3, yuv422 (UYVY), yuv422_yuy2 (YUYV); others → InputError.
  Stamps: ``header.stamp`` (bag receive time if the header stamp is zero). Intrinsics: from a
  ``sensor_msgs/msg/CameraInfo`` topic when one exists (latest message at or before the frame,
  else the first one). Ground-truth poses: an optional ``nav_msgs/msg/Odometry`` topic given by
  ``gt_topic=`` (child frame = camera, pose = world_from_cam, matched by nearest stamp);
  by default the unique Odometry topic whose name contains ``ground_truth`` or ``gt``.
* **synth** (``vggt4d-synth --out DIR``): ``DIR/rgb/000000.png``, ``DIR/masks/000000.png``
  (255 = dynamic), ``DIR/depth/000000.npz`` (``depth`` metres), ``DIR/gt.npz`` (``stamps_ns``,
  ``intrinsics``, ``cam_from_world``), ``DIR/camera.json``. All ground truth.
* **images** (``kind="images"``): ``<dir>/*.{png,jpg,jpeg,bmp,tif,tiff}`` sorted by name with
  natural number order (``2.png`` before ``10.png``); default 30 fps.
* **video** (``kind="video"``): any file OpenCV can decode (``.mp4 .avi .mov .mkv .webm``);
  stamps from the container's frame rate (30 fps if unknown).
* **davis** (DAVIS-2016 and DAVIS-2017, 480p): ``<root>/JPEGImages/480p/<seq>/00000.jpg …`` and
  ``<root>/Annotations/480p/<seq>/00000.png …``. INPUT is either ``<root>/JPEGImages/480p/<seq>``
  or ``<root>`` with ``sequence=``. Annotations: DAVIS-2016 binary 0/255, DAVIS-2017 palette
  object ids; any non-zero label = dynamic. Sequence lists (benchmarks):
  ``<root>/ImageSets/2016/val.txt`` or ``<root>/ImageSets/2017/val.txt``. No poses. 24 fps.
* **sintel** (MPI-Sintel training + depth/camera training data merged in one root):
  ``<root>/training/final/<seq>/frame_0001.png …`` (``pass_name="clean"`` for ``clean``),
  ``<root>/training/camdata_left/<seq>/frame_0001.cam`` (float32 tag 202021.25, then
  3x3 float64 K, then 3x4 float64 ``[R|t]`` camera-from-world), ``<root>/training/depth/<seq>/
  frame_0001.dpt`` (float32 tag 202021.25, int32 width, int32 height, float32 depth row-major),
  optional dynamic masks ``<root>/training/dynamic_label_perfect/<seq>/frame_0001.png``
  (non-zero = dynamic; the MonST3R-style labels used by dynamic-scene papers). 24 fps.
* **tum** (TUM RGB-D, e.g. ``rgbd_dataset_freiburg3_walking_xyz``): ``<seq>/rgb.txt``
  (``timestamp filename`` lines, ``#`` comments), ``<seq>/rgb/<timestamp>.png``,
  ``<seq>/groundtruth.txt`` (``timestamp tx ty tz qx qy qz qw``: world_from_cam, metres),
  optional ``<seq>/depth.txt`` + ``<seq>/depth/*.png`` (uint16, 5000 units per metre).
  GT pose/depth are associated to each RGB stamp by nearest time within 0.02 s (TUM's
  ``associate.py`` default); frames without GT get ``world_from_cam=None``. Intrinsics: the
  published calibration for freiburg1/2/3 by sequence name.
* **bonn** (Bonn RGB-D Dynamic, e.g. ``rgbd_bonn_balloon``): same files as TUM; intrinsics
  fx=542.822841 fy=542.576870 cx=315.593520 cy=237.756098. (Bonn ground truth is given for
  the motion-capture marker body; the constant marker-to-camera offset is left as published.)
* **vkitti** (Virtual KITTI 2, rgb + textgt archives extracted into one root):
  ``<root>/Scene01/clone/frames/rgb/Camera_0/rgb_00000.jpg …`` with
  ``<root>/Scene01/clone/extrinsic.txt`` and ``intrinsic.txt`` (also accepted under
  ``<scene>/clone/textgt/``). ``extrinsic.txt``: header line, then ``frame cameraID r11 r12 r13
  t1 r21 r22 r23 t2 r31 r32 r33 t3 0 0 0 1`` (camera-from-world, metres). ``intrinsic.txt``:
  header, then ``frame cameraID fx fy cx cy``. Optional depth
  ``<scene>/clone/frames/depth/Camera_0/depth_00000.png`` (uint16 centimetres). INPUT is the
  variation folder (``<root>/Scene01/clone``); ``camera=1`` selects Camera_1. 10 fps.
* **pointodyssey** (Point Odyssey): ``<seq>/rgbs/rgb_00000.jpg …`` and ``<seq>/anno.npz`` with
  ``intrinsics`` [S,3,3] and ``extrinsics`` [S,4,4] (camera-from-world); optional
  ``<seq>/depths/depth_00000.png`` (uint16, metres = value / 65535 * 1000) and
  ``<seq>/masks/mask_00000.png`` (non-zero = dynamic). 30 fps.
* **dycheck** (DyCheck iPhone): ``<seq>/rgb/1x/0_00000.png …`` (``<camera>_<frame>``) and
  ``<seq>/camera/0_00000.json`` with ``orientation`` (3x3, world→camera rotation), ``position``
  (camera centre in world), ``focal_length``, ``principal_point``, ``pixel_aspect_ratio``,
  ``skew``; OpenCV axes. Optional ``<seq>/depth/1x/0_00000.npy`` ([H,W] or [H,W,1], scene units).
  Only camera 0 (the moving iPhone) is read; frames listed in ``<seq>/splits/train.json``
  (``frame_names``) when present, else all ``rgb/1x/0_*.png``. 30 fps.
"""
from __future__ import annotations

import json
import re
import struct
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from vggt4d_ros.geometry.transforms import invert_se3, to_homogeneous
from vggt4d_ros.tools.cli_util import first_line
from vggt4d_ros.tools.rosbag_io import RGB_ENCODINGS, image_to_rgb

__all__ = [
    "Frame", "FrameSource", "InputError", "open_source", "detect_kind", "list_sequences",
    "DATASET_KINDS", "SOURCE_KINDS", "image_msg_to_rgb", "quat_to_rot", "read_sintel_cam",
    "read_sintel_dpt",
]

SINTEL_TAG = 202021.25
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DATASET_KINDS = ("davis", "sintel", "tum", "bonn", "vkitti", "pointodyssey", "dycheck")
SOURCE_KINDS = ("rosbag", "images", "video", "synth") + DATASET_KINDS
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")

# Published TUM RGB-D calibrations (fx, fy, cx, cy), selected by "freiburgN" in the name.
TUM_INTRINSICS = {
    "freiburg1": (517.3, 516.5, 318.6, 255.3),
    "freiburg2": (520.9, 521.0, 325.1, 249.7),
    "freiburg3": (535.4, 539.2, 320.1, 247.6),
}
BONN_INTRINSICS = (542.822841, 542.576870, 315.593520, 237.756098)
TUM_MAX_DT_S = 0.02


class InputError(Exception):
    """Bad or unreadable input; ``str(err)`` is a one-line message meant for the user."""


@dataclass
class Frame:
    """One input frame with optional ground truth.

    Attributes:
        index: position in the (sub-sampled) sequence, 0-based.
        stamp_ns: time stamp, nanoseconds.
        name: stable per-frame name (file stem or zero-padded index).
        image: [H,W,3] uint8 RGB.
        intrinsic: [3,3] float64 pinhole K in pixels of ``image``, or None.
        world_from_cam: [4,4] float64 camera-to-world (OpenCV optical axes), or None.
        mask: [H,W] bool ground-truth dynamic mask (True = dynamic), or None.
        depth: [H,W] float32 ground-truth z-depth in dataset units (metres), 0 = invalid, or None.
    """

    index: int
    stamp_ns: int
    name: str
    image: np.ndarray
    intrinsic: np.ndarray | None = None
    world_from_cam: np.ndarray | None = None
    mask: np.ndarray | None = None
    depth: np.ndarray | None = None


# --------------------------------------------------------------------------- small helpers
def _natural_key(path: Path) -> list[Any]:
    """Sort key: digits compare as numbers ("2" < "10")."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _list_images(folder: Path, prefix: str = "") -> list[Path]:
    """Image files in ``folder`` whose name starts with ``prefix``, natural order."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTS and p.name.startswith(prefix)]
    return sorted(files, key=_natural_key)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as [H,W,3] uint8 RGB (grey and 16-bit inputs converted)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"cannot read image file {path} (missing or corrupt)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_raw(path: Path) -> np.ndarray:
    """Read an image file unchanged (e.g. uint16 depth, palette masks as indices)."""
    if path.suffix.lower() == ".png":
        # PIL keeps palette indices (DAVIS-2017) where OpenCV would expand to colours.
        from PIL import Image
        try:
            with Image.open(path) as im:
                return np.array(im)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image file {path}: {exc}") from exc
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"cannot read image file {path} (missing or corrupt)")
    return img


def _read_mask(path: Path) -> np.ndarray:
    """Read a label/mask image; non-zero (any channel) = dynamic. Returns [H,W] bool."""
    lab = _read_raw(path)
    return lab.any(axis=2) if lab.ndim == 3 else lab != 0


def _intrinsic(fx: float, fy: float, cx: float, cy: float, skew: float = 0.0) -> np.ndarray:
    """3x3 pinhole matrix (pixels)."""
    return np.array([[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def _se3_inverse(t: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 (or 3x4) transform, returned as 4x4 float64."""
    return invert_se3(to_homogeneous(np.asarray(t, dtype=np.float64)[:3, :4]))


def quat_to_rot(qx: float, qy: float, qz: float, qw: float) -> np.ndarray:
    """Unit quaternion (Hamilton, x y z w) → 3x3 rotation matrix."""
    q = np.array([qw, qx, qy, qz], dtype=np.float64)
    n = np.linalg.norm(q)
    if n < 1e-12:
        raise InputError("zero-norm quaternion in ground truth")
    w, x, y, z = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _pose_from_tum(vals: Sequence[float]) -> np.ndarray:
    """``tx ty tz qx qy qz qw`` → 4x4 world_from_cam."""
    t = np.eye(4)
    t[:3, :3] = quat_to_rot(*vals[3:7])
    t[:3, 3] = vals[:3]
    return t


def read_sintel_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Sintel ``.cam`` file → (K [3,3] pixels, cam_from_world [3,4])."""
    data = Path(path).read_bytes()
    if len(data) < 4 + 21 * 8 or struct.unpack("<f", data[:4])[0] != np.float32(SINTEL_TAG):
        raise InputError(f"not a Sintel .cam file: {path}")
    vals = np.frombuffer(data[4:4 + 21 * 8], dtype="<f8")
    return vals[:9].reshape(3, 3).copy(), vals[9:].reshape(3, 4).copy()


def read_sintel_dpt(path: Path) -> np.ndarray:
    """Read a Sintel ``.dpt`` depth file → [H,W] float32 (z-depth, scene units)."""
    data = Path(path).read_bytes()
    if len(data) < 12 or struct.unpack("<f", data[:4])[0] != np.float32(SINTEL_TAG):
        raise InputError(f"not a Sintel .dpt file: {path}")
    w, h = struct.unpack("<ii", data[4:12])
    if w <= 0 or h <= 0 or len(data) < 12 + 4 * w * h:
        raise InputError(f"truncated Sintel .dpt file: {path}")
    return np.frombuffer(data[12:12 + 4 * w * h], dtype="<f4").reshape(h, w).astype(np.float32)


# --------------------------------------------------------------------------- base classes
class FrameSource(ABC):
    """A finite, ordered sequence of frames. Subclasses implement ``_count`` and ``_load``.

    Args:
        stride: keep every ``stride``-th frame (benchmark protocols sub-sample).
        max_frames: keep at most this many frames after striding (None = all).
        start: first raw frame to use (benchmark protocols skip a prefix).
    """

    kind: str = "base"
    has_gt_pose: bool = False
    has_gt_mask: bool = False
    has_gt_depth: bool = False

    def __init__(self, name: str, stride: int = 1, max_frames: int | None = None,
                 start: int = 0) -> None:
        if stride < 1:
            raise InputError(f"stride must be >= 1, got {stride}")
        if max_frames is not None and max_frames < 1:
            raise InputError(f"max_frames must be >= 1, got {max_frames}")
        if start < 0:
            raise InputError(f"start must be >= 0, got {start}")
        self.name = name
        self.stride = stride
        self.max_frames = max_frames
        self.start = start

    @abstractmethod
    def _count(self) -> int:
        """Number of raw frames before sub-sampling."""

    @abstractmethod
    def _iter_raw(self, raw_indices: Sequence[int]) -> Iterator[Frame]:
        """Yield frames for the given raw indices (ascending); ``Frame.index`` is set later."""

    def _indices(self) -> list[int]:
        idx = list(range(self.start, self._count(), self.stride))
        return idx[: self.max_frames] if self.max_frames is not None else idx

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self) -> Iterator[Frame]:
        for k, frame in enumerate(self._iter_raw(self._indices())):
            frame.index = k
            yield frame

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for summaries."""
        return {"kind": self.kind, "name": self.name, "frames": len(self), "stride": self.stride,
                "max_frames": self.max_frames, "start": self.start, "gt_pose": self.has_gt_pose,
                "gt_mask": self.has_gt_mask, "gt_depth": self.has_gt_depth}


class IndexedSource(FrameSource):
    """Random-access source: subclasses implement ``_count`` and ``_load(raw_index)``."""

    def __init__(self, name: str, fps: float, stride: int = 1,
                 max_frames: int | None = None, start: int = 0) -> None:
        super().__init__(name, stride, max_frames, start)
        if not fps > 0:
            raise InputError(f"fps must be > 0, got {fps}")
        self.fps = float(fps)

    def _stamp(self, raw_index: int) -> int:
        """Nominal stamp (ns) of raw frame ``raw_index`` at ``self.fps``."""
        return int(round(raw_index * 1e9 / self.fps))

    @abstractmethod
    def _load(self, raw_index: int) -> Frame:
        """Load raw frame ``raw_index``."""

    def _iter_raw(self, raw_indices: Sequence[int]) -> Iterator[Frame]:
        for i in raw_indices:
            yield self._load(i)


# --------------------------------------------------------------------------- plain inputs
class ImageFolderSource(IndexedSource):
    """Sorted image files of one folder (see module docstring)."""

    kind = "images"

    def __init__(self, folder: Path, fps: float | None = None, **kw: Any) -> None:
        folder = Path(folder)
        self.files = _list_images(folder)
        if not self.files:
            raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {folder}")
        super().__init__(folder.name, fps or 30.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        return Frame(0, self._stamp(i), self.files[i].stem, read_rgb(self.files[i]))


class VideoSource(FrameSource):
    """Frames of a video file decoded with OpenCV, in order."""

    kind = "video"

    def __init__(self, path: Path, fps: float | None = None, **kw: Any) -> None:
        self.path = Path(path)
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise InputError(f"cannot open video {self.path} (missing, corrupt or unsupported)")
            native_fps = cap.get(cv2.CAP_PROP_FPS)
            n = 0
            while cap.grab():          # count by decoding: container counts can be wrong
                n += 1
        finally:
            cap.release()
        if n == 0:
            raise InputError(f"video {self.path} has no decodable frames")
        self.n = n
        self.fps = float(fps or (native_fps if native_fps and native_fps > 0 else 30.0))
        super().__init__(self.path.stem, **kw)

    def _count(self) -> int:
        return self.n

    def _iter_raw(self, raw_indices: Sequence[int]) -> Iterator[Frame]:
        wanted = set(raw_indices)
        last = max(raw_indices) if raw_indices else -1
        cap = cv2.VideoCapture(str(self.path))
        try:
            for i in range(last + 1):
                ok, bgr = cap.read()
                if not ok:
                    raise InputError(f"video {self.path} ended early at frame {i}")
                if i in wanted:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    yield Frame(0, int(round(i * 1e9 / self.fps)), f"{i:06d}", rgb)
        finally:
            cap.release()


# --------------------------------------------------------------------------- rosbag2
SUPPORTED_ENCODINGS = RGB_ENCODINGS


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (or CompressedImage) → [H,W,3] uint8 RGB (``rosbag_io.image_to_rgb``).

    Honours ``step`` (row padding) and ``is_bigendian`` (16-bit). Raises InputError for
    unsupported encodings or inconsistent sizes.
    """
    if hasattr(msg, "encoding"):
        h, w, step = int(msg.height), int(msg.width), int(msg.step)
        if h <= 0 or w <= 0 or len(msg.data) < h * step:
            raise InputError(f"image message {w}x{h} step {step} has {len(msg.data)} bytes "
                             "(corrupt)")
    try:
        return image_to_rgb(msg)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _stamp_of(msg: Any, bag_ns: int) -> int:
    """Header stamp in ns (bag receive time when the header stamp is zero)."""
    st = msg.header.stamp
    ns = int(st.sec) * 1_000_000_000 + int(st.nanosec)
    return ns if ns > 0 else int(bag_ns)


class RosbagSource(FrameSource):
    """Images of one topic of a rosbag2 (sqlite3 or mcap), read with ``rosbags``."""

    kind = "rosbag"

    def __init__(self, path: Path, topic: str | None = None, gt_topic: str | None = "auto",
                 **kw: Any) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"bag not found: {self.path}")
        with self._reader() as reader:
            topics = {name: c.msgtype for name, c in reader.topics.items()}
            self.topic = self._choose_topic(topics, topic)
            self.info_topic = next((t for t, ty in sorted(topics.items())
                                    if ty == "sensor_msgs/msg/CameraInfo"), None)
            if gt_topic == "auto":
                gt_topic = self._auto_gt_topic(topics)
            if gt_topic is not None and topics.get(gt_topic) != "nav_msgs/msg/Odometry":
                raise InputError(f"ground-truth topic '{gt_topic}' is not a nav_msgs/Odometry "
                                 f"topic of {self.path}")
            self.gt_topic = gt_topic
            self.n = sum(c.msgcount for c in reader.connections if c.topic == self.topic)
        if self.n == 0:
            raise InputError(f"image topic '{self.topic}' of {self.path} has no messages")
        self.has_gt_pose = gt_topic is not None
        super().__init__(self.path.stem if self.path.is_file() else self.path.name, **kw)

    @contextmanager
    def _reader(self) -> Iterator[Any]:
        """Open the bag with rosbags' AnyReader; any failure to open → InputError."""
        from rosbags.highlevel import AnyReader
        reader = AnyReader([self.path])
        try:
            reader.open()
        except Exception as exc:  # rosbags raises several unrelated types for bad bags
            msg = first_line(exc) or type(exc).__name__
            raise InputError(f"cannot open bag {self.path}: {msg}") from exc
        try:
            yield reader
        finally:
            reader.close()

    @staticmethod
    def _auto_gt_topic(topics: dict[str, str]) -> str | None:
        """The unique Odometry topic whose name says ground truth (``ground_truth``, ``gt``)."""
        cands = [t for t, ty in topics.items() if ty == "nav_msgs/msg/Odometry"
                 and re.search(r"(ground_?truth|(^|/)gt(/|_|$))", t)]
        return cands[0] if len(cands) == 1 else None

    def _choose_topic(self, topics: dict[str, str], topic: str | None) -> str:
        images = sorted(t for t, ty in topics.items() if ty in IMAGE_TYPES)
        listing = ", ".join(f"{t} [{ty}]" for t, ty in sorted(topics.items())) or "none"
        if topic is not None:
            if topic not in topics:
                raise InputError(f"topic '{topic}' not in bag {self.path}; available: {listing}")
            if topics[topic] not in IMAGE_TYPES:
                raise InputError(f"topic '{topic}' is {topics[topic]}, not an image; "
                                 f"available: {listing}")
            return topic
        if not images:
            raise InputError(f"bag {self.path} has no image topic; available: {listing}")
        if len(images) > 1:
            raise InputError(f"bag {self.path} has several image topics ({', '.join(images)}); "
                             "choose one with --topic")
        return images[0]

    def _count(self) -> int:
        return self.n

    def _aux(self, reader: Any) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, Any]]]:
        """(CameraInfo K by stamp, GT world_from_cam by stamp), each sorted by stamp."""
        infos: list[tuple[int, np.ndarray]] = []
        gts: list[tuple[int, Any]] = []
        wanted = [c for c in reader.connections if c.topic in (self.info_topic, self.gt_topic)]
        if not wanted:          # rosbags reads ALL connections when given an empty list
            return infos, gts
        for conn, ts, raw in reader.messages(connections=wanted):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == self.info_topic:
                infos.append((_stamp_of(msg, ts), np.asarray(msg.k, np.float64).reshape(3, 3)))
            else:
                p = msg.pose.pose
                gts.append((_stamp_of(msg, ts), _pose_from_tum(
                    [p.position.x, p.position.y, p.position.z, p.orientation.x,
                     p.orientation.y, p.orientation.z, p.orientation.w])))
        return sorted(infos, key=lambda x: x[0]), sorted(gts, key=lambda x: x[0])

    def _iter_raw(self, raw_indices: Sequence[int]) -> Iterator[Frame]:
        wanted = set(raw_indices)
        with self._reader() as reader:
            infos, gts = self._aux(reader)
            conns = [c for c in reader.connections if c.topic == self.topic]
            try:
                for i, (conn, ts, raw) in enumerate(reader.messages(connections=conns)):
                    if i not in wanted:
                        continue
                    msg = reader.deserialize(raw, conn.msgtype)
                    stamp = _stamp_of(msg, ts)
                    yield Frame(0, stamp, f"{stamp}", image_msg_to_rgb(msg),
                                intrinsic=_latest_before(infos, stamp),
                                world_from_cam=_nearest(gts, stamp, 0.5 * 1e9 / 30))
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"corrupt bag {self.path}: {exc}") from exc


def _latest_before(items: list[tuple[int, np.ndarray]], stamp: int) -> np.ndarray | None:
    """Value of the last item with stamp <= ``stamp`` (first item if none; None if empty)."""
    if not items:
        return None
    best = items[0][1]
    for s, v in items:
        if s > stamp:
            break
        best = v
    return best.copy()


def _nearest(items: list[tuple[int, Any]], stamp: int, max_dt_ns: float) -> Any | None:
    """Value of the item nearest in time to ``stamp`` if within ``max_dt_ns``, else None."""
    if not items:
        return None
    stamps = np.array([s for s, _ in items], dtype=np.int64)
    k = int(np.argmin(np.abs(stamps - stamp)))
    if abs(int(stamps[k]) - stamp) > max_dt_ns:
        return None
    val = items[k][1]
    return val.copy() if isinstance(val, np.ndarray) else val


# --------------------------------------------------------------------------- datasets
class DavisSource(IndexedSource):
    """DAVIS-2016/2017 480p sequence (see module docstring)."""

    kind = "davis"
    has_gt_mask = True

    def __init__(self, path: Path, sequence: str | None = None, fps: float | None = None,
                 resolution: str = "480p", **kw: Any) -> None:
        path = Path(path)
        if sequence is not None:
            root, seq = path, sequence
        elif path.parent.parent.name == "JPEGImages":
            root, seq = path.parent.parent.parent, path.name
        else:
            raise InputError(f"{path} is not <root>/JPEGImages/{resolution}/<seq>; pass the "
                             "sequence folder or a DAVIS root with a sequence name")
        self.files = _list_images(root / "JPEGImages" / resolution / seq)
        if not self.files:
            raise InputError(f"no frames in {root / 'JPEGImages' / resolution / seq}")
        self.ann_dir = root / "Annotations" / resolution / seq
        self.has_gt_mask = self.ann_dir.is_dir()
        super().__init__(seq, fps or 24.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        ann = self.ann_dir / (f.stem + ".png")
        mask = _read_mask(ann) if ann.is_file() else None
        return Frame(0, self._stamp(i), f.stem, read_rgb(f), mask=mask)


class SintelSource(IndexedSource):
    """MPI-Sintel training sequence with cameras, depth and optional dynamic masks."""

    kind = "sintel"

    def __init__(self, path: Path, sequence: str | None = None, pass_name: str = "final",
                 fps: float | None = None, **kw: Any) -> None:
        path = Path(path)
        if sequence is None:
            if path.parent.name not in ("final", "clean") or path.parent.parent.name != "training":
                raise InputError(f"{path} is not <root>/training/<final|clean>/<seq>")
            root, seq, pass_name = path.parent.parent.parent, path.name, path.parent.name
        else:
            root, seq = path, sequence
        tr = root / "training"
        self.files = _list_images(tr / pass_name / seq, prefix="frame_")
        if not self.files:
            raise InputError(f"no frame_*.png in {tr / pass_name / seq}")
        self.cam_dir, self.depth_dir = tr / "camdata_left" / seq, tr / "depth" / seq
        self.mask_dir = tr / "dynamic_label_perfect" / seq
        self.has_gt_pose = self.cam_dir.is_dir()
        self.has_gt_depth = self.depth_dir.is_dir()
        self.has_gt_mask = self.mask_dir.is_dir()
        super().__init__(seq, fps or 24.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        fr = Frame(0, self._stamp(i), f.stem, read_rgb(f))
        cam = self.cam_dir / (f.stem + ".cam")
        if cam.is_file():
            k, cam_from_world = read_sintel_cam(cam)
            fr.intrinsic, fr.world_from_cam = k, _se3_inverse(cam_from_world)
        dpt = self.depth_dir / (f.stem + ".dpt")
        if dpt.is_file():
            fr.depth = read_sintel_dpt(dpt)
        m = self.mask_dir / (f.stem + ".png")
        if m.is_file():
            fr.mask = _read_mask(m)
        return fr


def _seconds_text_to_ns(text: str) -> int:
    """Decimal seconds as written in a text file → exact integer nanoseconds."""
    return int((Decimal(text) * 1_000_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def _read_stamped_list(path: Path) -> list[tuple[int, list[str]]]:
    """TUM-style text file → [(timestamp_ns, rest_of_fields)], comments skipped."""
    out = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        try:
            out.append((_seconds_text_to_ns(parts[0]), parts[1:]))
        except (InvalidOperation, ValueError, IndexError) as exc:
            raise InputError(f"{path}:{ln}: malformed line '{line}'") from exc
    return out


class TumSource(IndexedSource):
    """TUM RGB-D sequence (rgb.txt, groundtruth.txt, optional depth.txt)."""

    kind = "tum"

    def __init__(self, path: Path, **kw: Any) -> None:
        path = Path(path)
        kw.pop("fps", None)
        if not (path / "rgb.txt").is_file():
            raise InputError(f"{path} has no rgb.txt (TUM/Bonn layout expected)")
        rgb = _read_stamped_list(path / "rgb.txt")
        if not rgb:
            raise InputError(f"{path / 'rgb.txt'} lists no frames")
        self.root = path
        self.rgb = [(t, path / f[0]) for t, f in rgb]
        self.gt: list[tuple[int, np.ndarray]] = []
        if (path / "groundtruth.txt").is_file():
            for t, vals in _read_stamped_list(path / "groundtruth.txt"):
                if len(vals) < 7:
                    raise InputError(f"{path / 'groundtruth.txt'}: expected 8 columns")
                self.gt.append((t, _pose_from_tum([float(v) for v in vals])))
        self.depth: list[tuple[int, Path]] = []
        if (path / "depth.txt").is_file():
            self.depth = [(t, path / f[0])
                          for t, f in _read_stamped_list(path / "depth.txt")]
        self.has_gt_pose, self.has_gt_depth = bool(self.gt), bool(self.depth)
        self.k = self._intrinsics(path.name)
        super().__init__(path.name, 30.0, **kw)

    def _intrinsics(self, name: str) -> np.ndarray | None:
        for key, vals in TUM_INTRINSICS.items():
            if key in name:
                return _intrinsic(*vals)
        return None

    def _count(self) -> int:
        return len(self.rgb)

    def _load(self, i: int) -> Frame:
        stamp, f = self.rgb[i]
        fr = Frame(0, stamp, f.stem, read_rgb(f),
                   intrinsic=None if self.k is None else self.k.copy(),
                   world_from_cam=_nearest(self.gt, stamp, TUM_MAX_DT_S * 1e9))
        dpath = _nearest(self.depth, stamp, TUM_MAX_DT_S * 1e9)
        if dpath is not None:
            fr.depth = _read_raw(dpath).astype(np.float32) / 5000.0
        return fr


class BonnSource(TumSource):
    """Bonn RGB-D Dynamic sequence: TUM file layout, Bonn calibration."""

    kind = "bonn"

    def _intrinsics(self, name: str) -> np.ndarray | None:
        return _intrinsic(*BONN_INTRINSICS)


def _read_vkitti_table(path: Path, camera: int, ncols: int) -> dict[int, np.ndarray]:
    """VKITTI 2 text table (header + ``frame cameraID values…``) → {frame: values}."""
    out = {}
    lines = path.read_text().splitlines()
    for ln, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 + ncols:
            raise InputError(f"{path}:{ln}: expected {2 + ncols} columns, got {len(parts)}")
        if int(parts[1]) == camera:
            out[int(parts[0])] = np.array([float(v) for v in parts[2:2 + ncols]])
    return out


class VkittiSource(IndexedSource):
    """Virtual KITTI 2 scene variation (e.g. ``Scene01/clone``), one camera."""

    kind = "vkitti"

    def __init__(self, path: Path, camera: int = 0, fps: float | None = None, **kw: Any) -> None:
        path = Path(path)
        rgb_dir = path / "frames" / "rgb" / f"Camera_{camera}"
        self.files = _list_images(rgb_dir, prefix="rgb_")
        if not self.files:
            raise InputError(f"no rgb_*.jpg in {rgb_dir} (expected <root>/SceneXX/<variation>)")
        txt = next((d for d in (path, path / "textgt") if (d / "extrinsic.txt").is_file()), None)
        self.extr = _read_vkitti_table(txt / "extrinsic.txt", camera, 16) if txt else {}
        self.intr = _read_vkitti_table(txt / "intrinsic.txt", camera, 4) \
            if txt and (txt / "intrinsic.txt").is_file() else {}
        self.depth_dir = path / "frames" / "depth" / f"Camera_{camera}"
        self.has_gt_pose, self.has_gt_depth = bool(self.extr), self.depth_dir.is_dir()
        super().__init__(f"{path.parent.name}_{path.name}", fps or 10.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        num = int(f.stem.split("_")[-1])
        fr = Frame(0, self._stamp(i), f.stem, read_rgb(f))
        if num in self.extr:
            fr.world_from_cam = _se3_inverse(self.extr[num].reshape(4, 4))
        if num in self.intr:
            fr.intrinsic = _intrinsic(*self.intr[num])
        d = self.depth_dir / f"depth_{num:05d}.png"
        if d.is_file():
            fr.depth = _read_raw(d).astype(np.float32) / 100.0
        return fr


class PointOdysseySource(IndexedSource):
    """Point Odyssey sequence (rgbs/, anno.npz, optional depths/ and masks/)."""

    kind = "pointodyssey"

    def __init__(self, path: Path, fps: float | None = None, **kw: Any) -> None:
        path = Path(path)
        self.files = _list_images(path / "rgbs", prefix="rgb_")
        if not self.files:
            raise InputError(f"no rgbs/rgb_*.jpg in {path}")
        self.extr = self.intr = None
        if (path / "anno.npz").is_file():
            try:
                with np.load(path / "anno.npz", allow_pickle=False) as anno:
                    self.extr = np.asarray(anno["extrinsics"], np.float64)
                    self.intr = np.asarray(anno["intrinsics"], np.float64)
            except (KeyError, ValueError, OSError) as exc:
                raise InputError(f"cannot read {path / 'anno.npz'}: {exc}") from exc
            if len(self.extr) < len(self.files) or len(self.intr) < len(self.files):
                raise InputError(f"{path / 'anno.npz'} has fewer cameras than frames")
        self.root = path
        self.has_gt_pose = self.extr is not None
        self.has_gt_depth = (path / "depths").is_dir()
        self.has_gt_mask = (path / "masks").is_dir()
        super().__init__(path.name, fps or 30.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        num = f.stem.split("_")[-1]
        fr = Frame(0, self._stamp(i), f.stem, read_rgb(f))
        if self.extr is not None:
            fr.world_from_cam = _se3_inverse(self.extr[i])
            fr.intrinsic = self.intr[i].copy()
        d = self.root / "depths" / f"depth_{num}.png"
        if d.is_file():
            fr.depth = _read_raw(d).astype(np.float32) / 65535.0 * 1000.0
        m = self.root / "masks" / f"mask_{num}.png"
        if m.is_file():
            fr.mask = _read_mask(m)
        return fr


class DycheckSource(IndexedSource):
    """DyCheck iPhone sequence, camera 0 (rgb/1x, camera/*.json, optional depth/1x)."""

    kind = "dycheck"

    def __init__(self, path: Path, fps: float | None = None, **kw: Any) -> None:
        path = Path(path)
        split = path / "splits" / "train.json"
        if split.is_file():
            names = [n for n in json.loads(split.read_text())["frame_names"] if n.startswith("0_")]
            self.files = [path / "rgb" / "1x" / f"{n}.png" for n in names]
        else:
            self.files = _list_images(path / "rgb" / "1x", prefix="0_")
        if not self.files:
            raise InputError(f"no rgb/1x/0_*.png in {path} (DyCheck iPhone layout expected)")
        self.root = path
        self.has_gt_pose = (path / "camera").is_dir()
        self.has_gt_depth = (path / "depth" / "1x").is_dir()
        super().__init__(path.name, fps or 30.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _camera(self, stem: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(K, world_from_cam) from ``camera/<stem>.json`` or None if absent."""
        p = self.root / "camera" / f"{stem}.json"
        if not p.is_file():
            return None
        try:
            cam = json.loads(p.read_text())
            r = np.asarray(cam["orientation"], np.float64).reshape(3, 3)
            c = np.asarray(cam["position"], np.float64).reshape(3)
            f = float(cam["focal_length"])
            cx, cy = (float(v) for v in cam["principal_point"])
            aspect, skew = float(cam.get("pixel_aspect_ratio", 1.0)), float(cam.get("skew", 0.0))
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"malformed DyCheck camera file {p}: {exc}") from exc
        wfc = np.eye(4)
        wfc[:3, :3], wfc[:3, 3] = r.T, c
        return _intrinsic(f, f * aspect, cx, cy, skew), wfc

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        fr = Frame(0, self._stamp(i), f.stem, read_rgb(f))
        cam = self._camera(f.stem)
        if cam is not None:
            fr.intrinsic, fr.world_from_cam = cam
        d = self.root / "depth" / "1x" / f"{f.stem}.npy"
        if d.is_file():
            fr.depth = np.load(d, allow_pickle=False).astype(np.float32).reshape(
                fr.image.shape[:2])
        return fr


class SynthFolderSource(IndexedSource):
    """Folder written by ``vggt4d-synth`` (rgb/, masks/, depth/*.npz, gt.npz, camera.json)."""

    kind = "synth"
    has_gt_pose = has_gt_mask = has_gt_depth = True

    def __init__(self, path: Path, fps: float | None = None, **kw: Any) -> None:
        path = Path(path)
        self.files = _list_images(path / "rgb")
        if not self.files or not (path / "gt.npz").is_file():
            raise InputError(f"{path} is not a vggt4d-synth folder (rgb/ and gt.npz expected)")
        try:
            with np.load(path / "gt.npz", allow_pickle=False) as gt:
                self.stamps = np.asarray(gt["stamps_ns"], np.int64)
                self.intr = np.asarray(gt["intrinsics"], np.float64)
                self.cfw = np.asarray(gt["cam_from_world"], np.float64)
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"cannot read {path / 'gt.npz'}: {exc}") from exc
        if not len(self.stamps) == len(self.intr) == len(self.cfw) == len(self.files):
            raise InputError(f"{path}: gt.npz has {len(self.stamps)} frames, rgb/ has "
                             f"{len(self.files)}")
        self.root = path
        super().__init__(path.name, fps or 30.0, **kw)

    def _count(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Frame:
        f = self.files[i]
        fr = Frame(0, int(self.stamps[i]), f.stem, read_rgb(f), intrinsic=self.intr[i].copy(),
                   world_from_cam=_se3_inverse(self.cfw[i]))
        m = self.root / "masks" / f"{f.stem}.png"
        if m.is_file():
            fr.mask = _read_mask(m)
        d = self.root / "depth" / f"{f.stem}.npz"
        if d.is_file():
            with np.load(d, allow_pickle=False) as z:
                fr.depth = np.asarray(z["depth"], np.float32)
        return fr


# --------------------------------------------------------------------------- entry points
def detect_kind(path: Path) -> str:
    """Guess the source kind of ``path`` from its layout (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_file():
        suf = path.suffix.lower()
        if suf in (".mcap", ".db3"):
            return "rosbag"
        if suf in VIDEO_EXTS:
            return "video"
        if suf in (".yaml", ".yml") and path.name == "metadata.yaml":
            return "rosbag"
        raise InputError(f"unknown input file type '{path.suffix}' for {path} "
                         "(expected a bag, a video, or a folder)")
    if (path / "metadata.yaml").is_file() or any(path.glob("*.db3")) or any(path.glob("*.mcap")):
        return "rosbag"
    if path.parent.parent.name == "JPEGImages":
        return "davis"
    if path.parent.name in ("final", "clean") and path.parent.parent.name == "training":
        return "sintel"
    if (path / "gt.npz").is_file() and (path / "camera.json").is_file() and (path / "rgb").is_dir():
        return "synth"
    if (path / "rgb.txt").is_file():
        return "bonn" if "bonn" in path.name.lower() else "tum"
    if (path / "frames" / "rgb").is_dir():
        return "vkitti"
    if (path / "rgbs").is_dir():
        return "pointodyssey"
    if (path / "rgb" / "1x").is_dir():
        return "dycheck"
    if _list_images(path):
        return "images"
    raise InputError(f"cannot tell what {path} is: no bag metadata, no images, no known "
                     "dataset layout (see vggt4d_ros.tools.datasets docs)")


def open_source(path: str | Path, kind: str = "auto", *, topic: str | None = None,
                gt_topic: str | None = "auto", stride: int = 1, max_frames: int | None = None,
                start: int = 0, fps: float | None = None, **extra: Any) -> FrameSource:
    """Open ``path`` as a frame source.

    Args:
        path: bag, video, image folder or dataset sequence folder.
        kind: one of ``SOURCE_KINDS`` or ``"auto"`` (layout detection).
        topic: rosbag image topic (required when a bag has several).
        gt_topic: rosbag nav_msgs/Odometry topic with ground-truth camera poses; ``"auto"``
            picks the unique Odometry topic named like ground truth (``/ground_truth/odom``).
        stride: keep every ``stride``-th frame; ``max_frames``: cap after striding;
            ``start``: first raw frame used.
        fps: nominal frame rate for sources without stamps.
        extra: per-dataset options (``sequence``, ``pass_name``, ``camera``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    kind = detect_kind(path) if kind == "auto" else kind
    common: dict[str, Any] = {"stride": stride, "max_frames": max_frames, "start": start}
    if kind == "rosbag":
        return RosbagSource(path, topic=topic, gt_topic=gt_topic, **common)
    classes: dict[str, type] = {
        "images": ImageFolderSource, "video": VideoSource, "davis": DavisSource,
        "sintel": SintelSource, "tum": TumSource, "bonn": BonnSource, "vkitti": VkittiSource,
        "pointodyssey": PointOdysseySource, "dycheck": DycheckSource, "synth": SynthFolderSource}
    if kind not in classes:
        raise InputError(f"unknown input kind '{kind}' (one of: auto, {', '.join(SOURCE_KINDS)})")
    return classes[kind](path, fps=fps, **common, **extra)


def list_sequences(root: str | Path, dataset: str) -> list[tuple[str, Path]]:
    """Every sequence of a benchmark root as ``(name, sequence_path)``, sorted by name.

    Roots: davis → ``<root>`` (``ImageSets/<2016|2017>/val.txt`` if present, else all of
    ``JPEGImages/480p``; ``dataset="davis2016"`` / ``"davis2017"`` pick the list);
    sintel → ``<root>`` (``training/final/*``); tum/bonn → ``<root>/*/rgb.txt``;
    vkitti → ``<root>/Scene*/clone``; pointodyssey → ``<root>/*/rgbs``;
    dycheck → ``<root>/*/rgb/1x``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset root not found: {root}")
    ds = dataset.lower()
    if ds.startswith("davis"):
        jpg = root / "JPEGImages" / "480p"
        year = "2017" if ds.endswith("2017") else "2016"
        lst = root / "ImageSets" / year / "val.txt"
        names = ([n.strip() for n in lst.read_text().split() if n.strip()] if lst.is_file()
                 else sorted(p.name for p in jpg.iterdir() if p.is_dir()) if jpg.is_dir()
                 else [])
        seqs = [(n, jpg / n) for n in names]
    elif ds == "sintel":
        fin = root / "training" / "final"
        seqs = [(p.name, p) for p in sorted(fin.iterdir()) if p.is_dir()] if fin.is_dir() else []
    elif ds in ("tum", "bonn"):
        seqs = [(p.name, p) for p in sorted(root.iterdir()) if (p / "rgb.txt").is_file()]
    elif ds == "vkitti":
        seqs = [(f"{p.parent.name}_{p.name}", p) for p in sorted(root.glob("Scene*/clone"))]
    elif ds == "pointodyssey":
        seqs = [(p.name, p) for p in sorted(root.iterdir()) if (p / "rgbs").is_dir()]
    elif ds == "dycheck":
        seqs = [(p.name, p) for p in sorted(root.iterdir()) if (p / "rgb" / "1x").is_dir()]
    else:
        raise InputError(f"unknown dataset '{dataset}' (one of: davis2016, davis2017, "
                         "sintel, tum, bonn, vkitti, pointodyssey, dycheck)")
    if not seqs:
        raise InputError(f"no {dataset} sequences under {root}")
    return seqs
