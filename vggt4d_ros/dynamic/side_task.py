"""Run a piece of GPU work on a second CUDA stream while the caller keeps the GPU busy.

VGGT4D's small stages (k-means over the DINO tokens, the pose-free half of the refinement)
are bound by kernel launches and host round trips, not by the GPU; the model passes are the
opposite: their kernels are queued far ahead of the GPU (H100, 16 frames: pass 1's launches
return after 57 ms, its kernels finish after 108 ms). :class:`SideTask` runs such a stage on
its own CUDA stream, in one of three modes:

* ``"inline"``: at creation, on the caller's stream (the plain order);
* ``"deferred"``: on the caller's thread when :meth:`SideTask.launch` is called - the caller
  first queues a model pass, then launches the task, whose host work (Python, launches, host
  reads of its own stream) then fills the time the CPU would otherwise spend waiting for
  that pass; its kernels run beside the pass's on a high-priority stream;
* ``"thread"``: at creation, in a worker thread (the worker's Python competes with the
  caller's launches for the GIL; measured slower than in order on the device, run 10).

Stream safety: the side stream waits for the caller's stream as it was at creation (the
inputs are complete, later work is not waited for); the task keeps its inputs referenced
and synchronises its own stream before it ends, so the caching allocator cannot hand their
memory to another stream early; :meth:`SideTask.result` orders the caller's stream after
the task's work.

A threaded task must not call ``torch.compile``'d code: dynamo's tracing state is
process-wide, and a compilation in one thread breaks compiled calls in the other (seen on
the device: "FX to symbolically trace a dynamo-optimized function"). Triton kernels and
eager ops are fine.

On CPU there is no stream: "thread" runs inline, "deferred" still runs at ``launch()``.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch


SIDE_TASK_MODES = ("inline", "deferred", "thread")


class SideTask:
    """``SideTask(fn, device, mode)`` runs ``fn()`` (see the module doc for when);
    ``.result()`` waits for and returns its value.

    ``seconds`` is the task's own wall time, its GPU work included (valid after
    :meth:`result`); ``stage`` names its ``torch.profiler`` range (``vggt4d::<stage>``, as the
    pipeline's timed stages). Exceptions raised by ``fn`` are re-raised by :meth:`result` in
    the caller's thread. Gradients are off on the side stream (``torch.no_grad``), as in the
    pipeline that uses it.
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, mode: str = "thread",
                 name: str = "vggt4d-side", stage: Optional[str] = None) -> None:
        if mode not in SIDE_TASK_MODES:
            raise ValueError(f"side task mode must be one of {SIDE_TASK_MODES}, got {mode!r}")
        self.seconds = 0.0
        self._stage = stage
        self._fn: Optional[Callable[[], Any]] = fn
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._device = device
        cuda = device.type == "cuda"
        if cuda and mode != "inline":
            # high priority: its few small kernels go ahead of the queued pass's next ones
            self._stream = torch.cuda.Stream(device, priority=-1)
            self._stream.wait_stream(torch.cuda.current_stream(device))
        if mode == "thread" and cuda:
            self._thread = threading.Thread(target=self.launch, name=name, daemon=True)
            self._thread.start()
        elif mode != "deferred":
            self.launch()

    @property
    def overlapped(self) -> bool:
        """True when the task runs on its own stream (worker thread or deferred)."""
        return self._stream is not None

    def launch(self) -> None:
        """Run the task now if it has not run (a deferred task: right after the caller has
        queued the GPU work the task should run beside)."""
        fn, self._fn = self._fn, None
        if fn is None:
            return
        t0 = time.perf_counter()
        if self._stage is not None:     # a named range for the profiler (no-op otherwise)
            fn = _in_profiler_range(fn, f"vggt4d::{self._stage}")
        try:
            if self._stream is None:
                self._value = fn()
                if self._device.type == "cuda":     # inline: its kernels count in `seconds`
                    torch.cuda.current_stream(self._device).synchronize()
            else:
                with torch.no_grad(), torch.cuda.device(self._device), \
                        torch.cuda.stream(self._stream):
                    self._value = fn()
                    self._stream.synchronize()
        except BaseException as exc:          # re-raised in the caller's thread
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def result(self) -> Any:
        """Wait for the task (a deferred one not yet launched runs now); the caller's current
        stream is ordered after its GPU work."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self.launch()
        if self._stream is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        if self._error is not None:
            raise self._error
        return self._value


def _in_profiler_range(fn: Callable[[], Any], label: str) -> Callable[[], Any]:
    def ranged() -> Any:
        with torch.profiler.record_function(label):
            return fn()
    return ranged
