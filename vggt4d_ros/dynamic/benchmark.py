"""Stage timings and peak memory of the VGGT4D pipeline vs plain VGGT (GPU benchmark).

    python -m vggt4d_ros.dynamic.benchmark --frames 16 --height 294 --width 518 \\
        --repeats 3 --json bench_vggt4d.json [--golden ../shared/golden]

Builds VGGT-1B with random weights directly on the device (no checkpoint needed; timings do
not depend on weight values), feeds a synthetic window (textured background panning, one
textured square moving across it), and reports for plain VGGT and for the pipeline
(``reference``: scikit-learn/-image clustering + threshold; ``fast``: torch k-means and Otsu on
the device, torch kNN outlier removal on CUDA; ``fast_hostknn``: fast but cKDTree outlier
removal on the host): the median per-stage seconds (CUDA-synchronised), min/max of the total,
and the peak allocated GPU memory. ``--tiny`` uses a small config for a CPU smoke run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch

from .pipeline import Vggt4dConfig, Vggt4dPipeline

TINY = {"embed_dim": 32, "depth": 24, "num_heads": 2, "patch_embed": {
    "embed_dim": 32, "depth": 1, "num_heads": 2, "num_register_tokens": 4},
    "camera_head": {"dim_in": 64, "trunk_depth": 1, "num_heads": 2},
    "dpt": {"dim_in": 64, "features": 16, "out_channels": [8, 16, 32, 32]}}


def synthetic_window(frames: int, height: int, width: int, seed: int = 0,
                     device: str = "cpu") -> torch.Tensor:
    """``[S, 3, H, W]`` in [0, 1]: a panning smooth-noise background and a moving square."""
    g = torch.Generator().manual_seed(seed)
    big_w = width + 4 * frames
    coarse = torch.rand(1, 3, height // 8 + 1, big_w // 8 + 1, generator=g)
    bg = torch.nn.functional.interpolate(coarse, size=(height, big_w), mode="bicubic",
                                         align_corners=False)[0].clamp(0, 1)
    tex = torch.rand(3, height // 3, height // 3, generator=g)
    side = tex.shape[-1]
    out = []
    for i in range(frames):
        img = bg[:, :, 4 * i:4 * i + width].clone()
        x0 = int((width - side) * i / max(frames - 1, 1))
        y0 = (height - side) // 2
        img[:, y0:y0 + side, x0:x0 + side] = tex
        out.append(img)
    return torch.stack(out).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn, device: torch.device, warmup: int, repeats: int) -> Dict[str, object]:
    """Run ``fn`` (returns a timings dict or None); median per key, peak memory in GB."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs: List[Dict[str, float]] = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        stages = fn() or {}
        _sync(device)
        wall = time.perf_counter() - t0
        runs.append({**stages, "wall": wall})
    keys = runs[0].keys()
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    walls = [r["wall"] for r in runs]
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    return {"median_s": med, "wall_min_s": min(walls), "wall_max_s": max(walls),
            "peak_gb": peak, "repeats": repeats}


def run(frames: int, height: int, width: int, repeats: int, warmup: int, tiny: bool,
        device: Optional[str] = None) -> Dict[str, object]:
    """Benchmark plain VGGT and the VGGT4D pipeline (reference and fast backends)."""
    from ..model.config import VGGTConfig
    from ..model.vggt import VGGT

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = VGGTConfig.from_dict(TINY) if tiny else VGGTConfig.vggt_1b()
    torch.manual_seed(0)
    with torch.device(dev):
        model = VGGT(cfg, enable_track=False).eval()
    images = synthetic_window(frames, height, width, device=str(dev))
    amp = torch.bfloat16 if dev.type == "cuda" else None
    report: Dict[str, object] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "model": "tiny" if tiny else "VGGT-1B (random weights)",
        "frames": frames, "height": height, "width": width, "autocast": str(amp),
        "command": " ".join(sys.argv)}

    def plain():
        with torch.no_grad():
            model(images, autocast_dtype=amp)

    report["plain_vggt"] = _measure(plain, dev, warmup, repeats)
    variants = {"reference": Vggt4dConfig(cluster_backend="reference"),
                "fast": Vggt4dConfig(cluster_backend="fast"),
                "fast_hostknn": Vggt4dConfig(cluster_backend="fast",
                                             refine_outlier_backend="reference")}
    for backend, vcfg in variants.items():
        pipe = Vggt4dPipeline(model, vcfg)
        last = {}

        def vggt4d():
            res = pipe(images)
            last["mask_fraction"] = float(res.mask.float().mean())
            last["coarse_fraction"] = float(res.coarse_mask.float().mean())
            return res.timings

        entry = _measure(vggt4d, dev, warmup, repeats)
        entry.update(last)
        report[f"vggt4d_{backend}"] = entry
    return report


