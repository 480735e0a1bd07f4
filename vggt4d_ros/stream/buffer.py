"""Input side of the engine: frame validation, the bounded input queue and its drop policy.

Defined behaviour for imperfect input (stamps are compared with the last ACCEPTED stamp):

==========================================  ===============================================
situation                                   behaviour
==========================================  ===============================================
stamp equal to the last accepted stamp      dropped, counted as ``duplicate``
stamp older by <= ``backwards_reset_ns``    dropped, counted as ``out_of_order`` (small reorder)
stamp older by  > ``backwards_reset_ns``    new sequence (bag loop / replay restart): the engine
                                            RESETs (reason ``stamp_backwards``), frame accepted
image size differs from the sequence's      RESET (reason ``image_size_changed``), frame accepted
queue full (policy ``drop_oldest``)         oldest queued frame dropped, counted ``queue_full``
                                            (frames pinned for a started prediction are
                                            neither dropped nor counted in ``max_queue``)
not a uint8 [H,W,3] array / bad stamp type  ValueError (a caller bug, not a data condition)
==========================================  ===============================================

Policy ``keep_all`` (offline replay) never drops for lack of room; ``drop_oldest`` (live)
keeps at most ``max_queue`` frames waiting for the worker, so latency stays bounded (plus at
most one window's new frames whose prediction has started, see ``pin_frames``).
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

DROP_POLICIES = ("drop_oldest", "keep_all")


@dataclass
class FrameInput:
    """One camera frame: ``stamp_ns`` (int, ns, from the source header), ``image`` [H,W,3] uint8
    RGB, ``frame_id`` (the camera frame name, carried to the outputs)."""

    stamp_ns: int
    image: np.ndarray
    frame_id: str = "camera"


@dataclass
class QueuedFrame:
    """A frame accepted by the input stage, with the engine-unique ``key`` (never reused)."""

    key: int
    stamp_ns: int
    image: np.ndarray
    frame_id: str


@dataclass
class ResetMarker:
    """Queued between the frames of two sequences: the worker resets when it reaches it."""

    reason: str


QueueItem = Union[QueuedFrame, ResetMarker]


def validate_frame(frame: FrameInput) -> None:
    """Raise ValueError unless ``frame`` is an int stamp and a uint8 [H,W,3] image (H, W >= 2)."""
    if not isinstance(frame.stamp_ns, (int, np.integer)) or isinstance(frame.stamp_ns, bool):
        raise ValueError("FrameInput.stamp_ns must be an int (nanoseconds), "
                         f"got {type(frame.stamp_ns).__name__}")
    img = frame.image
    if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3
            or img.shape[2] != 3):
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"FrameInput.image must be a uint8 [H,W,3] RGB array, got {desc}")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"FrameInput.image too small: {img.shape}")


class InputQueue:
    """Thread-safe input stage: validates stamps/sizes, assigns keys, applies the drop policy.

    ``submit`` is cheap (safe to call from a camera callback); ``pop`` / ``pin_frames`` are
    the worker's (the engine serialises their callers).
    """

    def __init__(self, drop_policy: str = "keep_all", max_queue: int = 64,
                 backwards_reset_ns: int = 1_000_000_000):
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if backwards_reset_ns < 0:
            raise ValueError(f"backwards_reset_ns must be >= 0, got {backwards_reset_ns}")
        self.drop_policy = drop_policy
        self.max_queue = int(max_queue)
        self.backwards_reset_ns = int(backwards_reset_ns)
        self._lock = threading.Lock()
        self._items: deque[QueueItem] = deque()
        self._n_frames = 0                    # frames (not markers) in _items
        self._pinned = 0                      # the oldest items, frames never dropped
        self._next_key = 0                    # keys are never reused, even across resets
        self._last_stamp: Optional[int] = None
        self._shape: Optional[tuple[int, int]] = None
        self.frames_in = 0
        self.dropped: Counter[str] = Counter()

    def submit(self, frame: FrameInput) -> Optional[str]:
        """Validate and enqueue. Returns None if accepted, else the drop reason.

        A reset-triggering frame is accepted (returns None) after a ``ResetMarker``.
        """
        validate_frame(frame)
        stamp = int(frame.stamp_ns)
        shape = frame.image.shape[:2]
        with self._lock:
            self.frames_in += 1
            reset_reason = None
            if self._last_stamp is not None:
                if stamp == self._last_stamp:
                    return self._drop("duplicate")
                if stamp < self._last_stamp:
                    if self._last_stamp - stamp <= self.backwards_reset_ns:
                        return self._drop("out_of_order")
                    reset_reason = "stamp_backwards"
            if reset_reason is None and self._shape is not None and shape != self._shape:
                reset_reason = "image_size_changed"
            if reset_reason is not None:
                self._items.append(ResetMarker(reset_reason))
            self._last_stamp = stamp
            self._shape = shape
            self._items.append(QueuedFrame(self._next_key, stamp, frame.image, str(frame.frame_id)))
            self._next_key += 1
            self._n_frames += 1
            if self.drop_policy == "drop_oldest":
                while self._n_frames - self._pinned > self.max_queue:
                    self._drop_oldest_frame()
            return None

    def _drop(self, reason: str) -> str:
        self.dropped[reason] += 1
        return reason

    def _drop_oldest_frame(self) -> None:
        for i, item in enumerate(self._items):
            if i >= self._pinned and isinstance(item, QueuedFrame):
                del self._items[i]
                self._n_frames -= 1
                self.dropped["queue_full"] += 1
                return

    def pop(self) -> Optional[QueueItem]:
        """Take the oldest queued item (frame or reset marker), None if the queue is empty."""
        with self._lock:
            if not self._items:
                return None
            item = self._items.popleft()
            self._pinned = max(self._pinned - 1, 0)
            if isinstance(item, QueuedFrame):
                self._n_frames -= 1
            return item

    def num_items(self) -> int:
        """Queued items: frames and reset markers."""
        with self._lock:
            return len(self._items)

    def pin_frames(self, n: int) -> list[QueuedFrame]:
        """Pin the oldest ``n`` queued frames (the next window's, whose prediction starts now)
        and return them, if the queue holds that many before any reset marker; else pin
        nothing and return []. Pinned frames are already being predicted: ``drop_oldest``
        neither drops them (that would void the prediction) nor counts them against
        ``max_queue`` (they are not waiting). ``pop`` unpins them as it takes them."""
        with self._lock:
            frames = []
            for item in self._items:
                if len(frames) >= n or isinstance(item, ResetMarker):
                    break
                frames.append(item)
            if len(frames) < n:
                return []
            self._pinned = n
            return frames

    def clear(self) -> int:
        """Forget queued frames and the stamp/size history (engine reset).

        Returns the number of frames discarded."""
        with self._lock:
            n = self._n_frames
            self._items.clear()
            self._n_frames = self._pinned = 0
            self._last_stamp = None
            self._shape = None
            return n

    def __len__(self) -> int:
        with self._lock:
            return self._n_frames

    @property
    def pinned(self) -> int:
        """Queued frames pinned for a started prediction (see ``pin_frames``)."""
        with self._lock:
            return self._pinned
