"""Out-of-memory fallback: a ``WindowPredictor`` wrapper that shrinks the window on OOM.

``AdaptiveWindowPredictor(inner, FallbackConfig(min_window_size=9))`` behaves exactly like
``inner`` until ``inner.predict`` raises an out-of-memory error (``torch.cuda.OutOfMemoryError``,
a predictor's own :class:`WindowTooLargeError`, a ``MemoryError``, or a ``RuntimeError`` saying
"out of memory" / "can't allocate memory" — the CPU allocator's words). Then it

1. drops the exception (and with it the traceback that pins the failed window's tensors),
   runs ``gc.collect()`` and ``torch.cuda.empty_cache()`` (when CUDA is initialised);
2. lowers its frame limit to ``max(min_window_size, floor(shrink_factor · tried))`` (at least one
   frame fewer than the size that failed) and re-runs the SAME window on its NEWEST ``limit``
   frames — the engine orders a window ``[keyframes, overlap, new]``, so the oldest anchors go
   first and the overlap that aligns the window is kept as far as the limit allows;
3. keeps the limit for the following windows (no repeated OOM per window), and, when
   ``grow_after > 0``, tries one frame more after every ``grow_after`` consecutive successful
   windows (an OOM puts it back down). ``grow_after = 0`` (default) never grows back: an OOM
   on a given device and resolution is reproducible, so growing back would only trade
   latency spikes for a few more overlap frames.

Frames left out of a shrunk window are returned as INVALID predictions (extrinsic and depth
NaN, confidence 0, mask False, intrinsic copied from the oldest kept frame); the engine never
uses invalid frames as anchors and holds the pose of an invalid NEW frame. With
``min_window_size > stride`` every new frame of a steady-state window is predicted; only the
first window of a sequence (``window_size`` new frames) can lose its oldest frames, which the
engine then reports as LOST and re-anchors (see ``stream/engine.py``).

If the window does not fit even at ``min_window_size`` a :class:`WindowTooLargeError` is raised:
the caller drops the window (the node counts it as an inference error and carries on).

Counters for /diagnostics: :meth:`AdaptiveWindowPredictor.stats`. Everything else (``label``,
``random_weights``, ...) is forwarded to ``inner``. Not thread-safe: one worker calls predict.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vggt4d_ros.stream.predictor import WindowPrediction

__all__ = ["AdaptiveWindowPredictor", "FallbackConfig", "WindowTooLargeError",
           "with_oom_fallback", "is_out_of_memory", "free_accelerator_memory"]


class WindowTooLargeError(MemoryError):
    """A window does not fit in (accelerator) memory. Predictors may raise it themselves
    (e.g. from a memory estimate) instead of waiting for the allocator to fail."""


@dataclass
class FallbackConfig:
    """OOM fallback settings.

    min_window_size: smallest window (frames) worth running; >= 2. Choose it > the engine's
        stride so that every new frame is always predicted.
    shrink_factor: next limit = floor(shrink_factor × frames that failed), in (0, 1).
    grow_after: successful windows at a reduced limit before trying one frame more (0 = never).
    """

    min_window_size: int = 2
    shrink_factor: float = 0.75
    grow_after: int = 0

    def __post_init__(self) -> None:
        if self.min_window_size < 2:
            raise ValueError(f"min_window_size must be >= 2, got {self.min_window_size}")
        if not 0.0 < self.shrink_factor < 1.0:
            raise ValueError(f"shrink_factor must be in (0, 1), got {self.shrink_factor}")
        if self.grow_after < 0:
            raise ValueError(f"grow_after must be >= 0, got {self.grow_after}")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for allocation failures: torch.cuda.OutOfMemoryError, WindowTooLargeError (and any
    MemoryError), RuntimeErrors whose message says "out of memory" (cuDNN / cuBLAS / older
    torch) or "can't allocate memory" (torch's CPU allocator)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def free_accelerator_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (no-op without CUDA)."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def invalid_prediction(num_frames: int, like: WindowPrediction) -> WindowPrediction:
    """``num_frames`` frames that the engine treats as not predicted (NaN pose and depth,
    zero confidence, static mask), at ``like``'s resolution, intrinsic of ``like``'s frame 0."""
    h, w = like.resolution_hw
    intr = np.repeat(np.asarray(like.intrinsic, np.float64)[:1], num_frames, axis=0)
    return WindowPrediction(extrinsic=np.full((num_frames, 3, 4), np.nan),
                            intrinsic=intr,
                            depth=np.full((num_frames, h, w), np.nan, np.float32),
                            depth_conf=np.zeros((num_frames, h, w), np.float32),
                            mask=np.zeros((num_frames, h, w), bool))


class AdaptiveWindowPredictor:
    """``WindowPredictor`` that retries a window with fewer frames after an OOM (see module)."""

    def __init__(self, inner: Any, config: Optional[FallbackConfig] = None,
                 free_memory: Callable[[], None] = free_accelerator_memory) -> None:
        if not hasattr(inner, "predict"):
            raise ValueError("inner predictor must have a predict(images, frame_keys) method")
        self.inner = inner
        self.config = config or FallbackConfig()
        self._free_memory = free_memory
        self.limit: Optional[int] = None   # max frames per call; None = whatever is asked
        self.oom_retries = 0               # predict calls that failed with OOM and were retried
        self.oom_windows_dropped = 0       # windows that did not fit even at min_window_size
        self.windows_shrunk = 0            # windows run with fewer frames than asked
        self.frames_not_predicted = 0      # frames returned invalid because of the limit
        self.last_window_frames = 0        # frames actually predicted in the last window
        self.last_oom = ""                 # first line of the last OOM message
        self._successes_at_limit = 0

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper: label, random_weights, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def stats(self) -> dict[str, Any]:
        """Counters for /diagnostics (plain values)."""
        return {"oom_retries": self.oom_retries,
                "oom_windows_dropped": self.oom_windows_dropped,
                "window_limit": self.limit if self.limit is not None else "none",
                "window_frames_last": self.last_window_frames,
                "windows_shrunk": self.windows_shrunk,
                "frames_not_predicted": self.frames_not_predicted}

    def predict(self, images: np.ndarray, frame_keys: Sequence[int]) -> WindowPrediction:
        """images [S,H,W,3] uint8 RGB (oldest first) -> WindowPrediction of S frames; frames
        beyond the current limit (the oldest) come back invalid. Raises WindowTooLargeError
        when even ``min_window_size`` frames do not fit."""
        total = len(frame_keys)
        if len(images) != total:
            raise ValueError(f"{len(images)} images but {total} frame keys")
        while True:
            n = total if self.limit is None else min(total, self.limit)
            try:
                pred = self.inner.predict(images[total - n:], list(frame_keys)[total - n:])
                break
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                self.last_oom = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            # outside the except block: the exception and its frames are released
            self._free_memory()
            if n <= self.config.min_window_size:
                self.oom_windows_dropped += 1
                raise WindowTooLargeError(
                    f"window of {n} frames does not fit in memory even at min_window_size="
                    f"{self.config.min_window_size} ({self.last_oom}); lower the model input "
                    "width (node: model.image_width, replay: --resolution) or use a larger "
                    "device")
            self.oom_retries += 1
            self.limit = max(self.config.min_window_size,
                             min(n - 1, int(math.floor(self.config.shrink_factor * n))))
            self._successes_at_limit = 0
        self.last_window_frames = n
        self._after_success(total)
        if n == total:
            return pred
        self.windows_shrunk += 1
        self.frames_not_predicted += total - n
        return _prepend(invalid_prediction(total - n, pred), pred)

    def _after_success(self, asked: int) -> None:
        """Grow the limit by one frame every ``grow_after`` successes (if enabled)."""
        if self.limit is None or not self.config.grow_after:
            return
        self._successes_at_limit += 1
        if self._successes_at_limit >= self.config.grow_after:
            self._successes_at_limit = 0
            self.limit += 1
            if self.limit >= asked:
                self.limit = None


def with_oom_fallback(predictor: Any, min_window: int, stride: int) -> AdaptiveWindowPredictor:
    """``predictor`` inside the fallback as the node and the replay configure it: windows
    shrink down to ``min_window`` frames, 0 meaning ``stride + 1`` (every new frame of a
    steady-state window is still predicted)."""
    return AdaptiveWindowPredictor(predictor, FallbackConfig(min_window_size=min_window
                                                             or stride + 1))


def _prepend(head: WindowPrediction, tail: WindowPrediction) -> WindowPrediction:
    """Concatenate two predictions along frames (head first); timings of ``tail``."""
    return WindowPrediction(
        extrinsic=np.concatenate([head.extrinsic, np.asarray(tail.extrinsic, np.float64)[:, :3]]),
        intrinsic=np.concatenate([head.intrinsic, np.asarray(tail.intrinsic, np.float64)]),
        depth=np.concatenate([head.depth, np.asarray(tail.depth, np.float32)]),
        depth_conf=np.concatenate([head.depth_conf, np.asarray(tail.depth_conf, np.float32)]),
        mask=np.concatenate([head.mask, np.asarray(tail.mask, bool)]),
        timings=dict(tail.timings))
