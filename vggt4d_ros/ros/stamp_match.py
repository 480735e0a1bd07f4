"""Pair each Image with the CameraInfo of the same stamp — a small cache instead of
message_filters (not available without a ROS install).

Stamps are integer nanoseconds (``header.stamp`` converted once by the caller). An image
matches the info whose stamp is equal, or the closest one within ``tolerance_ns``. The cache is
bounded (oldest entries evicted) and keyed by stamp, so duplicate stamps replace each other.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time → integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampCache(Generic[T]):
    """Thread-safe bounded map ``stamp_ns -> item`` with exact-or-nearest lookup.

    Args:
        capacity: items kept (oldest inserted evicted first), >= 1.
        tolerance_ns: largest |stamp difference| accepted by :meth:`match` (0 = exact only).
    """

    def __init__(self, capacity: int = 32, tolerance_ns: int = 0) -> None:
        if capacity < 1 or tolerance_ns < 0:
            raise ValueError(f"capacity must be >= 1 and tolerance >= 0, got {capacity}, "
                             f"{tolerance_ns}")
        self.capacity = capacity
        self.tolerance_ns = tolerance_ns
        self._items: "OrderedDict[int, T]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, stamp_ns: int, item: T) -> None:
        """Insert (or replace) the item for ``stamp_ns``; evicts the oldest beyond capacity."""
        with self._lock:
            self._items.pop(stamp_ns, None)
            self._items[stamp_ns] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def match(self, stamp_ns: int) -> Optional[T]:
        """The item with the same stamp, else the nearest within tolerance, else None."""
        with self._lock:
            if stamp_ns in self._items:
                return self._items[stamp_ns]
            if not self.tolerance_ns or not self._items:
                return None
            best = min(self._items, key=lambda s: abs(s - stamp_ns))
            return self._items[best] if abs(best - stamp_ns) <= self.tolerance_ns else None

    def latest(self) -> Optional[T]:
        """The most recently inserted item (None when empty)."""
        with self._lock:
            return next(reversed(self._items.values())) if self._items else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
