"""stream.factory: the VGGT4D window predictor (tiny random weights) end to end through the
engine on CPU, the working resolution / intrinsics contract, and the per-frame token cache."""
import warnings

import numpy as np
import pytest
import torch

from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.stream.factory import (RANDOM_WEIGHTS_LABEL, PredictorConfig, Vggt4dWindowPredictor,
                                       build_predictor, working_size)
from vggt4d_ros.stream.predictor import WindowPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


@pytest.fixture(scope="module")
def tiny_predictor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_predictor(PredictorConfig(checkpoint="random_tiny", device="cpu",
                                               image_width=56))


def test_working_size_and_config_validation():
    assert working_size(48, 64, 56) == (42, 56)
    assert working_size(294, 518, 518) == (294, 518)
    assert working_size(1080, 1920, 518) == (294, 518)
    assert working_size(10, 1000, 56) == (14, 56)
    with pytest.raises(ValueError):
        PredictorConfig(image_width=500)
    with pytest.raises(ValueError):
        PredictorConfig(dtype="int8")


def test_tiny_predictor_contract(tiny_predictor):
    assert isinstance(tiny_predictor, WindowPredictor)
    assert tiny_predictor.label == RANDOM_WEIGHTS_LABEL and tiny_predictor.random_weights
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 48, 64, 3), dtype=np.uint8)
    pred = tiny_predictor.predict(images, [0, 1, 2, 3]).validate(4)
    assert pred.resolution_hw == (42, 56)
    assert pred.mask.dtype == bool and pred.depth.dtype == np.float32
    # intrinsics refer to the working resolution (principal point at its centre)
    np.testing.assert_allclose(pred.intrinsic[:, 0, 2], 28.0)
    np.testing.assert_allclose(pred.intrinsic[:, 1, 2], 21.0)
    assert np.isfinite(pred.extrinsic).all()
    # deterministic: same weights seed -> same prediction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = build_predictor(PredictorConfig(checkpoint="random_tiny", device="cpu",
                                                image_width=56))
    np.testing.assert_allclose(again.predict(images, [0, 1, 2, 3]).depth, pred.depth,
                               rtol=1e-5, atol=1e-6)


