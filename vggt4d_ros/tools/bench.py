"""``vggt4d-bench``: GPU benchmark of VGGT and VGGT4D (one command, one table).

Runs the full-size VGGT-1B architecture with seeded RANDOM weights (speed does not depend on
the weights; every geometric output of this run is meaningless) and prints:

1. Plain VGGT per window size (8/16/32/64 frames at 518x294 by default): patch embed,
   aggregator, heads, full forward; peak memory; aggregator TFLOP/s and % of the H100/H200
   dense bf16 peak. The recipe is the official one: fp32 weights, bf16 autocast around the
   aggregator, fp32 heads.
2. VGGT4D (the product path, ``Vggt4dConfig`` defaults + fast backends) per window size:
   every stage (pass 1, saliency, clustering, threshold, pass 2, refinement, points), total,
   peak memory, and the ratio to the plain VGGT forward measured in the same run.
3. An ablation at one window size that starts from a straightforward REFERENCE path kept here
   (:func:`reference_vggt4d`: fp32 eager, every needed layer's Q/K stored and full
   token x token Gram matrices materialised, scikit-learn / scikit-image clustering and
   thresholds, refinement on the host, a full second forward with its own patch embedding
   and every head) and switches the speed-ups on one at a time.
4. A stream of ``--stream-frames`` frames (window 16, stride 8) through the same
   ``StreamEngine`` + ``Vggt4dWindowPredictor`` the node uses, driven as the node drives it
   (camera thread submits, worker polls one window at a time): frames/s, per-window latency,
   stitching time and GPU memory after every window (flat = bounded); pipelined and serial
   engine with every frame queued (throughput), and pipelined behind a 30 Hz camera.

Timing: CUDA-synchronised, warm-up calls, median of ``--repeats``. Results go to stdout and,
as JSON, to ``--out`` (default ``$OUT/bench.json`` when ``$OUT`` is set).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from vggt4d_ros.tools.bench_util import (H100_BF16_DENSE_TFLOPS, cuda_missing, parse_window_args,
                                         run_info, synchronize, tflops, time_fn, vggt_flops,
                                         write_report)

RANDOM_LABEL = "random weights: geometry is meaningless"


# --------------------------------------------------------------------------- model
def build_random_vggt(device: torch.device, seed: int = 0, config=None):
    """Full-size VGGT-1B (no track head) with seeded random weights, built on ``device``."""
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    torch.manual_seed(seed)
    with torch.device(device):
        model = VGGT(config or VGGTConfig.vggt_1b(), enable_track=False).eval()
    return model


# --------------------------------------------------------------------------- reference path
@torch.no_grad()
def reference_vggt4d(model, images: torch.Tensor, amp: Optional[torch.dtype] = None,
                     cfg=None) -> Dict[str, object]:
    """Straightforward VGGT4D: the baseline every speed-up is measured against.

    images [S, 3, H, W] in [0, 1]. Stores the global-attention Q/K of all saliency layers,
    materialises the full per-source, per-head Gram tensors (``naive_saliency_maps``), clusters
    with scikit-learn and thresholds with scikit-image on the host, runs a complete second
    forward (patch embedding and every head again) and refines on the host with the
    reference backends. Returns the same quantities as the pipeline (extrinsic, mask, ...):
    extrinsic [S,3,4] / pose_enc [S,9] (pass 2), mask / coarse [S,H,W] bool, pass1_extrinsic,
    pass1_pose_enc, intrinsic [S,3,3], depth / depth_conf [S,H,W] (pass 1), saliency [S,h,w],
    labels [S,h,w] int64 (feature clusters), threshold (float).
    """
    from vggt4d_ros.dynamic.cluster import cluster_features, cluster_mean_map
    from vggt4d_ros.dynamic.intervention import build_intervention_control
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, _cam_to_world
    from vggt4d_ros.dynamic.refine import refine_dynamic_mask
    from vggt4d_ros.dynamic.saliency import naive_saliency_maps, needed_layers
    from vggt4d_ros.dynamic.threshold import adaptive_threshold, upsample_map
    from vggt4d_ros.model.hooks import AttentionControl

    cfg = cfg or Vggt4dConfig(cluster_backend="reference", refine_outlier_backend="reference")
    s, _, h, w = images.shape
    p = model.config.num_special_tokens
    layers = set(needed_layers(cfg.saliency_specs()))
    store_q: Dict[int, torch.Tensor] = {}
    store_k: Dict[int, torch.Tensor] = {}

    def keep(kind: str, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        # [1, heads, S*T, d] -> patch tokens [S, heads, N, d], kept (as the official code does)
        nh, d = q.shape[1], q.shape[-1]
        store_q[layer] = q[0].reshape(nh, s, -1, d)[:, :, p:].transpose(0, 1).float().clone()
        store_k[layer] = k[0].reshape(nh, s, -1, d)[:, :, p:].transpose(0, 1).float().clone()

    ctrl = AttentionControl(capture={"global": layers}, on_qk=keep, encoder_features=True)
    out1 = model(images, control=ctrl, autocast_dtype=amp)
    maps = naive_saliency_maps(store_q, store_k, cfg.window_offsets, cfg.saliency_specs())
    gh, gw = h // 14, w // 14
    saliency = maps["dyn_map"].float().reshape(s, gh, gw)
    feats = out1["encoder_features"].reshape(s, gh * gw, -1).float()
    labels = cluster_features(feats, cfg.feature_clusters, cfg.kmeans_seed, "reference")
    cmap = cluster_mean_map(saliency, labels.reshape(s, gh, gw))
    up = upsample_map(cmap, (h, w))
    thr = adaptive_threshold(up, cfg.otsu_classes, cfg.otsu_bins, backend="reference")
    coarse = up > thr
    control2, _ = build_intervention_control(coarse, cfg.intervention_layers)
    out2 = model(images, control=control2, autocast_dtype=amp)      # full second forward
    ext = out2["extrinsic"][0].float()
    mask = refine_dynamic_mask(out1["depth"][0, ..., 0].float(), out1["intrinsic"][0].float(),
                               _cam_to_world(ext), coarse, images.float(),
                               cfg.refine_config())
    # pass-1 outputs, pose encodings, saliency, labels and threshold: additive, for
    # tools/numerics_check (already computed above; nothing recomputed)
    return {"extrinsic": ext, "mask": mask, "coarse": coarse,
            "pose_enc": out2["pose_enc"][0].float(),
            "pass1_extrinsic": out1["extrinsic"][0].float(),
            "pass1_pose_enc": out1["pose_enc"][0].float(),
            "intrinsic": out1["intrinsic"][0].float(),
            "depth": out1["depth"][0, ..., 0].float(), "depth_conf": out1["depth_conf"][0].float(),
            "saliency": saliency, "labels": labels.reshape(s, gh, gw), "threshold": thr}


# --------------------------------------------------------------------------- sections
def bench_plain(model, images: torch.Tensor, warmup: int, repeats: int) -> Dict[str, object]:
    """Plain VGGT (official recipe) on one window: parts and full forward."""
    dev = images.device
    s, _, h, w = images.shape
    x = images[None]
    amp = torch.bfloat16
    cfg = model.config
    with torch.inference_mode():
        def embed():
            with torch.autocast(dev.type, dtype=amp):
                return model.aggregator.embed_patches(x)
        t_embed = time_fn(embed, warmup, repeats, dev)

        def aggregate():
            with torch.autocast(dev.type, dtype=amp):
                return model.aggregator.run(x, keep_layers=model.needed_layers())
        t_agg = time_fn(aggregate, warmup, repeats, dev)
        agg = aggregate()
        tokens = [t.float() if t is not None else None for t in agg.layers]

        def heads():
            with torch.autocast(dev.type, enabled=False):
                model.camera_head(tokens)
                model.depth_head(tokens, images=x, patch_start_idx=agg.patch_start_idx)
                model.point_head(tokens, images=x, patch_start_idx=agg.patch_start_idx)
        t_heads = time_fn(heads, warmup, repeats, dev)
        agg = tokens = None        # free the kept layers before the full forward
        t_full = time_fn(lambda: model(images, autocast_dtype=amp), warmup, repeats, dev)
    fl = vggt_flops(s, h, w, cfg.embed_dim, cfg.depth, cfg.patch_embed.embed_dim,
                    cfg.patch_embed.depth)
    agg_tf = tflops(fl["total"], t_agg.median_s)
    return {"frames": s, "patch_embed": t_embed.as_dict(), "aggregator": t_agg.as_dict(),
            "heads": t_heads.as_dict(), "full": t_full.as_dict(),
            "aggregator_tflops": agg_tf, "aggregator_mfu": agg_tf / H100_BF16_DENSE_TFLOPS,
            "flops_tera": {k: v / 1e12 for k, v in fl.items()}}


def bench_attention_backends(model, images: torch.Tensor, warmup: int, repeats: int
                             ) -> Dict[str, object]:
    """Aggregator time per fused-attention backend of ``scaled_dot_product_attention``.

    PyTorch picks FlashAttention-2 by default; cuDNN's fused attention (Hopper) is opt-in.
    Each row forces one backend for the whole aggregator (frame, global and masked blocks).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = images.device
    x = images[None]
    rows: Dict[str, object] = {}
    for name in ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION",
                 "fused_blocks_eager", "fused_blocks_compiled"):
        if name.startswith("fused"):
            t0 = time.perf_counter()
            model.use_fused_blocks(True, compile=name.endswith("compiled"))
            with torch.inference_mode():
                run_first = model.aggregator.run
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    run_first(x, keep_layers=[model.config.depth - 1])
            synchronize(dev)
            rows[name + "_first_call_s"] = time.perf_counter() - t0

        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return model.aggregator.run(x, keep_layers=[model.config.depth - 1])
        try:
            with torch.inference_mode():
                if name == "default" or name.startswith("fused"):
                    t = time_fn(run, warmup, repeats, dev)
                else:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        t = time_fn(run, warmup, repeats, dev)
            rows[name] = t.as_dict()
            print(f"  aggregator with {name:20s} {t.median_s * 1e3:8.1f} ms", flush=True)
        except Exception as exc:  # a backend may not support this shape / GPU
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  aggregator with {name:20s} unavailable: {type(exc).__name__}", flush=True)
    model.use_fused_blocks(False)
    return rows


