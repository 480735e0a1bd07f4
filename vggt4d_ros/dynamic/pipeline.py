"""VGGT4D two-pass pipeline (VGGT4D spec §0): one window of frames -> poses, depth, masks.

Data flow for images ``[S, 3, H, W]`` in [0, 1]:

1. Pass 1: the DINO patch tokens ("encoder features") are embedded first (or taken from the
   caller's per-frame cache), then the plain VGGT forward runs on them; the global-attention
   Q/K of the 11 saliency layers are reduced on the fly by
   :class:`~.saliency.GramSaliencyReducer` (nothing else is captured). The k-means over the
   tokens (step 2) needs nothing else, so with ``interleave_stages`` (or ``overlap_stages``)
   on CUDA it runs on a side stream during pass 1 (``side_task.py``; see the config).
2. Saliency ``[S, h, w]`` -> feature clustering -> bilinear upsample -> adaptive multi-Otsu
   threshold -> coarse mask ``M0 [S, H, W]``.
3. Pass 2: VGGT again with dynamic tokens removed from keys/values in layers 0-4. Only the
   camera pose is used, so by default only the aggregator + camera head run
   (``pass2_camera_only``), reusing pass 1's patch tokens (``reuse_patch_tokens``: the DINO
   patch embedding is identical in both passes).
4. Refinement (pass-1 depth + intrinsics, pass-2 poses, M0) -> final mask. Its outlier
   removal and clustering need no pose (``refine.prepare_refinement``); they run before pass 2
   (or beside it, with ``interleave_stages`` / ``overlap_stages``) and only the residual test
   waits for the poses.
5. Outputs: poses from pass 2; depth, depth confidence, intrinsics from pass 1; world points =
   pass-1 depth unprojected (official VGGT convention, ``pixel_offset`` 0) with pass-1
   intrinsics and pass-2 poses; their confidence = pass-1 depth confidence.

Numerics: on CUDA the aggregator runs under bf16 autocast with fp32 heads (the official
recipe); on CPU everything is fp32 (``autocast="auto"``).

Defined fallbacks (each with a ``warnings.warn``; never a crash or NaN pose):

* ``S < min_frames`` (default 2: no source frame exists for the saliency) -> plain VGGT
  output, empty masks, ``saliency`` None.
* coarse mask without a dynamic token (all static, or constant saliency) -> pass 2 would be
  bit-identical to pass 1 (the model takes its plain path), so it is skipped.
* all-dynamic masks -> only special tokens remain keys in layers 0-4 (defined by the model).
* non-finite pass-2 pose -> pass-1 pose for those frames. Non-finite depth -> see refine.py.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..geometry.unproject import depth_to_world_points
from . import cuda_graph
from .cluster import cluster_features
from .intervention import build_intervention_control
from .refine import RefineConfig, prepare_refinement
from .saliency import GramSaliencyReducer, SaliencyMapSpec
from .side_task import SideTask
from .threshold import coarse_mask


@dataclass
class Vggt4dConfig:
    """Every constant of VGGT4D (spec §7) with the paper/released defaults."""

    dynamic: bool = True                    # False -> plain VGGT (one pass, empty masks)
    # saliency (spec §2)
    window_offsets: Tuple[int, ...] = (2, 4, 6)
    mean1_layers: Tuple[int, ...] = (3, 4, 5, 6, 7)
    var1_layers: Tuple[int, ...] = (18, 19)
    mean2_layers: Tuple[int, ...] = (17, 18, 19, 20, 21)
    mean3_layers: Tuple[int, ...] = (0,)
    var3_layers: Tuple[int, ...] = (0,)
    # clustering + threshold (spec §3-4)
    feature_clusters: int = 64
    kmeans_seed: int = 42
    cluster_backend: str = "reference"      # "reference" (scikit-learn/-image) | "fast" (torch)
    otsu_classes: Tuple[int, ...] = (2, 3, 4)
    otsu_bins: int = 256
    # intervention (spec §5)
    intervention_layers: Tuple[int, ...] = (0, 1, 2, 3, 4)
    patch_size: int = 14
    # refinement (spec §6)
    refine: bool = True
    refine_outlier_neighbors: int = 20
    refine_outlier_std_ratio: float = 2.5
    refine_clusters: int = 30
    refine_visibility_margin: float = 0.01
    refine_min_valid_fraction: float = 0.05
    refine_residual_threshold: float = 0.1
    refine_close_kernel: int = 5
    refine_dilate_kernel: int = 3
    refine_pixel_offset: float = 0.5
    refine_outlier_backend: str = "auto"    # "auto" (torch kNN on CUDA, cKDTree on CPU) | ...
    refine_backend: str = "auto"            # "auto" (refine_fast on CUDA) | "reference" | "fast"
    refine_boundary_sharpening: bool = False  # measured trade-off: see refine.py docstring
    refine_boundary_band: int = 4
    refine_boundary_threshold: float = 0.2
    refine_boundary_keep_threshold: float = 0.2
    # execution
    reuse_patch_tokens: bool = True         # pass 2 reuses pass-1 DINO patch tokens
    pass2_camera_only: bool = True          # pass 2 runs aggregator + camera head only
    autocast: str = "auto"                  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "off"
    pass1_point_head: bool = False          # world points come from depth: the point head is idle
    # The GPU speed path's block and head options. head_dtype and mlp_gelu_epilogue change
    # numerics (both as the official recipe: ``Vggt4dConfig.official_recipe()``);
    # cast_weight_cache and qk_rope_kernel keep results. Measured on the H100
    # (docs/BENCHMARKS.md, runs 43-47): the four together 28 ms of a 253 ms window, and the
    # fast path still agrees with the fp32 reference within the bf16 tolerance
    # (tools/numerics_check).
    # DPT depth head dtype: "auto" = bf16 when the aggregator runs under bf16 autocast (CUDA),
    # else float32 | "fp32" (the official recipe: heads in float32) | "bf16".
    head_dtype: str = "auto"
    # On CUDA under autocast, with the fused block path (compile_blocks): each block's MLP
    # GELU fused into its first GEMM (a cuBLASLt epilogue). That GELU is the tanh
    # approximation (|difference| < 5e-4, below bf16 resolution) instead of the official
    # exact GELU; elsewhere (CPU, fp32) the exact GELU runs whatever this says.
    mlp_gelu_epilogue: bool = True
    # Under autocast with the fused block path: keep the blocks' linear weights cast to bf16
    # once (a second copy: 1.8 GB for VGGT-1B) instead of casting them in every call. Same
    # values, same results.
    cast_weight_cache: bool = True
    # On CUDA with the fused block path: each aggregator block's qk-norm and RoPE (and the
    # cast for SDPA) as one Triton kernel instead of two inductor kernels (same maths up to
    # the rounding of the LayerNorm reductions).
    qk_rope_kernel: bool = True
    attention_backend: str = "auto"         # SDPA kernel: "auto" (PyTorch's pick) | "cudnn" | "flash"
    # torch.compile the transformer blocks on CUDA (measured 165 -> 99 ms for the 16-frame
    # aggregator on an H200; the first window of each shape compiles, ~18 s). On CPU the same
    # functions run uncompiled (bit-identical to the module path).
    compile_blocks: bool = True
    # with compile_blocks on CUDA, also torch.compile the camera and DPT heads (float32 maths
    # kept; fused elementwise kernels; rounding-level differences)
    compile_heads: bool = True
    # On CUDA, run the k-means over the DINO tokens during pass 1 and the refinement's
    # pose-free half during pass 2, on a side stream from a worker thread (side_task.py; same
    # results). Off by default: once those stages had been made cheap on the GPU, the worker's
    # Python launches competing for the GIL with the main thread's cost as much as the overlap
    # saved (H100, 16 frames: 313 ms in order vs 317-331 ms overlapped, docs/BENCHMARKS.md).
    overlap_stages: bool = False
    # On CUDA, interleave those two stages with the passes on the calling thread instead:
    # pass 1's (pass 2's) kernels are queued first, then the k-means (the refinement's
    # pose-free half) runs on a high-priority side stream while the GPU works through the
    # queue, so its host time (Python, launches, its own host reads) is hidden without a
    # second thread contending for the GIL (side_task.py "deferred"; same results). H100, 16
    # frames: 295 -> 274 ms per window; 500-frame stream 17.6 -> 20.2 frames/s (run 12, CUDA
    # graphs on in both; 24-25 frames/s with the final defaults, runs 17-18).
    interleave_stages: bool = True
    # On CUDA, run the fast k-means loops (DINO-token clustering; the refinement's seeding +
    # Lloyd iterations) and the threshold stage (cluster map, upsampling, multi-Otsu) as
    # CUDA-graph replays instead of ~15 small launches per iteration / ~260 per threshold
    # (launch-bound: k-means ~38 ms wall for ~10 ms of GPU work, threshold 4.4 ms for 1.2,
    # H100, 16 frames). Same arithmetic and labels as the eager path (CPU tests under an
    # emulated capture; tools/graph_check on the device). A capture that fails falls back to
    # eager. The graphs are captured on a high-priority stream so that their kernels keep
    # interleaving with the model passes (captured at normal priority they queued behind
    # them, and graphs lost in the stream, runs 13-23). H100, 16 frames, same process:
    # 252.4 vs 258.0 ms per window, 500-frame stream 25.3 vs 23.7 frames/s (run 27); stream
    # 24.2 vs 23.5 (run 24); costs ~0.2 GB of graph memory (docs/BENCHMARKS.md, runs 21-27).
    cuda_graphs: bool = True
    # With cuda_graphs on CUDA, also pass 1 (aggregator with the saliency reduction, camera and
    # depth heads) as one CUDA graph per window shape: its ~1,900 launches (~57 ms of host
    # time on the H100 host, run 25) become one replay, so the host is free for the
    # interleaved k-means while the GPU works. Same kernels, same results; the graph's memory
    # (pass 1's working set) stays reserved per shape (two shapes kept).
    pass1_graph: bool = True
    # Likewise pass 2 after its last key-masked layer (layers 5-23 and the camera head: their
    # shapes do not depend on the mask); the masked layers stay eager (their key counts
    # change with every window).
    pass2_graph: bool = True
    # Likewise the DINO patch embedding per frame count (a stream embeds only its new frames,
    # at the start of each window: launched one by one, the GPU waited for the host there).
    embed_graph: bool = True
    min_frames: int = 2
    points_pixel_offset: float = 0.0        # world points: official VGGT unprojection

    def __post_init__(self) -> None:
        if self.cluster_backend not in ("reference", "fast"):
            raise ValueError(f"cluster_backend must be 'reference' or 'fast', "
                             f"got {self.cluster_backend!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.head_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"head_dtype must be 'auto', 'fp32' or 'bf16', "
                             f"got {self.head_dtype!r}")
        if self.attention_backend not in ("auto", "cudnn", "flash"):
            raise ValueError(f"attention_backend must be 'auto', 'cudnn' or 'flash', "
                             f"got {self.attention_backend!r}")
        if self.refine_outlier_backend not in ("auto", "reference", "fast"):
            raise ValueError(f"refine_outlier_backend must be 'auto', 'reference' or 'fast', "
                             f"got {self.refine_outlier_backend!r}")
        if self.refine_backend not in ("auto", "reference", "fast"):
            raise ValueError(f"refine_backend must be 'auto', 'reference' or 'fast', "
                             f"got {self.refine_backend!r}")
        if self.min_frames < 2:
            raise ValueError("min_frames must be >= 2 (saliency needs a source frame)")

    @classmethod
    def official_recipe(cls, **overrides: Any) -> "Vggt4dConfig":
        """The official numerics: float32 DPT heads, exact GELU (bf16 aggregator on CUDA);
        the execution speed-ups that keep results (graphs, compiled blocks, caches) stay."""
        return cls(**{"head_dtype": "fp32", "mlp_gelu_epilogue": False, **overrides})

    def head_autocast_dtype(self, amp: Optional[torch.dtype]) -> Optional[torch.dtype]:
        """Autocast dtype of the DPT heads given the aggregator's (None = float32)."""
        if self.head_dtype == "bf16" or (self.head_dtype == "auto" and amp is not None):
            return torch.bfloat16
        return None

    def side_task_mode(self) -> str:
        """How the k-means and the refinement's pose-free half run (``side_task.SideTask``)."""
        if self.overlap_stages:
            return "thread"
        return "deferred" if self.interleave_stages else "inline"

    def saliency_specs(self) -> Tuple[SaliencyMapSpec, ...]:
        """The five statistics of spec §2 with this config's layer sets."""
        return (SaliencyMapSpec("mean1", "q", "q", tuple(self.mean1_layers), "mean"),
                SaliencyMapSpec("var1", "q", "q", tuple(self.var1_layers), "std"),
                SaliencyMapSpec("mean2", "q", "q", tuple(self.mean2_layers), "mean"),
                SaliencyMapSpec("mean3", "k", "k", tuple(self.mean3_layers), "mean"),
                SaliencyMapSpec("var3", "q", "k", tuple(self.var3_layers), "std"))

    def refine_config(self, device: Optional[torch.device] = None) -> RefineConfig:
        """Refinement constants as a :class:`RefineConfig` (``device`` resolves "auto")."""
        outlier = self.refine_outlier_backend
        if outlier == "auto":
            outlier = "fast" if device is not None and device.type == "cuda" else "reference"
        backend = self.refine_backend                  # same rule: no device -> reference
        if backend == "auto":
            backend = "fast" if device is not None and device.type == "cuda" else "reference"
        return RefineConfig(
            outlier_backend=outlier,
            outlier_neighbors=self.refine_outlier_neighbors,
            outlier_std_ratio=self.refine_outlier_std_ratio, num_clusters=self.refine_clusters,
            seed=self.kmeans_seed, visibility_margin=self.refine_visibility_margin,
            min_valid_fraction=self.refine_min_valid_fraction,
            residual_threshold=self.refine_residual_threshold,
            close_kernel=self.refine_close_kernel, dilate_kernel=self.refine_dilate_kernel,
            pixel_offset=self.refine_pixel_offset, kmeans_backend=self.cluster_backend,
            boundary_sharpening=self.refine_boundary_sharpening,
            boundary_band=self.refine_boundary_band,
            boundary_threshold=self.refine_boundary_threshold,
            boundary_keep_threshold=self.refine_boundary_keep_threshold,
            backend=backend, cuda_graphs=self.cuda_graphs)


