"""Benchmark accounting: analytic FLOPs match the spec's per-frame figures; timer basics."""
import pytest

from vggt4d_ros.tools.bench import STREAM_RUNS
from vggt4d_ros.tools.bench_util import time_fn, tflops, vggt_flops


def test_vggt_flops_match_spec_figures():
    # VGGT_ARCH.md: at 518x294 (782 tokens) aggregator linear layers ~0.95 TFLOP per frame,
    # DINO ~0.48 TFLOP per frame, global attention ~0.06*S TFLOP per frame.
    one = vggt_flops(1, 294, 518)
    sixteen = vggt_flops(16, 294, 518)
    linear_agg = 48 * 2 * 782 * 12 * 1024 ** 2
    assert linear_agg / 1e12 == pytest.approx(0.95, abs=0.01)
    assert (one["aggregator"] - linear_agg) / 1e12 == pytest.approx(0.12, abs=0.01)
    glob_attn_per_frame = (sixteen["global_blocks"] - 16 * 24 * 2 * 782 * 12 * 1024 ** 2) / 16
    assert glob_attn_per_frame / 1e12 == pytest.approx(0.06 * 16, rel=0.02)
    assert 2.4 < sixteen["total"] / 16 / 1e12 < 3.0     # "~2.5-3 TFLOP per frame per pass"


def test_time_fn_cpu_and_tflops():
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, repeats=3, device="cpu")
    assert len(calls) == 5 and len(t.runs) == 3 and t.min_s <= t.median_s <= t.max_s
    assert tflops(2e12, 2.0) == pytest.approx(1.0)


def test_bench_cli_rejects_bad_sizes(capsys):
    from vggt4d_ros.tools.bench import main
    with pytest.raises(SystemExit) as exc:
        main(["--height", "100", "--device", "cpu"])
    assert exc.value.code == 2


def test_bench_ablation_steps_build_valid_configs():
    """Every ablation step's pipeline config is valid (a typo'd flag fails here, not after
    minutes on the GPU device)."""
    from vggt4d_ros.dynamic.pipeline import Vggt4dPipeline
    from vggt4d_ros.tools.bench import ablation_steps
    names = []
    for name, _desc, factory in ablation_steps():
        names.append(name)
        if not name.startswith(("reference", "+bf16_autocast")):
            assert isinstance(factory(object()), Vggt4dPipeline)
    assert len(set(names)) == len(names)


def test_graph_check_tool_runs_under_emulated_capture(emulated_cuda_graphs, monkeypatch):
    """tools/graph_check (the device check of the CUDA-graph paths) on the CPU, capture
    emulated and .cuda() a no-op: every check runs and reports equal labels / masks."""
    import torch

    from vggt4d_ros.tools import graph_check as gc
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(gc, "_timed", lambda fn, repeats: {"median_ms": 0.0})
    assert gc.check_coarse_mask(3, 294, 518, 64, 1)["graph_equals_eager"]
    assert gc.check_refine_kmeans(2, 500, 30, 1)["graph_equals_eager"]
    rows = gc.check_feature_kmeans(2, 60, 16, 8, 1, sklearn=True)
    assert all(r["graph_equals_eager"] and r["graph_equals_sklearn"] for r in rows.values())


@pytest.mark.parametrize("run", sorted(STREAM_RUNS))
def test_bench_stream_reports_the_per_window_split(run):
    """vggt4d-bench's stream part on the CPU with a tiny random model, driven like the node
    (camera thread, worker polling one window at a time): every frame comes out and the
    per-window split (pipeline, alignment, emit) is reported."""
    import math

    import torch

    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    from vggt4d_ros.tools.bench import bench_stream
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    spec = STREAM_RUNS[run]
    pipelined, rate = spec["pipelined"], spec["rate_hz"]
    overrides = {"refine": False, **spec.get("set", {})}
    r = bench_stream(model, frames=11, height=28, width=42, window=4, stride=2,
                     device=torch.device("cpu"), warmup_frames=4, overrides=overrides,
                     pipelined=pipelined, rate_hz=rate)
    assert r["frames_out"] == 11 and r["overrides"] == overrides
    assert r["pipelined"] == pipelined and r["camera_rate_hz"] == rate
    assert r["flush_s"] > 0 and r["wall_s"] > 0          # the odd last frame: a flush window
    assert isinstance(r["cuda_graph_caches"], dict) and r["warmup_s"] > 0
    assert max(r["window_sizes"]) == 4 and min(r["window_sizes"]) == 3     # flush: 2 + 1
    assert r["lookahead_misses"] == 0 and r["queue_depth_max"] >= 0
    assert 0 < r["window_latency_s_median"] <= r["window_latency_s_p95"] \
        <= r["window_latency_s_max"]
    split = r["window_ms_median"]
    assert set(split) == {"total_ms", "predict_ms", "preprocess_ms", "pipeline_ms", "align_ms",
                          "emit_ms"}
    assert all(math.isfinite(v) and v >= 0 for v in split.values())
    assert split["predict_ms"] <= split["total_ms"]
    if run == "serial":
        # serial: the engine waits for the whole prediction; pipelined, every window after the
        # first was started while the previous one was emitted (the wait is shorter)
        assert r["lookahead_hits"] == 0 and split["pipeline_ms"] <= split["predict_ms"]
    elif run == "pipelined":
        assert r["lookahead_hits"] == 3           # windows 1-3 of 4 full windows (+ the flush)
    stages = r["pipeline_stage_ms_median"]        # the pipeline's own stages, in the stream
    assert {"pass1", "total"} <= set(stages) and "s" not in stages
    assert all(math.isfinite(v) and v >= 0 for v in stages.values())


def test_config_overrides_parse_python_literals_and_refuse_malformed_items():
    from vggt4d_ros.tools.bench_util import config_overrides
    assert config_overrides(["cuda_graphs=False", "feature_clusters=32", "head_dtype='bf16'"]) \
        == {"cuda_graphs": False, "feature_clusters": 32, "head_dtype": "bf16"}
    for bad in ("cuda_graphs", "=1", "x=not a literal"):
        with pytest.raises(ValueError):
            config_overrides([bad])


def test_interleaved_medians_times_every_variant_in_turns():
    import torch

    from vggt4d_ros.tools.bench import interleaved_medians
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    med = interleaved_medians(fns, warmup=1, repeats=2, device=torch.device("cpu"))
    assert order == ["a", "b", "c"] * 3 and set(med) == {"a", "b", "c"}
    assert all(v >= 0 for v in med.values())
