"""Attention hooks: key suppression paths agree with an explicit reference; RoPE facts."""
from __future__ import annotations

import math

import pytest
import torch

from vggt4d_ros.model.hooks import AttentionControl
from vggt4d_ros.model.layers.attention import Attention, KeySelection
from vggt4d_ros.model.layers.rope import RotaryPositionEmbedding2D, grid_positions


def _reference_attention(attn: Attention, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with -inf logits for dropped keys. keep [B', T] bool."""
    b, t, c = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, t, c))


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(32, 4, qk_norm=True).eval()


def test_index_and_mask_selection_equal_reference(attn: Attention) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    attn = attn.double()
    keep = torch.rand(3, 10) > 0.4
    keep[:, 0] = True
    with torch.no_grad():
        ref = _reference_attention(attn, x, keep)
        masked = attn(x, keys=KeySelection(mask=keep[:, None, None, :]))
        assert torch.allclose(masked, ref, atol=1e-10)
        for row in range(3):                     # per-row gather (one row = equal counts)
            idx = keep[row].nonzero()[:, 0][None]
            got = attn(x[row:row + 1], keys=KeySelection(index=idx))
            assert torch.allclose(got, ref[row:row + 1], atol=1e-10)
        plain = attn(x)
    assert (plain - ref).abs().max() > 1e-3     # the suppression changes the result


def test_key_selections_choose_gather_or_mask() -> None:
    keep = torch.ones(1, 3, 5 + 4, dtype=torch.bool)
    keep[0, 0, 6] = False                         # frame 0 drops one patch, others none
    keep[0, 1, 2] = False                         # special token: must be forced back on
    ctrl = AttentionControl(key_keep=keep, key_mask_layers={0})
    frame_sel, global_sel = ctrl.key_selections(5, torch.device("cpu"))
    assert frame_sel.mask is not None and frame_sel.mask.shape == (3, 1, 1, 9)
    assert bool(frame_sel.mask[0, 0, 0, 2]) and not bool(frame_sel.mask[0, 0, 0, 6])
    assert global_sel.index is not None and global_sel.index.shape == (1, 26)
    assert 6 not in global_sel.index[0].tolist() and 2 in global_sel.index[0].tolist()
    # Nothing dropped -> plain attention (no selection at all).
    ctrl = AttentionControl(key_keep=torch.ones(1, 3, 9, dtype=torch.bool), key_mask_layers={0})
    assert ctrl.key_selections(5, torch.device("cpu")) == (None, None)
    assert AttentionControl().key_selections(5, torch.device("cpu")) == (None, None)


def test_qk_callback_only_for_captured_layers() -> None:
    seen = []
    ctrl = AttentionControl(capture={"global": {3}}, on_qk=lambda *a: seen.append(a[:2]))
    assert ctrl.qk_callback("frame", 3) is None and ctrl.qk_callback("global", 2) is None
    ctrl.qk_callback("global", 3)(torch.zeros(1), torch.zeros(1))
    assert seen == [("global", 3)]
    with pytest.raises(ValueError, match="unknown kind"):
        AttentionControl(capture={"cross": {0}}, on_qk=print).validate(1, 1, 6, 24)


def test_rope_positions_and_rotation() -> None:
    pos = grid_positions(2, 3, 5)
    assert pos.shape == (11, 2)
    assert pos[:5].abs().sum() == 0                       # special tokens at (0, 0)
    assert pos[5].tolist() == [1, 1] and pos[-1].tolist() == [2, 3]  # row+1, col+1
    rope = RotaryPositionEmbedding2D(100.0)
    tab = rope.tables(2, 3, 5, 8, "cpu")
    x = torch.randn(1, 1, 11, 8)
    y = rope.apply(x, tab)
    assert torch.equal(y[:, :, :5], x[:, :, :5])         # no rotation at (0, 0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6)  # rotations keep norms
    # Token (row 1, col 1) -> position (2, 2): first half rotated by angle 2·f, f = 100^0 = 1.
    t = 5 + 1 * 3 + 1
    a, b = x[0, 0, t, 0], x[0, 0, t, 2]                   # rotate-half pairs channel 0 with 2
    assert torch.allclose(y[0, 0, t, 0], a * math.cos(2) - b * math.sin(2), atol=1e-6)
    # Relative property: q·k depends only on the position difference.
    q, k = torch.randn(8), torch.randn(8)
    tab_full = rope.tables(4, 4, 0, 8, "cpu")
    def dot(i: int, j: int) -> float:
        qq = rope.apply(q.expand(1, 1, 16, 8), tab_full)[0, 0, i]
        kk = rope.apply(k.expand(1, 1, 16, 8), tab_full)[0, 0, j]
        return float(qq @ kk)
    assert dot(0, 5) == pytest.approx(dot(10, 15), abs=1e-5)   # both (+1, +1) apart