@dataclass
class Vggt4dResult:
    """One window's outputs (all on the input device, float32 unless stated).

    extrinsic ``[S, 3, 4]`` camera-from-world (pass 2); intrinsic ``[S, 3, 3]`` pixels
    (pass 1); depth / depth_conf ``[S, H, W]`` (pass 1, model units); world_points
    ``[S, H, W, 3]`` (pass-1 depth, pass-2 poses; frame of camera 0); world_points_conf
    ``[S, H, W]``; saliency ``[S, h, w]`` in [0, 1] or None; coarse_mask / mask ``[S, H, W]``
    bool (dynamic = True); timings: seconds per stage ("total" = wall time of the call;
    "cluster" and "refine_prep" are the side tasks' own durations, concurrent with pass 1 /
    pass 2 with ``overlap_stages`` or ``interleave_stages`` (then included in "pass1" /
    "pass2" too); "cluster_wait" the wait for the k-means).
    Extra (additive): token_mask ``[S, N]`` bool or None (pass-2 dynamic tokens); threshold
    (float, NaN when not computed); pass1_extrinsic ``[S, 3, 4]``; fallback: reason or "".
    """

    extrinsic: Tensor
    intrinsic: Tensor
    depth: Tensor
    depth_conf: Tensor
    world_points: Tensor
    world_points_conf: Tensor
    saliency: Optional[Tensor]
    coarse_mask: Tensor
    mask: Tensor
    timings: Dict[str, float] = field(default_factory=dict)
    token_mask: Optional[Tensor] = None
    threshold: float = float("nan")
    pass1_extrinsic: Optional[Tensor] = None
    fallback: str = ""


