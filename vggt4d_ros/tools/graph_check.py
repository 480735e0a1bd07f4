"""``python -m vggt4d_ros.tools.graph_check``: the CUDA-graph k-means paths against their eager
twins on the GPU (labels must be equal) and their times.

* feature k-means (``dynamic/cluster.kmeans_torch``, scikit-learn's algorithm and random
  stream): graphs vs ``cuda_graphs=False`` vs scikit-learn on the host, for features of the
  size of a 16-frame 518x294 window (random and blob-structured);
* refinement k-means (``dynamic/refine_fast.batched_kmeans``): graph vs eager on padded
  per-frame clouds;
* threshold stage (``dynamic/threshold.coarse_mask``: cluster map, upsampling, multi-Otsu):
  graph vs eager.

Random inputs: this checks equality and speed, nothing about the quality of a clustering.
Exits non-zero when labels differ.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict

import numpy as np
import torch

from vggt4d_ros.dynamic.cluster import kmeans_reference, kmeans_torch
from vggt4d_ros.dynamic.refine_fast import batched_kmeans, query_bucket
from vggt4d_ros.tools.bench_util import time_fn, write_report


def _features(kind: str, m: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(m, c, generator=g)
    centres = torch.randn(96, c, generator=g) * 3
    return centres[torch.randint(0, 96, (m,), generator=g)] + torch.randn(m, c, generator=g)


def _timed(fn: Callable[[], object], repeats: int) -> Dict[str, float]:
    t = time_fn(fn, warmup=1, repeats=repeats, device="cuda")
    return {"median_ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3}


def check_feature_kmeans(frames: int, tokens: int, c: int, k: int, repeats: int,
                         sklearn: bool) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for kind in ("random", "blobs"):
        x = _features(kind, frames * tokens, c, seed=frames).cuda()
        graph = kmeans_torch(x, k, cuda_graphs=True)[0].cpu()
        eager = kmeans_torch(x, k)[0].cpu()
        row: Dict[str, object] = {"points": list(x.shape), "k": k,
                                  "graph_equals_eager": bool(torch.equal(graph, eager))}
        if sklearn:
            ref = kmeans_reference(x.float().cpu().numpy(), k)
            row["graph_equals_sklearn"] = bool(np.array_equal(graph.numpy(), ref))
        row["graph"] = _timed(lambda: kmeans_torch(x, k, cuda_graphs=True), repeats)
        row["eager"] = _timed(lambda: kmeans_torch(x, k), repeats)
        out[kind] = row
    return out


def check_refine_kmeans(frames: int, queries: int, k: int, repeats: int) -> Dict[str, object]:
    g = torch.Generator().manual_seed(queries)
    q = query_bucket(queries, 1 << 30)
    x = (torch.randn(frames, q, 3, generator=g) * 2).cuda()
    valid = (torch.rand(frames, q, generator=g) < 0.8).cuda()
    valid[:, queries:] = False

    def run(graphs: bool) -> torch.Tensor:
        gen = torch.Generator(device=x.device).manual_seed(7)
        return batched_kmeans(x, valid, k, gen, cuda_graphs=graphs)[0]

    graph, eager = run(True), run(False)
    return {"shape": [frames, q], "k": k,
            "graph_equals_eager": bool(torch.equal(graph[valid], eager[valid])),
            "graph": _timed(lambda: run(True), repeats),
            "eager": _timed(lambda: run(False), repeats)}


def check_coarse_mask(frames: int, height: int, width: int, k: int,
                      repeats: int) -> Dict[str, object]:
    from vggt4d_ros.dynamic.threshold import coarse_mask
    g = torch.Generator().manual_seed(frames)
    gh, gw = height // 14, width // 14
    sal = torch.rand(frames, gh, gw, generator=g)
    sal[:, gh // 3: gh // 2, gw // 3: gw // 2] += 0.7          # a salient block
    sal, lab = sal.cuda(), torch.randint(0, k, (frames, gh, gw), generator=g).cuda()

    def run(graphs: bool):
        return coarse_mask(sal, lab, (height, width), k, backend="fast", cuda_graphs=graphs)
    (t_g, m_g), (t_e, m_e), (t_e2, m_e2) = run(True), run(False), run(False)
    return {"shape": [frames, height, width],
            "graph_equals_eager": bool(torch.equal(t_g, t_e) and torch.equal(m_g, m_e)),
            # float atomics (an index_add_ once) made two eager calls differ on the device
            "eager_repeatable": bool(torch.equal(t_e, t_e2) and torch.equal(m_e, m_e2)),
            "graph": _timed(lambda: run(True), repeats),
            "eager": _timed(lambda: run(False), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=777, help="patch tokens per frame (518x294)")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--refine-queries", type=int, default=15000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("graph_check: needs CUDA")
    report = {"device": torch.cuda.get_device_name(),
              "feature_kmeans": check_feature_kmeans(args.frames, args.tokens, args.channels,
                                                     args.clusters, args.repeats,
                                                     not args.no_sklearn),
              "refine_kmeans": check_refine_kmeans(args.frames, args.refine_queries, 30,
                                                   args.repeats),
              "coarse_mask": check_coarse_mask(args.frames, 294, 518, args.clusters,
                                               args.repeats)}
    print(report)
    write_report(report, args.out, "graph_check.json")
    rows = list(report["feature_kmeans"].values()) + [report["refine_kmeans"],
                                                       report["coarse_mask"]]
    if not all(r["graph_equals_eager"] and r.get("graph_equals_sklearn", True)
               and r.get("eager_repeatable", True) for r in rows):
        sys.exit("graph_check: labels differ")


if __name__ == "__main__":
    main()