def test_batched_key_suppression_equals_per_sequence_runs() -> None:
    """B=2 with different masks (mask path for global attention) == two B=1 runs (gather path)."""
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    torch.manual_seed(0)
    cfg = VGGTConfig.from_dict({
        "embed_dim": 32, "depth": 3, "num_heads": 2,
        "patch_embed": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "camera_head": {"dim_in": 64, "trunk_depth": 1, "num_heads": 2},
    })
    model = VGGT(cfg, enable_depth=False, enable_point=False, enable_track=False).double().eval()
    with torch.no_grad():   # make the blocks matter (LayerScale init 0.01 is nearly identity)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    images = torch.rand(2, 3, 3, 28, 42, dtype=torch.float64)
    keep = torch.rand(2, 3, 5 + 6) > 0.3
    keep[1, 2, 7] = False
    keep[0, :, 5:] = True
    keep[0, 0, 9] = False                        # sequence 0 drops 1 token, sequence 1 more
    seen = {}
    ctrl = AttentionControl(key_keep=keep, key_mask_layers={0, 1},
                            capture={"global": {1}},
                            on_qk=lambda kind, i, q, k: seen.setdefault("shape", q.shape))
    with torch.no_grad():
        both = model(images, control=ctrl)["pose_enc"]
        singles = [model(images[b:b + 1], control=AttentionControl(
            key_keep=keep[b:b + 1], key_mask_layers={0, 1}))["pose_enc"] for b in range(2)]
        plain = model(images)["pose_enc"]
    assert seen["shape"] == (2, 2, 3 * 11, 16)
    assert torch.allclose(both, torch.cat(singles), atol=1e-10)
    assert (both - plain).abs().max() > 1e-4


def test_fused_block_path_is_bitwise_equal():
    """The functional (compilable) block path gives the module path's outputs bit for bit,
    with Q/K capture and key suppression active."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.hooks import AttentionControl
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(3, 3, 28, 42)
    captured = {}

    def control():
        keep = torch.rand(1, 3, 5 + 6, generator=torch.Generator().manual_seed(1)) > 0.3
        return AttentionControl(capture={"global": {0, 3}}, key_keep=keep,
                                key_mask_layers={0, 1},
                                on_qk=lambda kind, l, q, k: captured.setdefault(
                                    (len(captured) >= 2, l), q.clone()))
    with torch.no_grad():
        plain = model(images, control=control())
        model.use_fused_blocks(True)
        fused = model(images, control=control())
        model.use_fused_blocks(False)
    for key in ("pose_enc", "depth", "world_points", "depth_conf"):
        assert torch.equal(plain[key], fused[key]), key
    assert torch.equal(captured[(False, 0)], captured[(True, 0)])


def test_fused_block_path_under_autocast_casts_qk_like_sdpa():
    """Under bf16 autocast the fused path casts q/k to bf16 itself (where SDPA would cast them)
    and still gives the module path's outputs bit for bit; a Q/K hook sees q/k uncast (the
    dtype the module path gives it: float32 from the qk-norm on CUDA, bf16 on CPU)."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.hooks import AttentionControl
    from vggt4d_ros.model.layers import block as block_mod
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(3, 3, 28, 42)
    seen = []
    casts = []
    real = block_mod._sdpa_qk_dtype

    def spy(x, on_qk):
        casts.append(real(x, on_qk))
        return casts[-1]

    def control():
        return AttentionControl(capture={"global": {0}},
                                on_qk=lambda kind, layer, q, k: seen.append(q.dtype))
    with torch.no_grad():
        plain = model(images, control=control(), autocast_dtype=torch.bfloat16)
        model.use_fused_blocks(True)
        block_mod._sdpa_qk_dtype = spy
        try:
            fused = model(images, control=control(), autocast_dtype=torch.bfloat16)
        finally:
            block_mod._sdpa_qk_dtype = real
            model.use_fused_blocks(False)
    assert torch.bfloat16 in casts and None in casts      # the hooked layer is not cast
    assert len(seen) == 2 and seen[0] == seen[1]
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(plain[key], fused[key]), key