class _Timer:
    """Per-stage wall-clock timings, synchronised with the current CUDA stream on a GPU (not
    the whole device: a side-stream task keeps running across stage boundaries)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.timings: Dict[str, float] = {}
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def total(self) -> float:
        """Wall time since construction (synchronised)."""
        self._sync()
        return time.perf_counter() - self.start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"vggt4d::{name}"):   # no-op unless profiling
                yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


class Vggt4dPipeline:
    """VGGT4D on one window: ``Vggt4dPipeline(model, Vggt4dConfig())(images) -> Vggt4dResult``."""

    def __init__(self, model: torch.nn.Module, config: Optional[Vggt4dConfig] = None) -> None:
        self.model = model
        self.config = config or Vggt4dConfig()
        if self.config.compile_blocks and hasattr(model, "use_fused_blocks"):
            on_cuda = any(p.is_cuda for p in model.parameters())
            # compiled graphs are per window shape; the first window of a shape compiles
            model.use_fused_blocks(True, compile=on_cuda,
                                   compile_heads=self.config.compile_heads)

    # ------------------------------------------------------------------ helpers
    def _autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        mode = self.config.autocast
        if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None

    @staticmethod
    def _check_images(images: Tensor) -> Tensor:
        """``[S, 3, H, W]`` or ``[1, S, 3, H, W]`` -> ``[S, 3, H, W]``."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 5:
            if images.shape[0] != 1:
                raise ValueError(f"Vggt4dPipeline processes one window (B=1), got "
                                 f"{tuple(images.shape)}")
            images = images[0]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [S, 3, H, W], got {tuple(images.shape)}")
        if images.shape[0] < 1:
            raise ValueError("images must hold at least one frame")
        return images

    def _camera_pass(self, images: Tensor, control, patch_tokens: Optional[Tensor],
                     amp: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
        """Aggregator + camera head only -> (extrinsic [S,3,4], intrinsic [S,3,3])."""
        model = self.model
        x = images[None]
        start = self._pass2_split(x, control)
        if start is None:
            return _camera_layers(model, x, control, patch_tokens, amp, None)
        # the key-masked layers (data-dependent key counts) eagerly, the rest replayed
        with _autocast(x.device.type, amp):
            head = model.aggregator.run(x, control=control, patch_tokens=patch_tokens,
                                        keep_layers=(), layer_range=(0, start))
        key = (id(model), tuple(x.shape), start, head.tokens.dtype, amp, self._kernel_key(),
               x.device)
        graph = _pass2_graphs.get(key, lambda: _capture_pass2_tail(model, x, start,
                                                                   head.tokens, amp))
        if graph is None:                   # capture failed in this process: the eager tail
            return _camera_layers(model, x, None, None, amp, (start, head.tokens))
        return graph.run(head.tokens)

    def _pass2_split(self, x: Tensor, control) -> Optional[int]:
        """The first layer of pass 2 after its key-masked ones when that tail runs as a CUDA
        graph (``pass2_graph``: no masks, no hooks, shapes fixed per window shape), else
        None (the whole pass eagerly)."""
        cfg = self.config
        if not (cfg.cuda_graphs and cfg.pass2_graph and cuda_graph.usable(x)
                and control is not None and control.key_mask_layers
                and not any(control.capture.values())):
            return None
        start = max(control.key_mask_layers) + 1
        return start if start < len(self.model.aggregator.frame_blocks) else None

    @contextmanager
    def _block_options(self) -> Iterator[None]:
        """This config's fused-block options (``mlp_gelu_epilogue``, ``cast_weight_cache``,
        ``qk_rope_kernel``) on the model's block functions for the duration of a call,
        restored after: pipelines with different options may share one model (bench
        variants)."""
        fns = getattr(self.model, "fused_functions", None)
        if fns is None:
            yield
            return
        saved = (fns.gelu_epilogue, fns.cast_weights, fns.qk_rope_kernel)
        fns.gelu_epilogue = self.config.mlp_gelu_epilogue
        fns.cast_weights = self.config.cast_weight_cache
        fns.qk_rope_kernel = self.config.qk_rope_kernel
        try:
            yield
        finally:
            fns.gelu_epilogue, fns.cast_weights, fns.qk_rope_kernel = saved

    def _kernel_key(self) -> Tuple[Any, ...]:
        """The config fields that change which kernels a model pass launches (part of every
        CUDA-graph cache key)."""
        cfg = self.config
        return (cfg.compile_blocks, cfg.compile_heads, cfg.attention_backend,
                cfg.mlp_gelu_epilogue, cfg.cast_weight_cache, cfg.qk_rope_kernel)

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def __call__(self, images: Tensor, patch_tokens: Optional[Tensor] = None) -> Vggt4dResult:
        """Run VGGT4D on a window ``images [S, 3, H, W]`` float in [0, 1] (any device).

        ``patch_tokens`` [S, N, C_dino]: optional DINO tokens of these frames (``model.aggregator.
        embed_patches``), e.g. cached per frame by the streaming engine; pass 1 then skips the
        patch embedding (identical result).
        """
        with self._block_options():
            return self._run(images, patch_tokens)

    def _run(self, images: Tensor, patch_tokens: Optional[Tensor]) -> Vggt4dResult:
        cfg = self.config
        images = self._check_images(images)
        s, _, h, w = images.shape
        timer = _Timer(images.device)
        amp = self._autocast_dtype(images.device)
        run_dynamic = cfg.dynamic
        fallback = ""
        if run_dynamic and s < cfg.min_frames:
            warnings.warn(f"VGGT4D needs >= {cfg.min_frames} frames, got {s}: plain VGGT output "
                          "with empty dynamic masks", RuntimeWarning, stacklevel=2)
            run_dynamic, fallback = False, f"too few frames ({s} < {cfg.min_frames})"

        from ..model.hooks import AttentionControl

        reducer = None
        control = None
        if run_dynamic:
            reducer = GramSaliencyReducer(s, offsets=cfg.window_offsets,
                                          specs=cfg.saliency_specs())
            control = AttentionControl(capture=reducer.capture, on_qk=reducer.on_qk,
                                       encoder_features=True)
        heads1 = ("camera", "depth", "point") if cfg.pass1_point_head else ("camera", "depth")
        head_amp = cfg.head_autocast_dtype(amp)
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        dev = images.device
        cluster_task = None
        if run_dynamic:
            # DINO tokens first, so that the k-means over them (spec §3, independent of the
            # saliency) runs on a side stream while the rest of pass 1 occupies the GPU
            if patch_tokens is None:
                with timer("embed"):
                    patch_tokens = self.embed_patches(images)
            feats = patch_tokens.reshape(s, gh * gw, -1)
            cluster_task = SideTask(
                lambda: cluster_features(feats, cfg.feature_clusters, cfg.kmeans_seed,
                                         cfg.cluster_backend, cfg.cuda_graphs),
                dev, cfg.side_task_mode(), name="vggt4d-kmeans", stage="cluster")
        with timer("pass1"), self._attention_kernels():
            graph = (self._pass1_graph(images, patch_tokens, amp, heads1, head_amp)
                     if run_dynamic else None)
            if graph is None:
                out1 = self.model(images, control=control, patch_tokens=patch_tokens,
                                  autocast_dtype=amp, heads=heads1, head_autocast_dtype=head_amp)
            else:
                self.model.validate_images(images, self.model.config.patch_size)   # skipped in it
                out1 = graph.run(images, patch_tokens)
                out1["encoder_features"] = patch_tokens
                reducer = graph.state             # holds this window's statistics now
            if cluster_task is not None:
                cluster_task.launch()       # deferred: beside pass 1's queued kernels
        ext1 = out1["extrinsic"][0].float()
        intr1 = out1["intrinsic"][0].float()
        depth1 = out1["depth"][0, ..., 0].float()
        conf1 = out1["depth_conf"][0].float()

        empty = torch.zeros(s, h, w, dtype=torch.bool, device=dev)
        saliency = token_mask = None
        coarse = mask = empty
        thr: Tensor | float = float("nan")
        ext = ext1
        if run_dynamic:
            with timer("saliency"):
                saliency = reducer.maps()["dyn_map"][0].reshape(s, gh, gw)
            with timer("cluster_wait"):
                labels = cluster_task.result().reshape(s, gh, gw)
            timer.timings["cluster"] = cluster_task.seconds
            with timer("threshold"):
                thr, coarse = coarse_mask(saliency, labels, (h, w), cfg.feature_clusters,
                                          cfg.otsu_classes, cfg.otsu_bins,
                                          cfg.cluster_backend, cfg.cuda_graphs)
            refine_task = None
            if cfg.refine:
                # outlier removal + clustering need no pose: they overlap pass 2
                rcfg = cfg.refine_config(dev)
                refine_task = SideTask(
                    lambda: prepare_refinement(depth1, intr1, coarse, images.float(), rcfg),
                    dev, cfg.side_task_mode(), name="vggt4d-refine",
                    stage="refine_prep")
            with timer("pass2"):
                control2, token_mask = build_intervention_control(
                    coarse, cfg.intervention_layers, patch_size=cfg.patch_size)
                if bool(token_mask.any()):
                    ext = self._pass2(images, control2, out1, amp)
                else:
                    fallback = "coarse mask has no dynamic token: pass 2 skipped (= pass 1)"
                if refine_task is not None:
                    refine_task.launch()    # deferred: beside pass 2's queued kernels
            bad = ~torch.isfinite(ext).all(dim=(-2, -1))
            if bool(bad.any()):
                warnings.warn(f"non-finite pass-2 pose in frames {bad.nonzero().flatten().tolist()}"
                              ": using pass-1 poses there", RuntimeWarning, stacklevel=2)
                ext = torch.where(bad[:, None, None], ext1, ext)
            mask = coarse
            if refine_task is not None:
                with timer("refine"):
                    finish = refine_task.result()
                    mask = finish(_cam_to_world(ext))
                timer.timings["refine_prep"] = refine_task.seconds
        with timer("points"):
            points = depth_to_world_points(depth1, intr1, ext, pixel_offset=cfg.points_pixel_offset)
        timer.timings["total"] = timer.total()
        return Vggt4dResult(extrinsic=ext, intrinsic=intr1, depth=depth1, depth_conf=conf1,
                            world_points=points, world_points_conf=conf1, saliency=saliency,
                            coarse_mask=coarse, mask=mask, timings=timer.timings,
                            token_mask=token_mask, threshold=float(thr), pass1_extrinsic=ext1,
                            fallback=fallback)

    @torch.no_grad()
    def embed_patches(self, images: Tensor) -> Tensor:
        """DINO patch tokens ``[S, N, C]`` of ``images [S, 3, H, W]``, exactly as pass 1
        computes them (same autocast): what a per-frame token cache may pass back as
        ``patch_tokens``."""
        amp = self._autocast_dtype(images.device)
        cfg = self.config
        with self._block_options():
            if cfg.cuda_graphs and cfg.embed_graph and cuda_graph.usable(images):
                key = (id(self.model), tuple(images.shape), images.dtype, amp,
                       self._kernel_key(), images.device)
                graph = _embed_graphs.get(key, lambda: _ModelGraph(
                    self.model, lambda x: _embed(self.model, x, amp), (images,)))
                if graph is not None:
                    return graph.run(images)
            return _embed(self.model, images, amp)

    def _pass1_graph(self, images: Tensor, patch_tokens: Tensor, amp: Optional[torch.dtype],
                     heads: Tuple[str, ...], head_amp: Optional[torch.dtype]
                     ) -> Optional["_ModelGraph"]:
        """The cached CUDA graph of pass 1 for this window shape and configuration, or None
        (graphs off, not CUDA, or capture failed in this process: the eager pass runs)."""
        cfg = self.config
        if not (cfg.cuda_graphs and cfg.pass1_graph and cuda_graph.usable(images)):
            return None
        specs = cfg.saliency_specs()
        # everything the captured kernels depend on besides the inputs' values; the entry
        # holds the model, so its id is not reused while the entry lives
        key = (id(self.model), tuple(images.shape), tuple(patch_tokens.shape),
               patch_tokens.dtype, amp, heads, head_amp, specs, tuple(cfg.window_offsets),
               self._kernel_key(), images.device)
        return _pass1_graphs.get(key, lambda: _capture_pass1(
            self.model, images, patch_tokens, amp, heads, head_amp, specs,
            tuple(cfg.window_offsets)))

    def _attention_kernels(self):
        """Context forcing the configured fused-attention kernel (no-op for "auto")."""
        if self.config.attention_backend == "auto":
            return _null()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION,
                   "flash": SDPBackend.FLASH_ATTENTION}[self.config.attention_backend]
        # preferred first; efficient/math stay allowed for shapes the fused kernel rejects
        # (masked frame blocks, CPU)
        return sdpa_kernel([backend, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                           set_priority=True)

    def _pass2(self, images: Tensor, control, out1: dict, amp: Optional[torch.dtype]) -> Tensor:
        """Second pass with key suppression -> extrinsic ``[S, 3, 4]`` float32."""
        tokens = out1["encoder_features"] if self.config.reuse_patch_tokens else None
        with self._attention_kernels():
            if self.config.pass2_camera_only:
                return self._camera_pass(images, control, tokens, amp)[0].float()
            out2 = self.model(images, control=control, patch_tokens=tokens, autocast_dtype=amp)
        return out2["extrinsic"][0].float()


class _ModelGraph:
    """A model computation of one shape captured as a CUDA graph (``Vggt4dConfig`` embed /
    pass-1 / pass-2 graphs): ``fn(*inputs)`` is recorded on static copies of ``inputs``;
    :meth:`run` copies new inputs in, replays and returns copies of the outputs (a tensor, or
    a tuple or dict of them: a later replay overwrites the graph's own). ``state``: what else
    the capture records into (pass 1's saliency reducer). ``model`` is kept alive: its id is
    part of the cache keys.

    The capture runs under ``no_grad``: the graph cache builds outside inference mode, which
    turns autograd back on (run 39 on the H100: compiled blocks then failed the capture). It
    is captured at normal priority, so that the interleaved side stages (high priority) still
    go ahead of its kernels."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Any],
                 inputs: Tuple[Tensor, ...], state: Any = None) -> None:
        self.model = model
        self.state = state
        self.inputs = tuple(t.detach().clone() for t in inputs)
        self.out: Any = None

        def forward() -> None:
            with torch.no_grad():
                self.out = fn(*self.inputs)
        self.replay = cuda_graph.capture(forward, self.inputs[0].device, priority=0)

    def run(self, *inputs: Tensor) -> Any:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.replay()
        out = self.out
        if isinstance(out, dict):
            return {k: v.clone() for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(v.clone() for v in out)
        return out.clone()


_PASS1_OUTPUTS = ("extrinsic", "intrinsic", "depth", "depth_conf")


def _capture_pass1(model: torch.nn.Module, images: Tensor, patch_tokens: Tensor,
                   amp: Optional[torch.dtype], heads: Tuple[str, ...],
                   head_amp: Optional[torch.dtype], specs, offsets: Tuple[int, ...]
                   ) -> _ModelGraph:
    """Pass 1 (``Vggt4dConfig.pass1_graph``) on images ``[S, 3, H, W]`` and DINO patch tokens
    ``[S, N, C]``: the model forward (``heads``) -> the :data:`_PASS1_OUTPUTS`, with a saliency
    reducer of its own (the graph's ``state``) whose accumulators are graph memory: after a
    replay, ``reducer.maps()`` reads that window's statistics. The image value check (a host
    read) is skipped inside: the caller runs it."""
    from ..model.hooks import AttentionControl
    reducer = GramSaliencyReducer(images.shape[0], offsets=offsets, specs=specs)
    control = AttentionControl(capture=reducer.capture, on_qk=reducer.on_qk)

    def forward(images: Tensor, tokens: Tensor) -> Dict[str, Tensor]:
        reducer.reset()                           # the capture records the accumulation
        out = model(images, control=control, patch_tokens=tokens, autocast_dtype=amp,
                    heads=heads, head_autocast_dtype=head_amp, validate=False)
        return {k: out[k] for k in _PASS1_OUTPUTS}
    return _ModelGraph(model, forward, (images, patch_tokens), state=reducer)


# two window shapes (a stream's window and its end-of-sequence flush)
_pass1_graphs: "cuda_graph.GraphCache[_ModelGraph]" = cuda_graph.GraphCache(2, "pass1")


def _embed(model: torch.nn.Module, images: Tensor, amp: Optional[torch.dtype]) -> Tensor:
    """DINO patch tokens ``[S, N, C]`` of ``images [S, 3, H, W]`` under pass 1's autocast."""
    with _autocast(images.device.type, amp):
        return model.aggregator.embed_patches(images[None])


# frame counts: a stream's first window, its stride, its end-of-sequence flush
_embed_graphs: "cuda_graph.GraphCache[_ModelGraph]" = cuda_graph.GraphCache(3, "embed")


def _camera_layers(model: torch.nn.Module, x: Tensor, control, patch_tokens: Optional[Tensor],
                   amp: Optional[torch.dtype], entry: Optional[Tuple[int, Tensor]]
                   ) -> Tuple[Tensor, Tensor]:
    """Aggregator (all layers, or from ``entry`` = (layer, tokens entering it)) + camera head
    on ``x [1, S, 3, H, W]`` -> (extrinsic [S,3,4], intrinsic [S,3,3])."""
    from ..model.pose_encoding import pose_encoding_to_extri_intri
    dev = x.device.type
    depth = len(model.aggregator.frame_blocks)
    with _autocast(dev, amp):
        # the last global block only for the camera tokens (~2 ms of a 16-frame pass)
        agg = model.aggregator.run(
            x, control=control, patch_tokens=patch_tokens, keep_layers={depth - 1},
            last_layer_tokens=1, layer_range=None if entry is None else (entry[0], depth),
            entry_tokens=None if entry is None else entry[1])
    # the camera head reads only the camera token: convert that, not the whole layer
    tokens = [t[:, :, :1].float() if t is not None else t for t in agg.layers]
    with torch.autocast(dev, enabled=False) if amp is not None else _null():
        pose = model.camera_head(tokens)[-1]
    ext, intr = pose_encoding_to_extri_intri(pose, tuple(x.shape[-2:]))
    return ext[0], intr[0]


def _capture_pass2_tail(model: torch.nn.Module, x: Tensor, start: int, tokens: Tensor,
                        amp: Optional[torch.dtype]) -> _ModelGraph:
    """Pass 2 after its last key-masked layer (``Vggt4dConfig.pass2_graph``): layers
    ``start``.. of the aggregator (no masks, no hooks: fixed shapes per window shape) and the
    camera head, from the tokens the masked layers leave -> (extrinsic [S,3,4], intrinsic
    [S,3,3]). The static token buffer keeps their dtype: under bf16 autocast the residual
    stream stays float32, and a bf16 buffer rounded it (found in review after run 41)."""
    shape_only = torch.empty_like(x)          # the aggregator reads only its shape here
    return _ModelGraph(model, lambda t: _camera_layers(model, shape_only, None, None, amp,
                                                       (start, t)), (tokens,))


_pass2_graphs: "cuda_graph.GraphCache[_ModelGraph]" = cuda_graph.GraphCache(2, "pass2")


def _cam_to_world(extrinsic: Tensor) -> Tensor:
    """camera-from-world ``[S, 3, 4]`` -> world-from-camera ``[S, 4, 4]``."""
    s = extrinsic.shape[0]
    bottom = extrinsic.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(s, 1, 4)
    return torch.linalg.inv(torch.cat([extrinsic, bottom], dim=1))


@contextmanager
def _null() -> Iterator[None]:
    yield


def _autocast(device_type: str, amp: Optional[torch.dtype]):
    """Autocast to ``amp`` on that device type; a no-op context for None (float32)."""
    return torch.autocast(device_type, dtype=amp) if amp is not None else _null()