def _stage_medians(runs: List[Dict[str, float]]) -> Dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in keys}


def bench_pipeline(pipe, images: torch.Tensor, warmup: int, repeats: int) -> Dict[str, object]:
    """One VGGT4D configuration: per-stage medians, total, peak memory."""
    dev = images.device
    stage_runs: List[Dict[str, float]] = []

    def run():
        res = pipe(images)
        stage_runs.append(dict(res.timings))
        return res
    t = time_fn(run, warmup, repeats, dev)
    stages = _stage_medians(stage_runs[warmup:])
    return {"total": t.as_dict(), "stages": stages}


def ablation_steps() -> List[tuple]:
    """(name, description, factory(model) -> callable(images)) in cumulative order."""
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline

    def ref(amp):
        return lambda model: (lambda x: reference_vggt4d(model, x, amp=amp))

    def pipe(**kw):
        for flag in ("compile_blocks", "compile_heads", "overlap_stages", "cuda_graphs",
                     "interleave_stages", "cast_weight_cache", "mlp_gelu_epilogue",
                     "qk_rope_kernel"):
            kw.setdefault(flag, False)              # each switched on by its own step
        kw.setdefault("head_dtype", "fp32")
        return lambda model: Vggt4dPipeline(model, Vggt4dConfig(**kw))

    compiled = dict(cluster_backend="fast", refine_backend="fast", attention_backend="cudnn",
                    compile_blocks=True, compile_heads=True)
    graphs = dict(compiled, interleave_stages=True, cuda_graphs=True)
    # the last cumulative step (= the product defaults); the variants after it start here
    defaults = dict(graphs, cast_weight_cache=True, qk_rope_kernel=True, mlp_gelu_epilogue=True,
                    head_dtype="bf16")

    return [
        ("reference_fp32", "reference path: fp32 eager, stored Q/K + full Gram tensors, "
         "sklearn/skimage, full 2nd forward, host refinement", ref(None)),
        ("+bf16_autocast", "bf16 autocast aggregator, fp32 heads (fused SDPA / flash)",
         ref(torch.bfloat16)),
        ("+streaming_gram", "Q/K of the 11 layers reduced as produced, sources averaged first "
         "(no token x token tensors per source/head)",
         pipe(cluster_backend="reference", refine_outlier_backend="reference",
              refine_backend="reference", reuse_patch_tokens=False, pass2_camera_only=False,
              pass1_point_head=True)),
        ("+gpu_cluster_threshold_knn", "torch k-means / multi-Otsu / kNN outlier removal on "
         "the GPU (per-frame refinement loop)",
         pipe(cluster_backend="fast", refine_backend="reference", reuse_patch_tokens=False,
              pass2_camera_only=False, pass1_point_head=True)),
        ("+pass2_camera_only_token_reuse", "pass 2 = aggregator + camera head, DINO tokens "
         "reused from pass 1", pipe(cluster_backend="fast", refine_backend="reference",
                                    pass1_point_head=True)),
        ("+pass1_no_point_head", "pass 1 skips the idle point head (points come from depth)",
         pipe(cluster_backend="fast", refine_backend="reference")),
        ("+batched_gpu_refine", "refinement batched over frames and clusters on the GPU "
         "(refine_fast: subsampled outlier rule, batched k-means, one sync)",
         pipe(cluster_backend="fast", refine_backend="fast")),
        ("+cudnn_attention", "cuDNN fused attention preferred over FlashAttention-2",
         pipe(cluster_backend="fast", refine_backend="fast", attention_backend="cudnn")),
        ("+compiled_blocks", "torch.compile'd block functions (LN/RoPE/LayerScale/GELU fused)",
         pipe(cluster_backend="fast", refine_backend="fast", attention_backend="cudnn",
              compile_blocks=True)),
        ("+compiled_heads", "torch.compile'd camera and DPT heads (float32, fused "
         "elementwise kernels)", pipe(**compiled)),
        ("+interleaved_stages", "k-means after pass 1's launches and the refinement's "
         "pose-free half after pass 2's, on a high-priority side stream, same thread",
         pipe(**compiled, interleave_stages=True)),
        ("+cuda_graphs", "k-means loops (DINO tokens; refinement seeding + Lloyd) and the "
         "threshold stage as CUDA-graph replays (captured at high priority)",
         pipe(**graphs)),
        ("+cast_weight_cache", "block linear weights cast to bf16 once, not in every call",
         pipe(**graphs, cast_weight_cache=True)),
        ("+qk_rope_kernel", "qk-norm + RoPE + cast of each block as one Triton kernel",
         pipe(**graphs, cast_weight_cache=True, qk_rope_kernel=True)),
        ("+bf16_heads_gelu_epilogue", "numerics within the bf16 tolerance: DPT depth head "
         "under bf16 autocast, MLP GELU (tanh) fused into its GEMM",
         pipe(**defaults)),
        ("+overlapped_stages (not default)", "the two side stages from a worker thread "
         "instead of interleaved (GIL contention)",
         pipe(**dict(defaults, interleave_stages=False), overlap_stages=True)),
    ]


