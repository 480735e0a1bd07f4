"""Timing, memory and FLOP accounting helpers for the GPU benchmarks (no ROS, no CLI).

Timing is CUDA-synchronised wall time (``torch.cuda.synchronize`` before and after), a few
warm-up calls, then the median of N repeats. On CPU the same helpers time plain wall clock.
FLOP counts are analytic (multiply-add = 2 FLOP) for VGGT at a given window so that achieved
TFLOP/s and the fraction of the H100's ~800 TFLOP/s dense bf16 peak can be reported.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

H100_BF16_DENSE_TFLOPS = 800.0   # ~ measured 8192^3 bf16 matmul on the device (KINDS.md: 778-798)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Median and spread of repeated runs, seconds; peak GPU memory in bytes (0 on CPU)."""

    median_s: float
    min_s: float
    max_s: float
    runs: List[float] = field(default_factory=list)
    peak_bytes: int = 0

    def as_dict(self) -> Dict[str, float]:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "runs_s": list(self.runs), "peak_gb": self.peak_bytes / 1e9}


def time_fn(fn: Callable[[], object], warmup: int = 2, repeats: int = 5,
            device: torch.device | str = "cuda") -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` synchronised calls.

    Peak memory is the maximum allocated during the timed calls (reset after warm-up).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    on_cuda = torch.cuda.is_available() and torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if on_cuda else 0
    return Timing(statistics.median(runs), min(runs), max(runs), runs, peak)


def vggt_flops(frames: int, height: int, width: int, embed_dim: int = 1024, depth: int = 24,
               dino_dim: int = 1024, dino_depth: int = 24, mlp_ratio: float = 4.0,
               patch: int = 14, special: int = 5, dino_special: int = 5) -> Dict[str, float]:
    """Analytic forward FLOPs of VGGT's patch embed and aggregator for one window.

    Per transformer block on T tokens of width C: linear layers 2·T·(3C² + C² + 2·r·C²)
    (qkv, proj, MLP with ratio r) and attention 4·T_ctx·T·C (QKᵀ and AV) where T_ctx is the
    attended context. Frame blocks attend within a frame (T = special + N), global blocks over
    the whole window (S·T). Heads are not counted. Returns FLOPs by part.
    """
    n = (height // patch) * (width // patch)
    lin = (4.0 + 2.0 * mlp_ratio)
    t = special + n
    td = dino_special + n
    dino = dino_depth * frames * (2 * td * lin * dino_dim ** 2 + 4 * td * td * dino_dim)
    frame_blocks = depth * frames * (2 * t * lin * embed_dim ** 2 + 4 * t * t * embed_dim)
    st = frames * t
    global_blocks = depth * (2 * st * lin * embed_dim ** 2 + 4 * st * st * embed_dim)
    return {"patch_embed": dino, "frame_blocks": frame_blocks, "global_blocks": global_blocks,
            "aggregator": frame_blocks + global_blocks, "total": dino + frame_blocks + global_blocks}


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def gpu_memory_gb() -> Optional[float]:
    """Currently allocated GPU memory in GB, or None without CUDA."""
    return torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else None


def config_overrides(items: List[str]) -> Dict[str, object]:
    """``["KEY=VALUE", ...]`` (Python literals, e.g. ``cuda_graphs=False``) -> dict, for the
    tools' ``--set`` of Vggt4dConfig fields. Raises ValueError on a malformed item."""
    import ast
    out: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--set {key}: {value!r} is not a Python literal") from exc
    return out


def cuda_missing(device: torch.device, prog: str, why: str) -> bool:
    """True, after one line on stderr, when ``device`` is CUDA and there is no GPU: the GPU
    tools then exit 2."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: CUDA is not available ({why})", file=sys.stderr)
        return True
    return False


def run_info(device: torch.device) -> Dict[str, object]:
    """Where and when a device report was made: device name, torch / CUDA / Python versions,
    UTC date (the header every GPU tool's JSON report starts with)."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def parse_window_args(parser, args, overrides: List[str]) -> None:
    """Shared checks of the GPU tools' arguments: ``overrides`` (``--set`` items) parsed into
    ``args.overrides``, ``--height`` / ``--width`` positive multiples of 14; a bad value ends
    in ``parser.error`` (exit 2 with the usage)."""
    try:
        args.overrides = config_overrides(overrides)
    except ValueError as exc:
        parser.error(str(exc))
    if args.height % 14 or args.width % 14 or min(args.height, args.width) <= 0:
        parser.error("--height and --width must be positive multiples of 14")


def write_report(report: Dict[str, object], out: Optional[str], default_name: str
                 ) -> Optional[str]:
    """Write ``report`` as JSON to ``out``, else to ``$OUT/default_name`` when ``$OUT`` is set
    (the device's output folder), else nowhere. Returns the path written or None."""
    path = out or (os.path.join(os.environ["OUT"], default_name)
                   if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {path}")
    return path