def golden_check(golden_dir: str, device: Optional[str] = None,
                 backends: tuple = ("reference", "fast")) -> Dict[str, object]:
    """Run the golden ``vggt4d/case_seq10`` on ``device`` in fp32 and with bf16 autocast.

    Reports, per mode, the max abs error of saliency / pass-2 extrinsics vs the golden data
    and the IoU of coarse and refined masks (fp32 on GPU should match like the CPU tests;
    bf16 is the product recipe, expected close but not within the fp32 tolerances).
    """
    from pathlib import Path

    from safetensors.torch import load_file

    from ..model.checkpoint import load_vggt
    from ..model.config import VGGTConfig

    root = Path(golden_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_vggt(root / "vggt" / "weights.safetensors",
                      VGGTConfig.from_json(root / "vggt" / "config.json"), device=dev,
                      skip_track_head=True)
    g = load_file(str(root / "vggt4d" / "case_seq10.safetensors"))
    images = (g["in.images"].float() / 255).to(dev)

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.cpu(), b.cpu()
        return float((a & b).sum()) / max(float((a | b).sum()), 1.0)

    out: Dict[str, object] = {"device": str(dev)}
    runs = [(mode, backend, compiled) for mode in ("off", "bf16") for backend in backends
            for compiled in ((False, True) if dev.type == "cuda" else (False,))]
    for mode, backend, compiled in runs:
        cfg = Vggt4dConfig(autocast=mode, cluster_backend=backend, compile_blocks=compiled)
        model.use_fused_blocks(False)
        res = Vggt4dPipeline(model, cfg)(images)
        out[f"{mode}_{backend}{'_compiled' if compiled else ''}"] = {
            "saliency_max_err": float((res.saliency.cpu() - g["saliency.dyn_map"]).abs().max()),
            "pass2_extrinsic_max_err": float((res.extrinsic.cpu()
                                              - g["pass2.extrinsic"]).abs().max()),
            "depth_max_err": float((res.depth.cpu() - g["pass1.depth"][..., 0]).abs().max()),
            "coarse_iou": iou(res.coarse_mask, g["mask.coarse"]),
            "refined_iou": iou(res.mask, g["mask.refined"]),
            "timings": res.timings}
    model.use_fused_blocks(False)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=294)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="small random model (CPU smoke run)")
    ap.add_argument("--golden-backends", default="reference,fast",
                    help="comma list of cluster backends for --golden")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the report here as well")
    ap.add_argument("--golden", default=None,
                    help="also run ../shared/golden vggt4d/case_seq10 on the device (fp32, bf16)")
    a = ap.parse_args(argv)
    if a.height % 14 or a.width % 14 or a.frames < 1:
        print("error: height/width must be multiples of 14 and frames >= 1", file=sys.stderr)
        return 2
    report = run(a.frames, a.height, a.width, a.repeats, a.warmup, a.tiny, a.device)
    if a.golden:
        report["golden_check"] = golden_check(a.golden, a.device,
                                              tuple(a.golden_backends.split(",")))
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