def bench_ablation(model, images: torch.Tensor, warmup: int, repeats: int
                   ) -> List[Dict[str, object]]:
    rows = []
    for name, desc, factory in ablation_steps():
        model.use_fused_blocks(False)          # each step sets its own block path
        fn = factory(model)
        slow = name.startswith("reference")
        torch.cuda.empty_cache() if images.is_cuda else None
        with torch.inference_mode():
            t = time_fn(lambda: fn(images), 1 if slow else warmup, 1 if slow else repeats,
                        images.device)
        row = {"step": name, "what": desc, **t.as_dict()}
        print(f"  {name:34s} {t.median_s * 1e3:9.1f} ms  peak {t.peak_bytes / 1e9:6.2f} GB",
              flush=True)
        rows.append(row)
    model.use_fused_blocks(False)
    return rows


# Stream runs: the engine pipelined or serial; the camera rate (0 = every frame queued at
# once: throughput); ``set``: Vggt4dConfig overrides of that run (A/B comparisons in one
# process: device instances differ by up to ~25 %).
STREAM_RUNS: Dict[str, Dict[str, object]] = {
    "pipelined": {"pipelined": True, "rate_hz": 0.0},
    "serial": {"pipelined": False, "rate_hz": 0.0},
    "live30": {"pipelined": True, "rate_hz": 30.0},
    "pipelined_no_model_graphs": {"pipelined": True, "rate_hz": 0.0,
                                  "set": {"embed_graph": False, "pass1_graph": False,
                                          "pass2_graph": False}},
}

