"""Small helpers shared by the dense heads: output activations and sinusoidal position embeddings.

Everything here is stateless and works on any device/dtype. Conventions follow VGGT's heads
(``../shared/spec/VGGT_ARCH.md`` item 8):

- ``inv_log``:  y -> sign(y) * (exp|y| - 1)   (point maps, so large coordinates stay reachable)
- ``exp``:      y -> exp(y)                     (depth, strictly positive)
- ``expp1``:    y -> 1 + exp(y)                 (confidences, always > 1)
- uv grid: pixel-centre coordinates of an ``h x w`` feature map, normalised so that the image
  diagonal has length 2 (aspect ratio of the *image*, W / H), x to the right, y down.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .head_act import base_act

_POINT_ACTIVATIONS = ("exp", "inv_log", "linear", "relu", "sigmoid", "norm_exp", "expm1")
_CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")


def inverse_log_transform(y: torch.Tensor) -> torch.Tensor:
    """sign(y) * (exp(|y|) - 1); inverse of sign(x) * log(1 + |x|). Any shape."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the named value activation elementwise (``norm_exp`` over the last dim).

    Args:
        x: [..., C] raw head output.
        activation: one of "exp", "inv_log", "linear", "relu", "sigmoid", "norm_exp", "expm1".
    """
    if activation in ("exp", "inv_log", "linear", "relu"):
        return base_act(x, activation)  # shared with the camera head's pose activations
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "expm1":
        return torch.expm1(x)
    if activation == "norm_exp":
        # Direction times expm1(norm): scale-equivariant parametrisation of 3-D points.
        d = x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return x / d * torch.expm1(d)
    raise ValueError(f"unknown activation {activation!r}; expected one of {_POINT_ACTIVATIONS}")


def apply_conf_activation(c: torch.Tensor, conf_activation: str) -> torch.Tensor:
    """Activation of the confidence channel: "expp1" (1 + exp), "expp0" (exp) or "sigmoid"."""
    if conf_activation == "expp1":
        return 1.0 + torch.exp(c)
    if conf_activation == "expp0":
        return torch.exp(c)
    if conf_activation == "sigmoid":
        return torch.sigmoid(c)
    raise ValueError(f"unknown conf_activation {conf_activation!r}; expected one of {_CONF_ACTIVATIONS}")


def activate_head(out: torch.Tensor, activation: str, conf_activation: str
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a dense head output into activated values and confidence.

    Args:
        out: [N, C, H, W] raw output; the first C-1 channels are values, the last one confidence.
    Returns:
        values [N, H, W, C-1], conf [N, H, W].
    """
    if out.ndim != 4 or out.shape[1] < 2:
        raise ValueError(f"activate_head expects [N, C>=2, H, W], got {tuple(out.shape)}")
    fmap = out.permute(0, 2, 3, 1)
    return apply_activation(fmap[..., :-1], activation), apply_conf_activation(fmap[..., -1], conf_activation)


def create_uv_grid(width: int, height: int, aspect_ratio: Optional[float] = None,
                   dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
                   ) -> torch.Tensor:
    """uv coordinates of a ``height x width`` grid, normalised by the diagonal.

    The extremes are +-span*(n-1)/n with span_x = a / sqrt(1 + a^2), span_y = 1 / sqrt(1 + a^2)
    (a = aspect_ratio = W / H of the image, default width / height), i.e. the coordinates of
    cell centres of a plane whose diagonal has length 2.

    Returns:
        [height, width, 2] with [..., 0] = u (x, right) and [..., 1] = v (y, down).
    """
    if width < 1 or height < 1:
        raise ValueError(f"uv grid needs a positive size, got {width}x{height}")
    a = float(width) / float(height) if aspect_ratio is None else float(aspect_ratio)
    diag = (a * a + 1.0) ** 0.5
    span_x, span_y = a / diag, 1.0 / diag
    ex = span_x * (width - 1) / width
    ey = span_y * (height - 1) / height
    u = torch.linspace(-ex, ex, steps=width, dtype=dtype, device=device)
    v = torch.linspace(-ey, ey, steps=height, dtype=dtype, device=device)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack((uu, vv), dim=-1)


def sincos_embed_1d(pos: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """[sin(pos * w_i), cos(pos * w_i)] with w_i = omega_0^(-i / (dim/2)), i < dim/2.

    Args:
        pos: [M] positions.
    Returns:
        [M, dim] float32.
    """
    if dim % 2:
        raise ValueError(f"sin/cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0 ** omega
    angles = pos.reshape(-1, 1).to(torch.float32) * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def uv_grid_embed(uv: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """Sinusoidal embedding of a 2-D grid: first half embeds u, second half v.

    Args:
        uv: [H, W, 2].
    Returns:
        [H, W, dim] float32.
    """
    if uv.ndim != 3 or uv.shape[-1] != 2:
        raise ValueError(f"uv grid must be [H, W, 2], got {tuple(uv.shape)}")
    if dim % 4:
        raise ValueError(f"uv embedding dim must be a multiple of 4, got {dim}")
    h, w, _ = uv.shape
    flat = uv.reshape(-1, 2)
    emb = torch.cat([sincos_embed_1d(flat[:, 0], dim // 2, omega_0),
                     sincos_embed_1d(flat[:, 1], dim // 2, omega_0)], dim=-1)
    return emb.view(h, w, dim)


def add_uv_pos_embed(x: torch.Tensor, image_w: int, image_h: int, ratio: float = 0.1,
                     omega_0: float = 100.0) -> torch.Tensor:
    """x + ratio * sinusoidal uv embedding of its own grid (aspect of the image, W / H).

    Args:
        x: [N, C, h, w] feature map (C multiple of 4).
        image_w, image_h: size of the image the map comes from, pixels (only the ratio matters).
    Returns:
        [N, C, h, w], same dtype as x.
    """
    n, c, h, w = x.shape
    uv = create_uv_grid(w, h, aspect_ratio=image_w / image_h, dtype=x.dtype, device=x.device)
    pe = uv_grid_embed(uv, c, omega_0) * ratio
    return (x + pe.permute(2, 0, 1)[None]).to(x.dtype)
