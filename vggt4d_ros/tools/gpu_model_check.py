"""GPU check of the full-size VGGT-1B model with random (seeded) weights: speed, memory, bf16.

For each frame count (default 1, 8, 16, 32) at 518x294 it runs the whole model (aggregator +
camera + depth + point heads, no track head) in
- bf16: the official recipe, ``model(images, autocast_dtype=torch.bfloat16)`` (aggregator
  under autocast, heads in float32 with autocast off), and
- fp32: everything float32 (TF32 matmuls disabled so this is a true float32 reference),
prints the CUDA-synchronised median time (after warm-up) and the peak allocated memory, the
aggregator-only time (comparable with the official README table), the bf16 time of a VGGT4D
pass 2 (key suppression of ~20 % patch tokens in layers 0-4), and the bf16-vs-fp32 difference
of pose_enc, depth and world_points (max abs, max abs relative to the fp32 range, median
relative). Writes everything to ``$OUT/gpu_model_check.json`` when ``OUT`` is set.

    python -m vggt4d_ros.tools.gpu_model_check            # ~1-2 min on an H100
    python -m vggt4d_ros.tools.gpu_model_check --frames 1,8 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.hooks import AttentionControl
from vggt4d_ros.model.vggt import VGGT
from vggt4d_ros.tools.bench_util import cuda_missing, run_info, time_fn, tflops, vggt_flops

COMPARED = ("pose_enc", "depth", "world_points", "depth_conf")


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", default="1,8,16,32", help="comma-separated frame counts")
    p.add_argument("--height", type=int, default=294, help="pixels, multiple of 14")
    p.add_argument("--width", type=int, default=518, help="pixels, multiple of 14")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 runs")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    p.add_argument("--config", default=None,
                   help="config.json of another size (default: VGGT-1B), e.g. for a CPU smoke test")
    p.add_argument("--golden", default=None,
                   help="golden folder (../shared/golden): also compare the tiny model on this "
                        "device in fp32 with the official outputs (tolerance 1e-4)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_model_check.json)")
    args = p.parse_args(argv)
    args.frames = [int(v) for v in args.frames.split(",") if v.strip()]
    if args.height % 14 or args.width % 14:
        p.error("--height and --width must be multiples of 14")
    return args


def _diff(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """bf16 result a vs fp32 reference b: max abs, max abs / max|b|, median |a-b|/(|b|+eps)."""
    a, b = a.float(), b.float()
    d = (a - b).abs()
    scale = b.abs().max().clamp(min=1e-12)
    rel = d / (b.abs() + 1e-6 * scale)
    return {"max_abs": float(d.max()), "max_abs_over_range": float(d.max() / scale),
            "median_rel": float(rel.flatten().median()), "finite": bool(torch.isfinite(a).all())}


def _pose_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest rotation angle between the bf16 and fp32 quaternions, degrees."""
    qa = torch.nn.functional.normalize(a[..., 3:7].float(), dim=-1)
    qb = torch.nn.functional.normalize(b[..., 3:7].float(), dim=-1)
    cos = (qa * qb).sum(-1).abs().clamp(max=1.0)
    return float(torch.rad2deg(2 * torch.acos(cos)).max())


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    dev = torch.device(args.device)
    if cuda_missing(dev, "gpu_model_check", "this check needs a GPU"):
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 runs are a float32 reference
    torch.backends.cudnn.allow_tf32 = False
    cfg = VGGTConfig.from_json(args.config) if args.config else VGGTConfig.vggt_1b()
    golden = _golden_check(Path(args.golden), dev) if args.golden else None
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = VGGT(cfg, enable_track=False).eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    report: Dict[str, object] = {
        **run_info(dev), "config": args.config or "vggt_1b",
        "command": " ".join([sys.executable, "-m", "vggt4d_ros.tools.gpu_model_check"]
                            + (argv if argv is not None else sys.argv[1:])),
        "params": n_params, "build_s": build_s, "height": args.height, "width": args.width,
        "warmup": args.warmup, "repeats": args.repeats, "tf32": False, "results": [],
        "golden": golden,
    }
    print(f"{report['device']}  torch {torch.__version__}  {report['config']} random weights "
          f"({n_params:,} params, track head off), {args.width}x{args.height}")
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    for s in args.frames:
        images = torch.rand(s, 3, args.height, args.width, device=dev, generator=gen)
        row: Dict[str, object] = {"frames": s}
        flops = vggt_flops(s, args.height, args.width, cfg.embed_dim, cfg.depth,
                           cfg.patch_embed.embed_dim, cfg.patch_embed.depth)["total"]
        with torch.inference_mode():
            bf16 = time_fn(lambda: model(images, autocast_dtype=torch.bfloat16),
                           args.warmup, args.repeats, device=dev)
            row["bf16"] = bf16.as_dict()
            row["bf16"]["backbone_tflops_per_s"] = tflops(flops, bf16.median_s)
            agg = time_fn(lambda: _aggregator_bf16(model, images), args.warmup, args.repeats,
                          device=dev)
            row["bf16_aggregator_only"] = agg.as_dict()
            ctrl = _pass2_control(s, args.height, args.width, dev)
            p2 = time_fn(lambda: model(images, control=ctrl, autocast_dtype=torch.bfloat16),
                         args.warmup, args.repeats, device=dev)
            row["bf16_keymask_layers0to4"] = p2.as_dict()
            out_bf16 = model(images, autocast_dtype=torch.bfloat16)
            line = (f"S={s:3d} bf16 {bf16.median_s * 1e3:8.1f} ms  "
                    f"peak {bf16.peak_bytes / 1e9:6.2f} GB"
                    f" | aggregator {agg.median_s * 1e3:8.1f} ms  "
                    f"peak {agg.peak_bytes / 1e9:6.2f} GB"
                    f" | key-masked {p2.median_s * 1e3:8.1f} ms")
            if not args.no_fp32:
                fp32 = time_fn(lambda: model(images), args.warmup, max(1, args.repeats // 2),
                               device=dev)
                row["fp32"] = fp32.as_dict()
                out_fp32 = model(images)
                row["bf16_vs_fp32"] = {k: _diff(out_bf16[k], out_fp32[k]) for k in COMPARED}
                row["bf16_vs_fp32"]["rotation_deg_max"] = _pose_angle_deg(
                    out_bf16["pose_enc"], out_fp32["pose_enc"])
                line += (f" | fp32 {fp32.median_s * 1e3:8.1f} ms  "
                         f"peak {fp32.peak_bytes / 1e9:6.2f} GB")
                del out_fp32
        print(line, flush=True)
        if "bf16_vs_fp32" in row:
            for k, v in row["bf16_vs_fp32"].items():
                print(f"      bf16 vs fp32 {k:14s} {v}")
        report["results"].append(row)
        del out_bf16
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t0
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_model_check.json")
                       if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    print(f"total {report['total_s']:.1f} s")
    return 0


def _golden_check(folder: Path, dev: torch.device) -> Dict[str, object]:
    """Tiny golden model on ``dev`` in fp32 vs the official outputs: max abs diff per tensor."""
    from safetensors.torch import load_file

    from vggt4d_ros.model.checkpoint import load_vggt
    from vggt4d_ros.model.hooks import AttentionControl as Ctrl

    if not (folder / "vggt" / "weights.safetensors").is_file():
        print(f"golden check skipped: {folder}/vggt/weights.safetensors not found")
        return {"skipped": f"not found: {folder}"}
    cfg = VGGTConfig.from_json(folder / "vggt" / "config.json")
    model = load_vggt(folder / "vggt" / "weights.safetensors", cfg, device=dev)
    result: Dict[str, object] = {}
    worst = 0.0
    with torch.inference_mode():
        for case in ("case_a", "case_b", "case_c", "case_d"):
            ref = load_file(str(folder / "vggt" / f"{case}.safetensors"))
            images = ref["in.images"].to(dev).float() / 255.0
            q = ref.get("in.query_points")
            out = model(images, query_points=q.to(dev) if q is not None else None)
            layers, _ = model.aggregator(images[None], keep_layers={4, 23})
            ours = {"out.pose_enc": out["pose_enc"][0], "out.extrinsic": out["extrinsic"][0],
                    "out.intrinsic": out["intrinsic"][0], "out.depth": out["depth"][0],
                    "out.world_points": out["world_points"][0],
                    "agg.layer04": layers[4][0], "agg.layer23": layers[23][0]}
            if q is not None:
                ours["out.track"] = out["track"][0]
            for k, v in ours.items():
                if k in ref:
                    err = float((v.cpu() - ref[k]).abs().max())
                    ok = torch.allclose(v.cpu(), ref[k], rtol=1e-4, atol=1e-2 if "track" in k
                                        else 1e-4)
                    result[f"{case}.{k}"] = {"max_abs": err, "ok": bool(ok)}
                    worst = max(worst, 0.0 if ok else 1.0)
        seq = folder / "vggt4d" / "case_seq10.safetensors"
        if seq.is_file():
            ref = load_file(str(seq))
            images = ref["in.images"].to(dev).float() / 255.0
            dyn = torch.nn.functional.max_pool2d(ref["in.gt_square_mask"].float()[:, None],
                                                 14, 14)[:, 0].flatten(1) > 0.5
            keep = torch.cat([torch.ones(dyn.shape[0], 5, dtype=torch.bool), ~dyn], 1)[None]
            out = model(images, control=Ctrl(key_keep=keep.to(dev),
                                             key_mask_layers={0, 1, 2, 3, 4}))
            v, g = out["pose_enc"][0].cpu(), ref["pass2_gtmask.pose_enc"]
            ok = torch.allclose(v, g, rtol=1e-4, atol=1e-4)
            result["seq10.pass2_gtmask.pose_enc"] = {"max_abs": float((v - g).abs().max()),
                                                     "ok": bool(ok)}
            worst = max(worst, 0.0 if ok else 1.0)
    result["all_ok"] = worst == 0.0
    print(f"golden check on {dev}: {'all within tolerance' if worst == 0.0 else 'MISMATCH'}")
    for k, v in result.items():
        if isinstance(v, dict) and not v["ok"]:
            print(f"   {k}: {v}")
    return result


def _aggregator_bf16(model: VGGT, images: torch.Tensor) -> object:
    """Aggregator alone under bf16 autocast, keeping only the last layer (README comparable)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        return model.aggregator.run(images[None], keep_layers=[model.config.depth - 1])


def _pass2_control(s: int, h: int, w: int, dev: torch.device) -> AttentionControl:
    """VGGT4D pass 2: ~20 % of patch tokens (different per frame) dropped as keys in 0-4."""
    n = (h // 14) * (w // 14)
    g = torch.Generator(device=dev).manual_seed(1234)
    keep = torch.rand(1, s, 5 + n, device=dev, generator=g) > 0.2
    return AttentionControl(key_keep=keep, key_mask_layers={0, 1, 2, 3, 4})


if __name__ == "__main__":
    sys.exit(main())