# Isolated-window variants timed against the defaults, calls interleaved (A, B, C, A, B, C,
# ...) so that drift of the machine hits every variant alike.
VGGT4D_VARIANTS: Dict[str, Dict[str, object]] = {
    "no_pass1_graph": {"pass1_graph": False},
    "no_pass2_graph": {"pass2_graph": False},
    "no_embed_graph": {"embed_graph": False},
    "no_model_graphs": {"embed_graph": False, "pass1_graph": False, "pass2_graph": False},
    # the numerics / memory options, each off (runs 43-44 measured them the other way round)
    "no_qk_rope_kernel": {"qk_rope_kernel": False},
    "no_gelu_epilogue": {"mlp_gelu_epilogue": False},
    "no_cast_weights": {"cast_weight_cache": False},
    "fp32_heads": {"head_dtype": "fp32"},
    "official_numerics": {"mlp_gelu_epilogue": False, "head_dtype": "fp32"},
    "none_of_the_four": {"mlp_gelu_epilogue": False, "cast_weight_cache": False,
                         "head_dtype": "fp32", "qk_rope_kernel": False},
}


def interleaved_medians(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                        device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each function, the calls taken in turns after ``warmup``
    rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            runs[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in runs.items()}


def bench_stream(model, frames: int, height: int, width: int, window: int, stride: int,
                 device: torch.device, warmup_frames: int = 0,
                 overrides: Optional[Dict[str, object]] = None, pipelined: bool = True,
                 rate_hz: float = 0.0) -> Dict[str, object]:
    """A long stream through StreamEngine + Vggt4dWindowPredictor, driven as the node drives it.

    A feeder thread is the camera: it submits every frame at once (``rate_hz`` 0: the
    throughput of the engine) or at ``rate_hz`` (a live camera: does the node keep up?); the
    calling thread is the node's worker, ``poll(max_windows=1)`` until every frame of the full
    windows is out. ``pipelined``: ``StreamConfig.pipelined`` (next window predicted while
    this one is emitted).

    ``warmup_frames`` (plus ``frames % stride``, so that the last, shorter window's shape is
    met too) first go through a separate engine, untimed (``warmup_s`` reports how long): the
    compiled graphs of every window shape the stream meets are built there, as a node does in
    its first seconds. ``fps``: frames of the full windows per second, first submit to last
    output; the end-of-stream flush (the last, shorter window) is reported apart
    (``flush_s``). Window latency: submit of the window's newest frame to the poll that
    returns the window. GPU memory: allocated after every prediction (flat = bounded).
    ``overrides``: Vggt4dConfig fields (as ``--set``).
    """
    import threading

    from vggt4d_ros.dynamic import cuda_graph
    overrides = dict(overrides or {})
    warmup_s = 0.0
    if warmup_frames:
        t0 = time.perf_counter()
        bench_stream(model, warmup_frames + frames % stride, height, width, window, stride,
                     device, overrides=overrides, pipelined=pipelined)
        warmup_s = time.perf_counter() - t0
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
    from vggt4d_ros.stream.factory import Vggt4dWindowPredictor

    graphs_before = cuda_graph.cache_stats()
    pipe = Vggt4dPipeline(model, Vggt4dConfig(**{"cluster_backend": "fast", **overrides}))
    predictor = Vggt4dWindowPredictor(pipe, width, str(device), label=RANDOM_LABEL)
    window_sizes: Dict[int, int] = {}     # frames per predictor call: each size compiles once
    mem: List[float] = []
    predict = predictor.predict

    def counted_predict(images, frame_keys):
        window_sizes[len(frame_keys)] = window_sizes.get(len(frame_keys), 0) + 1
        out = predict(images, frame_keys)
        if device.type == "cuda":        # between predictions: what the stream retains
            mem.append(torch.cuda.memory_allocated() / 1e9)
        return out
    predictor.predict = counted_predict
    engine = StreamEngine(predictor, StreamConfig(window_size=window, stride=stride,
                                                  drop_policy="keep_all", pipelined=pipelined))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height, width + 8 * frames // 4, 3), dtype=np.uint8)
    # a panning view of one random texture: consecutive frames overlap
    images = [np.ascontiguousarray(base[:, (2 * i) % (base.shape[1] - width):][:, :width])
              for i in range(frames)]
    stamps = [int(i * 1e9 / 30) for i in range(frames)]
    submitted: Dict[int, float] = {}

    def camera():
        start = time.perf_counter()
        for i, (stamp, img) in enumerate(zip(stamps, images)):
            if rate_hz:
                time.sleep(max(0.0, start + i / rate_hz - time.perf_counter()))
            submitted[stamp] = time.perf_counter()
            engine.submit(FrameInput(stamp_ns=stamp, image=img, frame_id="camera_optical_frame"))

    full = window + (frames - window) // stride * stride if frames >= window else 0
    lat, stages, depth = [], [], []
    n_out = 0
    feeder = threading.Thread(target=camera, name="bench_camera", daemon=True)
    t0 = time.perf_counter()
    feeder.start()
    if not rate_hz:
        feeder.join()                   # every frame queued before the worker starts
    while n_out < full:
        outs = engine.poll(max_windows=1)
        if not outs:
            time.sleep(0.0005)
            continue
        lat.append(time.perf_counter() - submitted[outs[-1].stamp_ns])
        stages.append(dict(getattr(engine.last_window, "timings", None) or {}))
        depth.append(engine.counters.queue_depth)
        n_out += len(outs)
    wall = time.perf_counter() - t0
    feeder.join()
    t_flush = time.perf_counter()
    n_out += len(engine.flush())
    synchronize(device)
    flush_s = time.perf_counter() - t_flush
    counters = engine.counters
    engine.close()
    graphs = {name: {k: v - graphs_before.get(name, {}).get(k, 0) if k != "size" else v
                     for k, v in st.items()} for name, st in cuda_graph.cache_stats().items()}
    return {"frames": frames, "frames_out": n_out, "window": window, "stride": stride,
            "pipelined": pipelined, "camera_rate_hz": rate_hz,
            "overrides": overrides, "warmup_frames": warmup_frames, "warmup_s": warmup_s,
            "window_sizes": dict(sorted(window_sizes.items())),
            "wall_s": wall, "fps": full / wall, "flush_s": flush_s, "cuda_graph_caches": graphs,
            "lookahead_hits": counters.lookahead_hits,
            "lookahead_misses": counters.lookahead_misses,
            "queue_depth_max": max(depth) if depth else 0,
            "window_latency_s_median": float(np.median(lat)) if lat else None,
            "window_latency_s_p95": float(np.percentile(lat, 95)) if lat else None,
            "window_latency_s_max": float(np.max(lat)) if lat else None,
            "gpu_mem_gb_after_windows": mem,
            "gpu_mem_growth_gb": (mem[-1] - mem[min(2, len(mem) - 1)]) if len(mem) > 2 else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0,
            "window_ms_median": _window_breakdown(stages),
            "window_total_ms": _spread([st["total_s"] * 1e3 for st in stages if "total_s" in st]),
            "pipeline_stage_ms_median": _pipeline_stages(stages)}


def _spread(values: List[float]) -> Dict[str, float]:
    """mean, p10, p50, p90 and max of ``values`` (rounded), {} if empty: the tail of the
    per-window times, which the median hides and frames/s does not."""
    if not values:
        return {}
    v = np.asarray(values, float)
    out = {"mean": v.mean(), "max": v.max()}
    out.update({f"p{q}": np.percentile(v, q) for q in (10, 50, 90)})
    return {k: round(float(x), 2) for k, x in out.items()}


def _window_breakdown(stages: List[Dict[str, float]]) -> Dict[str, float]:
    """Median per-window split of the stream's time (ms): the predictor's pre-processing and
    pipeline, the rest of predict (output transfer, wrapper), Sim(3) alignment and the emit
    step (static points, map fusion, records) - where the host time between windows goes.
    ``predict_ms`` is the time the engine WAITED for the prediction: pipelined, a prediction
    started while the previous window was emitted is partly done when its turn comes."""
    def med(key: str) -> float:
        vals = [s[key] for s in stages if key in s]
        return float(np.median(vals)) * 1e3 if vals else float("nan")
    out = {k: med(k) for k in ("total_s", "predict_s", "preprocess_s", "pipeline_s",
                               "align_s")}
    emit = [s["total_s"] - s["predict_s"] - s["align_s"] for s in stages
            if {"total_s", "predict_s", "align_s"} <= set(s)]
    out["emit_s"] = float(np.median(emit)) * 1e3 if emit else float("nan")
    return {k.replace("_s", "_ms"): round(v, 2) for k, v in out.items()}


def _pipeline_stages(stages: List[Dict[str, float]]) -> Dict[str, float]:
    """Median ms per VGGT4D stage inside the stream's windows (the pipeline's own timings,
    ``pipeline_<stage>``), to compare with the isolated window of the ``vggt4d`` section."""
    keys = sorted({k for s in stages for k in s if k.startswith("pipeline_") and k != "pipeline_s"})
    return {k[len("pipeline_"):]: round(float(np.median([s[k] for s in stages if k in s])) * 1e3, 2)
            for k in keys}


# --------------------------------------------------------------------------- CLI
def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vggt4d-bench", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--height", type=int, default=294)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--ablation-frames", type=int, default=16)
    p.add_argument("--stream-frames", type=int, default=500)
    p.add_argument("--stream-runs", nargs="+", default=list(STREAM_RUNS), choices=list(STREAM_RUNS),
                   help="stream runs: pipelined / serial engine with every frame queued at "
                        "once (throughput), pipelined engine behind a 30 Hz camera (live), "
                        "A/B baseline: pipelined without the model's CUDA graphs (embed, "
                        "pass 1, pass 2's tail)")
    p.add_argument("--variants", nargs="*", default=list(VGGT4D_VARIANTS),
                   choices=list(VGGT4D_VARIANTS),
                   help="isolated-window variants timed interleaved with the defaults (each "
                        "compiles / captures its own kernels on its first call)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default=None, help="VGGT config JSON (default: full VGGT-1B)")
    p.add_argument("--skip", nargs="*", default=[], choices=["plain", "vggt4d", "ablation",
                                                             "stream", "attention"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Vggt4dConfig overrides for the vggt4d and stream sections (python "
                        "literals), e.g. cuda_graphs=False interleave_stages=True")
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="sys.setswitchinterval for this process (Python's GIL hand-over "
                        "period, default 0.005 s): how long the prediction thread can wait for "
                        "the GIL while the worker emits a window")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    parse_window_args(p, args, args.set)
    if min(args.frames) < 1 or args.stream_frames < 0 or args.window < 2 or \
            not 0 < args.stride <= args.window:
        p.error("frames >= 1, window >= 2 and 0 < stride <= window")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    dev = torch.device(args.device)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if cuda_missing(dev, "vggt4d-bench", "this benchmark is for the GPU device"):
        return 2
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    from vggt4d_ros.model.config import VGGTConfig
    cfg = VGGTConfig.from_json(args.config) if args.config else None
    t_start = time.perf_counter()
    model = build_random_vggt(dev, config=cfg)
    report: Dict[str, object] = {
        "label": RANDOM_LABEL, **run_info(dev),
        "command": "vggt4d-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "switch_interval_s": sys.getswitchinterval(),
        "size": [args.height, args.width], "plain": [], "vggt4d": [], "ablation": None,
        "stream": None, "attention_backends": None}
    print(f"{report['device']} torch {torch.__version__} | {args.config or 'VGGT-1B'} {RANDOM_LABEL} | "
          f"{args.width}x{args.height}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    pipe = Vggt4dPipeline(model, Vggt4dConfig(**{"cluster_backend": "fast", **args.overrides}))
    report["overrides"] = args.overrides
    for s in args.frames:
        images = torch.rand(s, 3, args.height, args.width, device=dev, generator=gen)
        if "plain" not in args.skip:
            model.use_fused_blocks(False)          # the official recipe: eager modules
            row = bench_plain(model, images, args.warmup, args.repeats)
            model.use_fused_blocks(True, compile=dev.type == "cuda")
            with torch.inference_mode():
                comp = time_fn(lambda: model(images, autocast_dtype=torch.bfloat16),
                               args.warmup, args.repeats, dev)
            row["full_compiled_blocks"] = comp.as_dict()
            report["plain"].append(row)
            print(f"plain S={s:3d}: embed {row['patch_embed']['median_s'] * 1e3:7.1f} ms | "
                  f"aggregator {row['aggregator']['median_s'] * 1e3:7.1f} ms "
                  f"({row['aggregator_tflops']:.0f} TFLOP/s, "
                  f"{100 * row['aggregator_mfu']:.0f}% of {H100_BF16_DENSE_TFLOPS:.0f}) | "
                  f"heads {row['heads']['median_s'] * 1e3:7.1f} ms | full "
                  f"{row['full']['median_s'] * 1e3:7.1f} ms peak "
                  f"{row['full']['peak_gb']:.2f} GB | full, compiled blocks+heads "
                  f"{comp.median_s * 1e3:7.1f} ms", flush=True)
        if "vggt4d" not in args.skip:
            model.use_fused_blocks(True, compile=dev.type == "cuda")   # as the pipeline sets
            r = bench_pipeline(pipe, images, args.warmup, args.repeats)
            r["frames"] = s
            if dev.type == "cuda" and args.variants:
                from vggt4d_ros.dynamic import cuda_graph
                # A/B in this process, calls interleaved: the defaults against each variant
                pipes = {"default": pipe}
                for name in args.variants:
                    kw = VGGT4D_VARIANTS[name]
                    pipes[name] = Vggt4dPipeline(model, Vggt4dConfig(**{
                        "cluster_backend": "fast", **args.overrides, **kw}))
                # each configuration keeps its own model graphs (their cache keys differ)
                with cuda_graph.scaled_capacities(len(pipes)):
                    r["variants_ms"] = {k: v * 1e3 for k, v in interleaved_medians(
                        {k: (lambda p=p: p(images)) for k, p in pipes.items()}, args.warmup,
                        args.repeats, dev).items()}
            plain = next((p for p in report["plain"] if p["frames"] == s), None)
            if plain:
                r["ratio_to_plain_vggt"] = r["total"]["median_s"] / plain["full"]["median_s"]
            report["vggt4d"].append(r)
            st = " ".join(f"{k} {v * 1e3:.1f}" for k, v in r["stages"].items())
            ab = "".join(f" | {k} {v:.1f}" for k, v in r.get("variants_ms", {}).items())
            ab = f" | interleaved (ms){ab}" if ab else ""
            print(f"vggt4d S={s:3d}: total {r['total']['median_s'] * 1e3:7.1f} ms peak "
                  f"{r['total']['peak_gb']:.2f} GB ratio {r.get('ratio_to_plain_vggt', 0):.2f} "
                  f"| {st} (ms){ab}", flush=True)
        del images
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    images = torch.rand(args.ablation_frames, 3, args.height, args.width, device=dev,
                        generator=gen)
    model.use_fused_blocks(False)
    if "attention" not in args.skip and dev.type == "cuda":
        print(f"attention backends at S={args.ablation_frames}:", flush=True)
        report["attention_backends"] = bench_attention_backends(model, images, args.warmup,
                                                                args.repeats)
    if "ablation" not in args.skip:
        print(f"ablation at S={args.ablation_frames}:", flush=True)
        report["ablation"] = bench_ablation(model, images, args.warmup, args.repeats)
        base = report["ablation"][0]["median_s"]
        for row in report["ablation"]:
            row["speedup_vs_reference"] = base / row["median_s"]
    if "stream" not in args.skip and args.stream_frames:
        report["stream_runs"] = {}
        for k, name in enumerate(args.stream_runs):
            spec = STREAM_RUNS[name]
            pipelined, rate = bool(spec["pipelined"]), float(spec["rate_hz"])
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            st = bench_stream(model, args.stream_frames, args.height, args.width, args.window,
                              args.stride, dev, warmup_frames=3 * args.window if k == 0 else 0,
                              overrides={**args.overrides, **dict(spec.get("set", {}))},
                              pipelined=pipelined, rate_hz=rate)
            report["stream_runs"][name] = st
            report["stream"] = report["stream"] or st
            camera = f"camera {rate:g} Hz" if rate else "all frames queued"
            print(f"stream[{name}] {st['frames']} frames W{args.window}/S{args.stride}, "
                  f"{'pipelined' if pipelined else 'serial'}, {camera} (after "
                  f"{st['warmup_frames']} warm-up frames, {st['warmup_s']:.1f} s): "
                  f"{st['fps']:.1f} frames/s (end-of-stream flush {st['flush_s']:.2f} s apart), "
                  f"predicted ahead {st['lookahead_hits']} (discarded "
                  f"{st['lookahead_misses']}), queue max {st['queue_depth_max']}, window "
                  f"latency median {st['window_latency_s_median']:.3f} p95 "
                  f"{st['window_latency_s_p95']:.3f} max {st['window_latency_s_max']:.3f} s, "
                  f"CUDA-graph caches {st['cuda_graph_caches']}, window sizes "
                  f"{st['window_sizes']}, GPU memory growth {st['gpu_mem_growth_gb']} GB, "
                  f"peak {st['peak_gb']:.2f} GB; window total (ms) {st['window_total_ms']}; "
                  f"per window (median ms) "
                  f"{st['window_ms_median']}; VGGT4D stages in the stream (median ms) "
                  f"{st['pipeline_stage_ms_median']}", flush=True)
    report["total_s"] = time.perf_counter() - t_start
    write_report(report, args.out, "bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
