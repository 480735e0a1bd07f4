"""Unit tests of the DPT heads, the track head and depth unprojection (no golden data needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vggt4d_ros.geometry.unproject import depth_to_world_points
from vggt4d_ros.model.heads.dpt_head import DPTHead, FeatureFusionBlock, ResidualConvUnit
from vggt4d_ros.model.heads.head_utils import (activate_head, add_uv_pos_embed, apply_activation,
                                               apply_conf_activation, create_uv_grid,
                                               inverse_log_transform, uv_grid_embed)
from vggt4d_ros.model.heads.track_head import TrackHead
from vggt4d_ros.model.heads.track_modules.blocks import CorrPyramid, EfficientUpdateFormer
from vggt4d_ros.model.heads.track_modules.modules import AttnBlock
from vggt4d_ros.model.heads.track_modules.tracker import TrackerPredictor
from vggt4d_ros.model.heads.track_modules.utils import (flow_embed, grid_sincos_embed,
                                                        sample_points, window_offsets)

TINY = dict(dim_in=32, features=16, out_channels=(8, 8, 16, 16))


def _tokens(B: int, S: int, h: int, w: int, dim: int, layers: int = 24, seed: int = 0,
            P: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, P + h * w, dim, generator=g) for _ in range(layers)]


def _seed_params(m: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


# ----------------------------------------------------------------------------- activations


def test_inverse_log_transform_values():
    y = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    want = torch.tensor([-(math.e ** 2 - 1), -(math.e ** 0.5 - 1), 0.0, math.e ** 0.5 - 1, math.e ** 2 - 1])
    torch.testing.assert_close(inverse_log_transform(y), want)
    # it inverts sign(x) log(1 + |x|)
    x = torch.linspace(-50, 50, 101)
    torch.testing.assert_close(inverse_log_transform(torch.sign(x) * torch.log1p(x.abs())), x,
                               rtol=1e-5, atol=1e-4)


def test_conf_and_value_activations():
    x = torch.tensor([-1.0, 0.0, 3.0])
    torch.testing.assert_close(apply_conf_activation(x, "expp1"), 1 + torch.exp(x))
    torch.testing.assert_close(apply_activation(x, "exp"), torch.exp(x))
    with pytest.raises(ValueError, match="unknown activation"):
        apply_activation(x, "softplus")
    with pytest.raises(ValueError, match="unknown conf_activation"):
        apply_conf_activation(x, "exp")


def test_activate_head_splits_last_channel_as_confidence():
    out = torch.randn(2, 4, 3, 5)
    pts, conf = activate_head(out, "inv_log", "expp1")
    assert pts.shape == (2, 3, 5, 3) and conf.shape == (2, 3, 5)
    torch.testing.assert_close(conf, 1 + torch.exp(out[:, 3]))
    torch.testing.assert_close(pts, inverse_log_transform(out[:, :3].permute(0, 2, 3, 1)))


# ----------------------------------------------------------------------------- uv embedding


def test_uv_grid_is_diagonal_normalised_cell_centres():
    uv = create_uv_grid(8, 4, aspect_ratio=2.0)
    assert uv.shape == (4, 8, 2)
    span_x, span_y = 2 / math.sqrt(5), 1 / math.sqrt(5)
    assert uv[0, 0, 0].item() == pytest.approx(-span_x * 7 / 8)
    assert uv[0, -1, 0].item() == pytest.approx(span_x * 7 / 8)
    assert uv[-1, 0, 1].item() == pytest.approx(span_y * 3 / 4)
    # u varies along columns only, v along rows only
    assert torch.all(uv[:, 3, 0] == uv[0, 3, 0]) and torch.all(uv[2, :, 1] == uv[2, 0, 1])
    # cells are square in the normalised plane (aspect given = grid aspect)
    assert (uv[0, 1, 0] - uv[0, 0, 0]).item() == pytest.approx((uv[1, 0, 1] - uv[0, 0, 1]).item(), rel=1e-5)


def test_uv_embedding_layout():
    uv = create_uv_grid(3, 2)
    emb = uv_grid_embed(uv, 8, omega_0=100.0)
    u, v = uv[1, 2, 0], uv[1, 2, 1]
    w = torch.tensor([1.0, 1.0 / 10.0])  # 100^(-i/2), i = 0, 1
    want = torch.cat([torch.sin(u * w), torch.cos(u * w), torch.sin(v * w), torch.cos(v * w)])
    torch.testing.assert_close(emb[1, 2], want)
    x = torch.zeros(2, 8, 2, 3)
    torch.testing.assert_close(add_uv_pos_embed(x, 3, 2)[0], 0.1 * emb.permute(2, 0, 1))
    with pytest.raises(ValueError):
        uv_grid_embed(uv, 6)


# ----------------------------------------------------------------------------- DPT blocks


def test_residual_conv_unit_quirk_adds_relu_of_input():
    torch.manual_seed(0)
    rcu = _seed_params(ResidualConvUnit(4))
    x = torch.randn(2, 4, 5, 6)
    x_before = x.clone()
    out = rcu(x)
    branch = rcu.conv2(F.relu(rcu.conv1(F.relu(x_before))))
    torch.testing.assert_close(out, branch + F.relu(x_before))
    assert not torch.allclose(out, branch + x_before)  # the textbook skip would differ
    assert torch.equal(x, x_before)                     # and the caller's tensor is untouched


def test_fusion_block_resizes_align_corners_and_needs_skip():
    blk = _seed_params(FeatureFusionBlock(4))
    a, b = torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 5)
    assert blk(a, b).shape == (1, 4, 6, 10)
    assert blk(a, b, size=(7, 9)).shape == (1, 4, 7, 9)
    with pytest.raises(ValueError, match="skip"):
        blk(a)
    top = FeatureFusionBlock(4, has_residual=False)
    assert not hasattr(top, "resConfUnit1")


def test_dpt_state_dict_key_names():
    keys = set(DPTHead(**TINY, output_dim=2).state_dict())
    assert "scratch.refinenet4.resConfUnit2.conv1.weight" in keys
    assert "scratch.refinenet4.resConfUnit1.conv1.weight" not in keys
    assert "resize_layers.3.weight" in keys and "resize_layers.2.weight" not in keys
    assert "scratch.output_conv2.2.bias" in keys and "scratch.layer1_rn.bias" not in keys
    fo = set(DPTHead(**TINY, feature_only=True).state_dict())
    assert "scratch.output_conv1.weight" in fo and not any("output_conv2" in k for k in fo)


@pytest.mark.parametrize("H,W", [(28, 42), (42, 28)])
def test_dpt_depth_and_point_shapes_and_ranges(H, W):
    B, S = 2, 3
    toks = _tokens(B, S, H // 14, W // 14, TINY["dim_in"])
    images = torch.rand(B, S, 3, H, W)
    depth_head = _seed_params(DPTHead(**TINY, output_dim=2, activation="exp"))
    depth, dconf = depth_head(toks, images, patch_start_idx=5)
    assert depth.shape == (B, S, H, W, 1) and dconf.shape == (B, S, H, W)
    assert depth.dtype == torch.float32 and bool((depth > 0).all()) and bool((dconf > 1).all())
    point_head = _seed_params(DPTHead(**TINY, output_dim=4, activation="inv_log"), seed=1)
    pts, pconf = point_head(toks, images, 5)
    assert pts.shape == (B, S, H, W, 3) and pconf.shape == (B, S, H, W)
    assert torch.isfinite(pts).all() and bool((pconf > 1).all())


def test_dpt_feature_only_down_ratio_shape():
    toks = _tokens(1, 2, 3, 4, TINY["dim_in"])
    images = torch.rand(1, 2, 3, 42, 56)
    head = _seed_params(DPTHead(**TINY, feature_only=True, down_ratio=2, pos_embed=False))
    feats = head(toks, images, 5)
    assert feats.shape == (1, 2, TINY["features"], 21, 28)


def test_dpt_chunking_and_frame_independence():
    B, S, h, w = 1, 5, 2, 3
    toks = _tokens(B, S, h, w, TINY["dim_in"], seed=3)
    images = torch.rand(B, S, 3, h * 14, w * 14)
    head = _seed_params(DPTHead(**TINY, output_dim=2, activation="exp"), seed=2)
    full = head(toks, images, 5, frames_chunk_size=None)
    chunked = head(toks, images, 5, frames_chunk_size=2)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # frames do not talk to each other inside the head
    toks2 = [t.clone() for t in toks]
    for t in toks2:
        t[:, 4] += 1.0
    other = head(toks2, images, 5)
    torch.testing.assert_close(other[0][:, :4], full[0][:, :4])
    assert not torch.allclose(other[0][:, 4], full[0][:, 4])


def test_dpt_ignores_special_tokens():
    toks = _tokens(1, 1, 2, 2, TINY["dim_in"], seed=5)
    images = torch.rand(1, 1, 3, 28, 28)
    head = _seed_params(DPTHead(**TINY, output_dim=2, activation="exp"))
    a = head(toks, images, 5)[0]
    toks2 = [t.clone() for t in toks]
    for t in toks2:
        t[:, :, :5] = 7.0
    torch.testing.assert_close(head(toks2, images, 5)[0], a)


def test_dpt_runs_fp32_inside_bf16_autocast():
    toks = [t.to(torch.bfloat16) for t in _tokens(1, 1, 2, 2, TINY["dim_in"])]
    images = torch.rand(1, 1, 3, 28, 28)
    head = _seed_params(DPTHead(**TINY, output_dim=2, activation="exp"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        depth, conf = head(toks, images, 5)
    assert depth.dtype == torch.float32 and conf.dtype == torch.float32


def test_dpt_bad_input():
    head = DPTHead(**TINY, output_dim=2, activation="exp")
    toks = _tokens(1, 1, 2, 2, TINY["dim_in"])
    with pytest.raises(ValueError, match="multiple of patch size"):
        head(toks, torch.rand(1, 1, 3, 28, 30), 5)
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        head(toks, torch.rand(1, 3, 28, 28), 5)
    with pytest.raises(ValueError, match="layer 23"):
        head(toks[:10], torch.rand(1, 1, 3, 28, 28), 5)
    with pytest.raises(ValueError, match="not kept"):
        head([None if i == 11 else t for i, t in enumerate(toks)], torch.rand(1, 1, 3, 28, 28), 5)
    with pytest.raises(ValueError, match="tokens of layer"):
        head(toks, torch.rand(1, 1, 3, 42, 28), 5)
    with pytest.raises(ValueError):
        DPTHead(**{**TINY, "out_channels": (8, 8, 16)})


def test_dpt_full_size_parameter_count():
    with torch.device("meta"):
        depth = DPTHead(dim_in=2048, output_dim=2, activation="exp")
        point = DPTHead(dim_in=2048, output_dim=4)
    n_depth = sum(p.numel() for p in depth.parameters())
    n_point = sum(p.numel() for p in point.parameters())
    assert n_point - n_depth == 2 * 33  # two more output channels of the last 1x1 conv (32 in + bias)
    assert 32_000_000 < n_depth < 33_200_000  # spec: ~32.6 M
    assert len(depth.state_dict()) == 62


# ----------------------------------------------------------------------------- tracker pieces


def test_flow_embed_interleaved_linear_frequencies():
    xy = torch.tensor([[[0.3, -1.2]]])
    e = flow_embed(xy, 8)
    f = torch.arange(0, 8, 2).float() * (1000.0 / 8)
    want_x = torch.stack([torch.sin(0.3 * f), torch.cos(0.3 * f)], dim=-1).flatten()
    want_y = torch.stack([torch.sin(-1.2 * f), torch.cos(-1.2 * f)], dim=-1).flatten()
    torch.testing.assert_close(e[0, 0], torch.cat([want_x, want_y]))


def test_grid_sincos_embed_layout():
    emb = grid_sincos_embed(8, 3, 5)
    assert emb.shape == (1, 8, 3, 5)
    x, y = 4.0, 2.0
    w = torch.tensor([1.0, 0.01])  # 10000^(-i/2)
    want = torch.cat([torch.sin(x * w), torch.cos(x * w), torch.sin(y * w), torch.cos(y * w)])
    torch.testing.assert_close(emb[0, :, 2, 4], want)


def test_sample_points_hits_pixel_centres_and_clamps():
    fmap = torch.arange(12.0).view(1, 1, 3, 4)
    pts = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [1.5, 1.0], [10.0, 1.0]]])
    got = sample_points(fmap, pts)[0, :, 0]
    torch.testing.assert_close(got, torch.tensor([0.0, 11.0, 5.5, 7.0]))


def _reference_corr(fmaps, targets, coords, levels, r):
    """Official formulation: full correlation volume, then window sampling (swapped-axis grid)."""
    B, S, C, H, W = fmaps.shape
    N = targets.shape[2]
    out, cur = [], fmaps
    d = torch.linspace(-r, r, 2 * r + 1)
    delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)  # [..., 0] = row offset
    for i in range(levels):
        if i:
            cur = F.avg_pool2d(cur.reshape(B * S, C, *cur.shape[-2:]), 2, 2).reshape(B, S, C, *[s // 2 for s in cur.shape[-2:]])
        h, w = cur.shape[-2:]
        corr = torch.matmul(targets, cur.reshape(B, S, C, h * w)) / math.sqrt(C)
        corr = corr.reshape(B * S * N, 1, h, w)
        pts = coords.reshape(B * S * N, 1, 1, 2) / 2 ** i + delta[None]
        grid = pts * torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)]) - 1
        out.append(F.grid_sample(corr, grid, align_corners=True, padding_mode="zeros").reshape(B, S, N, -1))
    return torch.cat(out, dim=-1)


def test_corr_pyramid_matches_full_volume_sampling():
    g = torch.Generator().manual_seed(0)
    B, S, C, H, W, N = 1, 2, 8, 19, 23, 5
    fmaps = torch.randn(B, S, C, H, W, generator=g)
    targets = torch.randn(B, S, N, C, generator=g)
    coords = torch.rand(B, S, N, 2, generator=g) * torch.tensor([W + 4.0, H + 4.0]) - 2.0
    got = CorrPyramid(fmaps, num_levels=3, radius=2).sample(targets, coords)
    assert got.shape == (B, S, N, 3 * 25)
    torch.testing.assert_close(got, _reference_corr(fmaps, targets, coords, 3, 2), rtol=1e-4, atol=1e-5)
    assert window_offsets(1)[1].tolist() == [-1.0, 0.0]  # inner index moves y


def test_attn_block_residual_on_normalised_input():
    blk = _seed_params(AttnBlock(8, 2))
    x = torch.randn(3, 4, 8) * 3 + 1
    xn = blk.norm1(x)
    mid = xn + blk.attn(xn, xn, xn)[0]
    torch.testing.assert_close(blk(x), mid + blk.mlp(blk.norm2(mid)))


def test_update_former_shapes_and_no_cross_talk_without_space_attention():
    uf = _seed_params(EfficientUpdateFormer(space_depth=0, time_depth=2, input_dim=12, hidden_size=16,
                                            num_heads=2, output_dim=6, add_space_attn=False))
    x = torch.randn(1, 3, 4, 12)
    y = uf(x)
    assert y.shape == (1, 3, 4, 6)
    x2 = x.clone()
    x2[:, 2] += torch.randn(4, 12)  # (a constant shift would vanish in the input LayerNorm)
    torch.testing.assert_close(uf(x2)[:, :2], y[:, :2])  # tracks independent without space attn
    uf2 = _seed_params(EfficientUpdateFormer(space_depth=2, time_depth=2, input_dim=12, hidden_size=16,
                                             num_heads=2, output_dim=6, num_virtual_tracks=4))
    y2 = uf2(x)
    assert not torch.allclose(uf2(x2)[:, :2], y2[:, :2])  # virtual tracks couple them


def test_tracker_outputs_and_pinned_query_frame():
    torch.manual_seed(0)
    tr = _seed_params(TrackerPredictor(stride=2, corr_levels=3, corr_radius=2, latent_dim=8,
                                       hidden_size=16, depth=2), std=0.1)
    fmaps = torch.randn(2, 3, 8, 12, 16)
    q = torch.tensor([[[3.0, 4.0], [20.0, 10.0]], [[0.0, 0.0], [31.0, 23.0]]])
    preds, vis, conf = tr(q, fmaps, iters=3)
    assert len(preds) == 3 and all(p.shape == (2, 3, 2, 2) for p in preds)
    for p in preds:
        torch.testing.assert_close(p[:, 0], q)  # query frame pinned (image pixels)
    assert vis.shape == conf.shape == (2, 3, 2)
    assert bool(((vis > 0) & (vis < 1)).all()) and bool(((conf > 0) & (conf < 1)).all())
    assert not torch.allclose(preds[0][:, 1:], preds[-1][:, 1:])  # iterations refine
    with pytest.raises(ValueError):
        tr(q[0], fmaps)
    with pytest.raises(ValueError, match="no point"):
        tr(q[:, :0], fmaps)
    one, _, _ = tr(q, fmaps[:, :1], iters=1)  # a single frame is just the queries
    torch.testing.assert_close(one[0][:, 0], q)


def test_track_head_end_to_end_shapes_and_key_names():
    th = _seed_params(TrackHead(dim_in=32, features=8, hidden_size=16, corr_levels=2, corr_radius=1,
                                out_channels=(8, 8, 16, 16)), std=0.1)
    keys = set(th.state_dict())
    assert "tracker.updateformer.virual_tracks" in keys
    assert "tracker.updateformer.space_point2virtual_blocks.5.cross_attn.in_proj_weight" in keys
    assert "feature_extractor.scratch.output_conv1.weight" in keys
    toks = _tokens(1, 2, 2, 3, 32)
    images = torch.rand(1, 2, 3, 28, 42)
    q = torch.tensor([[5.0, 6.0], [30.0, 20.0], [1.0, 27.0]])
    tracks, vis, conf = th(toks, images, 5, q)
    assert len(tracks) == 4 and tracks[-1].shape == (1, 2, 3, 2)
    assert vis.shape == conf.shape == (1, 2, 3)
    torch.testing.assert_close(tracks[-1][0, 0], q)


def test_track_head_full_size_parameter_count():
    with torch.device("meta"):
        th = TrackHead(dim_in=2048)
    n = sum(p.numel() for p in th.parameters())
    assert 65_000_000 < n < 67_000_000  # spec: 66 M


def test_full_vggt_1b_key_set_and_parameter_count():
    """Spec: 1,797 state-dict keys, 1,256,537,516 parameters (built on meta, no weights)."""
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT

    with torch.device("meta"):
        model = VGGT(VGGTConfig.vggt_1b())
    assert len(model.state_dict()) == 1797
    assert sum(p.numel() for p in model.parameters()) == 1_256_537_516
    count = {n: sum(p.numel() for p in getattr(model, n).parameters())
             for n in ("depth_head", "point_head", "track_head")}
    assert count == {"depth_head": 32_654_562, "point_head": 32_654_628, "track_head": 65_941_396}


# ----------------------------------------------------------------------------- unprojection


def _random_cameras(S: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    K = np.zeros((S, 3, 3))
    K[:, 0, 0] = rng.uniform(50, 80, S)
    K[:, 1, 1] = rng.uniform(50, 80, S)
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = 10.0, 7.0, 1.0
    E = np.zeros((S, 4, 4))
    for s in range(S):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        E[s, :3, :3] = q * np.sign(np.linalg.det(q))
        E[s, :3, 3] = rng.normal(size=3)
        E[s, 3, 3] = 1.0
    return K, E


def test_unproject_roundtrip_numpy_and_torch():
    S, H, W = 3, 6, 9
    K, E = _random_cameras(S)
    depth = np.random.default_rng(1).uniform(1, 5, (S, H, W))
    pts = depth_to_world_points(depth, K, E)
    assert isinstance(pts, np.ndarray) and pts.shape == (S, H, W, 3)
    # project back: camera coords, then pixels
    cam = np.einsum("sij,shwj->shwi", E[:, :3, :3], pts) + E[:, None, None, :3, 3]
    np.testing.assert_allclose(cam[..., 2], depth, rtol=1e-10)
    uv = np.einsum("sij,shwj->shwi", K, cam)
    uv = uv[..., :2] / uv[..., 2:]
    vv, uu = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    np.testing.assert_allclose(uv[..., 0], np.broadcast_to(uu, (S, H, W)), atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], np.broadcast_to(vv, (S, H, W)), atol=1e-9)
    # torch in -> torch out, same dtype; [S,H,W,1] depth and [S,3,4] extrinsics accepted
    t = depth_to_world_points(torch.from_numpy(depth).float()[..., None], torch.from_numpy(K),
                              torch.from_numpy(E[:, :3]).float())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), pts, rtol=1e-5, atol=1e-5)


def test_unproject_pixel_offset_shifts_rays():
    K, E = _random_cameras(1, seed=2)
    E[0] = np.eye(4)
    depth = np.full((1, 2, 3), 2.0)
    a = depth_to_world_points(depth, K, E, pixel_offset=0.0)
    b = depth_to_world_points(depth, K, E, pixel_offset=0.5)
    np.testing.assert_allclose(b[..., 0] - a[..., 0], 0.5 * 2.0 / K[0, 0, 0])
    np.testing.assert_allclose(b[..., 1] - a[..., 1], 0.5 * 2.0 / K[0, 1, 1])
    np.testing.assert_allclose(a[0, 0, 0], [(0 - 10.0) * 2 / K[0, 0, 0], (0 - 7.0) * 2 / K[0, 1, 1], 2.0])


def test_unproject_bad_shapes():
    K, E = _random_cameras(2)
    with pytest.raises(ValueError, match="depth must be"):
        depth_to_world_points(np.ones((2, 3)), K, E)
    with pytest.raises(ValueError, match="intrinsic"):
        depth_to_world_points(np.ones((2, 3, 4)), K[:1], E)
    with pytest.raises(ValueError, match="cam_from_world"):
        depth_to_world_points(np.ones((2, 3, 4)), K, E[:, :2])


def test_head_selection_and_bf16_heads_option():
    """VGGT.forward(heads=...) runs only the named heads; bf16 heads return float32 outputs
    close to the fp32 (official) heads."""
    import torch
    from vggt4d_ros.model.config import VGGTConfig
    from vggt4d_ros.model.vggt import VGGT
    from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
    images = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        full = model(images)
        sub = model(images, heads=("camera", "depth"))
        low = model(images, heads=("depth",), head_autocast_dtype=torch.bfloat16)
    assert "world_points" not in sub and "pose_enc" in sub
    assert torch.equal(sub["depth"], full["depth"]) and torch.equal(sub["pose_enc"], full["pose_enc"])
    assert low["depth"].dtype == torch.float32 and "pose_enc" not in low
    assert torch.allclose(low["depth"], full["depth"], rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="unknown heads"):
        model(images, heads=("normals",))
