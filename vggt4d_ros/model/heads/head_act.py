"""Output activations shared by the heads (pose encoding parts, DPT outputs / confidences)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def base_act(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise activation by name: linear, inv_log, exp, relu."""
    if kind == "linear":
        return x
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(torch.abs(x))
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {kind!r} (linear, inv_log, exp, relu)")


def activate_pose(pose_enc: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear",
                  fl_act: str = "linear") -> torch.Tensor:
    """pose encoding [..., 9] = translation (3) | quaternion xyzw (4) | FoV h, w (2), each
    part activated separately (VGGT-1B: linear, linear, relu)."""
    t = base_act(pose_enc[..., :3], trans_act)
    q = base_act(pose_enc[..., 3:7], quat_act)
    fov = base_act(pose_enc[..., 7:], fl_act)
    return torch.cat([t, q, fov], dim=-1)
