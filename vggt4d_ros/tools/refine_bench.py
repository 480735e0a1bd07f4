"""``python -m vggt4d_ros.tools.refine_bench [--device cuda] [--frames 16] ...``: time the
batched mask refinement (``dynamic/refine_fast.py``) against the reference path.

Runs on a synthetic scene with exact depth and poses (coarse mask = ground-truth mask dilated
by ``--dilate`` px) and prints the IoU between the two paths. A tool, so it may use the
synthetic world; the dynamic layer itself does not depend on tools.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from vggt4d_ros.dynamic import refine_fast
from vggt4d_ros.dynamic.refine import RefineConfig, refine_dynamic_mask
from vggt4d_ros.dynamic.refine_fast import REF_POINTS, refine_dynamic_mask_fast
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


def count_syncs(args) -> int:
    """Host synchronisations of one (warmed-up) fast refinement on CUDA, counted with
    ``torch.cuda.set_sync_debug_mode`` (the batched path documents exactly one)."""
    import warnings
    refine_dynamic_mask_fast(*args)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            refine_dynamic_mask_fast(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def knn_check(device: torch.device) -> float:
    """Largest |difference| between the kNN mean distances of the device path (the two
    Triton kernels on CUDA) and the portable CPU path, on random clouds with padded
    references; raises AssertionError above 1e-5 (m)."""
    worst = 0.0
    for s, q, r in ((3, 1000, 8192), (2, 5000, 4096), (4, 700, 300)):
        g = torch.Generator().manual_seed(q)
        queries = torch.randn(s, q, 3, generator=g)
        refs = torch.randn(s, r, 3, generator=g) * 1.5
        refs[0, r // 2:] = refine_fast._FAR                      # a half-padded frame
        ref_cpu = refine_fast._mean_knn_to_refs(queries.double(), refs.double(), 20).float()
        dev_out = refine_fast._mean_knn_to_refs(queries.to(device), refs.to(device), 20)
        worst = max(worst, float((dev_out.cpu() - ref_cpu).abs().max()))
    assert worst < 1e-5, f"kNN device path deviates by {worst}"
    return worst


def main() -> None:
    """Parse the arguments, run both paths, print times and IoU."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--height", type=int, default=294)
    ap.add_argument("--dilate", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-points", type=int, nargs="+", default=[REF_POINTS])
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--knn-plain", action="store_true", help="one topk over all refs")
    ap.add_argument("--sync-check", action="store_true",
                    help="count host synchronisations of one fast call (CUDA; documented: 1)")
    ap.add_argument("--knn-check", action="store_true",
                    help="compare the device kNN (Triton on CUDA) with the CPU path, then exit")
    a = ap.parse_args()
    if a.knn_check:
        print(f"kNN device vs CPU path: max |diff| {knn_check(torch.device(a.device)):.2e} m")
        return
    refine_fast.KNN_GROUPED = not a.knn_plain
    dev = torch.device(a.device)
    seq = SynthWorld(SynthConfig(width=a.width, height=a.height, num_frames=a.frames,
                                 seed=0, fps=10.0)).render_all()
    kernel = torch.ones(1, 1, 2 * a.dilate + 1, 2 * a.dilate + 1)
    gt = torch.from_numpy(seq.mask.astype(np.float32))[:, None]
    coarse = (F.conv2d(gt, kernel, padding=a.dilate)[:, 0] > 0).to(dev)
    args = (torch.from_numpy(seq.depth).float().to(dev),
            torch.from_numpy(seq.intrinsic).float().to(dev),
            torch.linalg.inv(torch.from_numpy(seq.cam_from_world).double()).float().to(dev),
            coarse, torch.from_numpy(seq.image).permute(0, 3, 1, 2).float().div(255).to(dev))

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(a.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        return best, out

    if a.sync_check and dev.type == "cuda":
        print(f"host syncs in one refine_dynamic_mask_fast call: {count_syncs(args)}")
    print(f"device {dev}, {a.frames} frames {a.width}x{a.height}, coarse fraction "
          f"{float(coarse.float().mean()):.3f}")
    ref = None
    if not a.no_reference:
        outlier = "fast" if dev.type == "cuda" else "reference"
        t0 = time.perf_counter()
        ref = refine_dynamic_mask(*args, RefineConfig(outlier_backend=outlier))
        print(f"reference (outlier {outlier}): {1e3 * (time.perf_counter() - t0):.1f} ms")
    for rp in a.ref_points:
        t, out = timed(lambda: refine_dynamic_mask_fast(*args, ref_points=rp))
        msg = f"fast ref_points={rp}: {1e3 * t:.1f} ms (best of {a.repeats})"
        if ref is not None:
            iou = float((out & ref).sum()) / max(float((out | ref).sum()), 1.0)
            msg += f", IoU vs reference {iou:.4f}"
        print(msg)


if __name__ == "__main__":
    main()
