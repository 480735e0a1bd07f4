"""The ``vggt4d`` node: camera images in; odometry, TF, dynamic masks, depth, static clouds out.

Threads: image/camera_info callbacks (one mutually-exclusive group) only convert the message,
check it and hand it to :meth:`StreamEngine.submit` (cheap, bounded queue, drop policy);
one worker thread runs :meth:`StreamEngine.poll` one window at a time and publishes it; with
``window.pipelined`` the engine's own prediction thread already runs the next window on the GPU
meanwhile (started by ``submit`` once its frames are queued). Timers (diagnostics, static map)
and services run in their own groups on a MultiThreadedExecutor. No callback ever waits for
the model.

Frames (REP-105): ``odom -> base_link`` (odometry, /tf) and ``base_link -> camera optical
frame`` (/tf_static, from parameters). The engine's world is the optical frame of the first
camera of the sequence; it is mapped into odom so that base_link starts at the identity.
Every per-frame output carries its source image's header stamp; camera-aligned images keep the
source frame_id; poses, paths and clouds are in the odom frame.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry, Path
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile,
                       QoSReliabilityPolicy)
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from vggt4d_ros.msg import Status
from vggt4d_ros.stream.engine import FrameInput
from vggt4d_ros.stream.odom import (LINK_FROM_OPTICAL, OdomFrames, TwistEstimator,
                                    covariance_in_base)

from . import params as P
from .image_conv import ImageConversionError, array_to_image, image_to_rgb
from .paths import PathEscapeError, confine, write_confined
from .pointcloud import points_to_cloud
from .stamp_match import StampCache, stamp_to_ns
from .transforms import (make_transform_stamped, matrix_from_xyz_rpy, matrix_to_pose,
                         quat_xyzw_from_matrix)

NODE_NAME = "vggt4d"
STATE_CODES = {"WAITING": Status.WAITING, "TRACKING": Status.TRACKING, "LOST": Status.LOST,
               "RESET": Status.RESET}
#: Bad-input classes, each a counter in /diagnostics (always present, 0 when never seen).
BAD_INPUT_CLASSES = ("unsupported_encoding", "zero_size", "truncated", "bad_step",
                     "image_size_changed", "stamp_backwards", "stamp_not_increasing",
                     "missing_camera_info", "invalid_camera_info", "inference_error",
                     "invalid_parameter")
PENDING_STAMPS_MIN = 1000  # receive-time table bound (latency), entries


class StartupError(RuntimeError):
    """The node cannot start (checkpoint, device, parameters); the message says what to do."""


def ns_to_time(stamp_ns: int) -> Time:
    """Integer nanoseconds → builtin_interfaces/Time."""
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def resolve_device(requested: str, cuda_available: Optional[bool] = None) -> tuple[str, str]:
    """``auto``/``cpu``/``cuda`` → (device, warning or ""). Raises StartupError for ``cuda``
    when no CUDA device is usable."""
    if cuda_available is None:
        import torch
        cuda_available = bool(torch.cuda.is_available())
    if requested == "cpu":
        return "cpu", ""
    if requested == "cuda":
        if not cuda_available:
            raise StartupError("model.device is 'cuda' but no CUDA device is available "
                               "(torch.cuda.is_available() is False); set model.device to "
                               "'cpu' or 'auto', or fix the GPU driver/container")
        return "cuda", ""
    if cuda_available:
        return "cuda", ""
    return "cpu", "model.device 'auto': no CUDA device available, running on the CPU (slow)"


def default_engine_factory(settings: P.NodeSettings, device: str):
    """The real engine: ``build_predictor`` (VGGT4D on a checkpoint, or tiny random weights)
    wrapped in a ``StreamEngine``. Raises StartupError with an actionable message."""
    from vggt4d_ros.stream.engine import StreamEngine
    from vggt4d_ros.stream.factory import build_predictor
    try:
        predictor = build_predictor(predictor_config(settings, device))
    except StartupError:
        raise
    except Exception as exc:  # checkpoint missing / truncated / wrong architecture, ...
        raise StartupError(f"cannot load model.checkpoint '{settings['model.checkpoint']}' on "
                           f"{device}: {exc}") from exc
    from vggt4d_ros.stream.fallback import with_oom_fallback
    predictor = with_oom_fallback(predictor, settings["window.min_size"], settings["window.stride"])
    return StreamEngine(predictor, stream_config(settings))


def predictor_config(settings: P.NodeSettings, device: str):
    """The factory's config from the node settings (see stream/factory.py)."""
    from vggt4d_ros.stream import factory
    return factory.PredictorConfig(**_known_fields(factory.PredictorConfig, {
        "checkpoint": settings["model.checkpoint"],
        "device": device,
        "dtype": settings["model.dtype"],
        "numerics": settings["model.numerics"],
        "image_width": settings["model.image_width"],
        "seed": settings["model.seed"],
        "dynamic": settings["vggt4d.dynamic"],
        "refine": settings["vggt4d.refine"],
        "cluster_backend": settings["vggt4d.cluster_backend"],
        "cuda_graphs": settings["vggt4d.cuda_graphs"],
    }))


