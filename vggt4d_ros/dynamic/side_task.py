"""Run a piece of GPU work on a second CUDA stream while the caller keeps the GPU busy.

VGGT4D's small stages (k-means over the DINO tokens, the pose-free half of the refinement)
are bound by kernel launches and host round trips, not by the GPU; the model passes are the
opposite. :class:`SideTask` runs such a stage in a worker thread on its own CUDA stream, so
its launches and synchronisations proceed while the main thread's pass occupies the GPU.

Stream safety (why the worker synchronises its stream before it ends): the caller's inputs
were produced on the main stream, so the side stream first waits for it; the inputs stay
referenced by the worker until its kernels have finished, so the caching allocator cannot
hand their memory to another stream early; the outputs are complete when :meth:`result`
returns, and the main stream waits for the side stream before using them.

A side task must not call ``torch.compile``'d code: dynamo's tracing state is process-wide,
and a compilation in one thread breaks compiled calls in the other (seen on the device: "FX
to symbolically trace a dynamo-optimized function"). Triton kernels and eager ops are fine.

On CPU (or with ``enabled=False``) the function runs inline when the task is created: same
results, no thread.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch


class SideTask:
    """``SideTask(fn, device)`` starts ``fn()``; ``.result()`` waits for and returns its value.

    ``seconds`` is the task's own wall time (valid after :meth:`result`). Exceptions raised
    by ``fn`` are re-raised by :meth:`result` in the caller's thread. Gradients are off in
    the worker (``torch.no_grad``), as in the pipeline that uses it.
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, enabled: bool = True,
                 name: str = "vggt4d-side") -> None:
        self.seconds = 0.0
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._device = device
        if enabled and device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))
            self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
            self._thread.start()
        else:
            self._run(fn)

    @property
    def overlapped(self) -> bool:
        """True when the task runs concurrently (worker thread + side stream)."""
        return self._stream is not None

    def _run(self, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            if self._stream is None:
                self._value = fn()
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
        """Wait for the task; the caller's current stream is ordered after its GPU work."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        if self._error is not None:
            raise self._error
        return self._value
