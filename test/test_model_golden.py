"""Our VGGT reproduces the official code on the golden tiny random-weight model.

Golden data: ../shared/golden/vggt (README.md there): tolerance rtol = atol = 1e-4.
Also checks the VGGT4D hooks (Q/K capture after qk-norm + RoPE, key suppression) against
../shared/golden/vggt4d/case_seq10.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vggt4d_ros.model.checkpoint import load_vggt
from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.hooks import AttentionControl
from vggt4d_ros.model.vggt import VGGT

RTOL = ATOL = 1e-4
CASES = ["case_a", "case_b", "case_c", "case_d"]
SALIENCY_LAYERS = [0, 3, 4, 5, 6, 7, 17, 18, 19, 20, 21]


def _close(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, rtol=RTOL, atol=ATOL), f"{name}: max abs diff {err:.3e}"


@pytest.fixture(scope="module")
def golden_model(golden_dir: Path) -> VGGT:
    cfg = VGGTConfig.from_json(golden_dir / "vggt" / "config.json")
    return load_vggt(golden_dir / "vggt" / "weights.safetensors", cfg)   # strict


@pytest.fixture(scope="module")
def case_results(golden_dir: Path, golden_model: VGGT) -> Dict[str, tuple]:
    """Run every case once: (golden tensors, our output dict, our aggregator layers)."""
    results = {}
    for name in CASES:
        ref = load_file(str(golden_dir / "vggt" / f"{name}.safetensors"))
        images = ref["in.images"].float() / 255.0
        query = ref.get("in.query_points")
        with torch.no_grad():
            out = golden_model(images, query_points=query)
            layers, psi = golden_model.aggregator(images[None])
        results[name] = (ref, out, layers, psi)
    return results


@pytest.mark.golden
@pytest.mark.parametrize("case", CASES)
def test_camera_outputs_match_golden(case_results, case: str) -> None:
    ref, out, _, _ = case_results[case]
    for i in range(4):
        _close(out["pose_enc_list"][i][0], ref[f"out.pose_enc_iter{i}"], f"{case} pose_enc_iter{i}")
    _close(out["pose_enc"][0], ref["out.pose_enc"], f"{case} pose_enc")
    _close(out["extrinsic"][0], ref["out.extrinsic"], f"{case} extrinsic")
    _close(out["intrinsic"][0], ref["out.intrinsic"], f"{case} intrinsic")


@pytest.mark.golden
@pytest.mark.parametrize("case", CASES)
def test_aggregator_tokens_match_golden(case_results, case: str) -> None:
    ref, _, layers, psi = case_results[case]
    assert psi == int(ref["agg.patch_start_idx"]) == 5
    assert len(layers) == 24
    _close(layers[4][0], ref["agg.layer04"], f"{case} layer04")
    _close(layers[23][0], ref["agg.layer23"], f"{case} layer23")


@pytest.mark.golden
@pytest.mark.parametrize("case", ["case_a", "case_b", "case_c"])
def test_dense_outputs_match_golden(case_results, case: str) -> None:
    ref, out, _, _ = case_results[case]
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        _close(out[key][0], ref[f"out.{key}"], f"{case} {key}")


@pytest.mark.golden
def test_tracks_match_golden(case_results) -> None:
    ref, out, _, _ = case_results["case_d"]
    assert torch.allclose(out["track"][0], ref["out.track"], rtol=0, atol=1e-2)
    for i in range(4):
        assert torch.allclose(out["track_list"][i][0], ref[f"out.track_iter{i}"], rtol=0, atol=1e-2)
    _close(out["vis"][0], ref["out.vis"], "vis")
    _close(out["conf"][0], ref["out.conf"], "conf")


@pytest.mark.golden
def test_model_keys_match_official_tiny(golden_dir: Path, golden_model: VGGT) -> None:
    """Same key names and shapes as the official tiny state dict (weights_keys.tsv)."""
    rows = [ln.split("\t") for ln in (golden_dir / "vggt" / "weights_keys.tsv").read_text()
            .splitlines() if ln.strip() and not ln.startswith("key\t")]
    official = {r[0]: r[1] for r in rows}
    own = golden_model.state_dict()
    assert len(official) == 1489
    assert set(own) == set(official), (sorted(set(own) ^ set(official))[:10])
    for k, v in own.items():
        assert str(list(v.shape)) == official[k], (k, tuple(v.shape), official[k])
    assert "aggregator._resnet_mean" not in own        # non-persistent buffers


# ---------------------------------------------------------------------------- hooks
@pytest.fixture(scope="module")
def seq10(golden_dir: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(golden_dir / "vggt4d" / "case_seq10.safetensors"))


@pytest.mark.golden
def test_control_none_equals_empty_control(golden_model: VGGT, seq10) -> None:
    images = seq10["in.images"][:4].float() / 255.0
    with torch.no_grad():
        a = golden_model(images)
        b = golden_model(images, control=AttentionControl())
        c = golden_model(images, control=AttentionControl(
            key_keep=torch.ones(1, 4, 5 + 192, dtype=torch.bool), key_mask_layers={0, 1}))
    for key in ("pose_enc", "extrinsic", "intrinsic"):
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], c[key]), key


@pytest.mark.golden
def test_captured_qk_and_encoder_features_match_golden(golden_model: VGGT, seq10) -> None:
    images = seq10["in.images"].float() / 255.0
    s, n, p = images.shape[0], seq10["mask.token"].shape[1], 5
    got: Dict[str, torch.Tensor] = {}

    def on_qk(kind: str, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        # q, k [B', heads, T, d] -> per frame [S, heads, N, d], patch tokens only.
        heads, d = q.shape[1], q.shape[3]
        for name, x in (("q", q), ("k", k)):
            x = x.reshape(s, heads, p + n, d) if kind == "frame" else \
                x.reshape(heads, s, p + n, d).transpose(0, 1)
            got[f"qk.{kind}_{name}.L{layer:02d}"] = x[:, :, p:].clone()

    control = AttentionControl(capture={"global": set(SALIENCY_LAYERS), "frame": {0}},
                               on_qk=on_qk, encoder_features=True)
    with torch.no_grad():
        out = golden_model(images, control=control)
    _close(out["pose_enc"][0], seq10["pass1.pose_enc"], "pass1 pose_enc")
    _close(out["encoder_features"], seq10["enc_feat"], "enc_feat")
    for layer in SALIENCY_LAYERS:
        for name in ("q", "k"):
            key = f"qk.global_{name}.L{layer:02d}"
            _close(got[key], seq10[key], key)
    _close(got["qk.frame_q.L00"], seq10["qk.frame_q.L00"], "qk.frame_q.L00")


def _token_keep(pixel_mask: torch.Tensor) -> torch.Tensor:
    """[S, H, W] bool dynamic mask -> key_keep [1, S, 5+N] (a patch is dynamic if any pixel is)."""
    dyn = F.max_pool2d(pixel_mask.float()[:, None], 14, 14)[:, 0] > 0.5   # [S, h, w]
    dyn = dyn.flatten(1)
    special = torch.ones(dyn.shape[0], 5, dtype=torch.bool)
    return torch.cat([special, ~dyn], dim=1)[None]


@pytest.mark.golden
def test_key_suppression_reproduces_golden_pass2(golden_model: VGGT, seq10) -> None:
    images = seq10["in.images"].float() / 255.0
    keep_gt = _token_keep(seq10["in.gt_square_mask"])
    keep_coarse = _token_keep(seq10["mask.coarse"])
    assert torch.equal(~keep_coarse[0, :, 5:], seq10["mask.token"])
    with torch.no_grad():
        gt = golden_model(images, control=AttentionControl(key_keep=keep_gt,
                                                           key_mask_layers={0, 1, 2, 3, 4}))
        co = golden_model(images, control=AttentionControl(key_keep=keep_coarse,
                                                           key_mask_layers={0, 1, 2, 3, 4}))
    _close(gt["pose_enc"][0], seq10["pass2_gtmask.pose_enc"], "pass2_gtmask pose_enc")
    _close(gt["extrinsic"][0], seq10["pass2_gtmask.extrinsic"], "pass2_gtmask extrinsic")
    _close(co["pose_enc"][0], seq10["pass2.pose_enc"], "pass2 pose_enc")
    _close(co["extrinsic"][0], seq10["pass2.extrinsic"], "pass2 extrinsic")
    # The intervention must matter (else this test could not fail).
    assert (gt["pose_enc"][0] - seq10["pass1.pose_enc"]).abs().max() > 1e-3


@pytest.mark.golden
def test_cached_patch_tokens_give_identical_result(golden_model: VGGT, seq10) -> None:
    images = seq10["in.images"][:3].float() / 255.0
    with torch.no_grad():
        tokens = golden_model.aggregator.embed_patches(images[None])
        a = golden_model(images)
        b = golden_model(images, patch_tokens=tokens)
    assert torch.equal(a["pose_enc"], b["pose_enc"])