def stream_config(settings: P.NodeSettings):
    """``StreamConfig`` for the engine from the node settings."""
    from vggt4d_ros.stream.engine import StreamConfig
    return StreamConfig(**_known_fields(StreamConfig, {
        "window_size": settings["window.size"],
        "stride": settings["window.stride"],
        "max_keyframes": settings["window.keyframes"],
        "pipelined": settings["window.pipelined"],
        # the node enforces drop_newest itself; the engine queue only knows drop_oldest
        "drop_policy": "drop_oldest",
        "max_queue": settings["queue_size"],
        "backwards_reset_s": settings["stamps.backwards_reset"],
        "voxel_size": settings["map.voxel_size"],
        "max_voxels": settings["map.max_voxels"],
    }))


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = set(getattr(cls, "__dataclass_fields__", {})) or set(values)
    return {k: v for k, v in values.items() if k in names}


class ThrottledLogger:
    """One log line per key per ``period_s`` (wall clock), with the number suppressed."""

    def __init__(self, logger, period_s: float) -> None:
        self._logger = logger
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warn(self, key: str, message: str, level: str = "warning") -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            n, self._suppressed[key] = self._suppressed[key], 0
        suffix = f" ({n} similar suppressed)" if n else ""
        getattr(self._logger, level)(f"[{key}] {message}{suffix}")


@dataclass
class _Pending:
    """Receive time of a submitted frame (latency = publish - receive, wall clock)."""

    received: float