def test_token_cache_gives_the_same_prediction_as_no_cache(tiny_predictor):
    """With the real pipeline: a window whose frames were embedded in an earlier window (cached
    tokens) predicts the same as a predictor that embeds everything afresh."""
    assert tiny_predictor.supports_token_cache
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(6, 48, 64, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = build_predictor(PredictorConfig(checkpoint="random_tiny", device="cpu",
                                                image_width=56, token_cache_size=0))
    assert not fresh.supports_token_cache
    tiny_predictor.predict(frames[:4], [100, 101, 102, 103])
    hits = tiny_predictor.cache_hits
    cached = tiny_predictor.predict(frames[2:], [102, 103, 104, 105])
    assert tiny_predictor.cache_hits == hits + 2
    ref = fresh.predict(frames[2:], [102, 103, 104, 105])
    np.testing.assert_allclose(cached.depth, ref.depth, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached.extrinsic, ref.extrinsic, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cached.mask, ref.mask)


def test_engine_end_to_end_with_tiny_vggt4d_on_cpu(tiny_predictor):
    world = SynthWorld(SynthConfig(width=64, height=48, num_frames=20, num_objects=1, seed=0))
    engine = StreamEngine(tiny_predictor, StreamConfig(window_size=6, stride=3, voxel_size=0.05))
    outs = []
    for i in range(20):
        f = world.render(i)
        outs += engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
    outs += engine.flush()
    c = engine.counters
    assert len(outs) == 20 and c.frames_out == 20 and c.windows == 6
    assert [o.stamp_ns for o in outs] == [world.render(i).stamp_ns for i in range(20)]
    for o in outs:
        assert o.image.shape == (42, 56, 3)
        assert o.depth.shape == (42, 56) and o.mask.shape == (42, 56)
        assert np.isfinite(o.world_from_cam).all() and np.isfinite(o.covariance).all()
        assert o.state in ("TRACKING", "LOST")
    np.testing.assert_allclose(outs[0].world_from_cam, np.eye(4), atol=1e-5)
    assert engine.last_window is not None and "pipeline_s" in engine.last_window.timings


class _FakeAggregator:
    def __init__(self):
        self.embedded = 0

    def embed_patches(self, x):                       # [1, S, 3, H, W] -> [S, N, C]
        self.embedded += x.shape[1]
        s, h, w = x.shape[1], x.shape[3], x.shape[4]
        return x[0].mean(dim=1).reshape(s, h * w // 196, 196)


class _FakeResult:
    def __init__(self, s, h, w, tokens):
        self.extrinsic = torch.eye(4)[:3].expand(s, 3, 4)
        self.intrinsic = torch.eye(3).expand(s, 3, 3)
        self.depth = torch.ones(s, h, w) * tokens.mean()
        self.depth_conf = torch.ones(s, h, w)
        self.mask = torch.zeros(s, h, w, dtype=torch.bool)
        self.timings = {}


class _FakePipeline:
    def __init__(self):
        self.model = type("M", (), {})()
        self.model.aggregator = _FakeAggregator()

    def embed_patches(self, images):                  # [S, 3, H, W] -> [S, N, C]
        return self.model.aggregator.embed_patches(images[None])

    def __call__(self, images, patch_tokens=None):
        assert patch_tokens is not None and patch_tokens.shape[0] == images.shape[0]
        return _FakeResult(images.shape[0], images.shape[2], images.shape[3], patch_tokens)


def test_patch_token_cache_embeds_shared_frames_once_and_is_bounded():
    pipe = _FakePipeline()
    pred = Vggt4dWindowPredictor(pipe, image_width=28, device="cpu", token_cache_size=6)
    assert pred.supports_token_cache
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(20, 28, 28, 3), dtype=np.uint8)
    pred.predict(frames[0:4], [0, 1, 2, 3])
    pred.predict(frames[2:6], [2, 3, 4, 5])            # 2 shared frames -> only 2 embedded
    assert pipe.model.aggregator.embedded == 6 and pred.cache_hits == 2
    for start in range(4, 16, 2):
        pred.predict(frames[start:start + 4], list(range(start, start + 4)))
    assert len(pred._cache) <= 6
    # cached tokens are the same tokens a fresh embedding gives
    fresh = Vggt4dWindowPredictor(_FakePipeline(), image_width=28, device="cpu", token_cache_size=6)
    a = pred.predict(frames[14:18], [14, 15, 16, 17]).depth
    b = fresh.predict(frames[14:18], [14, 15, 16, 17]).depth
    np.testing.assert_allclose(a, b)


def test_cuda_graphs_option_reaches_the_pipeline_from_the_node_and_the_replay():
    """vggt4d.cuda_graphs (node parameter, default on) and vggt4d-replay --[no-]cuda-graphs end
    up in the pipeline's Vggt4dConfig.cuda_graphs (on the CPU they change nothing); the node,
    the replay and the pipeline share the default."""
    pytest.importorskip("rclpy")
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig
    from vggt4d_ros.ros import node as node_mod
    from vggt4d_ros.ros import params as P
    from vggt4d_ros.tools import replay as rp
    values = {spec.name: spec.default for spec in P.PARAMS}
    assert values["vggt4d.cuda_graphs"] is True is Vggt4dConfig().cuda_graphs
    values.update({"model.checkpoint": "random_tiny", "vggt4d.cuda_graphs": False})
    cfg = node_mod.predictor_config(P.NodeSettings(values), "cpu")
    assert cfg.cuda_graphs is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_predictor(cfg).pipeline.config.cuda_graphs is False
    args = rp.build_parser().parse_args(["in", "--out", "o", "--no-cuda-graphs"])
    settings = rp.settings_from_args(args)
    assert settings.cuda_graphs is False
    assert rp.settings_from_args(rp.build_parser().parse_args(["in", "--out", "o"])).cuda_graphs \
        is True


def test_image_cache_resizes_and_uploads_each_frame_once_with_the_same_tensor():
    """Frames shared by consecutive windows are resized once (device cache by key); the window
    tensor equals the one built without the cache; a new input size empties the cache."""
    pred = Vggt4dWindowPredictor(_FakePipeline(), image_width=56, device="cpu", token_cache_size=6)
    resized = []
    inner = pred._resized

    def counting(image, hw):
        resized.append(hw)
        return inner(image, hw)
    pred._resized = counting
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(12, 48, 64, 3), dtype=np.uint8)
    a = pred.to_tensor(frames[0:4], [0, 1, 2, 3])
    b = pred.to_tensor(frames[2:6], [2, 3, 4, 5])
    assert len(resized) == 6 and set(resized) == {(42, 56)}
    assert torch.equal(b, pred.to_tensor(frames[2:6]))           # no keys: no cache
    assert torch.equal(a[2:], b[:2]) and a.shape == (4, 3, 42, 56)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    for start in range(4, 10, 2):
        pred.to_tensor(frames[start:start + 4], list(range(start, start + 4)))
    assert len(pred._image_cache) <= 6
    resized.clear()
    big = rng.integers(0, 256, size=(2, 96, 128, 3), dtype=np.uint8)
    pred.to_tensor(big, [10, 11])                      # same keys' content at a new size
    assert len(resized) == 2 and len(pred._image_cache) == 2
    with pytest.raises(ValueError, match="frame keys"):
        pred.to_tensor(frames[:3], [0, 1])


def test_numerics_option_reaches_the_pipeline_from_the_node_and_the_replay():
    """model.numerics (node parameter, default fast) and vggt4d-replay --numerics end up in
    the pipeline's config: fast = the pipeline defaults (bf16 heads under autocast, GELU
    epilogue), official = Vggt4dConfig.official_recipe() (float32 heads, exact GELU); a bad
    value is refused."""
    pytest.importorskip("rclpy")
    from vggt4d_ros.dynamic.pipeline import Vggt4dConfig
    from vggt4d_ros.ros import node as node_mod
    from vggt4d_ros.ros import params as P
    from vggt4d_ros.tools import replay as rp
    values = {spec.name: spec.default for spec in P.PARAMS}
    assert values["model.numerics"] == "fast"
    values.update({"model.checkpoint": "random_tiny"})
    for numerics, gelu, heads in (("fast", True, torch.bfloat16), ("official", False, None)):
        values["model.numerics"] = numerics
        cfg = node_mod.predictor_config(P.NodeSettings(values), "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe_cfg = build_predictor(cfg).pipeline.config
        assert pipe_cfg.mlp_gelu_epilogue is gelu
        assert pipe_cfg.head_autocast_dtype(torch.bfloat16) is heads
        assert pipe_cfg.cast_weight_cache and pipe_cfg.qk_rope_kernel     # same results
    assert Vggt4dConfig().mlp_gelu_epilogue
    args = rp.build_parser().parse_args(["in", "--out", "o", "--numerics", "official"])
    assert rp.settings_from_args(args).numerics == "official"
    with pytest.raises(ValueError, match="numerics"):
        PredictorConfig(numerics="fp8")
