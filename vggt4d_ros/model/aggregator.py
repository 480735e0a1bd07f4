"""VGGT aggregator: DINO patch embed + camera/register tokens + alternating frame/global attention.

Data flow for images [B, S, 3, H, W] in [0, 1] (h = H/14, w = W/14, N = h·w, P = 5):
ImageNet normalisation -> DINOv2 ``x_norm_patchtokens`` [B·S, N, C] -> prepend camera token and
4 register tokens (slot 0 for frame 0, slot 1 for every other frame) -> [B·S, P+N, C] -> depth ×
(frame block on [B·S, P+N, C], global block on [B, S·(P+N), C]) with 2-D RoPE on q/k.
Output of layer i = concat(frame-block output, global-block output) on channels,
[B, S, P+N, 2C]; ``patch_start_idx`` = P.

Keys: ``camera_token`` [1,2,1,C], ``register_token`` [1,2,R,C], ``patch_embed.*`` (DINO),
``frame_blocks.i.*``, ``global_blocks.i.*``; non-persistent buffers ``_resnet_mean`` /
``_resnet_std`` [1,1,3,1,1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from .config import VGGTConfig
from .hooks import AttentionControl
from .layers.block import Block
from .layers.rope import RotaryPositionEmbedding2D
from .layers.vision_transformer import DinoVisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AggregatorOutput:
    """Everything one aggregator pass produces.

    layers: list[depth] of [B, S, P+N, 2C] (None for layers not requested via keep_layers);
    patch_start_idx: P; patch_tokens: DINO x_norm_patchtokens [B·S, N, C_dino] (None when the
    run started after layer 0); tokens: the last run global block's output [B, S·(P+N), C]
    (rows limited by ``last_layer_tokens``), what the next layer would take.
    """

    layers: List[Optional[torch.Tensor]]
    patch_start_idx: int
    patch_tokens: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor] = None     # leaving the last layer run (see ``run``)


class Aggregator(nn.Module):
    """Alternating-attention transformer over the tokens of S frames."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.depth = cfg.depth
        self.patch_start_idx = cfg.num_special_tokens
        self.patch_embed = DinoVisionTransformer(cfg.patch_embed)
        self.rope = RotaryPositionEmbedding2D(cfg.rope_freq) if cfg.rope_freq > 0 else None

        def make_block() -> Block:
            return Block(c, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                         proj_bias=cfg.proj_bias, ffn_bias=cfg.ffn_bias, qk_norm=cfg.qk_norm,
                         init_values=cfg.init_values, norm_eps=cfg.layer_norm_eps)

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        # Slot 0: first frame of each sequence, slot 1: all other frames.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, c) * 1e-6)
        self.reset_normalization_buffers()

    def reset_normalization_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent ImageNet mean/std buffers [1, 1, 3, 1, 1].

        They are not in checkpoints, so a model built on the ``meta`` device and filled with
        ``load_state_dict(assign=True)`` must call this to get real values.
        """
        for name, value in (("_resnet_mean", IMAGENET_MEAN), ("_resnet_std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value, device=device).view(1, 1, 3, 1, 1),
                                 persistent=False)

    # ------------------------------------------------------------------ patch embedding
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """DINO patch tokens of every frame.

        images [B, S, 3, H, W] float in [0, 1] -> x_norm_patchtokens [B·S, N, C_dino].
        Per-frame work only, so a streaming caller may cache the result per frame.
        """
        b, s, c_in, h, w = images.shape
        if c_in != 3:
            raise ValueError(f"images must have 3 channels, got {c_in}")
        x = (images - self._resnet_mean) / self._resnet_std
        return self.patch_embed(x.reshape(b * s, c_in, h, w))

    def _special_tokens(self, b: int, s: int) -> torch.Tensor:
        """Camera + register tokens [B·S, P, C]: slot 0 for frame 0, slot 1 for the rest."""
        special = torch.cat([self.camera_token, self.register_token], dim=2)   # [1, 2, P, C]
        first, rest = special[:, :1], special[:, 1:].expand(1, s - 1, -1, -1)
        per_frame = torch.cat([first, rest], dim=1)                           # [1, S, P, C]
        return per_frame.expand(b, -1, -1, -1).reshape(b * s, *special.shape[2:])

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, control: Optional[AttentionControl] = None,
                patch_tokens: Optional[torch.Tensor] = None,
                keep_layers: Optional[Iterable[int]] = None
                ) -> Tuple[List[Optional[torch.Tensor]], int]:
        """images [B, S, 3, H, W] in [0, 1] -> (list[depth] of [B, S, P+N, 2C], P).

        ``patch_tokens`` [B·S, N, C_dino] reuses ``embed_patches`` output (identical result).
        ``keep_layers`` limits which layer outputs are materialised (others are None); the
        default keeps all, as the official aggregator does.
        """
        out = self.run(images, control=control, patch_tokens=patch_tokens,
                       keep_layers=keep_layers)
        return out.layers, out.patch_start_idx

    def run(self, images: torch.Tensor, control: Optional[AttentionControl] = None,
            patch_tokens: Optional[torch.Tensor] = None,
            keep_layers: Optional[Iterable[int]] = None,
            last_layer_tokens: Optional[int] = None,
            layer_range: Optional[Tuple[int, int]] = None,
            entry_tokens: Optional[torch.Tensor] = None) -> AggregatorOutput:
        """Like ``forward`` but also returns the DINO patch tokens (see AggregatorOutput).

        ``last_layer_tokens`` n: the last global block computes only the first n tokens of
        each frame (n = 1: the camera token, all the camera head reads) and the last layer's
        output is ``[B, S, n, 2C]``; every token still serves as key/value, so those rows
        equal the full computation's. Ignored when a Q/K hook reads that layer.

        ``layer_range`` (start, stop): run only layers start..stop-1 (default all); a run
        that starts after layer 0 takes the tokens entering it as ``entry_tokens`` (the
        ``tokens`` of a run that stopped there; ``images`` then only gives the shapes).
        Splitting a forward this way gives the same result as running it whole.
        """
        if images.dim() != 5:
            raise ValueError("aggregator expects images [B, S, 3, H, W], got "
                             f"{tuple(images.shape)}")
        b, s, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        n, p = gh * gw, self.patch_start_idx
        t = p + n
        start, stop = layer_range if layer_range is not None else (0, self.depth)
        if not 0 <= start < stop <= self.depth:
            raise ValueError(f"layer_range must satisfy 0 <= start < stop <= {self.depth}, "
                             f"got {layer_range}")
        if (start > 0) != (entry_tokens is not None):
            raise ValueError("entry_tokens are required exactly when layer_range starts after "
                             "layer 0")
        keep = set(range(self.depth)) if keep_layers is None else {int(i) for i in keep_layers}

        frame_sel = global_sel = None
        if control is not None:
            control.validate(b, s, t, self.depth)
            frame_sel, global_sel = control.key_selections(p, images.device)

        if entry_tokens is None:
            if patch_tokens is None:
                patch_tokens = self.embed_patches(images)
            elif patch_tokens.dim() != 3 or patch_tokens.shape[:2] != (b * s, n):
                raise ValueError(f"patch_tokens must be [B·S, N, C] = [{b * s}, {n}, C], "
                                 f"got {tuple(patch_tokens.shape)}")
            special = self._special_tokens(b, s).to(patch_tokens.dtype)
            tokens = torch.cat([special, patch_tokens], dim=1)          # [B·S, T, C]
        else:
            if entry_tokens.numel() != b * s * t * entry_tokens.shape[-1]:
                raise ValueError(f"entry_tokens must hold [B, S·T, C] = [{b}, {s * t}, C], "
                                 f"got {tuple(entry_tokens.shape)}")
            tokens = entry_tokens
        c = tokens.shape[-1]
        rope_f = rope_g = None
        if self.rope is not None:
            rope_f = self.rope.tables(gh, gw, p, self.cfg.head_dim, images.device)
            rope_g = rope_f.tile(s)

        layers: List[Optional[torch.Tensor]] = [None] * start
        for i in range(start, stop):
            masked = control is not None and i in control.key_mask_layers
            f_hook = control.qk_callback("frame", i) if control is not None else None
            g_hook = control.qk_callback("global", i) if control is not None else None
            tokens = self.frame_blocks[i](tokens.reshape(b * s, t, c), rope=rope_f, on_qk=f_hook,
                                          keys=frame_sel if masked else None)
            frame_out = tokens
            # last layer, first tokens only: nothing reads the other rows of its output
            rows = (_leading_rows(s, t, last_layer_tokens, images.device)
                    if last_layer_tokens is not None and i == self.depth - 1 and g_hook is None
                    else None)
            tokens = self.global_blocks[i](tokens.reshape(b, s * t, c), rope=rope_g,
                                           on_qk=g_hook, keys=global_sel if masked else None,
                                           rows=rows)
            if i in keep:
                n_out = t if rows is None else last_layer_tokens
                layers.append(torch.cat([frame_out.reshape(b, s, t, c)[:, :, :n_out],
                                         tokens.reshape(b, s, n_out, c)], dim=-1))
            else:
                layers.append(None)
        layers += [None] * (self.depth - stop)
        return AggregatorOutput(layers, p, patch_tokens, tokens)


def _leading_rows(frames: int, tokens: int, n: int, device: torch.device) -> torch.Tensor:
    """Positions of the first ``n`` tokens of every frame in the global sequence -> [S·n]."""
    if not 1 <= n <= tokens:
        raise ValueError(f"last_layer_tokens must be in [1, {tokens}], got {n}")
    start = torch.arange(frames, device=device)[:, None] * tokens
    return (start + torch.arange(n, device=device)[None]).flatten()