class Vggt4dNode(Node):
    """VGGT4D perception node; see the module docstring and DESIGN.md for the interface.

    Args:
        engine_factory: ``(settings, device) -> engine`` (defaults to the real StreamEngine
            over ``build_predictor``); tests may pass a factory with another predictor.
        cuda_available: override CUDA detection (tests).
        **kwargs: forwarded to rclpy Node (context, parameter_overrides, cli_args...).
    """

    def __init__(self, engine_factory: Optional[Callable] = None,
                 cuda_available: Optional[bool] = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        # --- 1. parameters, device, engine: all before any topic is advertised
        try:
            self._start_engine(engine_factory or default_engine_factory, cuda_available)
        except BaseException:
            super().destroy_node()
            raise
        self.add_pre_set_parameters_callback(self._count_invalid_parameters)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        s = self.settings
        self.odom_frame, self.base_frame = s["frames.odom_frame"], s["frames.base_frame"]
        self.camera_frame = s["frames.camera_frame"]
        self.base_from_cam = matrix_from_xyz_rpy(s["frames.camera_xyz"],
                                                 s["frames.camera_rpy"]) @ LINK_FROM_OPTICAL
        self.frames = OdomFrames(self.base_from_cam)
        self.log = ThrottledLogger(self.get_logger(), s["log_throttle"])

        # --- 2. state shared between callbacks and the worker
        self._lock = threading.Lock()          # counters, stamps, pending
        self._engine_lock = threading.Lock()   # engine.poll / reset / map snapshots
        self._publish_lock = threading.Lock()  # one window's outputs vs. ~/reset
        self._twist = TwistEstimator()           # base_link velocity from consecutive poses
        self.worker_busy = False   # True while the worker polls (or handles a failed poll)
        self.frames_received = 0
        self.frames_processed = 0
        self.bad_input: Counter[str] = Counter({k: 0 for k in BAD_INPUT_CLASSES})
        self.node_dropped: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=500)
        self._pending: dict[int, _Pending] = {}
        self._last_stamp: Optional[int] = None
        self._awaiting_info: Optional[int] = None
        self._last_shape: Optional[tuple[int, int]] = None
        self._last_output_stamp = 0
        self._last_window_index = -1
        self._reset_count = 0
        self._status_message = ""
        self._last_state = ""
        self._last_map_pub = 0.0
        self._frame_id_warned = False
        self._downscale_logged = False
        self._focal_ratio = math.nan
        self._path = Path()
        self._path.header.frame_id = self.odom_frame
        self._infos: StampCache[CameraInfo] = StampCache(
            capacity=64, tolerance_ns=int(round(s["camera_info.tolerance"] * 1e9)))

        # --- 3. interface
        self._make_publishers()
        self._make_subscriptions()
        grp = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=grp)
        self.create_service(Trigger, "~/save_map", self._on_save_map, callback_group=grp)
        # wall-clock timer: health reports continue while a bag (sim time) is paused
        self.create_timer(1.0, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup(),
                          clock=rclpy.clock.Clock(clock_type=rclpy.clock.ClockType.STEADY_TIME))
        self._publish_static_tf()
        self._publish_status(0, "started")
        self._worker = threading.Thread(target=self._run_worker, name="vggt4d_worker",
                                        daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"vggt4d ready: device {self.device}, window {s['window.size']}/"
            f"{s['window.stride']}, image topic '{self.resolve_topic_name('image')}'")

    def _start_engine(self, engine_factory: Callable, cuda_available: Optional[bool]) -> None:
        """Parameters → settings → device → engine. Raises StartupError (one clear reason)."""
        try:
            P.declare_all(self)
            self.settings = P.read_settings(self)
        except P.ConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.device, warning = resolve_device(self.settings["model.device"], cuda_available)
        if warning:
            self.get_logger().warning(warning)
        if self.settings["model.checkpoint"] == "random_tiny":
            self.get_logger().warning("model.checkpoint 'random_tiny': tiny RANDOM weights, "
                                      "outputs are meaningless (demos and tests only)")
        self.engine = engine_factory(self.settings, self.device)
        self.warmup_s = self._warm_up()

    def _warm_up(self) -> float:
        """``model.warmup_width/height``: compile and capture the model for that camera's
        windows now, before any topic is advertised (StartupError if it fails)."""
        s = self.settings
        camera_hw = (s["model.warmup_height"], s["model.warmup_width"])
        if min(camera_hw) <= 0:
            return 0.0
        from vggt4d_ros.stream.factory import warm_up
        try:
            seconds = warm_up(self.engine.predictor, camera_hw, s["model.image_width"],
                              s["window.size"], s["window.stride"])
        except Exception as exc:  # noqa: BLE001 - any failure here is a start-up failure
            raise StartupError(f"model warm-up for {camera_hw[1]}x{camera_hw[0]} images "
                               f"failed: {exc}") from exc
        self.get_logger().info(f"model warmed up for {camera_hw[1]}x{camera_hw[0]} images "
                               f"(windows of {s['window.size']} frames) in {seconds:.1f} s")
        return seconds

    # ------------------------------------------------------------------ interface set-up
    def _qos(self, prefix: str) -> QoSProfile:
        rel = self.settings[f"{prefix}.reliability"]
        return QoSProfile(
            history=QoSHistoryPolicy.KEEP_LAST, depth=self.settings[f"{prefix}.depth"],
            reliability=(QoSReliabilityPolicy.BEST_EFFORT if rel == "best_effort"
                         else QoSReliabilityPolicy.RELIABLE),
            durability=QoSDurabilityPolicy.VOLATILE)

    def _make_publishers(self) -> None:
        out = self._qos("qos.outputs")
        latched = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_odom = self.create_publisher(Odometry, "~/odom", out)
        self.pub_path = self.create_publisher(Path, "~/path", out)
        self.pub_mask = self.create_publisher(Image, "~/dynamic_mask", out)
        self.pub_mask_info = self.create_publisher(CameraInfo, "~/dynamic_mask/camera_info", out)
        self.pub_depth = self.create_publisher(Image, "~/depth", out)
        self.pub_depth_static = self.create_publisher(Image, "~/depth_static", out)
        self.pub_conf = self.create_publisher(Image, "~/confidence", out)
        self.pub_points = self.create_publisher(PointCloud2, "~/static_points", out)
        self.pub_map = self.create_publisher(PointCloud2, "~/static_map", latched)
        self.pub_status = self.create_publisher(Status, "~/status", latched)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.pub_tf = self.create_publisher(TFMessage, "/tf", 100)
        self.pub_tf_static = self.create_publisher(TFMessage, "/tf_static", latched)

    def _make_subscriptions(self) -> None:
        grp = MutuallyExclusiveCallbackGroup()
        qos = self._qos("qos.image")
        self.create_subscription(Image, "image", self._on_image, qos, callback_group=grp)
        if self.settings["camera_info.enabled"]:
            self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos,
                                     callback_group=grp)

    def _publish_static_tf(self) -> None:
        t = make_transform_stamped(self.base_from_cam, self.base_frame, self.camera_frame,
                                   self.get_clock().now().to_msg())
        self.pub_tf_static.publish(TFMessage(transforms=[t]))

    # ------------------------------------------------------------------ parameters
    def _count_invalid_parameters(self, params):
        """Pre-set hook: log + count every refused change, including those rclpy refuses
        itself before the on-set callback (read-only, type, range). Changes nothing."""
        result = P.validate_change({k: self.get_parameter(k).value for k in P.SPECS}, params)
        if not result.successful and hasattr(self, "log"):
            self._count_bad("invalid_parameter", f"rejected parameter change: {result.reason}")
        return params

    def _on_set_parameters(self, params):
        current = {k: self.get_parameter(k).value for k in P.SPECS}
        result = P.validate_change(current, params)
        if not result.successful:
            return result
        for p in params:
            if p.name == "log_throttle":
                self.log.period_s = float(p.value)
            elif p.name == "camera_info.tolerance":
                self._infos.tolerance_ns = int(round(float(p.value) * 1e9))
            if p.name in P.SPECS:
                self.settings.values[p.name] = p.value
        return result

    # ------------------------------------------------------------------ input (callbacks)
    def _on_camera_info(self, msg: CameraInfo) -> None:
        k = np.asarray(msg.k, dtype=np.float64)
        if k.shape != (9,) or not np.all(np.isfinite(k)) or k[0] <= 0 or k[4] <= 0 or \
                not np.all(np.isfinite(np.asarray(msg.d, dtype=np.float64))):
            self._count_bad("invalid_camera_info", "camera_info has NaN/Inf or non-positive "
                            "focal length; ignored")
            return
        self._infos.add(stamp_to_ns(msg.header.stamp), msg)

    def _check_camera_info(self, stamp: int) -> None:
        """Count images without a camera_info of the same stamp. The check of an image is
        made when the NEXT image arrives (its info, published just before it on another
        topic, may be delivered after it), so a missing info is reported one frame late."""
        with self._lock:
            waiting, self._awaiting_info = self._awaiting_info, stamp
        if waiting is not None and self._infos.match(waiting) is None:
            self._count_bad("missing_camera_info", f"no camera_info with the stamp of image "
                            f"{waiting} ns (tolerance {self.settings['camera_info.tolerance']}"
                            " s); the image was processed without it")

    def _count_bad(self, key: str, message: str) -> None:
        with self._lock:
            self.bad_input[key] += 1
        self.log.warn(key, message)

    def _on_image(self, msg: Image) -> None:
        """Convert, check, submit. Never blocks on the model."""
        received = time.monotonic()
        stamp = stamp_to_ns(msg.header.stamp)
        with self._lock:
            self.frames_received += 1
        try:
            rgb = image_to_rgb(msg)
        except ImageConversionError as exc:
            self._count_bad(exc.reason, f"image dropped: {exc}")
            return
        rgb = self._limit_size(rgb)
        frame_id = msg.header.frame_id or self.camera_frame
        if frame_id != self.camera_frame and not self._frame_id_warned:
            self._frame_id_warned = True
            self.get_logger().warning(
                f"images arrive in frame '{frame_id}' but frames.camera_frame is "
                f"'{self.camera_frame}' (the frame /tf_static publishes); outputs keep "
                f"'{frame_id}'")
        if self.settings["camera_info.enabled"]:
            self._check_camera_info(stamp)
        with self._lock:
            last, shape = self._last_stamp, self._last_shape
        backwards = int(round(self.settings["stamps.backwards_reset"] * 1e9))
        if last is not None and stamp <= last:
            if last - stamp > backwards:
                self._count_bad("stamp_backwards", f"stamp jumped back by "
                                f"{(last - stamp) / 1e9:.3f} s (bag loop / restart?): "
                                "resetting the sequence")
            else:
                self._count_bad("stamp_not_increasing", f"image stamp {stamp} ns is not newer "
                                f"than the last ({last} ns): dropped")
                return
        elif shape is not None and rgb.shape[:2] != shape:
            self._count_bad("image_size_changed", f"image size changed from {shape[1]}x"
                            f"{shape[0]} to {rgb.shape[1]}x{rgb.shape[0]}: resetting the "
                            "sequence")
        if self.settings["drop_policy"] == "drop_newest" and \
                self._waiting_frames() >= self.settings["queue_size"]:
            with self._lock:
                self.node_dropped["queue_full"] += 1
            self.log.warn("queue_full", "inference queue full: newest frame dropped")
            return
        reason = self.engine.submit(FrameInput(stamp_ns=stamp, image=rgb, frame_id=frame_id))
        if reason is not None:
            self.log.warn(f"engine_{reason}", f"frame {stamp} ns dropped by the engine: {reason}")
            return
        with self._lock:
            self._last_stamp, self._last_shape = stamp, rgb.shape[:2]
            self._pending[stamp] = _Pending(received)
            # receive times of frames not yet published (stale ones go when a newer frame is
            # published); the bound covers ~30 s of 30 Hz input waiting on one slow poll
            bound = max(PENDING_STAMPS_MIN,
                        4 * (self.settings["queue_size"] + self.settings["window.size"]))
            if len(self._pending) > bound:
                for old in sorted(self._pending)[: len(self._pending) // 2]:
                    del self._pending[old]
        self._wake.set()

    def _waiting_frames(self) -> int:
        """Queued frames still waiting (those of a started prediction are being predicted)."""
        c = self.engine.counters
        return c.queue_depth - c.queue_started

    def _limit_size(self, rgb: np.ndarray) -> np.ndarray:
        """Downscale (INTER_AREA, aspect kept) images wider than input.max_width."""
        max_w = self.settings["input.max_width"]
        h, w = rgb.shape[:2]
        if w <= max_w:
            return rgb
        import cv2
        new_h = max(2, int(round(h * max_w / w)))
        if not self._downscale_logged:
            self._downscale_logged = True
            self.get_logger().info(f"images of {w}x{h} are downscaled to {max_w}x{new_h} "
                                   "(input.max_width)")
        return cv2.resize(rgb, (max_w, new_h), interpolation=cv2.INTER_AREA)

    # ------------------------------------------------------------------ worker
    def _run_worker(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.worker_busy = True
            try:
                self._poll_once()
            except Exception as exc:  # never let the worker die
                self._count_bad("inference_error", f"window failed and was dropped: "
                                f"{type(exc).__name__}: {exc}")
                with self._engine_lock:
                    try:
                        self.engine.reset("inference_error")
                        self._count_failed_window_frames()
                    except Exception:
                        pass
            finally:
                self.worker_busy = False
            self._maybe_publish_map()

    def _count_failed_window_frames(self) -> None:
        """The frames of a failed window left the engine uncounted (the reset counts only queued
        and pending ones): count them as ``dropped.inference_error`` (caller holds the engine
        lock), so that received == processed + dropped + queued stays true."""
        c = self.engine.counters
        lost = c.frames_in - c.frames_out - sum(c.dropped.values()) - c.queue_depth
        with self._lock:
            self.node_dropped["inference_error"] = max(self.node_dropped["inference_error"],
                                                       int(lost))

    def _poll_once(self) -> None:
        # One window per poll: each window is published as soon as it is emitted (while the
        # engine predicts the next one), not after every queued window has run.
        # _publish_lock: a ~/reset waits until this window's outputs are out, so nothing of
        # the old sequence is published after the reset answer.
        while not self._stop.is_set():
            with self._publish_lock:
                if not self._poll_and_publish():
                    return

    def _poll_and_publish(self) -> bool:
        """Run at most one window and publish it; False when no window ran."""
        with self._engine_lock:
            outs = self.engine.poll(max_windows=1)
            window = self.engine.last_window
            state = self.engine.state
            resets = sum(self.engine.counters.resets.values())
        if resets != self._reset_count:
            self._reset_count = resets
            self._path.poses = []
            reason = getattr(self.engine, "last_reset_reason", "")
            self._status_message = f"reset: {reason}"
        for out in outs:
            self._publish_frame(out)
        if window is not None and window.window_index != self._last_window_index and outs:
            self._last_window_index = window.window_index
            self._publish_window_points(window, outs[-1].stamp_ns)
        if outs or state != self._last_state:
            stamp = outs[-1].stamp_ns if outs else self._last_output_stamp
            self._publish_status(stamp, getattr(window, "reason", "") if window else "")
        return bool(outs)

    def _publish_frame(self, out) -> None:
        stamp = ns_to_time(out.stamp_ns)
        frame_id = out.frame_id or self.camera_frame
        odom_from_base = self.frames.odom_from_base(out.world_from_cam)
        if np.all(np.isfinite(odom_from_base)):
            self._publish_pose(out, odom_from_base, stamp)
        else:   # the engine holds the last pose instead; never publish NaN poses
            self.log.warn("non_finite_pose", f"frame {out.stamp_ns} ns has a non-finite pose: "
                          "odometry/TF/path skipped for it")
        self._publish_images(out, stamp, frame_id)

    def _publish_pose(self, out, odom_from_base: np.ndarray, stamp: Time) -> None:
        """Odometry, TF odom -> base_link and the path (odom frame)."""
        odom = Odometry()
        odom.header.stamp, odom.header.frame_id = stamp, self.odom_frame
        odom.child_frame_id = self.base_frame
        odom.pose.pose = matrix_to_pose(odom_from_base)
        cov = covariance_in_base(out.covariance, self.base_from_cam)
        odom.pose.covariance = [float(v) for v in cov.ravel()]
        twist, twist_cov = self._twist.update(out.stamp_ns, out.sequence, odom_from_base, cov,
                                              out.trusted)
        tw = odom.twist.twist
        (tw.linear.x, tw.linear.y, tw.linear.z,
         tw.angular.x, tw.angular.y, tw.angular.z) = (float(v) for v in twist)
        odom.twist.covariance = [float(v) for v in twist_cov.ravel()]
        self.pub_odom.publish(odom)
        if self.settings["publish_tf"]:
            self.pub_tf.publish(TFMessage(transforms=[make_transform_stamped(
                odom_from_base, self.odom_frame, self.base_frame, stamp)]))
        ps = PoseStamped()
        ps.header = odom.header
        ps.pose = odom.pose.pose
        self._path.poses.append(ps)
        max_poses = self.settings["path.max_poses"]
        if len(self._path.poses) > max_poses:
            del self._path.poses[: len(self._path.poses) - max_poses]
        self._path.header.stamp = stamp
        self.pub_path.publish(self._path)

    def _publish_images(self, out, stamp: Time, frame_id: str) -> None:
        """Mask (+ camera_info), depth, static depth, confidence in the source frame."""
        mask = np.asarray(out.mask, dtype=bool)
        depth = np.asarray(out.depth, dtype=np.float32)
        self.pub_mask.publish(array_to_image(mask.astype(np.uint8) * 255, "mono8",
                                             stamp=stamp, frame_id=frame_id))
        self.pub_mask_info.publish(self._camera_info(out.intrinsic, mask.shape, stamp, frame_id))
        self.pub_depth.publish(array_to_image(depth, "32FC1", stamp=stamp, frame_id=frame_id))
        static = depth.copy()
        static[mask] = np.nan
        self.pub_depth_static.publish(array_to_image(static, "32FC1", stamp=stamp,
                                                     frame_id=frame_id))
        self.pub_conf.publish(array_to_image(np.asarray(out.confidence, dtype=np.float32),
                                             "32FC1", stamp=stamp, frame_id=frame_id))
        now = time.monotonic()
        with self._lock:
            self.frames_processed += 1
            pend = self._pending.pop(out.stamp_ns, None)
            if pend is not None:
                self.latencies.append(now - pend.received)
                # the engine emits frames in arrival order (FIFO, also across resets): frames
                # received before this one and still unpublished were dropped
                for stale in [t for t, p in self._pending.items()
                              if p.received < pend.received]:
                    del self._pending[stale]
        self._last_output_stamp = out.stamp_ns
        self._cross_check_focal(out.stamp_ns, out.intrinsic, mask.shape)

    def _cross_check_focal(self, stamp_ns: int, intrinsic, shape_hw) -> None:
        """Compare the model's focal length with the camera_info of the same stamp (scaled to
        the output width); the ratio goes to /diagnostics, a large disagreement is logged."""
        info = self._infos.match(stamp_ns)
        if info is None or info.width <= 0:
            return
        fx_cam = float(info.k[0]) * shape_hw[1] / float(info.width)
        fx_model = float(np.asarray(intrinsic)[0, 0])
        if not (math.isfinite(fx_model) and fx_cam > 0):
            return
        self._focal_ratio = fx_model / fx_cam
        if not 0.5 <= self._focal_ratio <= 2.0:
            self.log.warn("focal_mismatch", f"model focal length {fx_model:.1f} px differs "
                          f"from camera_info ({fx_cam:.1f} px at the output width) by a factor "
                          f"{self._focal_ratio:.2f}")

    @staticmethod
    def _camera_info(intrinsic, shape_hw, stamp: Time, frame_id: str) -> CameraInfo:
        info = CameraInfo()
        info.header.stamp, info.header.frame_id = stamp, frame_id
        info.height, info.width = int(shape_hw[0]), int(shape_hw[1])
        k = np.asarray(intrinsic, dtype=np.float64).reshape(3, 3)
        info.distortion_model = "plumb_bob"
        info.d = [0.0] * 5
        info.k = [float(v) for v in k.ravel()]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [float(k[0, 0]), 0.0, float(k[0, 2]), 0.0, 0.0, float(k[1, 1]),
                  float(k[1, 2]), 0.0, 0.0, 0.0, 1.0, 0.0]
        return info

    def _to_odom(self, points: np.ndarray) -> np.ndarray:
        return self.frames.points_to_odom(points)

    def _publish_window_points(self, window, stamp_ns: int) -> None:
        cloud = points_to_cloud(self._to_odom(window.static_points), window.colors,
                                window.confidence, frame_id=self.odom_frame,
                                stamp=ns_to_time(stamp_ns))
        self.pub_points.publish(cloud)

    def _map_cloud(self) -> PointCloud2:
        with self._engine_lock:
            arrays = self.engine.static_map.to_arrays()
        return points_to_cloud(self._to_odom(arrays["points"]), arrays["colors"],
                               arrays["confidence"], frame_id=self.odom_frame,
                               stamp=ns_to_time(self._last_output_stamp))

    def _maybe_publish_map(self) -> None:
        period = self.settings["map.publish_period"]
        if period <= 0 or self._last_output_stamp == 0:
            return
        now = time.monotonic()
        if now - self._last_map_pub >= period:
            self._last_map_pub = now
            self.pub_map.publish(self._map_cloud())

    # ------------------------------------------------------------------ status, diagnostics
    def _publish_status(self, stamp_ns: int, message: str = "") -> None:
        state = self.engine.state
        counters = self.engine.counters
        st = Status()
        st.header.stamp, st.header.frame_id = ns_to_time(stamp_ns), self.odom_frame
        st.state, st.state_name = STATE_CODES.get(state, Status.WAITING), state
        with self._lock:
            st.frames_received = self.frames_received
            st.frames_processed = self.frames_processed
            st.frames_dropped = self._dropped_total(counters)
            st.latency = float(self.latencies[-1]) if self.latencies else float("nan")
        st.windows = int(counters.windows)
        window = getattr(self.engine, "last_window", None)
        st.last_alignment_residual = float(window.residual) if window is not None else math.nan
        st.scale_drift = float(window.scale_drift) if window is not None else math.nan
        st.queue_depth = int(counters.queue_depth)
        st.message = self._status_message or message
        self._status_message = ""
        self._last_state = state
        self.pub_status.publish(st)

    def _dropped_total(self, counters) -> int:
        """Frames received but never published (caller holds self._lock)."""
        bad = sum(v for k, v in self.bad_input.items()
                  if k not in ("missing_camera_info", "invalid_camera_info", "inference_error",
                               "stamp_backwards", "image_size_changed", "invalid_parameter"))
        return int(bad + sum(self.node_dropped.values()) + sum(counters.dropped.values()))

    def _publish_diagnostics(self) -> None:
        counters = self.engine.counters
        with self._lock:
            lat = np.array(self.latencies) if self.latencies else np.array([np.nan])
            values: list[tuple[str, Any]] = [
                ("state", self.engine.state), ("device", self.device),
                ("frames_received", self.frames_received),
                ("frames_processed", self.frames_processed),
                ("frames_dropped", self._dropped_total(counters)),
                ("queue_depth", counters.queue_depth),
                ("window_pending", counters.pending),
                ("windows", counters.windows),
                ("windows_predicted_ahead", counters.lookahead_hits),
                ("predictions_ahead_discarded", counters.lookahead_misses),
                ("latency_last_s", float(lat[-1])),
                ("latency_p50_s", float(np.nanpercentile(lat, 50)) if self.latencies else "nan"),
                ("latency_p99_s", float(np.nanpercentile(lat, 99)) if self.latencies else "nan"),
                ("focal_ratio_model_over_camera_info", f"{self._focal_ratio:.4f}"),
            ]
            values += [(f"bad_input.{k}", v) for k, v in sorted(self.bad_input.items())]
            dropped = Counter(counters.dropped) + self.node_dropped
            values += [(f"dropped.{k}", v) for k, v in sorted(dropped.items())]
            values += [(f"resets.{k}", v) for k, v in sorted(counters.resets.items())]
        values += self._gpu_memory()
        stats = getattr(getattr(self.engine, "predictor", None), "stats", None)
        oom = stats() if callable(stats) else {}
        values += [(f"oom.{k}", v) for k, v in oom.items()]
        state = self.engine.state
        st = DiagnosticStatus()
        st.name = f"{self.get_fully_qualified_name()}: tracking"
        st.hardware_id = self.camera_frame
        if self.bad_input["inference_error"] and state != "TRACKING":
            st.level, st.message = DiagnosticStatus.ERROR, "inference errors"
        elif state == "TRACKING" and oom.get("window_limit", "none") != "none":
            st.level = DiagnosticStatus.WARN
            st.message = f"tracking with windows cut to {oom['window_limit']} frames (CUDA OOM)"
        elif state == "TRACKING":
            st.level, st.message = DiagnosticStatus.OK, "tracking"
        else:
            st.level, st.message = DiagnosticStatus.WARN, state.lower()
        st.values = [KeyValue(key=k, value=str(v)) for k, v in values]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self.pub_diag.publish(arr)

    def _gpu_memory(self) -> list[tuple[str, Any]]:
        if not self.device.startswith("cuda"):
            return [("gpu_memory_allocated_mb", "n/a (cpu)")]
        import torch
        return [("gpu_memory_allocated_mb", f"{torch.cuda.memory_allocated() / 2**20:.1f}"),
                ("gpu_memory_peak_mb", f"{torch.cuda.max_memory_allocated() / 2**20:.1f}")]

    # ------------------------------------------------------------------ services
    def _on_reset(self, request, response):
        with self._publish_lock:
            with self._engine_lock:
                self.engine.reset("service")
                self._reset_count = sum(self.engine.counters.resets.values())
            with self._lock:
                self._last_stamp, self._last_shape = None, None
                self._pending.clear()
            self._path.poses = []
            self._status_message = "reset: service"
            self._publish_status(self._last_output_stamp)
        self.get_logger().info("sequence reset by ~/reset")
        response.success, response.message = True, "reset: next frames start a new sequence"
        return response

    def _on_save_map(self, request, response):
        root = self.settings["output_dir"]
        try:
            ply = confine("static_map.ply", root)
            tum = confine("trajectory.tum", root)
            with self._engine_lock:
                arrays = self.engine.static_map.to_arrays()
                traj = self.engine.trajectory()
            from vggt4d_ros.geometry.voxel import write_ply
            # whole files or nothing, no symlink followed after the check (ros/paths.py)
            with write_confined("static_map.ply", root) as fh:
                write_ply(fh, self._to_odom(arrays["points"]), arrays["colors"],
                          arrays["counts"])
            lines = []
            for stamp_ns, w_c in traj:
                o_b = self.frames.odom_from_base(w_c)
                q = quat_xyzw_from_matrix(o_b[:3, :3])
                t = o_b[:3, 3]
                lines.append(f"{stamp_ns / 1e9:.9f} {t[0]:.6f} {t[1]:.6f} {t[2]:.6f} "
                             f"{q[0]:.9f} {q[1]:.9f} {q[2]:.9f} {q[3]:.9f}\n")
            with write_confined("trajectory.tum", root, "w") as fh:
                fh.write("".join(lines))
        except (PathEscapeError, OSError) as exc:
            self.get_logger().error(f"save_map failed: {exc}")
            response.success, response.message = False, f"save_map failed: {exc}"
            return response
        response.success = True
        response.message = (f"wrote {len(arrays['points'])} voxels to {ply} and "
                            f"{len(traj)} poses (base_link in {self.odom_frame}) to {tum}")
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ shutdown
    def destroy_node(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(timeout=30.0)
        close = getattr(getattr(self, "engine", None), "close", None)   # prediction thread
        if callable(close):
            close()
        super().destroy_node()


def main(args: Optional[list[str]] = None) -> int:
    """Console script ``vggt4d_node``: init, spin on a MultiThreadedExecutor, always clean up.

    Returns 0 on a normal shutdown, 2 when the node cannot start (the reason is logged once).
    """
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = Vggt4dNode()
        except StartupError as exc:
            rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
            return 2
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        try:
            executor.spin()
        finally:
            executor.shutdown()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
