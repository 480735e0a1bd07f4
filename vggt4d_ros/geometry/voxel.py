"""Voxel-grid fusion of static points with a fixed memory ceiling, and binary PLY export.

``VoxelMap`` keeps, per occupied voxel (cubic cells of side ``voxel_size`` in the map frame,
the odometry frame in the engine): the running mean position, running mean colour, mean
confidence, a hit count and the insert tick at which it was last updated. Everything is
stored in flat numpy arrays indexed by a sorted array of packed int64 voxel keys (key ->
storage slot), so an insert is a few vectorised passes (np.unique + searchsorted + a merge of
the 12-byte index entries, not of the storage) with no per-point Python loop.

Memory ceiling: at most ``max_voxels`` voxels. When an insert exceeds it, the voxels NOT
touched for the longest time are evicted first and, among equally old ones, those farthest
from ``camera_position`` (the current camera centre passed to ``insert``; without it, the
fewest hits go first). Voxels updated by the current insert therefore survive unless the
insert alone overflows the map. Storage grows by doubling up to ``max_voxels`` and never
beyond, so retained memory is bounded by ≈ 84 bytes · max_voxels.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

_BITS = 21                        # bits per axis in the packed key
_OFFSET = 1 << (_BITS - 1)        # voxel index range [-2^20, 2^20)
_MASK = (1 << _BITS) - 1


def pack_voxel_keys(ijk: np.ndarray) -> np.ndarray:
    """Integer voxel indices [N, 3] (each in [-2^20, 2^20)) -> packed int64 keys [N]."""
    u = (ijk.astype(np.int64) + _OFFSET)
    return (u[:, 0] << (2 * _BITS)) | (u[:, 1] << _BITS) | u[:, 2]


def unpack_voxel_keys(keys: np.ndarray) -> np.ndarray:
    """Packed int64 keys [N] -> integer voxel indices [N, 3]."""
    keys = keys.astype(np.int64)
    ijk = np.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], 1)
    return ijk - _OFFSET


class VoxelMap:
    """Bounded voxel map of static points (map frame, metres up to the odometry scale).

    Args:
        voxel_size: cell side (> 0, map units).
        max_voxels: hard ceiling on the number of voxels (>= 1).
    """

    _FIELDS = ("keys", "sum_xyz", "sum_rgb", "sum_conf", "count", "tick")

    def __init__(self, voxel_size: float = 0.05, max_voxels: int = 500_000):
        if not (voxel_size > 0 and np.isfinite(voxel_size)):
            raise ValueError("VoxelMap: voxel_size must be a positive finite number, "
                             f"got {voxel_size}")
        if int(max_voxels) < 1:
            raise ValueError(f"VoxelMap: max_voxels must be >= 1, got {max_voxels}")
        self.voxel_size = float(voxel_size)
        self.max_voxels = int(max_voxels)
        self.evicted_total = 0           # voxels evicted since creation / clear()
        self.rejected_points = 0         # points outside the representable key range
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Drop every voxel and release storage beyond a small initial capacity."""
        self._alloc(min(1024, self.max_voxels))
        self._n = 0
        self._tick = 0

    def _alloc(self, capacity: int) -> None:
        # index: keys sorted ascending and the storage slot of each (lookups by searchsorted)
        self._keys = np.empty(capacity, np.int64)
        self._slot = np.empty(capacity, np.int32)
        # storage, by slot (always the compact range [0, n)): sums, hits, last insert tick
        self._sum_xyz = np.empty((capacity, 3), np.float64)
        self._sum_rgb = np.empty((capacity, 3), np.float64)
        self._sum_conf = np.empty(capacity, np.float64)
        self._count = np.empty(capacity, np.int64)
        self._last_tick = np.empty(capacity, np.int64)

    def _grow(self, needed: int) -> None:
        cap = len(self._keys)
        if needed <= cap:
            return
        new_cap = min(max(needed, 2 * cap), self.max_voxels)
        old = self._arrays()
        self._alloc(new_cap)
        n = self._n
        for dst, src in zip(self._arrays(), old):
            dst[:n] = src[:n]

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The per-voxel index and storage arrays, in a fixed order."""
        return (self._keys, self._slot, self._sum_xyz, self._sum_rgb, self._sum_conf,
                self._count, self._last_tick)

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the index and storage arrays (capacity, not only the used part)."""
        return sum(a.nbytes for a in self._arrays())

    # ----------------------------------------------------------------- insert
    def insert(self, points: np.ndarray, colors: Optional[np.ndarray] = None,
               confidence: Optional[np.ndarray] = None,
               camera_position: Optional[np.ndarray] = None) -> None:
        """Fuse points [N, 3] (map frame) with colours [N, 3] uint8 RGB and confidence [N].

        Non-finite points are ignored. ``camera_position`` [3] (map frame) steers eviction.
        """
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"VoxelMap.insert: points must be [N, 3], got {points.shape}")
        n_in = points.shape[0]
        if colors is None:
            colors = np.full((n_in, 3), 255, np.uint8)
        colors = np.asarray(colors)
        if colors.shape != (n_in, 3):
            raise ValueError(f"VoxelMap.insert: colors must be [{n_in}, 3], got {colors.shape}")
        conf = (np.ones(n_in) if confidence is None
                else np.asarray(confidence, np.float64).reshape(-1))
        if conf.shape[0] != n_in:
            raise ValueError(f"VoxelMap.insert: confidence must be [{n_in}], got {conf.shape}")
        self._tick += 1
        pts = points.astype(np.float64, copy=False)
        ijk = np.floor(pts / self.voxel_size)
        ok = np.isfinite(ijk).all(1) & np.isfinite(conf)
        in_range = ok.copy()
        in_range[ok] = (np.abs(ijk[ok]) < _OFFSET - 1).all(1)
        self.rejected_points += int(ok.sum() - in_range.sum())
        if not in_range.any():
            return
        pts, ijk = pts[in_range], ijk[in_range].astype(np.int64)
        rgb, conf = colors[in_range].astype(np.float64), conf[in_range]

        keys, inverse = np.unique(pack_voxel_keys(ijk), return_inverse=True)
        m = len(keys)
        inverse = inverse.reshape(-1)
        # vectorised scatter-add per column (bincount is much faster than np.add.at)
        add_xyz = np.stack([np.bincount(inverse, weights=pts[:, c], minlength=m)
                            for c in range(3)], 1)
        add_rgb = np.stack([np.bincount(inverse, weights=rgb[:, c], minlength=m)
                            for c in range(3)], 1)
        add_conf = np.bincount(inverse, weights=conf, minlength=m)
        add_cnt = np.bincount(inverse, minlength=m).astype(np.int64)

        n = n_stored = self._n
        pos = np.searchsorted(self._keys[:n], keys)
        found = np.zeros(m, bool)
        valid = pos < n
        found[valid] = self._keys[:n][pos[valid]] == keys[valid]
        hit = self._slot[pos[found]]
        self._sum_xyz[hit] += add_xyz[found]
        self._sum_rgb[hit] += add_rgb[found]
        self._sum_conf[hit] += add_conf[found]
        self._count[hit] += add_cnt[found]
        self._last_tick[hit] = self._tick

        new = ~found
        n_new = int(new.sum())
        # capacity first, while the stored range is still [0, n): growing copies [0, _n) and
        # eviction below shrinks _n before the freed slots (inside that range) are refilled
        self._grow(min(n + n_new, self.max_voxels))
        overflow = n + n_new - self.max_voxels
        free = np.empty(0, np.int64)      # storage slots of evicted voxels, reused by new ones
        if overflow > 0:
            # Evict old voxels BEFORE merging so that storage never exceeds max_voxels.
            victims = self._victims(min(overflow, n), camera_position)
            free = self._slot[victims].astype(np.int64)
            keep = np.ones(n, bool)
            keep[victims] = False
            n = self._n = n - len(victims)                   # the index loses them now
            self._keys[:n] = self._keys[:n_stored][keep]
            self._slot[:n] = self._slot[:n_stored][keep]
            self.evicted_total += len(victims)
            room = self.max_voxels - n
            if n_new > room:   # the insert alone overflows: keep the nearest / most-hit new voxels
                idx = np.flatnonzero(new)
                if camera_position is not None:
                    cam = np.asarray(camera_position, np.float64).reshape(3)
                    score = np.linalg.norm(add_xyz[idx] / add_cnt[idx, None] - cam, axis=1)
                else:
                    score = -add_cnt[idx].astype(np.float64)
                drop = idx[np.argsort(score, kind="stable")[room:]]
                new[drop] = False
                self.evicted_total += len(drop)
                n_new = room
        if n_new:
            # storage stays compact: len(free) <= n_new (overflow = n + n_new - max_voxels),
            # so the new voxels take the freed slots, then the ones after the stored range
            total = n + n_new
            slots = np.concatenate([free, np.arange(n_stored, n_stored + n_new - len(free))])
            self._sum_xyz[slots] = add_xyz[new]
            self._sum_rgb[slots] = add_rgb[new]
            self._sum_conf[slots] = add_conf[new]
            self._count[slots] = add_cnt[new]
            self._last_tick[slots] = self._tick
            # merge the (sorted) new keys into the sorted index: 12 bytes a voxel move, not
            # the ~80 of the whole storage
            new_keys = keys[new]
            at = np.searchsorted(self._keys[:n], new_keys)
            self._keys[:total] = np.insert(self._keys[:n], at, new_keys)
            self._slot[:total] = np.insert(self._slot[:n], at, slots.astype(np.int32))
            self._n = total

    def _victims(self, n_evict: int, camera_position: Optional[np.ndarray]) -> np.ndarray:
        """Index positions (into the sorted keys) of the ``n_evict`` voxels first in the order
        (oldest tick, then the secondary criterion, then key order) - a stable lexsort's order,
        found in O(n): the oldest ticks by a partition, a sort only among the voxels of the
        boundary tick (one insert's worth). (A full lexsort of a 500k map plus compactions
        cost ~120 ms per insert once the map was full.)"""
        n = self._n
        n_evict = min(n_evict, n)
        if n_evict <= 0:
            return np.empty(0, np.int64)
        ticks = self._last_tick[self._slot[:n]]
        boundary = np.partition(ticks, n_evict - 1)[n_evict - 1]   # the n_evict-th oldest tick
        older = np.flatnonzero(ticks < boundary)
        tie = np.flatnonzero(ticks == boundary)                     # key order
        tie_slot = self._slot[tie]
        if camera_position is not None:
            cam = np.asarray(camera_position, np.float64).reshape(3)
            centre = self._sum_xyz[tie_slot] / self._count[tie_slot, None]
            secondary = -np.linalg.norm(centre - cam, axis=1)      # farthest first
        else:
            secondary = self._count[tie_slot].astype(np.float64)   # fewest hits first
        chosen = tie[np.argsort(secondary, kind="stable")[:n_evict - len(older)]]
        return np.concatenate([older, chosen])

    # ----------------------------------------------------------------- output
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the map, in voxel-key order: ``points`` [V, 3] float32 (mean position),
        ``colors`` [V, 3] uint8 (mean RGB), ``confidence`` [V] float32 (mean), ``counts`` [V]
        int64 (hits), ``last_update`` [V] int64 (insert tick)."""
        slot = self._slot[:self._n]
        cnt = self._count[slot]
        return {
            "points": (self._sum_xyz[slot] / cnt[:, None]).astype(np.float32),
            "colors": np.clip(np.rint(self._sum_rgb[slot] / cnt[:, None]), 0, 255).astype(np.uint8),
            "confidence": (self._sum_conf[slot] / cnt).astype(np.float32),
            "counts": cnt,
            "last_update": self._last_tick[slot],
        }

    def save_ply(self, path: Union[str, Path]) -> Path:
        """Write a binary little-endian PLY: ``x y z`` float32, ``red green blue`` uint8,
        ``count`` uint32 (hits per voxel). Returns the path."""
        arr = self.to_arrays()
        return write_ply(path, arr["points"], arr["colors"], arr["counts"])


_PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                       ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("count", "<u4")])


def write_ply(path: Union[str, Path, BinaryIO], points: np.ndarray, colors: np.ndarray,
              counts: Optional[np.ndarray] = None) -> Union[Path, BinaryIO]:
    """Binary little-endian PLY with vertices ``x y z red green blue count`` (see VoxelMap).
    ``path``: a file path, or a binary file object (written, not closed)."""
    n = len(points)
    rec = np.empty(n, _PLY_DTYPE)
    rec["x"], rec["y"], rec["z"] = (np.asarray(points, np.float32)[:, i] for i in range(3))
    colors = np.asarray(colors, np.uint8)
    rec["red"], rec["green"], rec["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    rec["count"] = np.ones(n, np.uint32) if counts is None else np.clip(counts, 0, 2**32 - 1)
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {n}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              "property uint count\nend_header\n")
    if hasattr(path, "write"):
        path.write(header.encode("ascii"))
        path.write(rec.tobytes())
        return path
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(rec.tobytes())
    return path


def read_ply(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """Read a PLY written by ``write_ply`` -> ``points`` [N,3] float32, ``colors`` [N,3] uint8,
    ``counts`` [N]."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"read_ply: {path} is not a PLY file")
    header = data[:end].decode("ascii")
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"read_ply: {path} is not binary little-endian")
    n = int(header.split("element vertex ")[1].split("\n")[0])
    rec = np.frombuffer(data[end + len(b"end_header\n"):], _PLY_DTYPE, count=n)
    return {"points": np.stack([rec["x"], rec["y"], rec["z"]], 1),
            "colors": np.stack([rec["red"], rec["green"], rec["blue"]], 1),
            "counts": rec["count"].astype(np.int64)}
