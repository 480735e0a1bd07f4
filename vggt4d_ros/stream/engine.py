"""``StreamEngine``: sliding windows over a frame stream, stitched into one odometry frame.

Scheduling
    The first window of a sequence waits for ``window_size`` frames. Every later window is
    ``[keyframes…, overlap…, new…]``: up to ``max_keyframes`` older keyframes (selected by
    parallax / rotation, bounded), the last ``overlap = window_size − stride`` emitted frames,
    and ``stride`` new frames. ``flush()`` runs a final, shorter window on what is left.

Which estimate a frame gets
    Every accepted frame is emitted EXACTLY ONCE, by the first window in which it is new
    (lowest latency). Later windows use it as an anchor (its emitted depth & pose) but never
    re-publish it, so the published trajectory is never rewritten.

Odometry frame
    The first window of a sequence defines it: frame 0 of the sequence at identity, scale of
    that window (odometry units = "metres up to the model's scale"). Later windows are mapped
    with ``odom_from_window`` (Sim(3), ``stitcher.align_window``); depths are rescaled into
    odometry units.

States
    WAITING (no window yet since start), RESET (after a reset, until the next window),
    TRACKING (last window aligned), LOST (last window failed to align or predicted garbage;
    it was re-anchored from the last good pose, see ``stitcher.reanchor``, covariance at its
    maximum; the next window that aligns brings TRACKING back, counted as a recovery).
    Recovery: while LOST, the last good frame is added to the next windows (at most
    ``recovery_anchor_windows``) and alignment prefers trusted anchors (frames of TRACKING
    windows: that frame and keyframes), so a transient failure (a garbage window) costs one
    LOST window and tracking resumes in the same odometry frame without a jump. Without a
    trusted anchor the re-anchored segment becomes the reference.
    Frames whose prediction is not finite HOLD the previous pose. Static points of LOST
    windows are published but never fused into the map; dynamic points are never fused.

Threads
    ``submit`` (camera callback) and ``poll`` (one worker) may run concurrently; ``push`` =
    ``submit`` + ``poll`` for single-threaded use. ``reset`` waits for a running window.

Pipelining (``StreamConfig.pipelined``, default on)
    Predictions run on one engine-owned thread. Window n+1's frames are known before window n
    is even predicted: its anchors are window n's overlap (and keyframes), its new frames the
    next ``stride`` queued ones. As soon as those are queued (already when window n starts,
    or later from ``submit``), they are pinned in the queue (``drop_oldest`` neither drops
    them nor counts them in ``max_queue``) and window n+1's prediction is queued on that
    thread right behind window n's: it runs on the GPU while the CPU aligns and emits window n
    and the caller publishes it. The started
    prediction is used only if window n+1, once its turn comes, has exactly the frames it was
    started with (same keys); otherwise (window n went LOST and re-shows its last good frame,
    a keyframe was evicted, a reset came) it is discarded and the window predicted again.
    Results therefore never depend on timing: pipelined and serial runs emit the same frames
    (under ``drop_oldest`` which frames are dropped depends on timing anyway). The predictor
    is only ever called from that one thread, one window at a time, so GPU memory is that of
    one window. ``close()`` stops the thread.

Memory (bounded; a long run keeps flat retained memory)
    overlap + keyframe (+ one recovery-anchor) records, at most ``window_size`` pending frames,
    the input queue (``max_queue`` under ``drop_oldest``, plus the ``stride`` pinned frames of
    a started prediction), the voxel map (``max_voxels``) and
    the trajectory: a preallocated ring of ``trajectory_capacity`` poses (stamp + x y z qx qy
    qz qw, 64 B each), the oldest overwritten when full.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from vggt4d_ros.geometry.sim3 import Sim3
from vggt4d_ros.geometry.transforms import (invert_se3, pose_to_tqxyzw, rotation_angle,
                                            to_homogeneous, tqxyzw_to_pose)
from vggt4d_ros.geometry.voxel import VoxelMap
from vggt4d_ros.stream.buffer import DROP_POLICIES, FrameInput, InputQueue, QueuedFrame, ResetMarker
from vggt4d_ros.stream.predictor import WindowPrediction, WindowPredictor
from vggt4d_ros.stream.stitcher import (AlignParams, AlignResult, FrameRecord, align_window,
                                        overlap_disagreement, pose_covariance,
                                        prediction_frame_valid, reanchor, sim3_mapping_pose,
                                        valid_depth)

__all__ = ["StreamEngine", "StreamConfig", "FrameInput", "FrameOutput", "WindowOutput",
           "StreamCounters", "STATES"]

STATES = ("WAITING", "TRACKING", "LOST", "RESET")


@dataclass
class StreamConfig:
    """Engine parameters. Lengths are odometry units (the first window's scale)."""

    window_size: int = 16               # frames per predictor call (without keyframes)
    stride: int = 8                     # new frames per window; overlap = window_size - stride >= 1
    max_keyframes: int = 0              # older keyframes prepended to each window (0 = off)
    keyframe_min_parallax: float = 0.15  # camera displacement / median depth to add a keyframe
    keyframe_min_rotation_deg: float = 15.0
    recovery_anchor_windows: int = 4    # while LOST, re-show the last good frame for this many
                                        # windows so tracking can resume in the same frame (0 = off)
    drop_policy: str = "keep_all"       # "keep_all" (replay) | "drop_oldest" (live)
    max_queue: int = 64                 # frames waiting for the worker under drop_oldest
    backwards_reset_s: float = 1.0      # stamp jumps further back than this start a new sequence
    align: AlignParams = field(default_factory=AlignParams)
    points_conf_quantile: float = 0.25  # per window: drop this least-confident fraction of pixels
    max_points_per_window: int = 20_000
    mask_dilation_px: int = 1           # dynamic mask grown before taking static points
    voxel_size: float = 0.02
    max_voxels: int = 500_000
    trajectory_capacity: int = 100_000
    seed: int = 0                       # subsampling RNG (deterministic per window)
    pipelined: bool = True              # predict window n+1 while window n is emitted (above)

    def __post_init__(self) -> None:
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {self.window_size}")
        if not 1 <= self.stride < self.window_size:
            raise ValueError(f"stride must be in [1, window_size) so that windows overlap, got "
                             f"stride={self.stride}, window_size={self.window_size}")
        if self.max_keyframes < 0:
            raise ValueError(f"max_keyframes must be >= 0, got {self.max_keyframes}")
        if self.recovery_anchor_windows < 0:
            raise ValueError("recovery_anchor_windows must be >= 0, "
                             f"got {self.recovery_anchor_windows}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, "
                             f"got {self.drop_policy!r}")
        if not 0.0 <= self.points_conf_quantile < 1.0:
            raise ValueError("points_conf_quantile must be in [0, 1), "
                             f"got {self.points_conf_quantile}")
        if (self.trajectory_capacity < 1 or self.max_points_per_window < 0
                or self.mask_dilation_px < 0):
            raise ValueError("need trajectory_capacity >= 1, max_points_per_window >= 0 and "
                             "mask_dilation_px >= 0")
        if self.backwards_reset_s < 0:
            raise ValueError(f"backwards_reset_s must be >= 0, got {self.backwards_reset_s}")

    @property
    def overlap(self) -> int:
        return self.window_size - self.stride


@dataclass
class FrameOutput:
    """Per-frame result (odometry frame; depth in odometry units; arrays at predictor resolution).

    cam_from_world / world_from_cam [4,4]; covariance [6,6] (x y z, rot x y z; see
    ``stitcher.pose_covariance``); depth [H,W] float32; confidence [H,W]; mask [H,W] bool
    (True = dynamic); image [H,W,3] uint8; intrinsic [3,3]; state; window_index; trusted
    (the frame's own prediction was valid and the window not LOST - False: pose held or
    re-anchored); sequence (the engine's sequence number: +1 at every reset, so consumers can
    tell frames of a new odometry origin from the old, also within one poll).
    """

    stamp_ns: int
    frame_id: str
    cam_from_world: np.ndarray
    world_from_cam: np.ndarray
    covariance: np.ndarray
    depth: np.ndarray
    confidence: np.ndarray
    mask: np.ndarray
    image: np.ndarray
    intrinsic: np.ndarray
    state: str
    window_index: int
    trusted: bool = True
    sequence: int = 0


@dataclass
class WindowOutput:
    """Per-window result. static_points [M,3] float32 (odometry frame), colors [M,3] uint8,
    confidence [M] float32, source_stamp_ns [M] int64 and source_uv [M,2] int32 (pixel of the
    point in its source frame, predictor resolution), residual (relative, see stitcher),
    scale_drift (log ratio, see ``stitcher.align_window``), odom_from_window, reason ("" or why
    LOST)."""

    window_index: int
    state: str
    frame_stamps: np.ndarray
    static_points: np.ndarray
    colors: np.ndarray
    confidence: np.ndarray
    source_stamp_ns: np.ndarray
    source_uv: np.ndarray
    residual: float
    scale_drift: float
    inlier_fraction: float
    num_align_points: int
    odom_from_window: Sim3
    reason: str
    timings: dict[str, float]


@dataclass
class StreamCounters:
    """Snapshot of the engine's counters (cumulative over the engine's life, across resets)."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    lost_windows: int = 0
    lost_events: int = 0                 # transitions into LOST
    recoveries: int = 0                  # transitions LOST -> TRACKING
    resets: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    pending: int = 0                     # taken from the queue, waiting for their window
    # of queue_depth: frames whose window's prediction started (pinned, not counted in max_queue)
    queue_started: int = 0
    lookahead_hits: int = 0              # windows whose prediction started early and was used
    lookahead_misses: int = 0            # early predictions discarded (window changed)


@dataclass
class _NextWindow:
    """What the next window will hold, known before the current one is emitted: its anchors
    (keys, input images) and the new frames it takes (``need``), of which ``taken`` are
    already out of the input queue (the engine's pending frames). ``taken`` is its own list,
    extended under the lock as frames leave the queue: ``submit``'s thread may start the
    window while the worker has popped a frame but not yet added it to the pending list."""

    anchor_keys: list[int]
    anchor_images: list[np.ndarray]
    taken: list[QueuedFrame]
    need: int


@dataclass
class _Lookahead:
    """A prediction started before its window's turn: the window's frame keys and the result."""

    keys: tuple[int, ...]
    result: Future


class StreamEngine:
    """Sliding-window VGGT4D odometry + static map; see the module docstring."""

    def __init__(self, predictor: WindowPredictor, config: Optional[StreamConfig] = None):
        if not hasattr(predictor, "predict"):
            raise ValueError("predictor must have a predict(images, frame_keys) method")
        self.predictor = predictor
        self.config = config or StreamConfig()
        cfg = self.config
        self._queue = InputQueue(cfg.drop_policy, cfg.max_queue,
                                 int(round(cfg.backwards_reset_s * 1e9)))
        self._lock = threading.RLock()
        # pipelining state (module docstring), guarded by _ahead_lock: submit may start the
        # next window's prediction while poll emits the current one
        self._ahead_lock = threading.Lock()
        self._next_window: Optional[_NextWindow] = None
        self._lookahead: Optional[_Lookahead] = None
        self._lookahead_hits = 0
        self._lookahead_misses = 0
        self._predict_thread: Optional[ThreadPoolExecutor] = None
        if cfg.pipelined:
            self._predict_thread = ThreadPoolExecutor(1, thread_name_prefix="vggt4d_predict")
            # an engine dropped without close() still releases its (idle) thread
            weakref.finalize(self, self._predict_thread.shutdown, wait=False)
        self.static_map = VoxelMap(cfg.voxel_size, cfg.max_voxels)
        self._traj_stamp = np.zeros(cfg.trajectory_capacity, np.int64)
        self._traj_tq = np.zeros((cfg.trajectory_capacity, 7), np.float64)
        self._frames_out = 0
        self._windows = 0
        self._lost_windows = 0
        self._lost_events = 0
        self._recoveries = 0
        self._resets: Counter[str] = Counter()
        self._dropped_local: Counter[str] = Counter()
        self.last_reset_reason = ""
        self._undelivered: list[FrameOutput] = []         # outputs of a poll that raised
        self._sequence = 0                                # +1 per reset (FrameOutput.sequence)
        self._clear_sequence()
        self._state = "WAITING"

    # ------------------------------------------------------------------ public API
    @property
    def state(self) -> str:
        return self._state

    @property
    def counters(self) -> StreamCounters:
        dropped = Counter(self._queue.dropped) + self._dropped_local
        return StreamCounters(self._queue.frames_in, self._frames_out, dict(dropped),
                              self._windows, self._lost_windows, self._lost_events,
                              self._recoveries, dict(self._resets), len(self._queue),
                              len(self._pending), self._queue.pinned, self._lookahead_hits,
                              self._lookahead_misses)

    def submit(self, frame: FrameInput) -> Optional[str]:
        """Validate and queue a frame (thread-safe, cheap). Returns the drop reason or None.

        Pipelined: the frame that completes the next window starts its prediction (on the
        prediction thread; this call does not wait for it)."""
        reason = self._queue.submit(frame)
        if reason is None:
            self._start_next_window()
        return reason

    def poll(self, max_windows: Optional[int] = None) -> list[FrameOutput]:
        """Run the windows that the frames queued when the call starts complete (every one, or
        at most ``max_windows``; the rest stay queued); returns the frames they emit.

        A worker that publishes between windows calls ``poll(max_windows=1)`` until it returns
        nothing, so that each window is published as soon as it is emitted.
        If the predictor raises, the failed window's new frames are counted as dropped
        (``inference_error``) and the exception propagates; frames queued behind it and outputs
        already produced by this call are kept and returned by the next ``poll``.
        """
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be None or >= 1, got {max_windows}")
        with self._lock:
            out, self._undelivered = self._undelivered, []
            budget = self._queue.num_items()          # not frames queued during this call
            windows = self._windows
            while budget and (max_windows is None or self._windows - windows < max_windows):
                item = self._take_item()
                if item is None:                      # dropped meanwhile (drop_oldest)
                    break
                budget -= 1
                try:
                    out += self._consume(item)
                except Exception:
                    self._undelivered = out
                    raise
            return out

    def close(self) -> None:
        """Stop the prediction thread (after a running prediction). Idempotent; windows after
        ``close`` are predicted in the calling thread."""
        with self._ahead_lock:
            thread, self._predict_thread = self._predict_thread, None
            self._next_window = self._lookahead = None
        if thread is not None:
            thread.shutdown(wait=True)

    def _take_item(self):
        """The oldest queued item; a frame also joins the planned next window's taken frames."""
        with self._ahead_lock:
            item = self._queue.pop()
            if self._next_window is not None and item is not None:
                if isinstance(item, QueuedFrame):
                    self._next_window.taken.append(item)
                else:                                 # a new sequence: the plan is void
                    self._next_window = None
            return item

    def _consume(self, item) -> list[FrameOutput]:
        """One queue item: a reset marker, or a frame that may complete a window."""
        if isinstance(item, ResetMarker):
            out = self._run_pending()                   # the old sequence's last frames
            self._reset_sequence(item.reason)
            return out
        self._pending.append(item)
        need = self.config.window_size if self._seq_windows == 0 else self.config.stride
        if len(self._pending) < need:
            return []
        batch, self._pending = self._pending[:need], self._pending[need:]
        return self._process(batch)

    def push(self, frame: FrameInput) -> list[FrameOutput]:
        """``submit`` + ``poll``: the frames emitted because of this one (often none)."""
        self.submit(frame)
        return self.poll()

    def flush(self) -> list[FrameOutput]:
        """End of stream: process queued frames and run a last (shorter) window on the rest."""
        with self._lock:
            return self.poll() + self._run_pending()

    def reset(self, reason: str = "requested") -> None:
        """Forget the sequence: queued/pending frames (counted as dropped ``reset``), trajectory,
        map, anchors. State becomes RESET; the next window starts a new odometry frame."""
        with self._lock:
            self._dropped_local["reset"] += (self._queue.clear() + len(self._pending)
                                             + len(self._undelivered))
            self._frames_out -= len(self._undelivered)    # never delivered: dropped instead
            self._pending, self._undelivered = [], []
            self._reset_sequence(reason)

    def trajectory(self) -> list[tuple[int, np.ndarray]]:
        """(stamp_ns, world_from_cam [4,4]) of the emitted frames of the current sequence, oldest
        first (at most ``trajectory_capacity``, the oldest overwritten beyond)."""
        stamps, poses = self.trajectory_arrays()
        return [(int(s), p) for s, p in zip(stamps, poses)]

    def trajectory_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Compact form of ``trajectory()``: stamps [N] int64, world_from_cam [N,4,4]."""
        cap = self.config.trajectory_capacity
        n = min(self._traj_count, cap)
        order = (np.arange(n) + (self._traj_count - n)) % cap
        poses = tqxyzw_to_pose(self._traj_tq[order]) if n else np.zeros((0, 4, 4))
        return self._traj_stamp[order].copy(), poses

    # ------------------------------------------------------------------ sequence state
    def _clear_sequence(self) -> None:
        cfg = self.config
        self._pending: list[QueuedFrame] = []
        self._history: deque[FrameRecord] = deque(maxlen=cfg.overlap)
        self._keyframes: deque[FrameRecord] = deque(maxlen=max(cfg.max_keyframes, 1))
        self._seq_windows = 0
        self._last_good_pose = np.eye(4)
        self._last_good_depth = float("nan")
        self._last_good_record: Optional[FrameRecord] = None
        self._recovery: Optional[FrameRecord] = None   # last good frame, re-shown while LOST
        self._recovery_windows = 0
        self._last_pose = np.eye(4)
        self._traj_count = 0
        self.last_window: Optional[WindowOutput] = None
        self.static_map.clear()
        with self._ahead_lock:
            # a started prediction of the old sequence is never used (it finishes unobserved)
            self._next_window = self._lookahead = None

    def _reset_sequence(self, reason: str) -> None:
        self._sequence += 1
        self._resets[reason] += 1
        self.last_reset_reason = reason
        self._clear_sequence()
        self._state = "RESET"

    def _run_pending(self) -> list[FrameOutput]:
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        # the last window of a sequence (a reset marker or the end of the stream follows):
        # whatever comes next is not its continuation, so nothing is planned after it
        return self._process(batch, plan_next=False)

    # ------------------------------------------------------------------ one window
    def _process(self, new_frames: list[QueuedFrame], plan_next: bool = True
                 ) -> list[FrameOutput]:
        """Predict one window ([keyframes, overlap, new]), place it in the odometry frame,
        fuse its static points and emit its new frames; pipelined and ``plan_next``, plan the
        next window (module docstring)."""
        t0 = time.perf_counter()
        anchor_recs = self._anchor_records()
        keys = [r.key for r in anchor_recs] + [f.key for f in new_frames]
        try:
            pred = self._predict(anchor_recs, new_frames, keys, plan_next).validate(len(keys))
        except Exception:
            self._dropped_local["inference_error"] += len(new_frames)
            raise
        t_pred = time.perf_counter()
        if anchor_recs and anchor_recs[0].depth.shape != pred.resolution_hw:
            raise ValueError("predictor resolution changed within a sequence: "
                             f"{anchor_recs[0].depth.shape} -> {pred.resolution_hw}")
        frame_valid = [prediction_frame_valid(pred.extrinsic[i], pred.depth[i], pred.intrinsic[i])
                       for i in range(len(keys))]
        rng = np.random.default_rng([self.config.seed, self._windows])
        anchors = [(i, r) for i, r in enumerate(anchor_recs) if r.valid and frame_valid[i]]
        res, sim = self._odom_from_window(pred, anchors, frame_valid, rng)
        t_align = time.perf_counter()
        new_idx = list(range(len(anchor_recs), len(keys)))
        outputs = self._emit(pred, sim, res, anchors, new_idx, new_frames, frame_valid, rng)
        if plan_next:
            self._plan_next_window(self._anchor_records())
        timings = dict(pred.timings)
        timings.update(predict_s=t_pred - t0, align_s=t_align - t_pred,
                       total_s=time.perf_counter() - t0)
        self.last_window.timings = timings
        return outputs

    # ------------------------------------------------------------------ predictions
    def _predict(self, anchor_recs: list[FrameRecord], new_frames: list[QueuedFrame],
                 keys: list[int], plan_next: bool) -> WindowPrediction:
        """The window's prediction: the one started early if it has exactly these frames, else
        predicted now (on the prediction thread when pipelined).

        Pipelined, the next window is planned before this prediction is waited for: its
        anchors are this window's overlap (assuming it tracks; corrected after the emit if it
        does not, a prediction already started is then discarded), so when its frames are
        queued it runs right behind this one and the device never waits for the host."""
        with self._ahead_lock:
            early, self._lookahead, self._next_window = self._lookahead, None, None
            thread = self._predict_thread
        if early is not None and early.keys != tuple(keys):
            self._lookahead_misses += 1   # it finishes unobserved; the thread runs one at a time
            early = None
        if early is not None:
            self._lookahead_hits += 1
            result = early.result
        else:
            images = np.stack([r.image for r in anchor_recs] + [f.image for f in new_frames])
            if thread is None:
                return self.predictor.predict(images, keys)
            result = thread.submit(self.predictor.predict, images, keys)
        if plan_next:
            history = (list(self._history) + list(new_frames))[-self.config.overlap:]
            self._plan_next_window(self._select_anchors(history, None))
        return result.result()

    def _plan_next_window(self, anchors: Sequence) -> None:
        """Record the next window's anchors (records or queued frames, ``.key`` / ``.image``)
        and start its prediction if its new frames are already queued."""
        with self._ahead_lock:
            if self._predict_thread is None or self._lookahead is not None:
                return
            self._next_window = _NextWindow([a.key for a in anchors], [a.image for a in anchors],
                                            list(self._pending), self.config.stride)
        self._start_next_window()

    def _start_next_window(self) -> None:
        """Start the planned next window's prediction once its new frames are all queued."""
        with self._ahead_lock:
            plan = self._next_window
            if plan is None or self._lookahead is not None or self._predict_thread is None:
                return
            frames = plan.taken[:plan.need]
            if len(frames) < plan.need:
                queued = self._queue.pin_frames(plan.need - len(frames))
                if not queued:
                    return
                frames = frames + queued
            images = plan.anchor_images + [f.image for f in frames]
            if len({im.shape for im in images}) > 1:
                # never within a sequence (a size change queues a reset marker first); a
                # camera callback must not raise for it anyway
                self._next_window = None
                return
            keys = plan.anchor_keys + [f.key for f in frames]
            images = np.stack(images)
            self._lookahead = _Lookahead(tuple(keys), self._predict_thread.submit(
                self.predictor.predict, images, keys))
            self._next_window = None

    def _anchor_records(self) -> list[FrameRecord]:
        """[recovery anchor (only while LOST)], keyframes not in the overlap (oldest first), then
        the overlap frames.

        The recovery anchor takes the place of the oldest overlap frame instead of adding one:
        a window one frame longer is a new input shape, and on CUDA the compiled model then
        compiles for it (15-23 s on the H100) - in the first LOST window, when the stream is
        already in trouble. So windows keep ``window_size`` (+ keyframes) frames."""
        return self._select_anchors(list(self._history), self._recovery)

    def _select_anchors(self, history: list, recovery: Optional[FrameRecord]) -> list:
        """``_anchor_records`` for a given overlap ``history`` and recovery anchor (items with
        ``.key``): [recovery], keyframes not in the history, then the history."""
        extra = list(self._keyframes) if self.config.max_keyframes else []
        if recovery is not None:
            extra = [recovery] + extra
            if len(history) > 1 and all(r.key != recovery.key for r in history):
                history = history[1:]
        seen = {r.key for r in history}
        out = []
        for rec in extra:
            if rec.key not in seen:
                seen.add(rec.key)
                out.append(rec)
        return out + history

    def _odom_from_window(self, pred: WindowPrediction, anchors, frame_valid: list[bool],
                          rng: np.random.Generator) -> tuple[AlignResult, Sim3]:
        """First window: its frame 0 becomes the odometry origin (scale 1). Later windows:
        robust Sim(3) on the anchors; on failure ``res.ok`` is False and ``sim`` re-anchors."""
        if self._seq_windows == 0:
            if frame_valid[0]:
                wfc0 = invert_se3(to_homogeneous(pred.extrinsic[0]))
                sim = sim3_mapping_pose(wfc0, np.eye(4), 1.0)
                return AlignResult(True, sim, 0.0, 1.0, 0, "", 0.0), sim
            res = AlignResult(False, None,
                              reason="first frame of the sequence has no valid prediction")
        elif anchors:
            # After a failure, frames of re-anchored (untrusted) windows may disagree with the
            # trusted ones (last good frame, keyframes): align on the trusted ones when present.
            trusted = [(i, r) for i, r in anchors if r.trusted]
            res = align_window(pred, trusted or anchors, self.config.align, rng)
            if res.ok:
                return res, res.odom_from_window
        else:
            res = AlignResult(False, None, reason="no valid anchor frame in the window")
        sim, how = reanchor(pred, anchors, frame_valid, self._last_good_pose,
                            self._last_good_depth)
        res.reason = f"{res.reason}; re-anchored: {how}"
        return res, sim

    def _emit(self, pred: WindowPrediction, sim: Sim3, res: AlignResult, anchors,
              new_idx: list[int], new_frames: list[QueuedFrame], frame_valid: list[bool],
              rng: np.random.Generator) -> list[FrameOutput]:
        """New frames into the odometry frame: poses (held where the prediction is invalid),
        depth in odometry units, covariance, static points (fused when TRACKING), records."""
        lost = not res.ok
        state = "LOST" if lost else "TRACKING"
        hw = pred.resolution_hw
        world_from_cam_odom = sim.transform_world_from_cam(
            invert_se3(to_homogeneous(pred.extrinsic)))
        # depth of the new frames in odometry units (the overlap frames' depth is not emitted)
        depth_new = pred.depth[new_idx] * np.float32(sim.scale)                # [k, H, W]
        images_small = [self._resize(f.image, hw) for f in new_frames]
        poses = []
        for i in new_idx:
            if frame_valid[i]:
                self._last_pose = world_from_cam_odom[i]
            poses.append(self._last_pose.copy())      # invalid prediction -> hold the pose
        med_depths = [_median_valid(depth_new[j]) if frame_valid[i] else float("nan")
                      for j, i in enumerate(new_idx)]
        t_dis, r_dis = (0.0, 0.0) if lost else overlap_disagreement(sim, pred, anchors)
        cov = pose_covariance(res.residual, t_dis, r_dis, _nanmedian(med_depths), lost)

        # static points of the new frames only, so that each pixel is fused once
        pts = self._static_points(pred, new_idx, new_frames, depth_new, poses, images_small, rng)
        if not lost and len(pts[0]):
            self.static_map.insert(pts[0], pts[1], pts[2], camera_position=poses[-1][:3, 3])

        window_index = self._windows
        outputs = []
        for j, (i, f) in enumerate(zip(new_idx, new_frames)):
            rec = FrameRecord(f.key, f.stamp_ns, f.frame_id, f.image, images_small[j],
                              depth_new[j].copy(), pred.depth_conf[i].copy(),
                              pred.mask[i].copy(), pred.intrinsic[i].copy(), poses[j],
                              frame_valid[i], frame_valid[i] and not lost, med_depths[j])
            self._history.append(rec)
            if rec.trusted:
                self._last_good_pose, self._last_good_depth = rec.world_from_cam, rec.median_depth
                self._last_good_record = rec
                self._maybe_keyframe(rec)
            self._append_trajectory(f.stamp_ns, poses[j])
            outputs.append(FrameOutput(f.stamp_ns, f.frame_id, invert_se3(poses[j]), poses[j],
                                       cov.copy(), rec.depth, rec.conf, rec.mask,
                                       rec.image_small, rec.intrinsic, state, window_index,
                                       rec.trusted, self._sequence))
        stamps = np.array([f.stamp_ns for f in new_frames], np.int64)
        self.last_window = WindowOutput(window_index, state, stamps, *pts, res.residual,
                                        res.scale_drift, res.inlier_fraction, res.num_points,
                                        sim, res.reason, {})
        self._update_recovery_anchor(lost)
        self._update_state(state)
        self._windows += 1
        self._seq_windows += 1
        self._frames_out += len(outputs)
        return outputs

    def _update_recovery_anchor(self, lost: bool) -> None:
        """While LOST, keep re-showing the last good frame (bounded number of windows); a
        window that aligns ends it. After the budget, the re-anchored segment stands alone."""
        if not lost or not self.config.recovery_anchor_windows:
            self._recovery, self._recovery_windows = None, 0
            return
        if self._recovery is None and self._recovery_windows == 0:
            self._recovery = self._last_good_record
        self._recovery_windows += 1
        if self._recovery_windows > self.config.recovery_anchor_windows:
            self._recovery = None                     # expired until TRACKING resumes

    def _update_state(self, state: str) -> None:
        if state == "LOST":
            self._lost_windows += 1
            if self._state != "LOST":
                self._lost_events += 1
        elif self._state == "LOST":
            self._recoveries += 1
        self._state = state

    @staticmethod
    def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Input image -> predictor resolution (area interpolation; no-op if equal)."""
        if image.shape[:2] == hw:
            return image
        # PIL's BOX filter averages the covered source pixels (area interpolation).
        return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BOX))

    def _static_points(self, pred: WindowPrediction, new_idx: Sequence[int],
                       new_frames: Sequence[QueuedFrame], depth_new: np.ndarray,
                       poses: Sequence[np.ndarray], images_small: Sequence[np.ndarray],
                       rng: np.random.Generator):
        """Confident static pixels of the new frames -> (points [M,3] odom, colors [M,3], conf [M],
        source stamps [M], source uv [M,2]). ``depth_new`` [k,H,W]: depth of the new frames
        (``new_idx`` of the window) in odometry units. Vectorised over all new frames at once."""
        cfg = self.config
        idx = np.asarray(new_idx)
        k, h, w = len(idx), pred.depth.shape[1], pred.depth.shape[2]
        dyn = pred.mask[idx]
        if cfg.mask_dilation_px:
            dyn = _dilate_masks(dyn, cfg.mask_dilation_px)
        conf = pred.depth_conf[idx]
        frame_ok = np.isfinite(pred.extrinsic[idx]).all(axis=(1, 2))
        ok = (valid_depth(depth_new) & ~dyn & np.isfinite(conf)
              & (conf >= cfg.align.min_confidence) & frame_ok[:, None, None])
        flat = np.flatnonzero(ok.ravel())                       # index into [k, H, W]
        if len(flat) and cfg.points_conf_quantile > 0:
            c = conf.ravel()[flat]
            # the quantile is estimated on 100k samples (drawn with replacement: as good an
            # estimate, ~10x cheaper than a draw without replacement) for large windows
            probe = c if len(c) <= 100_000 else c[rng.integers(0, len(c), 100_000)]
            flat = flat[c >= np.quantile(probe, cfg.points_conf_quantile)]
        if len(flat) > cfg.max_points_per_window:
            flat = np.sort(rng.choice(flat, cfg.max_points_per_window, replace=False))
        owner, pix = np.divmod(flat, h * w)
        v, u = np.divmod(pix, w)
        d = depth_new.reshape(k, -1)[owner, pix].astype(np.float64)
        intr = pred.intrinsic[idx][owner]                       # [M, 3, 3]
        pose = np.stack(poses)[owner]                           # [M, 4, 4] world_from_cam (odom)
        x_cam = np.stack([(u - intr[:, 0, 2]) / intr[:, 0, 0] * d,
                          (v - intr[:, 1, 2]) / intr[:, 1, 1] * d, d], 1)
        pts = (np.einsum("mij,mj->mi", pose[:, :3, :3], x_cam) + pose[:, :3, 3]).astype(np.float32)
        cols = np.stack(images_small).reshape(k, -1, 3)[owner, pix]
        stamps = np.array([f.stamp_ns for f in new_frames], np.int64)[owner]
        conf_m = conf.reshape(k, -1)[owner, pix].astype(np.float32)
        return pts, cols, conf_m, stamps, np.stack([u, v], 1).astype(np.int32)

    def _maybe_keyframe(self, rec: FrameRecord) -> None:
        """Keep ``rec`` as a keyframe if it moved enough from the newest keyframe (bounded)."""
        cfg = self.config
        if cfg.max_keyframes == 0:
            return
        if self._keyframes:
            last = self._keyframes[-1]
            depth = last.median_depth
            depth = depth if np.isfinite(depth) and depth > 0 else 1.0
            a, b = last.world_from_cam, rec.world_from_cam
            parallax = np.linalg.norm(b[:3, 3] - a[:3, 3]) / depth
            angle = np.degrees(rotation_angle(a[:3, :3].T @ b[:3, :3]))
            if parallax < cfg.keyframe_min_parallax and angle < cfg.keyframe_min_rotation_deg:
                return
        self._keyframes.append(rec)

    def _append_trajectory(self, stamp_ns: int, world_from_cam: np.ndarray) -> None:
        slot = self._traj_count % self.config.trajectory_capacity
        self._traj_stamp[slot] = stamp_ns
        self._traj_tq[slot] = pose_to_tqxyzw(world_from_cam)
        self._traj_count += 1


def _dilate_masks(masks: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation (side ``2·radius + 1``) of each mask of ``masks [K, H, W]`` bool; pixels
    beyond the border count as False. Same result as ``ndimage.maximum_filter(size=(1, s, s),
    mode="constant", cval=False)``, ~5x faster (OpenCV, per frame)."""
    import cv2
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    out = np.empty(masks.shape, bool)
    for i, m in enumerate(masks.astype(np.uint8)):
        out[i] = cv2.dilate(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    return out


def _median_valid(depth: np.ndarray) -> float:
    """Median of the valid (finite, > 0) depth values; NaN if none."""
    ok = valid_depth(depth)
    return float(np.median(depth[ok])) if ok.any() else float("nan")


def _nanmedian(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")
