"""``vggt4d-replay``: offline replay of a bag / folder / video / dataset through the stream engine.

    vggt4d-replay INPUT --out DIR [--checkpoint PATH|HF_ID|random_tiny] [--window 16 --stride 8]

Every frame is processed (``keep_all`` drop policy: nothing is dropped for lack of time or
room) by the same :class:`~vggt4d_ros.stream.engine.StreamEngine` the ROS node runs, built by
the same ``stream.factory.build_predictor``. The node's input rules still apply: a frame with a
duplicate or slightly reordered stamp is dropped and counted (``summary.json`` frames.dropped,
dropped_frames), a jump back in time starts a new sequence (``resets``). Nothing is written
at ``DIR`` until the run completes: outputs go to a temporary sibling folder that is renamed
to ``DIR`` at the end.

Outputs (``DIR/``)::

    bag/                   rosbag2 (sqlite3, or mcap with --storage mcap) with the node's topics,
                           message types, frames and stamps (header stamp = source stamp, log
                           time = header stamp):
                             /vggt4d/odom              nav_msgs/Odometry  odom -> base_link
                             /tf                       tf2_msgs/TFMessage odom -> base_link
                             /tf_static                tf2_msgs/TFMessage base_link -> camera
                             /vggt4d/path              nav_msgs/Path      (every frame)
                             /vggt4d/dynamic_mask      sensor_msgs/Image  mono8, 255 = dynamic
                             /vggt4d/dynamic_mask/camera_info  sensor_msgs/CameraInfo
                             /vggt4d/depth             sensor_msgs/Image  32FC1
                             /vggt4d/depth_static      sensor_msgs/Image  32FC1, NaN = dynamic
                             /vggt4d/confidence        sensor_msgs/Image  32FC1
                             /vggt4d/static_points     sensor_msgs/PointCloud2 per window
                             /vggt4d/static_map        sensor_msgs/PointCloud2 once, at the end
                             /vggt4d/status            vggt4d_ros/msg/Status (if msg/ found)
    trajectory.txt         TUM ``t tx ty tz qx qy qz qw``: camera (optical frame) pose in odom,
                           every frame with a finite pose (as published on /vggt4d/odom)
    static_map.ply         voxel map in odom (binary PLY: x y z red green blue count)
    masks/000000.png       mono8 dynamic masks (255 = dynamic) at the model resolution
    depth/000000.npz       ``depth`` [H,W] float32 (odom scale), ``confidence`` [H,W] float32,
                           ``intrinsic`` [3,3] pixels (model resolution)
    frames.txt             ``index stamp_ns window state source_name`` per processed frame
    gt/                    ground truth of the input in the same naming (when the input has
                           any): groundtruth.txt (TUM, world_from_cam), masks/, depth/*.npz,
                           gt.npz (stamps_ns, intrinsics, cam_from_world) — for ``vggt4d-eval``
    viz/                   pictures (see tools/visualize.py), unless --no-viz
    summary.json           settings, input, frames, windows, states, timings per stage, weights

Frames and messages follow the node (ros/node.py) with its default parameters:
``odom_from_base = odom_from_world · world_from_cam · cam_from_base`` with
``odom_from_world = base_from_cam`` (the engine's world is the first camera, at the identity, so
base_link starts at the identity of odom); ``base_from_cam`` = camera optical frame at the base
origin (REP-103 body axes); pose covariance rotated into base_link axes and sanitised; status and
window points after every engine call that emitted frames; the static map once, at the end.

Exit codes: 0 success; 2 bad input or arguments (one-line message on stderr, nothing
written at DIR); 1 internal failure (one line, nothing written at DIR).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from vggt4d_ros.geometry.transforms import invert_se3
from vggt4d_ros.stream.factory import NUMERICS
from vggt4d_ros.stream.odom import (LINK_FROM_OPTICAL, OdomFrames, TwistEstimator,
                                    covariance_in_base)
from vggt4d_ros.tools.atomic import atomic_output_dir
from vggt4d_ros.tools.cli_util import first_line, report_failure
from vggt4d_ros.tools.datasets import Frame, FrameSource, InputError, open_source, SOURCE_KINDS

RANDOM_WEIGHTS_NOTE = "random weights: geometry is meaningless"
NODE_NS = "/vggt4d"
TOPICS = {
    "odom": f"{NODE_NS}/odom", "tf": "/tf", "tf_static": "/tf_static", "path": f"{NODE_NS}/path",
    "mask": f"{NODE_NS}/dynamic_mask", "mask_info": f"{NODE_NS}/dynamic_mask/camera_info",
    "depth": f"{NODE_NS}/depth", "depth_static": f"{NODE_NS}/depth_static",
    "confidence": f"{NODE_NS}/confidence", "static_points": f"{NODE_NS}/static_points",
    "static_map": f"{NODE_NS}/static_map", "status": f"{NODE_NS}/status",
}
STATUS_CODES = {"WAITING": 0, "TRACKING": 1, "LOST": 2, "RESET": 3}
MAX_PATH_POSES = 10_000          # node: the Path keeps the last 10 000 poses
class ReplayError(Exception):
    """Internal failure of a replay (not the input's fault)."""


@dataclass
class ReplaySettings:
    """Everything that determines a replay's outputs (recorded in summary.json)."""

    checkpoint: str = "facebook/VGGT-1B"
    window: int = 16
    stride: int = 8
    resolution: int = 518            # model input width, pixels (VGGT: 518)
    keyframes: int = 0               # older keyframes per window (node: window.keyframes)
    min_window: int = 0              # CUDA-OOM fallback floor, frames; 0 = stride + 1
                                     # (node: window.min_size)
    device: str = "auto"             # auto = cuda if available, else cpu
    dtype: str = "auto"              # auto = bf16/fp16 on cuda, fp32 on cpu (node: model.dtype)
    dynamic: bool = True             # False = plain VGGT (no VGGT4D masks / key suppression)
    refine: bool = True              # VGGT4D mask refinement
    cuda_graphs: bool = True         # CUDA-graph k-means (node: vggt4d.cuda_graphs)
    numerics: str = "fast"           # fast | official (node: model.numerics)
    pipelined: bool = True           # predict ahead, same outputs (node: window.pipelined)
    voxel_size: float = 0.05         # static map voxel, odom units (node: map.voxel_size)
    max_voxels: int = 500_000        # node: map.max_voxels
    backwards_reset_s: float = 0.5   # node: stamps.backwards_reset
    seed: int = 0
    storage: str = "sqlite3"
    bag: bool = True
    viz: bool = True
    depth_format: str = "npz"        # "npz" (float32) or "png16" (uint16 millimetres)
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    camera_frame: str = "camera_optical_frame"
    input_kind: str = "auto"
    topic: str | None = None
    input_stride: int = 1
    max_frames: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers
def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _save_mono8(path: Path, img: np.ndarray) -> None:
    """Write a mono8 PNG; ReplayError (saying why, if it can tell) when OpenCV cannot."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(img, np.uint8)):
        why = "its folder vanished" if not path.parent.is_dir() else \
            f"image {img.shape} {img.dtype}"
        raise ReplayError(f"cannot write {path} ({why})")


def _find_msg_dir() -> Path | None:
    """The package's ``msg/`` folder (source checkout or ament share), if present."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "msg", here.parents[3] / "share" / "vggt4d_ros" / "msg"):
        if (cand / "Status.msg").is_file():
            return cand
    return None


class Timer:
    """Accumulates wall-clock seconds per stage name."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += seconds

    def run(self, stage: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.totals[stage] += time.perf_counter() - t0


# --------------------------------------------------------------------------- bag output
class BagOutput:
    """Writes the node's topics for each frame / window into a rosbag2 (via tools.rosbag_io)."""

    def __init__(self, path: Path, settings: ReplaySettings) -> None:
        from vggt4d_ros.tools import rosbag_io as bio
        self.bio = bio
        msg_dir = _find_msg_dir()
        self.ts = bio.get_ros2_typestore([msg_dir]) if msg_dir else bio.get_ros2_typestore()
        self.has_status = msg_dir is not None
        self.s = settings
        self.writer = bio.BagWriter(path, settings.storage, typestore=self.ts)
        self.path_poses: list[tuple[int, np.ndarray]] = []
        self.base_from_cam = LINK_FROM_OPTICAL
        self.static_sent = False

    def frame(self, stamp: int, odom_from_base: np.ndarray | None, cov: np.ndarray,
              twist: tuple[np.ndarray, np.ndarray], mask: np.ndarray, depth: np.ndarray,
              conf: np.ndarray, intrinsic: np.ndarray, camera_frame: str) -> None:
        """Per-frame messages, as the node publishes them (odom/TF/path only for a finite pose).

        ``cov``: pose covariance [6,6] in base_link axes (already sanitised); ``twist``:
        (twist [6], covariance [6,6]) from the shared TwistEstimator."""
        b, s, ts = self.bio, self.s, self.ts
        if not self.static_sent:        # base_link -> camera optical frame, once (latched)
            self.writer.write(TOPICS["tf_static"], stamp, b.tf_message([b.transform_stamped_msg(
                self.base_from_cam, stamp, s.base_frame, s.camera_frame, typestore=ts)],
                typestore=ts))
            self.static_sent = True
        if odom_from_base is not None:
            self.writer.write(TOPICS["odom"], stamp, b.odometry_msg(
                odom_from_base, stamp, s.odom_frame, s.base_frame, pose_covariance=cov,
                twist=twist[0], twist_covariance=twist[1], typestore=ts))
            self.writer.write(TOPICS["tf"], stamp, b.tf_message([b.transform_stamped_msg(
                odom_from_base, stamp, s.odom_frame, s.base_frame, typestore=ts)], typestore=ts))
            self.path_poses.append((stamp, odom_from_base))
            del self.path_poses[:-MAX_PATH_POSES]
            self.writer.write(TOPICS["path"], stamp, b.path_msg(self.path_poses, stamp,
                                                                s.odom_frame, typestore=ts))
        h, w = mask.shape
        self.writer.write(TOPICS["mask"], stamp, b.image_msg(
            mask.astype(np.uint8) * 255, stamp, camera_frame, "mono8", typestore=ts))
        self.writer.write(TOPICS["mask_info"], stamp, b.camera_info_msg(
            intrinsic, w, h, stamp, camera_frame, typestore=ts))
        d = depth.astype(np.float32)
        self.writer.write(TOPICS["depth"], stamp, b.image_msg(d, stamp, camera_frame, "32FC1",
                                                              typestore=ts))
        self.writer.write(TOPICS["depth_static"], stamp, b.image_msg(
            np.where(mask, np.float32(np.nan), d), stamp, camera_frame, "32FC1", typestore=ts))
        self.writer.write(TOPICS["confidence"], stamp, b.image_msg(
            conf.astype(np.float32), stamp, camera_frame, "32FC1", typestore=ts))

    def window(self, stamp: int, points: np.ndarray, colors: np.ndarray,
               confidence: np.ndarray) -> None:
        """Per-window static points (odom frame; x y z rgb confidence)."""
        self.writer.write(TOPICS["static_points"], stamp, self.bio.pointcloud2_msg(
            points, stamp, self.s.odom_frame, colors=colors,
            fields={"confidence": np.asarray(confidence, np.float32)}, typestore=self.ts))

    def status(self, stamp: int, state: str, counters: dict[str, int], residual: float,
               scale_drift: float, message: str) -> None:
        """vggt4d_ros/msg/Status after every processed frame (if the type is known)."""
        if not self.has_status:
            return
        cls = self.ts.types["vggt4d_ros/msg/Status"]
        msg = cls(header=self.bio.header_msg(stamp, self.s.odom_frame, self.ts),
                  state=STATUS_CODES.get(state, 0), state_name=state,
                  frames_received=counters["received"], frames_processed=counters["processed"],
                  frames_dropped=counters["dropped"], windows=counters["windows"],
                  last_alignment_residual=float(residual), scale_drift=float(scale_drift),
                  latency=0.0, queue_depth=0, message=message)
        self.writer.write(TOPICS["status"], stamp, msg)

    def finish(self, stamp: int, points: np.ndarray, colors: np.ndarray,
               confidence: np.ndarray | None) -> None:
        """Static map once at the end (x y z rgb confidence, odom), then close (moves the bag
        into place)."""
        conf = np.ones(len(points), np.float32) if confidence is None else confidence
        self.writer.write(TOPICS["static_map"], stamp, self.bio.pointcloud2_msg(
            points, stamp, self.s.odom_frame, colors=colors,
            fields={"confidence": np.asarray(conf, np.float32)}, typestore=self.ts))
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


# --------------------------------------------------------------------------- ground truth
class GroundTruthOutput:
    """Writes ``gt/`` (TUM trajectory, masks, depth, gt.npz) for frames that have GT."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stamps: list[int] = []
        self.poses: list[np.ndarray] = []
        self.intr: list[np.ndarray] = []
        self.any = False

    def add(self, name: str, frame: Frame) -> None:
        if frame.mask is not None:
            (self.root / "masks").mkdir(parents=True, exist_ok=True)
            _save_mono8(self.root / "masks" / f"{name}.png", frame.mask.astype(np.uint8) * 255)
            self.any = True
        if frame.depth is not None:
            (self.root / "depth").mkdir(parents=True, exist_ok=True)
            save_npz_deterministic(self.root / "depth" / f"{name}.npz",
                                   depth=frame.depth.astype(np.float32))
            self.any = True
        if frame.world_from_cam is not None:
            self.stamps.append(frame.stamp_ns)
            self.poses.append(frame.world_from_cam)
            self.intr.append(frame.intrinsic if frame.intrinsic is not None
                             else np.full((3, 3), np.nan))

    def finish(self) -> bool:
        """Write the trajectory files; returns whether any GT was written."""
        from vggt4d_ros.tools.metrics import write_tum
        if self.poses:
            self.root.mkdir(parents=True, exist_ok=True)
            wfc = np.stack(self.poses)
            write_tum(self.root / "groundtruth.txt", self.stamps, wfc)
            save_npz_deterministic(self.root / "gt.npz",
                                   stamps_ns=np.asarray(self.stamps, np.int64),
                                   intrinsics=np.stack(self.intr),
                                   cam_from_world=invert_se3(wfc))
            self.any = True
        return self.any


# --------------------------------------------------------------------------- predictor
def is_random_weights(checkpoint: str) -> bool:
    """True for the tiny random-weight configurations (``random_tiny`` and friends)."""
    return str(checkpoint).startswith("random")


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_predictor(settings: ReplaySettings) -> Any:
    """Build the window predictor exactly as the node does (``stream.factory``)."""
    from vggt4d_ros.stream import factory
    cfg = factory.PredictorConfig(**_known_fields(factory.PredictorConfig, {
        "checkpoint": settings.checkpoint, "device": resolve_device(settings.device),
        "dtype": settings.dtype, "image_width": settings.resolution, "seed": settings.seed,
        "dynamic": settings.dynamic, "refine": settings.refine,
        "cuda_graphs": settings.cuda_graphs, "numerics": settings.numerics}))
    return factory.build_predictor(cfg)


def make_engine(predictor: Any, settings: ReplaySettings) -> Any:
    """StreamEngine as the node configures it, but with the keep_all drop policy (offline:
    every frame is processed)."""
    from vggt4d_ros.stream.engine import StreamConfig, StreamEngine
    return StreamEngine(predictor, StreamConfig(**_known_fields(StreamConfig, {
        "window_size": settings.window, "stride": settings.stride,
        "max_keyframes": settings.keyframes, "drop_policy": "keep_all",
        "backwards_reset_s": settings.backwards_reset_s, "voxel_size": settings.voxel_size,
        "max_voxels": settings.max_voxels, "seed": settings.seed,
        "pipelined": settings.pipelined})))


# --------------------------------------------------------------------------- the replay
@dataclass
class ReplayResult:
    """What a replay wrote: the final output folder and its summary."""

    out_dir: Path
    summary: dict[str, Any]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise InputError(f"output {out} exists and is not an empty folder (use --overwrite)")


def run_replay(source: FrameSource, out_dir: str | Path, settings: ReplaySettings,
               predictor: Any | None = None, weights_note: str | None = None,
               overwrite: bool = False, progress: bool = True) -> ReplayResult:
    """Replay ``source`` through a StreamEngine and write all outputs at ``out_dir`` atomically.

    Args:
        source: frames (see tools.datasets).
        settings: replay settings; ``predictor``: a WindowPredictor to use instead of
            ``make_predictor(settings)`` (tests: the ground-truth predictor).
        weights_note: text recorded as ``summary["weights"]`` and drawn on every picture;
            defaults to RANDOM_WEIGHTS_NOTE for random checkpoints.
    Raises:
        InputError for bad input (nothing is left at ``out_dir``); ReplayError otherwise.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    with atomic_output_dir(out) as tmp:
        summary = _ReplayRun(source, tmp, settings, predictor, weights_note, progress).run()
    return ReplayResult(out, summary)


class _ReplayRun:
    """One replay writing everything under ``root`` (see :func:`run_replay`).

    The loop mirrors the node's worker: ``submit`` each frame (the engine's input rules may drop
    it), ``poll`` the engine one window at a time, write the outputs of the emitted frames, then
    the window points and the status; ``flush`` at the end of the input.
    """

    def __init__(self, source: FrameSource, root: Path, settings: ReplaySettings,
                 predictor: Any | None, weights_note: str | None, progress: bool) -> None:
        import torch
        from tqdm import tqdm
        torch.manual_seed(settings.seed)
        np.random.seed(settings.seed)
        self.source, self.root, self.s = source, root, settings
        self.timer = Timer()
        if predictor is None:
            predictor = self.timer.run("load_model", make_predictor, settings)
        if weights_note is None and (is_random_weights(settings.checkpoint)
                                     or getattr(predictor, "random_weights", False)):
            weights_note = RANDOM_WEIGHTS_NOTE
        self.predictor_name = type(predictor).__name__
        from vggt4d_ros.stream.fallback import with_oom_fallback
        predictor = with_oom_fallback(predictor, settings.min_window, settings.stride)
        self.predictor, self.weights_note = predictor, weights_note
        self.engine = make_engine(predictor, settings)
        self.twist = TwistEstimator()           # as the node: base_link velocity
        self.odom = OdomFrames(LINK_FROM_OPTICAL)
        (root / "masks").mkdir()
        (root / "depth").mkdir()
        self.bag = BagOutput(root / "bag", settings) if settings.bag else None
        self.gt = GroundTruthOutput(root / "gt")
        self.viz = None
        if settings.viz:
            from vggt4d_ros.tools.visualize import VizWriter
            self.viz = VizWriter(root / "viz", label=weights_note)
        self.pending: deque[tuple[int, Frame]] = deque()   # accepted, not yet output (in order)
        self.dropped: Counter[str] = Counter()              # engine input rules (duplicate, ...)
        self.drop_log: list[dict[str, Any]] = []
        self.traj: list[tuple[int, np.ndarray]] = []        # (stamp, odom_from_cam)
        self.lines: list[str] = []                          # frames.txt
        self.states: Counter[str] = Counter()
        self.transitions: list[dict[str, Any]] = []
        self.counters = {"received": 0, "processed": 0, "windows": 0, "dropped": 0}
        self.window_stages: Counter[str] = Counter()        # engine/predictor seconds, summed
        self.last_state, self.status_state = "WAITING", "WAITING"
        self.last_window: int | None = None
        self.last_stamp = 0
        self.bar = tqdm(total=len(source), unit="frame", desc="replay", disable=not progress,
                        dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Process the whole input, write the end-of-stream files; returns the summary."""
        t_start = time.perf_counter()
        try:
            it = iter(self.source)
            while True:
                t0 = time.perf_counter()
                frame = next(it, None)
                self.timer.add("read", time.perf_counter() - t0)
                if frame is None:
                    break
                self._feed(frame)
            while self._poll_one():                 # the windows still queued, one by one
                pass
            self._emit(self.timer.run("engine", self.engine.flush))
        except BaseException:
            self.bar.close()
            if self.bag is not None:
                self.bag.abort()
            raise
        self.bar.close()
        if self.pending:
            raise ReplayError(f"{len(self.pending)} accepted frames were never output by the "
                              "engine (keep_all must process every frame)")
        if self.counters["received"] == 0:
            raise InputError("input has no frames")
        return self._finish(time.perf_counter() - t_start)

    def _feed(self, frame: Frame) -> None:
        """Submit one frame (the node's input rules apply: duplicate / reordered stamps are
        dropped and counted, a jump backwards starts a new sequence), then poll the engine."""
        from vggt4d_ros.stream.engine import FrameInput
        self.counters["received"] += 1
        reason = self.timer.run("engine", self.engine.submit, FrameInput(
            stamp_ns=int(frame.stamp_ns), image=frame.image, frame_id=self.s.camera_frame))
        if reason is not None:
            self.dropped[str(reason)] += 1
            self.counters["dropped"] += 1
            self.drop_log.append({"index": frame.index, "stamp_ns": frame.stamp_ns,
                                  "reason": str(reason)})
            self.bar.update(1)
            return
        self.pending.append((frame.index, frame))
        # Run a window only once the one after it is queued too: the pipelined engine then
        # predicts that one on the GPU while this one is emitted and written (what is emitted
        # does not depend on when poll runs; a few more frames wait in the queue).
        c = self.engine.counters
        if c.queue_depth + c.pending >= self.s.window + self.s.stride:
            self._poll_one()

    def _poll_one(self) -> bool:
        """Run at most one window and write it; False when none ran."""
        outs = self.timer.run("engine", self.engine.poll, max_windows=1)
        self._emit(outs)
        return bool(outs)

    def _emit(self, outs: Sequence[Any]) -> None:
        """Write the emitted frames, then (like the node's worker) window points and status."""
        for fo in outs:
            if not self.pending or self.pending[0][1].stamp_ns != fo.stamp_ns:
                raise ReplayError(f"engine emitted stamp {fo.stamp_ns} out of input order")
            idx, frame = self.pending.popleft()
            self._write_frame(idx, frame, fo)
            self.bar.update(1)
        self._after_engine_call(outs)

    # ------------------------------------------------------------------ per frame / window
    def _write_frame(self, idx: int, frame: Frame, fo: Any) -> None:
        """All per-frame outputs of one emitted FrameOutput ``fo`` (source frame ``frame``)."""
        name, s, odom = f"{idx:06d}", self.s, self.odom
        if fo.state != self.last_state:
            self.transitions.append({"index": idx, "stamp_ns": fo.stamp_ns,
                                     "from": self.last_state, "to": fo.state})
            self.last_state = fo.state
        self.states[fo.state] += 1
        t0 = time.perf_counter()
        wfc = np.asarray(fo.world_from_cam, np.float64)
        odom_cam = odom.odom_from_cam(wfc) if np.all(np.isfinite(wfc)) else None
        if odom_cam is not None:
            self.traj.append((fo.stamp_ns, odom_cam))
        mask = np.asarray(fo.mask, bool)
        depth = np.asarray(fo.depth, np.float32)
        conf = np.asarray(fo.confidence, np.float32)
        intrinsic = np.asarray(fo.intrinsic, np.float64)
        _save_mono8(self.root / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
        if s.depth_format == "png16":
            mm = np.clip(np.nan_to_num(depth * 1000.0, nan=0.0), 0, 65535).astype(np.uint16)
            if not cv2.imwrite(str(self.root / "depth" / f"{name}.png"), mm):
                raise ReplayError(f"cannot write depth PNG for frame {name}")
        else:
            save_npz_deterministic(self.root / "depth" / f"{name}.npz", depth=depth,
                                   confidence=conf, intrinsic=intrinsic)
        self.gt.add(name, frame)
        self.counters["processed"] += 1
        if self.bag is not None:
            base = None if odom_cam is None else odom_cam @ odom.cam_from_base
            cov = covariance_in_base(fo.covariance, odom.base_from_cam)
            twist = (self.twist.update(fo.stamp_ns, fo.sequence, base, cov, fo.trusted)
                     if base is not None else None)
            self.bag.frame(fo.stamp_ns, base, cov, twist, mask, depth, conf, intrinsic,
                           fo.frame_id or s.camera_frame)
        self.lines.append(f"{idx} {fo.stamp_ns} {fo.window_index} {fo.state} {frame.name}")
        self.timer.add("write", time.perf_counter() - t0)
        if self.viz is not None:
            self.timer.run("viz", self.viz.add_frame, name, np.asarray(fo.image, np.uint8), mask,
                           depth, conf)
        self.last_stamp = fo.stamp_ns

    def _after_engine_call(self, outs: Sequence[Any]) -> None:
        """Static points of a new window and the status message (node order)."""
        win = self.engine.last_window
        if win is not None and win.window_index != self.last_window:
            self.last_window = win.window_index
            self.counters["windows"] += 1
            for stage, sec in (getattr(win, "timings", None) or {}).items():
                if isinstance(sec, (int, float)):
                    self.window_stages[stage] += float(sec)
            if self.bag is not None and outs:
                self.timer.run("write", self.bag.window, outs[-1].stamp_ns,
                               self.odom.points_to_odom(win.static_points),
                               np.asarray(win.colors, np.uint8).reshape(-1, 3),
                               np.asarray(win.confidence, np.float32).reshape(-1))
        state = self.engine.state
        if self.bag is not None and (outs or state != self.status_state):
            self.status_state = state
            res = float(win.residual) if win is not None else float("nan")
            drift = float(win.scale_drift) if win is not None else float("nan")
            self.timer.run("write", self.bag.status, outs[-1].stamp_ns if outs else self.last_stamp,
                           state, self.counters, res, drift,
                           getattr(win, "reason", "") if win is not None else "")

    # ------------------------------------------------------------------ end of stream
    def _finish(self, wall_loop: float) -> dict[str, Any]:
        """Map, trajectory, frames.txt, bag end, ground truth, pictures, summary.json."""
        from vggt4d_ros.geometry.voxel import write_ply
        from vggt4d_ros.tools.metrics import write_tum
        root, t0 = self.root, time.perf_counter()
        arr = self.engine.static_map.to_arrays()
        map_pts = self.odom.points_to_odom(arr["points"])
        map_cols = np.asarray(arr["colors"], np.uint8).reshape(-1, 3)
        write_ply(root / "static_map.ply", map_pts, map_cols, arr.get("counts"))
        if self.traj:
            write_tum(root / "trajectory.txt", [st for st, _ in self.traj],
                      np.stack([t for _, t in self.traj]))
        else:
            (root / "trajectory.txt").write_text(
                "# timestamp tx ty tz qx qy qz qw (world_from_cam)\n")
        (root / "frames.txt").write_text("# index stamp_ns window state source_name\n"
                                         + "".join(f"{ln}\n" for ln in self.lines))
        if self.bag is not None:
            self.bag.finish(self.last_stamp, map_pts, map_cols, arr.get("confidence"))
        has_gt = self.gt.finish()
        self.timer.add("write", time.perf_counter() - t0)
        viz_files: dict[str, str] = {}
        if self.viz is not None:
            poses = np.stack([t for _, t in self.traj]) if self.traj else np.zeros((0, 4, 4))
            viz_files = self.timer.run("viz", self.viz.finish, map_pts, map_cols, poses)
        wall = wall_loop + (time.perf_counter() - t0)
        summary = self._summary(len(map_pts), has_gt, viz_files, wall)
        (root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary

    def _summary(self, map_points: int, has_gt: bool, viz_files: dict[str, str],
                 wall: float) -> dict[str, Any]:
        """summary.json content. Everything except ``timings`` is deterministic."""
        s, c = self.s, self.counters
        return {
            "tool": "vggt4d-replay",
            "input": self.source.describe(),
            "settings": asdict(s),
            "weights": self.weights_note or f"checkpoint {s.checkpoint}",
            "predictor": self.predictor_name,
            "oom_fallback": self.predictor.stats(),
            "frames": {"received": c["received"], "processed": c["processed"],
                       "dropped": c["dropped"],
                       "dropped_by_reason": dict(sorted(self.dropped.items()))},
            "dropped_frames": self.drop_log,
            "resets": dict(sorted(getattr(self.engine.counters, "resets", {}).items())),
            "windows": c["windows"],
            "states": dict(sorted(self.states.items())),
            "state_transitions": self.transitions,
            "trajectory_poses": len(self.traj),
            "static_map_points": map_points,
            "ground_truth": "gt/" if has_gt else None,
            "viz": {k: f"viz/{v}" for k, v in viz_files.items()},
            "topics": TOPICS if s.bag else {},
            "timings": {
                "wall_s": round(wall, 4),
                "frames_per_s": round(c["processed"] / wall, 4) if wall > 0 else None,
                "stages_s": {k: round(v, 4) for k, v in sorted(self.timer.totals.items())},
                "window_stages_s": {k: round(v, 4)
                                    for k, v in sorted(self.window_stages.items())},
            },
        }


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``vggt4d-replay``."""
    p = argparse.ArgumentParser(
        prog="vggt4d-replay",
        description="Replay a rosbag2 / image folder / video / dataset sequence through the "
                    "VGGT4D stream engine (no ROS runtime needed) and write a bag of the node's "
                    "topics, a TUM trajectory, a PLY map, masks, depth, pictures and a summary.")
    p.add_argument("input", type=Path, help="bag folder or .mcap/.db3, image folder, video file, "
                                            "or dataset sequence folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--kind", default="auto", choices=("auto",) + SOURCE_KINDS,
                   help="input kind (default: detect from the layout)")
    p.add_argument("--topic", default=None, help="bag image topic (needed if several)")
    p.add_argument("--gt-topic", default="auto",
                   help="bag nav_msgs/Odometry ground-truth topic ('auto': the unique one named "
                        "like ground truth; 'none': ignore)")
    p.add_argument("--sequence", default=None,
                   help="sequence name when INPUT is a DAVIS or Sintel dataset root")
    p.add_argument("--checkpoint", default=os.environ.get("VGGT4D_CHECKPOINT",
                                                          "facebook/VGGT-1B"),
                   help="local checkpoint path, Hugging Face id, or random_tiny "
                        "(default: $VGGT4D_CHECKPOINT or facebook/VGGT-1B)")
    p.add_argument("--window", type=int, default=16, help="frames per window")
    p.add_argument("--stride", type=int, default=8, help="new frames per window")
    p.add_argument("--resolution", type=int, default=518, help="model input width, pixels")
    p.add_argument("--keyframes", type=int, default=0, help="older keyframes per window")
    p.add_argument("--min-window", type=int, default=0,
                   help="on CUDA out-of-memory, windows shrink down to this many frames "
                        "(0: stride + 1, every new frame still predicted)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="inference dtype (auto: bf16/fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-dynamic", action="store_true", help="plain VGGT (no VGGT4D masks)")
    p.add_argument("--no-refine", action="store_true", help="skip VGGT4D mask refinement")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: k-means loops and threshold as CUDA-graph replays (same "
                        "results; default on; node: vggt4d.cuda_graphs)")
    p.add_argument("--numerics", choices=NUMERICS, default="fast",
                   help="GPU numerics: fast (bf16 depth head, GEMM-fused tanh GELU) or official "
                        "(float32 heads, exact GELU); node: model.numerics")
    p.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True,
                   help="predict the next window while this one is written (same outputs; "
                        "default on; node: window.pipelined)")
    p.add_argument("--voxel-size", type=float, default=0.05, help="static map voxel, odom units")
    p.add_argument("--input-stride", type=int, default=1, help="use every N-th input frame")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    p.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3",
                   help="output bag storage")
    p.add_argument("--no-bag", action="store_true", help="do not write the output bag")
    p.add_argument("--no-viz", action="store_true", help="do not write pictures")
    p.add_argument("--depth-format", choices=("npz", "png16"), default="npz",
                   help="depth files: float32 npz or 16-bit PNG in millimetres")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def settings_from_args(a: argparse.Namespace) -> ReplaySettings:
    """ReplaySettings from parsed CLI arguments (validated)."""
    if a.window < 2 or a.stride < 1 or a.stride >= a.window:
        raise InputError(f"need --window >= 2 and 1 <= --stride < --window, got "
                         f"{a.window}/{a.stride}")
    if a.min_window and not 2 <= a.min_window <= a.window:
        raise InputError(f"--min-window must be 0 or in [2, --window], got {a.min_window}")
    if a.resolution < 14 or a.resolution % 14:
        raise InputError(f"--resolution must be a positive multiple of 14, got {a.resolution}")
    return ReplaySettings(
        checkpoint=str(a.checkpoint), window=a.window, stride=a.stride, resolution=a.resolution,
        keyframes=a.keyframes, min_window=a.min_window, device=a.device, dtype=a.dtype,
        dynamic=not a.no_dynamic, refine=not a.no_refine, cuda_graphs=a.cuda_graphs,
        numerics=a.numerics, pipelined=a.pipelined,
        voxel_size=a.voxel_size, seed=a.seed, storage=a.storage, bag=not a.no_bag,
        viz=not a.no_viz, depth_format=a.depth_format, input_kind=a.kind, topic=a.topic,
        input_stride=a.input_stride, max_frames=a.max_frames)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vggt4d-replay``. Returns the exit code (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        settings = settings_from_args(a)
        _check_out_dir(a.out, a.overwrite)
        extra = {"sequence": a.sequence} if a.sequence else {}
        source = open_source(a.input, a.kind, topic=a.topic, stride=a.input_stride,
                             max_frames=a.max_frames,
                             gt_topic=None if a.gt_topic == "none" else a.gt_topic, **extra)
        next(iter(source))          # fail fast on an unreadable first frame, before the model
        res = run_replay(source, a.out, settings, overwrite=a.overwrite, progress=not a.quiet)
    except InputError as exc:
        print(f"vggt4d-replay: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggt4d-replay: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users; the traceback is not for them
        if type(exc).__name__ == "CheckpointError":     # model.checkpoint: weights not usable
            print(f"vggt4d-replay: error: {first_line(exc)}", file=sys.stderr)
            return 2
        return report_failure("vggt4d-replay", exc)
    s = res.summary
    print(f"wrote {s['frames']['processed']} frames, {s['windows']} windows to {res.out_dir}"
          + (f"  [{s['weights']}]" if is_random_weights(settings.checkpoint) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
