"""Shared inputs of the mask-refinement tests: the golden case's refinement inputs and a
synthetic scene with exact geometry whose coarse mask is the true mask dilated."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def golden_inputs(g):
    """(depth [S,H,W], intrinsic, cam2world, coarse, images [S,3,H,W] in [0,1]) of case_seq10."""
    return (g["pass1.depth"][..., 0], g["pass1.intrinsic"], g["pass2.cam2world"],
            g["mask.coarse"], g["in.images"].float() / 255)


def dilated_mask_scene(width: int, height: int, frames: int, dilate_px: int):
    """Exact depth / poses (float64) of a 2-object synthetic world; coarse = GT mask dilated by
    ``dilate_px``. Returns (depth, intrinsic, cam2world, coarse, images, gt_mask)."""
    world = SynthWorld(SynthConfig(width=width, height=height, num_frames=frames, num_objects=2,
                                   seed=0, fps=10.0))
    seq = world.render_all()
    kernel = np.ones((2 * dilate_px + 1,) * 2, np.uint8)
    coarse = torch.from_numpy(np.stack([cv2.dilate(m.astype(np.uint8), kernel)
                                        for m in seq.mask]) > 0)
    depth = torch.from_numpy(seq.depth).double()
    intr = torch.from_numpy(seq.intrinsic).double()
    c2w = torch.linalg.inv(torch.from_numpy(seq.cam_from_world).double())
    images = torch.from_numpy(seq.image).permute(0, 3, 1, 2).double() / 255
    return depth, intr, c2w, coarse, images, torch.from_numpy(seq.mask)
