"""vggt4d-oom-check: force a REAL CUDA out-of-memory in a window and show the stream continues.

Steps (GPU):
1. build the full-size VGGT-1B with random weights (or ``--tiny``) and the node's predictor
   (VGGT4D pipeline, ``Vggt4dWindowPredictor``) on ``--device``;
2. run one ``--fit-frames`` window and measure its peak allocated memory;
3. measure a ``--window``-frame window too, then search a cap for
   ``torch.cuda.set_per_process_memory_fraction`` (from halfway between the two peaks down)
   under which the full window fails and a ``--fit-frames`` one runs (``--cap-gib`` sets it);
4. stream ``--frames`` synthetic frames through ``StreamEngine`` (window ``--window``, stride
   ``--stride``) over ``AdaptiveWindowPredictor`` (min ``--min-window``): the first window OOMs
   for real, is retried smaller, and the stream carries on.

Prints one verdict line ``OOM-CHECK PASS|FAIL: ...`` and writes the figures as JSON to ``--out``
(default ``$OUT/oom_check.json`` when ``$OUT`` is set). Exit 0 on PASS, 1 on FAIL.

``--simulate-limit K`` (CPU smoke test): no memory cap; the predictor raises
``torch.cuda.OutOfMemoryError`` for windows of more than K frames instead.
Random weights: geometry is meaningless; only memory behaviour is checked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vggt4d_ros.stream.fallback import AdaptiveWindowPredictor, FallbackConfig
from vggt4d_ros.tools.cli_util import exc_summary

RANDOM_LABEL = "random weights: geometry is meaningless"


class _SimulatedOom:
    """CPU smoke test: torch.cuda.OutOfMemoryError for windows above ``limit`` frames."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit = inner, limit

    def predict(self, images, frame_keys):
        if len(frame_keys) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: window of {len(frame_keys)} frames")
        return self.inner.predict(images, frame_keys)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vggt4d-oom-check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random VGGT instead of VGGT-1B")
    p.add_argument("--width", type=int, default=518, help="working width, pixels (x14)")
    p.add_argument("--height", type=int, default=294, help="synthetic frame height, pixels")
    p.add_argument("--window", type=int, default=64, help="engine window size, frames")
    p.add_argument("--stride", type=int, default=32, help="engine stride, frames")
    p.add_argument("--min-window", type=int, default=33, help="fallback minimum, frames")
    p.add_argument("--fit-frames", type=int, default=36,
                   help="a window size that must fit under the cap, frames (the cap is set "
                        "halfway between its measured peak and the full window's)")
    p.add_argument("--cap-gib", type=float, default=0.0, help="explicit allocator cap, GiB")
    p.add_argument("--frames", type=int, default=160, help="frames streamed")
    p.add_argument("--simulate-limit", type=int, default=0,
                   help="CPU smoke test: fake an OOM above this many frames (no real cap)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/oom_check.json)")
    return p.parse_args(argv)


def _predictor(args: argparse.Namespace, device: str):
    """The node's predictor (VGGT4D on random weights) on ``device``."""
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import Vggt4dWindowPredictor, tiny_vggt_config
    torch.manual_seed(0)
    cfg = tiny_vggt_config() if args.tiny else VGGTConfig.vggt_1b()
    with torch.device(device):
        model = VGGT(cfg, enable_track=False).eval()
    pipe = Vggt4dPipeline(model, Vggt4dConfig(cluster_backend="fast"))
    return Vggt4dWindowPredictor(pipe, args.width, device, label=RANDOM_LABEL)