def test_last_layer_tokens_gives_the_full_rows_of_the_leading_tokens():
    """aggregator.run(last_layer_tokens=n): the last global block computes only the first n
    tokens of each frame; those rows equal the full computation's (module and fused block
    paths, with key suppression active), earlier layers are untouched."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.hooks import AttentionControl
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    agg = model.aggregator
    x = torch.rand(1, 3, 3, 28, 42)
    keep = torch.rand(1, 3, 5 + 6, generator=torch.Generator().manual_seed(1)) > 0.3

    def control():
        return AttentionControl(key_keep=keep, key_mask_layers={0, agg.depth - 1})
    last = agg.depth - 1
    for fused in (False, True):
        model.use_fused_blocks(fused)
        with torch.no_grad():
            full = agg.run(x, control=control())
            for n in (1, 3):
                part = agg.run(x, control=control(), last_layer_tokens=n)
                assert part.layers[last].shape == (1, 3, n, full.layers[last].shape[-1])
                assert torch.allclose(part.layers[last], full.layers[last][:, :, :n],
                                      atol=1e-6, rtol=1e-5), (fused, n)
                assert torch.equal(part.layers[0], full.layers[0])
    model.use_fused_blocks(False)
    with pytest.raises(ValueError, match="last_layer_tokens"):
        agg.run(x, last_layer_tokens=0)


def test_aggregator_split_run_equals_the_whole_run():
    """aggregator.run(layer_range=(0, k)) then run(layer_range=(k, depth), entry_tokens=...)
    gives the whole run's layers (key suppression in the first part, ``last_layer_tokens``
    in the second: pass 2's eager head and graphed tail); bad ranges are rejected."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.hooks import AttentionControl
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    agg = model.aggregator
    x = torch.rand(1, 3, 3, 28, 42)
    keep = torch.rand(1, 3, 5 + 6, generator=torch.Generator().manual_seed(1)) > 0.3
    control = AttentionControl(key_keep=keep, key_mask_layers={0, 1, 2, 3, 4})
    last = agg.depth - 1
    with torch.no_grad():
        whole = agg.run(x, control=control, keep_layers={3, 10, last}, last_layer_tokens=1)
        head = agg.run(x, control=control, keep_layers={3}, layer_range=(0, 5))
        tail = agg.run(x, keep_layers={10, last}, last_layer_tokens=1, layer_range=(5, agg.depth),
                       entry_tokens=head.tokens)
    assert torch.equal(head.layers[3], whole.layers[3]) and head.layers[10] is None
    assert tail.layers[3] is None and tail.patch_tokens is None
    assert torch.equal(tail.layers[10], whole.layers[10])
    assert torch.equal(tail.layers[last], whole.layers[last])
    assert len(head.layers) == len(tail.layers) == agg.depth
    for bad in ({"layer_range": (5, 5)}, {"layer_range": (0, agg.depth + 1)},
                {"layer_range": (5, agg.depth)}, {"entry_tokens": head.tokens},
                {"layer_range": (5, agg.depth), "entry_tokens": head.tokens[:, :7]}):
        with pytest.raises(ValueError, match="layer_range|entry_tokens"):
            agg.run(x, **bad)


def test_gathered_keys_use_the_any_length_sdpa_kernels(monkeypatch):
    """Key suppression by gathered index (a key count that changes with every window) runs
    SDPA inside ``_any_length_kernels`` (on CUDA: no cuDNN, whose plans are built per key
    count); mask selections and plain attention do not; the result is the plain gathered
    attention."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from vggt4d_ros.model.layers import attention as att
    entered = []
    real = att._any_length_kernels

    def spy(q):
        entered.append(q.shape)
        return contextlib.nullcontext()
    monkeypatch.setattr(att, "_any_length_kernels", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) for _ in range(3))
    index = torch.tensor([[0, 2, 3, 7]] * 2)
    out = att.attend(q, k, v, None, att.KeySelection(index=index))
    assert len(entered) == 1
    ref = F.scaled_dot_product_attention(q, k[:, :, index[0]], v[:, :, index[0]])
    assert torch.allclose(out, ref, atol=1e-6)
    att.attend(q, k, v, None, att.KeySelection(mask=torch.ones(2, 1, 1, 10, dtype=torch.bool)))
    att.attend(q, k, v, None, None)
    assert len(entered) == 1
    assert isinstance(real(q), contextlib.nullcontext)      # CPU: the default backends


def test_cast_weight_cache_gives_the_same_outputs_and_follows_weight_updates():
    """``FusedBlockFunctions.cast_weights`` under bf16 autocast: the blocks' linear weights
    cast once and kept give the per-call casts' outputs bit for bit; a changed weight is
    re-cast in place (same storage, so a CUDA graph that captured it stays valid). The GELU
    epilogue option is ignored off CUDA (the exact GELU stays)."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.layers.block import Block
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(3, 3, 28, 42)
    bf16 = torch.bfloat16
    model.use_fused_blocks(True)
    fns = model.fused_functions
    with torch.inference_mode():
        plain = model(images, autocast_dtype=bf16)
        fns.cast_weights = True
        cached = model(images, autocast_dtype=bf16)
        blocks = [m for m in model.aggregator.modules() if isinstance(m, Block)]
        assert all(b._cast_cache is not None for b in blocks)
        copy = blocks[0]._cast_cache[1][4]                     # fc1 weight, bf16
        assert copy.dtype == bf16 and not copy.is_inference()
        fns.gelu_epilogue = True                               # CPU: no effect
        again = model(images, autocast_dtype=bf16)
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(plain[key], cached[key]), key
        assert torch.equal(plain[key], again[key]), key
    with torch.no_grad():
        blocks[0].mlp.fc1.weight.mul_(1.5)
    with torch.inference_mode():
        fresh = model(images, autocast_dtype=bf16)
        assert blocks[0]._cast_cache[1][4].data_ptr() == copy.data_ptr()
        assert torch.equal(copy, blocks[0].mlp.fc1.weight.to(bf16))
        fns.cast_weights = False
        uncached = model(images, autocast_dtype=bf16)
    model.use_fused_blocks(False)
    assert torch.equal(fresh["depth"], uncached["depth"])
    assert not torch.equal(fresh["depth"], plain["depth"])


