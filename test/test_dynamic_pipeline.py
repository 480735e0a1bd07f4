"""Two-pass VGGT4D pipeline: golden end-to-end, pass-2 intervention, fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from vggt4d_ros.dynamic.intervention import build_intervention_control
from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline, Vggt4dResult
from vggt4d_ros.model.checkpoint import load_vggt
from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.hooks import AttentionControl
from vggt4d_ros.model.vggt import VGGT

TOL = dict(rtol=1e-4, atol=1e-4)
TINY = {"embed_dim": 32, "depth": 24, "num_heads": 2, "patch_embed": {
    "embed_dim": 32, "depth": 1, "num_heads": 2, "num_register_tokens": 4},
    "camera_head": {"dim_in": 64, "trunk_depth": 1, "num_heads": 2},
    "dpt": {"dim_in": 64, "features": 16, "out_channels": [8, 16, 32, 32]}}


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.fixture(scope="module")
def seq10(golden_dir):
    return load_file(str(golden_dir / "vggt4d" / "case_seq10.safetensors"))


@pytest.fixture(scope="module")
def golden_model(golden_dir) -> VGGT:
    cfg = VGGTConfig.from_json(golden_dir / "vggt" / "config.json")
    return load_vggt(golden_dir / "vggt" / "weights.safetensors", cfg, skip_track_head=True)


@pytest.fixture(scope="module")
def golden_result(golden_model, seq10) -> Vggt4dResult:
    return Vggt4dPipeline(golden_model)(seq10["in.images"].float() / 255)


@pytest.fixture(scope="module")
def tiny_model() -> VGGT:
    """Random tiny VGGT (no golden data needed) for the fallback tests."""
    torch.manual_seed(0)
    return VGGT(VGGTConfig.from_dict(TINY), enable_track=False).eval()


# ------------------------------------------------------------------ golden end to end
def test_dynamic_pipeline_golden_end_to_end(golden_result, seq10):
    r, g = golden_result, seq10
    assert torch.allclose(r.saliency, g["saliency.dyn_map"], atol=1e-4, rtol=0)
    near = (g["mask.upsampled"] - float(g["mask.threshold"])).abs() < 1e-4
    assert torch.equal(r.coarse_mask[~near], g["mask.coarse"][~near])
    assert abs(r.threshold - float(g["mask.threshold"])) < 1e-5
    assert torch.equal(r.token_mask, g["mask.token"])
    assert torch.allclose(r.pass1_extrinsic, g["pass1.extrinsic"], **TOL)
    assert torch.allclose(r.extrinsic, g["pass2.extrinsic"], **TOL)        # poses: pass 2
    assert torch.allclose(r.intrinsic, g["pass1.intrinsic"], **TOL)        # intrinsics: pass 1
    assert torch.allclose(r.depth, g["pass1.depth"][..., 0], **TOL)        # depth: pass 1
    assert torch.allclose(r.depth_conf, g["pass1.depth_conf"], **TOL)
    assert _iou(r.mask, g["mask.refined"]) >= 0.99                        # measured 1.0
    assert set(r.timings) >= {"pass1", "saliency", "cluster", "threshold", "pass2", "refine",
                              "total"}
    s, h, w = r.depth.shape
    assert r.world_points.shape == (s, h, w, 3) and torch.isfinite(r.world_points).all()
    assert r.extrinsic.shape == (s, 3, 4) and r.fallback == ""


def test_dynamic_pipeline_golden_pass2_gt_mask(golden_model, seq10):
    """Intervention alone (no clustering): true square mask -> token mask -> pass 2."""
    images = seq10["in.images"].float() / 255
    control, _ = build_intervention_control(seq10["in.gt_square_mask"])
    with torch.no_grad():
        out = golden_model(images, control=control)
    assert torch.allclose(out["pose_enc"][0], seq10["pass2_gtmask.pose_enc"], **TOL)
    assert torch.allclose(out["extrinsic"][0], seq10["pass2_gtmask.extrinsic"], **TOL)
    # the suppression must matter on this case (else the test could not fail)
    assert (seq10["pass2_gtmask.pose_enc"] - seq10["pass1.pose_enc"]).abs().max() > 1e-3


def test_dynamic_pipeline_golden_pass2_full_forward_and_reuse(golden_model, seq10):
    """pass2.* given golden mask.coarse; reused patch tokens and the camera-only path agree."""
    images = seq10["in.images"].float() / 255
    control, _ = build_intervention_control(seq10["mask.coarse"])
    with torch.no_grad():
        fresh = golden_model(images, control=control)
        tokens = golden_model.aggregator.embed_patches(images[None])
        reused = golden_model(images, control=control, patch_tokens=tokens)
    assert torch.allclose(fresh["pose_enc"][0], seq10["pass2.pose_enc"], **TOL)
    assert torch.allclose(fresh["depth"][0], seq10["pass2.depth"], **TOL)
    assert torch.allclose(fresh["extrinsic"][0], seq10["pass2.extrinsic"], **TOL)
    assert torch.equal(fresh["pose_enc"], reused["pose_enc"])
    pipe = Vggt4dPipeline(golden_model)
    with torch.no_grad():
        ext, _ = pipe._camera_pass(images, control, tokens, None)
    assert torch.allclose(ext, fresh["extrinsic"][0], atol=1e-6, rtol=0)


def test_dynamic_pipeline_all_keys_kept_is_bitwise_plain(golden_model, seq10):
    images = seq10["in.images"].float()[:4] / 255
    s, _, h, w = images.shape
    keep = torch.ones(1, s, 5 + (h // 14) * (w // 14), dtype=torch.bool)
    with torch.no_grad():
        plain = golden_model(images)
        kept = golden_model(images, control=AttentionControl(key_keep=keep,
                                                             key_mask_layers={0, 1, 2, 3, 4}))
    for key in ("pose_enc", "depth", "depth_conf", "world_points"):
        assert torch.equal(plain[key], kept[key]), key


def test_dynamic_pipeline_intervention_touches_only_layers_0_to_4(golden_model, seq10):
    """Deep blocks get no key selection; re-running any deep block without one on its
    recorded input reproduces its output bitwise; shallow blocks do change."""
    images = seq10["in.images"].float()[:4] / 255
    control, dyn = build_intervention_control(seq10["mask.coarse"][:4])
    assert dyn.any()
    agg = golden_model.aggregator
    records = {}
    handles = []
    for kind, blocks in (("frame", agg.frame_blocks), ("global", agg.global_blocks)):
        for i, blk in enumerate(blocks):
            def hook(mod, args, kwargs, out, key=(kind, i)):
                records[key] = (args[0].clone(), kwargs.get("keys"), kwargs.get("rope"), out)
            handles.append(blk.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            golden_model(images, control=control)
    finally:
        for hd in handles:
            hd.remove()
    changed_shallow = 0
    for (kind, i), (x, keys, rope, out) in records.items():
        blk = (agg.frame_blocks if kind == "frame" else agg.global_blocks)[i]
        if i >= 5:
            assert keys is None, (kind, i)
            with torch.no_grad():
                assert torch.equal(blk(x, rope=rope), out), (kind, i)
        else:
            assert keys is not None, (kind, i)
            with torch.no_grad():
                changed_shallow += int(not torch.equal(blk(x, rope=rope), out))
    assert changed_shallow == 10


# ------------------------------------------------------------------ fallbacks (no golden)
def _images(s: int, h: int = 56, w: int = 70, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(s, 3, h, w, generator=g)


def test_dynamic_pipeline_plain_vggt_when_disabled(tiny_model):
    images = _images(4)
    res = Vggt4dPipeline(tiny_model, Vggt4dConfig(dynamic=False))(images)
    with torch.no_grad():
        plain = tiny_model(images)
    assert torch.equal(res.extrinsic, plain["extrinsic"][0])
    assert res.saliency is None and not res.mask.any() and not res.coarse_mask.any()
    assert "pass2" not in res.timings


def test_dynamic_pipeline_single_frame_falls_back(tiny_model):
    with pytest.warns(RuntimeWarning, match="needs >= 2 frames"):
        res = Vggt4dPipeline(tiny_model)(_images(1))
    assert res.fallback and res.saliency is None and not res.mask.any()
    assert torch.isfinite(res.extrinsic).all() and res.mask.shape == (1, 56, 70)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_dynamic_pipeline_short_windows(tiny_model, backend):
    cfg = Vggt4dConfig(cluster_backend=backend)
    for images in (_images(2), _images(3, seed=1)):      # some/all frames lack ±2/4/6 sources
        res = Vggt4dPipeline(tiny_model, cfg)(images)
        s = images.shape[0]
        assert res.extrinsic.shape == (s, 3, 4) and torch.isfinite(res.extrinsic).all()
        assert res.mask.shape == (s, 56, 70) and res.mask.dtype == torch.bool
        assert res.saliency is not None and torch.isfinite(res.saliency).all()


def test_dynamic_pipeline_all_static_mask_skips_pass2(tiny_model, monkeypatch):
    monkeypatch.setattr("vggt4d_ros.dynamic.threshold.adaptive_threshold",
                        lambda *a, **k: float("inf"))
    res = Vggt4dPipeline(tiny_model)(_images(4))
    assert "skipped" in res.fallback and not res.coarse_mask.any() and not res.mask.any()
    assert torch.equal(res.extrinsic, res.pass1_extrinsic)


def test_dynamic_pipeline_all_dynamic_mask(tiny_model, monkeypatch):
    monkeypatch.setattr("vggt4d_ros.dynamic.threshold.adaptive_threshold",
                        lambda *a, **k: float("-inf"))
    res = Vggt4dPipeline(tiny_model)(_images(4))
    assert res.coarse_mask.all() and res.token_mask.all()
    assert torch.isfinite(res.extrinsic).all()
    assert not torch.equal(res.extrinsic, res.pass1_extrinsic)   # pass 2 really ran
    assert res.mask.shape == res.coarse_mask.shape and res.fallback == ""
    no_refine = Vggt4dPipeline(tiny_model, Vggt4dConfig(refine=False))(_images(4))
    assert no_refine.fallback == "" and torch.equal(no_refine.mask, no_refine.coarse_mask)


def test_dynamic_pipeline_nan_pose_falls_back_to_pass1(tiny_model, monkeypatch):
    monkeypatch.setattr(Vggt4dPipeline, "_pass2",
                        lambda self, images, *a: torch.full((images.shape[0], 3, 4), float("nan")))
    with pytest.warns(RuntimeWarning, match="non-finite pass-2 pose"):
        res = Vggt4dPipeline(tiny_model)(_images(4))
    assert torch.equal(res.extrinsic, res.pass1_extrinsic)


class _NanDepthModel(torch.nn.Module):
    """Wraps a VGGT and puts NaN into the top 8 rows of every depth map."""

    def __init__(self, model: VGGT) -> None:
        super().__init__()
        self.inner = model
        self.aggregator, self.camera_head = model.aggregator, model.camera_head

    def forward(self, images, **kwargs):
        out = dict(self.inner(images, **kwargs))
        out["depth"] = out["depth"].clone()
        out["depth"][:, :, :8] = float("nan")
        return out


def test_dynamic_pipeline_nan_depth(tiny_model, monkeypatch):
    monkeypatch.setattr("vggt4d_ros.dynamic.threshold.adaptive_threshold",
                        lambda values, *a, **k: float(values.float().quantile(0.8)))
    with pytest.warns(RuntimeWarning, match="non-finite depth"):
        res = Vggt4dPipeline(_NanDepthModel(tiny_model))(_images(4))
    # (the random tiny model even predicts an infinite focal length: still no NaN pose)
    assert torch.isfinite(res.extrinsic).all()
    assert res.coarse_mask.any() and res.mask.dtype == torch.bool
    assert not res.mask[:, :5].any()     # NaN-depth rows static (morphology may reach 3 px in)
    assert torch.isnan(res.world_points[:, :8]).all()  # no depth -> no point
    assert torch.isfinite(res.world_points[:, 8:]).all()


def test_dynamic_pipeline_cached_patch_tokens_give_identical_result(tiny_model):
    images = _images(4)
    plain = Vggt4dPipeline(tiny_model)(images)
    with torch.no_grad():
        tokens = tiny_model.aggregator.embed_patches(images[None])
    cached = Vggt4dPipeline(tiny_model)(images, patch_tokens=tokens)
    assert torch.equal(plain.extrinsic, cached.extrinsic)
    assert torch.equal(plain.depth, cached.depth) and torch.equal(plain.mask, cached.mask)
    with pytest.raises(ValueError, match="patch_tokens"):
        Vggt4dPipeline(tiny_model)(images, patch_tokens=tokens[:3])


def test_dynamic_pipeline_bad_input(tiny_model):
    pipe = Vggt4dPipeline(tiny_model)
    with pytest.raises(ValueError):
        pipe(torch.rand(2, 4, 3, 56, 70))
    with pytest.raises(ValueError):
        pipe(torch.rand(4, 56, 70))
    with pytest.raises(ValueError):
        Vggt4dConfig(cluster_backend="gpu")
    with pytest.raises(ValueError):
        Vggt4dConfig(min_frames=1)


def test_execution_options_keep_results():
    """pass-1 point head on/off and a forced attention kernel change nothing on CPU fp32;
    bad option values are rejected."""
    import torch
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig, Vggt4dPipeline
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(4, 3, 28, 42)
    base = Vggt4dPipeline(model, Vggt4dConfig(refine=False))(images)
    for kw in ({"pass1_point_head": True}, {"attention_backend": "flash"}):
        other = Vggt4dPipeline(model, Vggt4dConfig(refine=False, **kw))(images)
        assert torch.equal(other.extrinsic, base.extrinsic) and torch.equal(other.depth, base.depth)
    for bad in ({"head_dtype": "fp8"}, {"attention_backend": "xformers"}):
        with pytest.raises(ValueError):
            Vggt4dConfig(**bad)


def test_dynamic_pipeline_cuda_graph_option_keeps_results(golden_model, seq10,
                                                           emulated_cuda_graphs):
    """``cuda_graphs`` (graph capture emulated on the CPU) with the fast backends: the same
    coarse mask and poses as without (sklearn-identical feature k-means either way); the
    refinement pads its queries to a bucket size (other random draws), so its mask is
    compared by IoU."""
    images = seq10["in.images"].float() / 255
    kw = dict(cluster_backend="fast", refine_backend="fast")
    plain = Vggt4dPipeline(golden_model, Vggt4dConfig(**kw))(images)
    graphed = Vggt4dPipeline(golden_model, Vggt4dConfig(cuda_graphs=True, **kw))(images)
    # embed; pass 1; k-means: Lloyd block + seeding; threshold; pass 2's unmasked layers;
    # refinement
    assert len(emulated_cuda_graphs) == 7
    assert torch.equal(graphed.coarse_mask, plain.coarse_mask)
    assert torch.equal(graphed.extrinsic, plain.extrinsic)
    assert _iou(graphed.mask, plain.mask) >= 0.95              # measured 1.0
    assert _iou(graphed.mask, seq10["mask.refined"]) >= 0.95   # measured 0.9946 (= without)


@pytest.mark.parametrize("autocast", ["auto", "bf16"])
def test_model_cuda_graphs_give_the_eager_result_and_are_replayed(tiny_model, autocast,
                                                                  emulated_cuda_graphs):
    """``embed_graph`` / ``pass1_graph`` / ``pass2_graph`` (capture emulated on the CPU, host
    reads refused inside it): the patch embedding, pass 1 and pass 2's unmasked layers as
    graphs give exactly the eager outputs, saliency and masks; a second window of the same
    shape replays them (no new capture); results (and embedded tokens) are copies, not the
    graphs' memory. The value check the graph skips still runs. bf16 autocast (the GPU
    recipe, here on the CPU): the residual stream entering pass 2's graphed tail stays
    float32 (a bf16 buffer there rounded it)."""
    from vggt4d_ros.dynamic import pipeline as pipeline_mod
    kw = dict(cluster_backend="fast", refine_backend="fast", cuda_graphs=True,
              autocast=autocast)
    a, b = _images(5, seed=1), _images(5, seed=2)
    eager = Vggt4dPipeline(tiny_model, Vggt4dConfig(pass1_graph=False, pass2_graph=False,
                                                    embed_graph=False, **kw))
    ref_a, ref_b = eager(a), eager(b)
    caches = (pipeline_mod._embed_graphs, pipeline_mod._pass1_graphs, pipeline_mod._pass2_graphs)
    assert [c.builds for c in caches] == [0, 0, 0]
    assert ref_a.token_mask.any() and ref_b.token_mask.any()       # pass 2 ran, masked
    pipe = Vggt4dPipeline(tiny_model, Vggt4dConfig(**kw))
    got_a = pipe(a)
    got_b = pipe(b)
    assert [(c.builds, c.hits) for c in caches] == [(1, 1)] * 3
    tokens = pipe.embed_patches(b)                            # what a token cache keeps
    assert torch.equal(tokens, eager.embed_patches(b)) and caches[0].hits == 2
    pipe(a)                                                   # a copy, not the graph's memory
    assert torch.equal(tokens, eager.embed_patches(b))
    for got, ref in ((got_a, ref_a), (got_b, ref_b)):
        for name in ("extrinsic", "pass1_extrinsic", "intrinsic", "depth", "depth_conf",
                     "saliency", "coarse_mask", "mask"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert not torch.equal(got_a.depth, got_b.depth)
    pipe(_images(4, seed=3))                                  # another shape: its own graphs
    assert [c.builds for c in caches] == [2, 2, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(a * 2)


def test_pass1_cuda_graph_under_inference_mode(tiny_model, emulated_cuda_graphs, monkeypatch):
    """A caller in ``torch.inference_mode`` (the bench, tools): the graph is built outside
    inference mode (graph-cache rule), which turns autograd back on; the captured pass must
    run with autograd off (on the device, compiled blocks under autograd failed the capture:
    "Inference tensors cannot be saved for backward", run 39)."""
    from vggt4d_ros.dynamic import pipeline as pipeline_mod
    grad_in_forward = []
    forward = type(tiny_model).forward

    def watched(self, *args, **kwargs):
        grad_in_forward.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(type(tiny_model), "forward", watched)
    kw = dict(cluster_backend="fast", refine_backend="fast", cuda_graphs=True)
    images = _images(4, seed=5)
    with torch.inference_mode():
        ref = Vggt4dPipeline(tiny_model, Vggt4dConfig(pass1_graph=False, pass2_graph=False,
                                                      embed_graph=False, **kw))(images)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                            # no capture fallback
            got = Vggt4dPipeline(tiny_model, Vggt4dConfig(**kw))(images)
    for cache in (pipeline_mod._embed_graphs, pipeline_mod._pass1_graphs,
                  pipeline_mod._pass2_graphs):
        assert cache.builds == 1 and not cache.disabled_reason
    assert len(grad_in_forward) >= 3 and not any(grad_in_forward)     # eager, warm-up, replay
    assert torch.equal(got.depth, ref.depth) and torch.equal(got.extrinsic, ref.extrinsic)


def test_failed_model_captures_fall_back_to_the_eager_passes(tiny_model, emulated_cuda_graphs,
                                                             monkeypatch):
    """A capture refused by CUDA (here: every capture raises) disables the graphs with one
    warning each and the window runs eagerly - pass 2 continuing from the tokens its masked
    layers left (not run twice) - with the eager result."""
    from vggt4d_ros.dynamic import cuda_graph
    kw = dict(cluster_backend="fast", refine_backend="fast", cuda_graphs=True)
    images = _images(4, seed=7)
    ref = Vggt4dPipeline(tiny_model, Vggt4dConfig(pass1_graph=False, pass2_graph=False,
                                                  embed_graph=False, **kw))(images)

    def refuse(fn, device, priority=-1):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graph, "capture", refuse)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed"):
        got = Vggt4dPipeline(tiny_model, Vggt4dConfig(**kw))(images)
    for name in ("extrinsic", "depth", "saliency", "coarse_mask"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_block_options_are_per_pipeline_and_part_of_the_graph_keys(tiny_model,
                                                                   emulated_cuda_graphs):
    """Two pipelines on one model with different block options (bf16 autocast, capture
    emulated): each call sets its own options and restores the model's after; each option set
    has its own model graphs; the weight cache changes no result. ``head_dtype="auto"``
    follows the aggregator's autocast; ``official_recipe`` turns the numerics options off."""
    from vggt4d_ros.dynamic import pipeline as pipeline_mod
    kw = dict(cluster_backend="fast", refine_backend="fast", cuda_graphs=True, autocast="bf16")
    a = _images(4, seed=1)
    cached = Vggt4dPipeline(tiny_model, Vggt4dConfig(cast_weight_cache=True, **kw))
    uncached = Vggt4dPipeline(tiny_model, Vggt4dConfig(cast_weight_cache=False, **kw))
    fns = tiny_model.fused_functions
    seen = []
    real = fns.attention_output_mlp

    def spy(*args, **kwargs):
        seen.append(fns.cast_weights)
        return real(*args, **kwargs)
    fns.attention_output_mlp = spy
    try:
        got_c, got_u = cached(a), uncached(a)
    finally:
        fns.attention_output_mlp = real
    assert True in seen and False in seen
    assert (fns.cast_weights, fns.gelu_epilogue) == (False, False)       # restored
    assert pipeline_mod._pass1_graphs.builds == 2 and pipeline_mod._embed_graphs.builds == 2
    for name in ("extrinsic", "depth", "mask", "saliency"):
        assert torch.equal(getattr(got_c, name), getattr(got_u, name)), name
    cfg = Vggt4dConfig()
    assert cfg.head_autocast_dtype(None) is None
    assert cfg.head_autocast_dtype(torch.bfloat16) is torch.bfloat16
    official = Vggt4dConfig.official_recipe(refine=False)
    assert official.head_autocast_dtype(torch.bfloat16) is None
    assert not official.mlp_gelu_epilogue and not official.refine