def _frames(args: argparse.Namespace) -> list[np.ndarray]:
    """A panning view over one random texture (consecutive frames overlap), uint8 RGB."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(args.height, args.width + 2 * args.frames, 3),
                        dtype=np.uint8)
    return [np.ascontiguousarray(base[:, 2 * i: 2 * i + args.width]) for i in range(args.frames)]


def _peak_allocated(pred, frames: list[np.ndarray], n: int, key0: int,
                    device: torch.device) -> Optional[int]:
    """Peak allocated bytes of one ``n``-frame window (None if it does not fit at all)."""
    from vggt4d_ros.stream.fallback import is_out_of_memory
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    oom = False
    try:
        pred.predict(np.stack(frames[:n]), list(range(key0, key0 + n)))
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - only OOM is expected here
        if not is_out_of_memory(exc):
            raise
        oom = True
    cache = getattr(pred, "_cache", None)
    if cache is not None:
        cache.clear()                  # measured tokens are not reused by the stream
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return None if oom else peak


def _cap_memory(pred, frames: list[np.ndarray], args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """Find an allocator cap under which a ``window``-frame window fails and a ``fit_frames``
    one runs, by trying caps from halfway between their uncapped peaks down towards the
    small window's peak (cuDNN adapts its workspaces to the memory left, so measured peaks
    alone do not tell). ``--cap-gib`` sets the cap directly. If the full window does not fit
    even uncapped, no cap is needed: the OOM is natural."""
    if device.index is None:   # the allocator API wants an explicit device index
        device = torch.device(device.type, torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    fit = _peak_allocated(pred, frames, args.fit_frames, 10_000, device)
    full = _peak_allocated(pred, frames, args.window, 20_000, device)
    info: dict[str, Any] = {"fit_frames": args.fit_frames, "total_gib": total / 2**30,
                            "fit_peak_gib": None if fit is None else fit / 2**30,
                            "window_peak_gib": None if full is None else full / 2**30}
    if fit is None:
        raise SystemExit(f"vggt4d-oom-check: even {args.fit_frames} frames do not fit on this "
                         "device; lower --fit-frames/--min-window or --width")
    if full is None and not args.cap_gib:
        return info
    if args.cap_gib:
        candidates = [args.cap_gib * 2**30]
    else:
        gap = max(full - fit, 0)
        candidates = [fit + f * gap for f in (0.5, 0.25, 0.1)]
        candidates += [fit * f for f in (1.02, 0.9, 0.8)]
    tried = []
    for cap in candidates:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        full_fits = _peak_allocated(pred, frames, args.window, 30_000, device) is not None
        fit_fits = _peak_allocated(pred, frames, args.fit_frames, 40_000, device) is not None
        tried.append({"cap_gib": cap / 2**30, "window_fits": full_fits, "fit_fits": fit_fits})
        if not full_fits and fit_fits:
            torch.cuda.reset_peak_memory_stats(device)
            info.update(cap_gib=cap / 2**30, fraction=min(1.0, cap / total), caps_tried=tried)
            return info
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    info["caps_tried"] = tried
    info["warning"] = "no cap separates the two window sizes; pass --cap-gib"
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The check; returns the report (``report["pass"]``)."""
    from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
    device = torch.device(args.device)
    inner = _predictor(args, str(device))
    frames = _frames(args)
    report: dict[str, Any] = {"device": str(device), "model": "tiny" if args.tiny else
                              "VGGT-1B", "weights": RANDOM_LABEL, "window": args.window,
                              "stride": args.stride, "min_window": args.min_window,
                              "frames": args.frames, "width": args.width,
                              "height": args.height}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if args.simulate_limit:
        inner = _SimulatedOom(inner, args.simulate_limit)
        report["simulated_limit"] = args.simulate_limit
    else:
        if device.type != "cuda":
            raise SystemExit("vggt4d-oom-check: a real OOM needs --device cuda "
                             "(use --simulate-limit K for a CPU smoke test)")
        report.update(_cap_memory(inner, frames, args, device))
    pred = AdaptiveWindowPredictor(inner, FallbackConfig(min_window_size=args.min_window))
    engine = StreamEngine(pred, StreamConfig(window_size=args.window, stride=args.stride,
                                             drop_policy="keep_all"))
    error = ""
    n_out = 0
    t0 = time.perf_counter()
    try:
        for i, img in enumerate(frames):
            n_out += len(engine.push(FrameInput(int(i * 1e9 / 30), img, "camera")))
        n_out += len(engine.flush())
    except Exception as exc:  # noqa: BLE001 - reported in the verdict
        error = exc_summary(exc)
    report.update(pred.stats())
    report.update(wall_s=time.perf_counter() - t0, frames_out=n_out, error=error,
                  last_oom=pred.last_oom, windows=engine.counters.windows,
                  states_last=engine.state)
    if device.type == "cuda":
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    report["pass"] = bool(not error and pred.oom_retries >= 1 and pred.limit is not None
                          and pred.limit < args.window and n_out == args.frames)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    # fewer fragmentation surprises under a hard cap (read when CUDA initialises, i.e. later)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not args.min_window > args.stride:
        print("vggt4d-oom-check: --min-window must be > --stride", file=sys.stderr)
        return 2
    report = run(args)
    verdict = "PASS" if report["pass"] else "FAIL"
    cap = f"under a {report['cap_gib']:.1f} GiB cap " if "cap_gib" in report else ""
    print(f"OOM-CHECK {verdict}: {report['window']}-frame window {cap}-> oom_retries="
          f"{report['oom_retries']}, continued at {report['window_limit']} frames, "
          f"{report['frames_out']}/{report['frames']} frames out, {report['windows']} windows"
          + (f", error: {report['error']}" if report["error"] else ""))
    out = args.out or (os.path.join(os.environ["OUT"], "oom_check.json")
                       if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
