"""``python -m vggt4d_ros.tools.profile_window``: where a VGGT4D window's time goes (GPU device).

Full-size VGGT-1B architecture with seeded RANDOM weights (speed only; geometry meaningless).
Two reports, printed and written as JSON to ``--out`` (default ``$OUT/profile.json``):

1. ``stages``: one pipeline call under ``torch.profiler``: per stage the wall time (the
   pipeline's CUDA-synchronised timer), the GPU kernel time launched inside it (sum of kernel
   durations) and the kernel count, plus the heaviest kernels. Wall time much larger than
   kernel time means the stage is bound by launches / host syncs, not by the GPU - such a
   stage can hide behind a GPU-bound one on a second CUDA stream.
2. ``overlap``: pairs of pipeline pieces timed alone and together (the second piece on a
   side CUDA stream from a worker thread while the first runs) - the measured basis for
   which stages the pipeline overlaps.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch

from vggt4d_ros.tools.bench import RANDOM_LABEL, build_random_vggt
from vggt4d_ros.tools.bench_util import (config_overrides, cuda_missing, run_info, synchronize,
                                         time_fn, write_report)


def profile_stages(pipe, images: torch.Tensor, top: int = 8) -> Dict[str, object]:
    """Per-stage wall / GPU-kernel time of one pipeline call (after the caller's warm-up).

    A kernel belongs to the innermost stage during whose (CPU) time range it was launched:
    the pipeline's timer synchronises at every stage boundary, so launches cannot straddle
    two; an interleaved side task's range lies inside its pass's.
    """
    from torch.profiler import ProfilerActivity, profile
    synchronize(images.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
    with profile(activities=acts) as prof:
        res = pipe(images)
        synchronize(images.device)
    events = prof.events()
    ranges = [(e.name.split("::", 1)[1], e.time_range.start, e.time_range.end)
              for e in events if e.name.startswith("vggt4d::")]
    per_stage: Dict[str, List[tuple]] = {name: [] for name, _, _ in ranges}
    all_kernels: List[tuple] = []
    for e in events:
        ks = [(k.name, k.duration) for k in getattr(e, "kernels", [])]
        if not ks:
            continue
        all_kernels.extend(ks)
        t = e.time_range.start
        # the innermost range wins: an interleaved side task runs inside its pass's range
        inside = [(t0, name) for name, t0, t1 in ranges if t0 <= t <= t1]
        if inside:
            per_stage[max(inside)[1]].extend(ks)
    stages = {}
    for name, ks in per_stage.items():
        by_name: Dict[str, float] = defaultdict(float)
        for kname, dur in ks:
            by_name[kname] += dur
        heavy = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
        stages[name] = {"wall_ms": res.timings.get(name, float("nan")) * 1e3,
                        "gpu_kernel_ms": sum(d for _, d in ks) / 1e3, "kernels": len(ks),
                        "top": [(n[:90], round(d / 1e3, 3)) for n, d in heavy]}
    return {"stages": stages, "gpu_kernel_ms_all": sum(d for _, d in all_kernels) / 1e3,
            "kernels_all": len(all_kernels), "wall_ms_total": res.timings["total"] * 1e3}


def profile_piece(fn: Callable[[], object], device: torch.device, top: int = 12
                  ) -> Dict[str, object]:
    """GPU kernel time, kernel count and heaviest kernels of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    synchronize(device)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU,
                                                     ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    by_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        for k in getattr(e, "kernels", []):
            by_name[k.name][0] += k.duration
            by_name[k.name][1] += 1
    heavy = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_kernel_ms": sum(v[0] for v in by_name.values()) / 1e3,
            "kernels": int(sum(v[1] for v in by_name.values())),
            "top": [(n[:90], round(v[0] / 1e3, 3), int(v[1])) for n, v in heavy]}


def time_overlap(first: Callable[[], object], second: Callable[[], object],
                 warmup: int, repeats: int, device: torch.device) -> Dict[str, float]:
    """Median ms of ``first``, ``second``, and both at once (second as the pipeline runs it
    with ``overlap_stages``: a :class:`~vggt4d_ros.dynamic.side_task.SideTask`)."""
    from vggt4d_ros.dynamic.side_task import SideTask

    def both():
        task = SideTask(second, device, "thread", name="profile-side")
        first()
        task.result()

    with torch.inference_mode():
        a = time_fn(first, warmup, repeats, device).median_s
        b = time_fn(second, warmup, repeats, device).median_s
        ab = time_fn(both, warmup, repeats, device).median_s
    return {"first_ms": a * 1e3, "second_ms": b * 1e3, "together_ms": ab * 1e3,
            "hidden_fraction_of_second": (a + b - ab) / b if b > 0 else float("nan")}


