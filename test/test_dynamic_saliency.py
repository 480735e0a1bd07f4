"""Gram-matrix saliency (VGGT4D spec §1-2): streaming reducer vs literal form vs golden."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vggt4d_ros.dynamic.saliency import (DEFAULT_MAP_SPECS, GramSaliencyReducer,
                                         golden_layer_tokens, naive_saliency_maps,
                                         needed_layers, source_weights)

MAP_NAMES = ("mean1", "var1", "mean2", "mean3", "var3", "dyn_map")


@pytest.fixture(scope="module")
def seq10(golden_dir):
    return load_file(str(golden_dir / "vggt4d" / "case_seq10.safetensors"))


def _random_layers(s: int, nh: int, n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = {l: torch.randn(s, nh, n, d, generator=g) for l in needed_layers()}
    k = {l: torch.randn(s, nh, n, d, generator=g) for l in needed_layers()}
    return q, k


def _as_global_qk(x: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """[S, nh, N, d] patch tokens + [S, nh, 5, d] specials -> model layout [1, nh, S·(5+N), d]."""
    s, nh, n, d = x.shape
    full = torch.cat([special, x], dim=2)                    # [S, nh, 5+N, d]
    return full.permute(1, 0, 2, 3).reshape(1, nh, s * (5 + n), d)


def _reduce_via_callback(q, k, s):
    red = GramSaliencyReducer(s)
    g = torch.Generator().manual_seed(7)
    for layer in range(24):                                   # every global + frame block
        nh, n, d = q[0].shape[1:]
        if layer in q:
            spec = torch.randn(s, nh, 5, d, generator=g) * 100  # must be sliced away
            red.on_qk("global", layer, _as_global_qk(q[layer], spec), _as_global_qk(k[layer], spec))
        red.on_qk("frame", layer, torch.randn(s, nh, 5 + n, d), torch.randn(s, nh, 5 + n, d))
    return red.maps()


def test_dynamic_saliency_needed_layers_are_the_eleven_of_the_spec():
    assert needed_layers() == (0, 3, 4, 5, 6, 7, 17, 18, 19, 20, 21)
    assert GramSaliencyReducer(4).capture == {"global": set(needed_layers())}


def test_dynamic_saliency_source_windows():
    w = source_weights(10)
    # frame 0: sources 2, 4, 6; frame 5: sources 1, 3, 7, 9
    assert torch.nonzero(w[0]).flatten().tolist() == [2, 4, 6]
    assert torch.nonzero(w[5]).flatten().tolist() == [1, 3, 7, 9]
    assert torch.allclose(w.sum(1), torch.ones(10))
    # S=3: frame 1 has no ±2/4/6 neighbour -> falls back to all other frames
    assert torch.nonzero(source_weights(3)[1]).flatten().tolist() == [0, 2]
    assert source_weights(1).sum() == 0


@pytest.mark.parametrize("s,seed", [(7, 0), (13, 1), (3, 2)])
def test_dynamic_saliency_streaming_equals_naive_random(s, seed):
    q, k = _random_layers(s, nh=3, n=20, d=8, seed=seed)
    fast = _reduce_via_callback(q, k, s)
    naive = naive_saliency_maps(q, k)
    for name in MAP_NAMES:
        assert fast[name].shape == (1, s, 20)
        assert torch.allclose(fast[name][0].double(), naive[name], atol=1e-5), name


def test_dynamic_saliency_bf16_inputs_are_reduced_in_fp32():
    q, k = _random_layers(6, nh=2, n=12, d=8, seed=3)
    red = GramSaliencyReducer(6)
    for layer in needed_layers():
        red.add_layer(layer, q[layer][None].bfloat16(), k[layer][None].bfloat16())
    maps = red.maps()
    assert all(v.dtype == torch.float32 for v in maps.values())
    ref = naive_saliency_maps({l: v.bfloat16().float() for l, v in q.items()},
                              {l: v.bfloat16().float() for l, v in k.items()})
    assert torch.allclose(maps["dyn_map"][0].double(), ref["dyn_map"], atol=1e-5)


def test_dynamic_saliency_ignores_surrounding_autocast():
    """The model calls on_qk inside its bf16 autocast region; the statistics stay fp32."""
    q, k = _random_layers(6, nh=2, n=12, d=8, seed=6)
    special = torch.zeros(6, 2, 5, 8)
    red = GramSaliencyReducer(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in needed_layers():
            red.on_qk("global", layer, _as_global_qk(q[layer], special),
                      _as_global_qk(k[layer], special))
    ref = naive_saliency_maps(q, k)
    for name in MAP_NAMES:
        assert torch.allclose(red.maps()[name][0].double(), ref[name], atol=1e-5), name


def test_dynamic_saliency_missing_layer_is_an_error():
    q, k = _random_layers(5, nh=2, n=10, d=4, seed=4)
    red = GramSaliencyReducer(5)
    for layer in needed_layers()[:-1]:
        red.add_layer(layer, q[layer][None], k[layer][None])
    assert not red.complete
    with pytest.raises(RuntimeError, match="missing global layers"):
        red.maps()


def test_dynamic_saliency_bad_shapes():
    red = GramSaliencyReducer(4)
    with pytest.raises(ValueError):
        red.on_qk("global", 0, torch.zeros(1, 2, 4 * 5 + 1, 4), torch.zeros(1, 2, 4 * 5 + 1, 4))
    with pytest.raises(ValueError):
        red.add_layer(0, torch.zeros(1, 3, 2, 5, 4), torch.zeros(1, 3, 2, 5, 4))


def test_dynamic_saliency_single_frame_is_finite_zero():
    q, k = _random_layers(1, nh=2, n=10, d=4, seed=5)
    maps = _reduce_via_callback(q, k, 1)
    for name in MAP_NAMES:
        assert torch.isfinite(maps[name]).all()
    assert maps["dyn_map"].abs().max() == 0


def test_dynamic_saliency_golden_naive_equals_streaming(seq10):
    q, k = golden_layer_tokens(seq10, needed_layers())
    s = q[0].shape[0]
    fast = _reduce_via_callback(q, k, s)
    naive = naive_saliency_maps(q, k)
    for name in MAP_NAMES:
        assert torch.allclose(fast[name][0].double(), naive[name], atol=1e-5), name


def test_dynamic_saliency_golden_maps(seq10):
    q, k = golden_layer_tokens(seq10, needed_layers())
    s = q[0].shape[0]
    maps = _reduce_via_callback(q, k, s)
    for name in MAP_NAMES:
        gold = seq10[f"saliency.{name}"]
        ours = maps[name][0].reshape(gold.shape)
        assert torch.allclose(ours, gold, atol=1e-4, rtol=0), \
            f"{name}: max err {(ours - gold).abs().max():.2e}"
    assert len(DEFAULT_MAP_SPECS) == 5
