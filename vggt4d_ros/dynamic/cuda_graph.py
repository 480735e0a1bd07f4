"""CUDA-graph capture of small, launch-bound loops (the fast k-means paths).

A function that only launches kernels on static buffers (no host synchronisation, no
data-dependent shapes) is run once on a side stream (the warm-up torch.cuda.graph asks for:
cuBLAS workspaces, lazy initialisations) and captured; replaying the graph then costs one
launch instead of one per kernel. The two functions here are the only place that decides
whether and how to capture, so that tests can emulate them on the CPU (``capture`` returning
the function itself, ``usable`` returning True) and run the exact buffer/replay logic.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Generic, Hashable, Iterator, Optional, TypeVar

import torch
from torch import Tensor


def usable(t: Tensor) -> bool:
    """Whether work on ``t``'s device can be captured (CUDA)."""
    return t.is_cuda


def capture(fn: Callable[[], None], device: torch.device, priority: int = -1
            ) -> Callable[[], None]:
    """Warm ``fn`` up on a side stream, capture it; returns the graph's replay (which keeps
    the graph alive). ``fn`` runs exactly once for real (the warm-up): it must leave its
    buffers in a state the caller re-initialises before the first replay.

    ``priority``: of the capture stream, which the captured kernels keep whatever stream
    replays them. High (-1, default) for the side stages, as the pipeline's side stream
    (side_task.py): captured on a normal stream, their graphs queued behind the model pass
    they should interleave with (run 23 on the H100: graphs then made the stream slower, 22.2
    vs 24.3 frames/s). A model pass itself is captured at normal priority (0), so that those
    side stages still go ahead of it."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device, priority=priority)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread (the pipeline's side task, the node's worker) may launch
    # work while this one captures
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        fn()
    return graph.replay


T = TypeVar("T")
_named_caches: "Dict[str, GraphCache]" = {}


def cache_stats() -> Dict[str, Dict[str, int]]:
    """Per named cache: ``hits`` (replays of a cached graph), ``builds`` (captures), ``size``."""
    return {name: {"hits": c.hits, "builds": c.builds, "size": len(c)}
            for name, c in _named_caches.items()}


@contextmanager
def scaled_capacities(factor: int) -> Iterator[None]:
    """Every named cache keeps ``factor`` times its capacity for the duration, restored after
    (surplus entries go at the next build): an A/B of ``factor`` configurations in one
    process, each with graphs of its own, must not evict and recapture in every call."""
    saved = {name: c.capacity for name, c in _named_caches.items()}
    for name, c in _named_caches.items():
        c.capacity = saved[name] * max(1, factor)
    try:
        yield
    finally:
        for name, c in _named_caches.items():
            c.capacity = saved.get(name, c.capacity)


class GraphCache(Generic[T]):
    """Thread-safe LRU cache of captured objects by shape key: a stream reuses a few window
    shapes; each entry holds its static buffers and graph memory, so only ``capacity`` are
    kept (the least recently used is dropped; a caller still using it keeps it alive).

    A build (capture) that raises disables the cache for the rest of the process with ONE
    warning: ``get`` then returns None and callers run their eager path (same results), so a
    driver or PyTorch that cannot capture costs speed, never windows."""

    def __init__(self, capacity: int, name: str = "") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.name = name
        self.hits = 0           # replays of a cached entry
        self.builds = 0         # captures (a stream whose shapes keep changing shows here)
        if name:
            _named_caches[name] = self
        self._lock = threading.Lock()
        self._items: "OrderedDict[Hashable, T]" = OrderedDict()
        self.disabled_reason = ""

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, build: Callable[[], T]) -> Optional[T]:
        """The entry of ``key``, built (and captured) on first use; None once disabled."""
        with self._lock:
            if self.disabled_reason:
                return None
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.builds += 1
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
            try:
                # normal tensors, not inference tensors: an entry built during an
                # inference_mode call must take in-place updates from no_grad callers too
                with torch.inference_mode(False):
                    item = build()
            except RuntimeError as exc:          # capture refused by CUDA / PyTorch
                self.disabled_reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                self._items.clear()
                warnings.warn(f"CUDA-graph capture failed ({self.disabled_reason}); running "
                              "the eager path from now on (same results, slower)",
                              RuntimeWarning, stacklevel=3)
                return None
            self._items[key] = item
            return item