def test_gelu_epilogue_maths_is_the_tanh_gelu_mlp():
    """``attention_output_mlp(gelu_epilogue=True)`` = the block's MLP with the tanh GELU
    (the cuBLASLt epilogue's GELU on CUDA; the same maths unfused here), and
    ``linear_gelu_tanh`` casts to the autocast dtype it is given."""
    import torch
    import torch.nn.functional as F
    from vggt4d_ros.model.layers.fused import attention_output_mlp, linear_gelu_tanh
    g = torch.Generator().manual_seed(0)
    b, t, c, h = 2, 7, 16, 4
    x = torch.randn(b, t, c, generator=g)
    attn = torch.randn(b, h, t, c // h, generator=g)
    w = {n: torch.randn(*shape, generator=g) * 0.2 for n, shape in (
        ("proj_w", (c, c)), ("proj_b", (c,)), ("g1", (c,)), ("nw", (c,)), ("nb", (c,)),
        ("fc1_w", (4 * c, c)), ("fc1_b", (4 * c,)), ("fc2_w", (c, 4 * c)), ("fc2_b", (c,)),
        ("g2", (c,)))}
    args = (x, attn, w["proj_w"], w["proj_b"], w["g1"], w["nw"], w["nb"], 1e-6,
            w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], w["g2"])
    got = attention_output_mlp(*args, gelu_epilogue=True)
    exact = attention_output_mlp(*args)
    y = F.linear(attn.transpose(1, 2).reshape(b, t, c), w["proj_w"], w["proj_b"])
    x1 = x + y * w["g1"]
    hid = F.gelu(F.linear(F.layer_norm(x1, (c,), w["nw"], w["nb"], 1e-6), w["fc1_w"],
                          w["fc1_b"]), approximate="tanh")
    want = x1 + F.linear(hid, w["fc2_w"], w["fc2_b"]) * w["g2"]
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.equal(got, exact) and torch.allclose(got, exact, atol=1e-2)
    low = linear_gelu_tanh(x, w["fc1_w"][:, :c], w["fc1_b"], torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.shape == (b, t, 4 * c)


def test_qk_rope_kernel_failure_falls_back_to_the_torch_functions(monkeypatch):
    """A Triton that cannot build the qk-norm + RoPE kernel costs speed, not a window: one
    warning, then the compiled torch functions (same outputs as the module path); an
    out-of-memory error is not swallowed (the stream's OOM handling needs it)."""
    import sys
    import types

    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.layers import block as block_mod
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(2, 3, 28, 42)

    def broken(*args, **kwargs):
        raise ValueError("no compiler here")
    fake = types.ModuleType("vggt4d_ros.model.layers._qk_rope_triton")
    fake.qk_norm_rope = broken
    monkeypatch.setitem(sys.modules, "vggt4d_ros.model.layers._qk_rope_triton", fake)
    monkeypatch.setattr(block_mod, "_QK_KERNEL_FAILED", "")
    monkeypatch.setattr(block_mod, "_qk_kernel_usable",
                        lambda x: not block_mod._QK_KERNEL_FAILED)
    with torch.no_grad():
        plain = model(images)
        model.use_fused_blocks(True)
        model.fused_functions.qk_rope_kernel = True
        with pytest.warns(RuntimeWarning, match="qk-norm \\+ RoPE Triton kernel unavailable"):
            fused = model(images)
        assert "no compiler here" in block_mod._QK_KERNEL_FAILED
        for key in ("pose_enc", "depth"):
            assert torch.equal(plain[key], fused[key]), key

        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")
        fake.qk_norm_rope = oom
        monkeypatch.setattr(block_mod, "_qk_kernel_usable", lambda x: True)
        with pytest.raises(torch.OutOfMemoryError):
            model(images)
    model.use_fused_blocks(False)