def overlap_pieces(pipe, images: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """Pipeline pieces on one window (random weights), each a no-argument callable."""
    from vggt4d_ros.dynamic.cluster import cluster_features
    from vggt4d_ros.dynamic.intervention import build_intervention_control
    from vggt4d_ros.dynamic.pipeline import _cam_to_world
    from vggt4d_ros.dynamic.refine_fast import refine_dynamic_mask_fast
    from vggt4d_ros.dynamic.threshold import adaptive_threshold

    model, cfg = pipe.model, pipe.config
    s, _, h, w = images.shape
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    x = images[None]
    bf16 = torch.bfloat16
    dev_type = images.device.type
    with torch.inference_mode():
        tok = model.aggregator.embed_patches(x)
        with torch.autocast(dev_type, dtype=bf16):
            agg = model.aggregator.run(x, patch_tokens=tok, keep_layers=model.needed_layers())
        layers = [t.float() if t is not None else None for t in agg.layers]
        out = model(images, autocast_dtype=bf16, heads=("camera", "depth"))
    depth = out["depth"][0, ..., 0].float()
    intr = out["intrinsic"][0].float()
    c2w = _cam_to_world(out["extrinsic"][0].float())
    yy = torch.arange(h, device=images.device)[None, :, None]
    xx = torch.arange(w, device=images.device)[None, None, :]
    ss = torch.arange(s, device=images.device)[:, None, None]
    coarse = ((xx - 40 - 12 * ss) ** 2 + (yy - h // 2) ** 2) < (h // 4) ** 2     # a moving disc
    control2, _ = build_intervention_control(coarse, cfg.intervention_layers,
                                             patch_size=cfg.patch_size)
    rcfg = cfg.refine_config(images.device)
    up = torch.rand(s, h, w, device=images.device)

    def depth_head():
        with torch.autocast(dev_type, enabled=False):
            return model.depth_head(layers, images=x.float(), patch_start_idx=agg.patch_start_idx)

    def pass1_aggregator():
        with torch.autocast(dev_type, dtype=bf16):
            return model.aggregator.run(x, patch_tokens=tok, keep_layers=model.needed_layers())

    return {
        "pass1_aggregator": pass1_aggregator,
        "pass2_camera": lambda: pipe._camera_pass(images, control2, tok, bf16),
        "depth_head": depth_head,
        "cluster_fast": lambda: cluster_features(tok.reshape(s, gh * gw, -1),
                                                 cfg.feature_clusters, cfg.kmeans_seed, "fast"),
        "threshold_fast": lambda: adaptive_threshold(up, cfg.otsu_classes, cfg.otsu_bins,
                                                     backend="fast"),
        "refine_fast": lambda: refine_dynamic_mask_fast(depth, intr, c2w, coarse, images.float(),
                                                        rcfg),
    }


OVERLAP_PAIRS = (("pass1_aggregator", "cluster_fast"), ("pass2_camera", "depth_head"),
                 ("pass2_camera", "refine_fast"), ("pass2_camera", "cluster_fast"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="profile_window", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=294)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-overlap", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (conv algorithm search)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Vggt4dConfig overrides (python literals), e.g. compile_blocks=False")
    p.add_argument("--top", type=int, default=8, help="heaviest kernels listed per stage")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    if cuda_missing(dev, "profile_window", "this tool is for the GPU device"):
        return 2
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    overrides = config_overrides(args.set)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = build_random_vggt(dev)
    pipe = Vggt4dPipeline(model, Vggt4dConfig(cluster_backend="fast", **overrides))
    gen = torch.Generator(device=dev).manual_seed(1)
    images = torch.rand(args.frames, 3, args.height, args.width, device=dev, generator=gen)
    report: Dict[str, object] = {"label": RANDOM_LABEL, **run_info(dev), "frames": args.frames,
                                 "size": [args.height, args.width], "overrides": overrides,
                                 "cudnn_benchmark": args.cudnn_benchmark}
    t = time_fn(lambda: pipe(images), args.warmup, args.repeats, dev)
    report["window_ms_median"] = t.median_s * 1e3
    report["profile"] = prof = profile_stages(pipe, images, top=args.top)
    print(f"{report['device']} | {args.frames} frames | window {t.median_s * 1e3:.1f} ms "
          f"(median of {args.repeats}) | {RANDOM_LABEL}")
    for name, st in prof["stages"].items():
        print(f"  {name:10s} wall {st['wall_ms']:8.2f} ms  gpu {st['gpu_kernel_ms']:8.2f} ms "
              f"kernels {st['kernels']:6d}")
        for n, d in st["top"]:
            print(f"      {d:8.2f} ms  {n[:100]}")
    print(f"  all kernels {prof['gpu_kernel_ms_all']:.2f} ms ({prof['kernels_all']})")
    if not args.skip_overlap:
        pieces = overlap_pieces(pipe, images)
        report["overlap"] = {}
        for a, b in OVERLAP_PAIRS:
            r = time_overlap(pieces[a], pieces[b], args.warmup, args.repeats, dev)
            report["overlap"][f"{a}+{b}"] = r
            print(f"  overlap {a} + {b}: {r['first_ms']:.1f} + {r['second_ms']:.1f} -> "
                  f"{r['together_ms']:.1f} ms (hidden {100 * r['hidden_fraction_of_second']:.0f}"
                  f"% of the second)", flush=True)
        with torch.inference_mode():
            report["alone_ms"] = {k: time_fn(f, args.warmup, args.repeats, dev).median_s * 1e3
                                  for k, f in pieces.items()}
        print("  alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["alone_ms"].items()))
        report["pieces"] = {}
        for k in ("cluster_fast", "threshold_fast", "refine_fast", "depth_head"):
            r = report["pieces"][k] = profile_piece(pieces[k], dev)
            print(f"  piece {k}: gpu {r['gpu_kernel_ms']:.2f} ms, {r['kernels']} kernels")
            for n, d, c in r["top"]:
                print(f"      {d:8.2f} ms {c:5d}x  {n[:100]}")
    write_report(report, args.out, "profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
