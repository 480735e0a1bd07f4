"""The window-predictor contract between the streaming engine and a model.

A ``WindowPredictor`` turns one window of frames into geometry expressed in the window's
OWN gauge: an arbitrary world frame (VGGT puts the window's first frame at identity) and an
unknown scale. The engine stitches windows into one odometry frame; the predictor never
sees the odometry frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class WindowPrediction:
    """Geometry of one window of S frames at the predictor's working resolution H x W.

    extrinsic  [S,3,4] float  camera-from-world (OpenCV optical axes) in the window gauge & scale
    intrinsic  [S,3,3] float  pixels, for the H x W images below
    depth      [S,H,W] float32 camera-z depth, window scale (<= 0 or non-finite = invalid)
    depth_conf [S,H,W] float  confidence (larger = better; any positive scale)
    mask       [S,H,W] bool   True = dynamic pixel
    timings    dict[str, float] seconds per stage
    """

    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: np.ndarray
    depth_conf: np.ndarray
    mask: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.depth.shape[0])

    @property
    def resolution_hw(self) -> tuple[int, int]:
        return int(self.depth.shape[1]), int(self.depth.shape[2])

    def validate(self, num_frames: int) -> "WindowPrediction":
        """Check shapes against ``num_frames`` and return a copy with canonical dtypes.

        Raises ValueError naming the offending field. Non-finite VALUES are allowed here (the
        engine treats them as invalid geometry and goes LOST), wrong SHAPES are programming
        errors.
        """
        ext = np.asarray(self.extrinsic, np.float64)
        if ext.shape == (num_frames, 4, 4):
            ext = ext[:, :3, :]
        if ext.shape != (num_frames, 3, 4):
            raise ValueError(f"WindowPrediction.extrinsic: expected [{num_frames},3,4], "
                             f"got {ext.shape}")
        intr = np.asarray(self.intrinsic, np.float64)
        if intr.shape != (num_frames, 3, 3):
            raise ValueError(f"WindowPrediction.intrinsic: expected [{num_frames},3,3], "
                             f"got {intr.shape}")
        depth = np.asarray(self.depth, np.float32)
        if depth.ndim != 3 or depth.shape[0] != num_frames:
            raise ValueError(f"WindowPrediction.depth: expected [{num_frames},H,W], "
                             f"got {depth.shape}")
        conf = np.asarray(self.depth_conf, np.float32)
        mask = np.asarray(self.mask)
        if conf.shape != depth.shape:
            raise ValueError(f"WindowPrediction.depth_conf: expected {depth.shape}, "
                             f"got {conf.shape}")
        if mask.shape != depth.shape:
            raise ValueError(f"WindowPrediction.mask: expected {depth.shape}, got {mask.shape}")
        return WindowPrediction(ext, intr, depth, conf, mask.astype(bool, copy=False),
                                dict(self.timings))


@runtime_checkable
class WindowPredictor(Protocol):
    """Anything that predicts a window: the VGGT4D adapter (``stream.factory``) or, in tests,
    ``tools.gt_predictor.GroundTruthPredictor``."""

    def predict(self, images: np.ndarray, frame_keys: Sequence[int]) -> WindowPrediction:
        """images [S,H,W,3] uint8 RGB (input resolution); frame_keys: S unique ints, stable per
        frame for the engine's lifetime (a frame shared by consecutive windows keeps its key,
        so per-frame work such as patch embeddings can be cached under it)."""
        ...
