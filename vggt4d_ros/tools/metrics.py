"""Evaluation metrics: trajectories (TUM I/O, ATE, RPE), dynamic masks (J, F), depth.

Trajectories are lists of world_from_cam poses [N,4,4] (the camera pose in the world, metres)
with stamps in integer nanoseconds. TUM lines are ``timestamp tx ty tz qx qy qz qw`` of
world_from_cam, timestamp in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.spatial.transform import Rotation


# --------------------------------------------------------------------------- TUM I/O
@dataclass
class Trajectory:
    """stamps_ns [N] int64; poses [N,4,4] float64 world_from_cam (metres)."""

    stamps_ns: np.ndarray
    poses: np.ndarray

    def __post_init__(self) -> None:
        self.stamps_ns = np.asarray(self.stamps_ns, dtype=np.int64).reshape(-1)
        self.poses = np.asarray(self.poses, dtype=np.float64)
        if self.poses.shape != (self.stamps_ns.size, 4, 4):
            raise ValueError(f"poses must be [N,4,4] for N={self.stamps_ns.size} stamps, "
                             f"got {self.poses.shape}")

    def __len__(self) -> int:
        return int(self.stamps_ns.size)

    @property
    def positions(self) -> np.ndarray:
        """[N,3] camera centres in the world (metres)."""
        return self.poses[:, :3, 3]


def _format_stamp(ns: int) -> str:
    """Exact decimal seconds of integer nanoseconds (no float rounding)."""
    ns = int(ns)
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _parse_stamp(text: str) -> int:
    """Integer nanoseconds of a decimal seconds string (exact for up to 9 decimals)."""
    t = text.strip()
    neg = t.startswith("-")
    t = t.lstrip("+-")
    if "e" in t.lower():
        return int(round(float(text) * 1e9))
    whole, _, frac = t.partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    return -ns if neg else ns


def write_tum(path: str | Path, stamps_ns: Sequence[int], world_from_cam: np.ndarray) -> None:
    """Write a TUM trajectory file: ``timestamp tx ty tz qx qy qz qw`` per pose.

    world_from_cam [N,4,4] (camera pose in the world), stamps in nanoseconds.
    """
    poses = np.asarray(world_from_cam, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(stamps_ns) != poses.shape[0]:
        raise ValueError(f"need [N,4,4] poses and N stamps, got {poses.shape} and {len(stamps_ns)}")
    q = Rotation.from_matrix(poses[:, :3, :3]).as_quat()   # x y z w
    q[q[:, 3] < 0] *= -1.0
    lines = ["# timestamp tx ty tz qx qy qz qw (world_from_cam)"]
    for s, T, qq in zip(stamps_ns, poses, q):
        vals = " ".join(f"{v:.9f}" for v in (*T[:3, 3], *qq))
        lines.append(f"{_format_stamp(s)} {vals}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_tum(path: str | Path) -> Trajectory:
    """Read a TUM trajectory (``#`` comments and blank lines skipped, commas allowed)."""
    stamps, poses = [], []
    for ln, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 8:
            raise ValueError(f"{path}:{ln}: expected 8 values (t tx ty tz qx qy qz qw), got {len(parts)}")
        vals = [float(v) for v in parts[1:]]
        q = np.array(vals[3:])
        if not np.isfinite(vals).all() or np.linalg.norm(q) < 1e-9:
            raise ValueError(f"{path}:{ln}: invalid pose values")
        T = np.eye(4)
        T[:3, :3] = Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()
        T[:3, 3] = vals[:3]
        stamps.append(_parse_stamp(parts[0]))
        poses.append(T)
    return Trajectory(np.array(stamps, dtype=np.int64), np.array(poses).reshape(-1, 4, 4))
