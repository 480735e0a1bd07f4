"""Preprocessing equals the official load_and_preprocess_images; bad input -> ValueError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.preprocess import preprocess_images
from vggt4d_ros.model.vggt import VGGT


@pytest.fixture(scope="module")
def case_e(golden_dir: Path) -> dict:
    return load_file(str(golden_dir / "vggt" / "case_e.safetensors"))


@pytest.mark.golden
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_preprocess_matches_golden(case_e: dict, mode: str, tmp_path: Path) -> None:
    raws = [case_e["in.raw0_hwc_uint8"].numpy(), case_e["in.raw1_hwc_uint8"].numpy()]
    paths = []
    for i, raw in enumerate(raws):
        paths.append(tmp_path / f"raw{i}.png")
        Image.fromarray(raw).save(paths[-1])
    ref = case_e[f"out.preprocessed_{mode}"].float() / 255.0
    for inputs in (raws, paths, [Image.open(p) for p in paths]):
        out = preprocess_images(inputs, mode=mode)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    for i, raw in enumerate(raws):
        single = preprocess_images(raw, mode=mode)
        ref_i = case_e[f"out.preprocessed_{mode}_single{i}"].float() / 255.0
        assert single.shape == ref_i.shape
        assert torch.allclose(single, ref_i, atol=1e-5, rtol=0)


def test_rgba_composited_on_white_and_grey_accepted() -> None:
    rgba = np.zeros((28, 56, 4), np.uint8)
    rgba[..., 0] = 255                       # red but fully transparent -> white
    out = preprocess_images([rgba], target_size=56)
    assert out.shape == (1, 3, 28, 56)
    assert torch.allclose(out, torch.ones_like(out))
    grey = np.full((28, 56), 128, np.uint8)
    out = preprocess_images([grey], target_size=56)
    assert torch.allclose(out, torch.full_like(out, 128 / 255))


def test_crop_mode_crops_tall_images_and_pads_mixed_batches() -> None:
    tall = np.zeros((400, 100, 3), np.uint8)
    wide = np.zeros((100, 400, 3), np.uint8)
    out = preprocess_images([tall, wide])           # crop: 518x518 and 518 wide x 126 high
    assert out.shape == (2, 3, 518, 518)
    # The wide frame is centred on white: top rows white, centre black.
    assert torch.all(out[1, :, 0] == 1.0) and torch.all(out[1, :, 259] == 0.0)


@pytest.mark.parametrize("bad, match", [
    ([], "at least one image"),
    ([np.zeros((10, 10, 3), np.float32)], "uint8"),
    ([np.zeros((10, 10, 2), np.uint8)], "HxWx3"),
    ([np.zeros((0, 10, 3), np.uint8)], "empty"),
    ([np.zeros((4, 2000, 3), np.uint8)], "too elongated"),
    ([12345], "unsupported type"),
    (["/nonexistent/image.png"], "file not found"),
])
def test_preprocess_rejects_bad_input(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        preprocess_images(bad)


def test_preprocess_rejects_bad_mode_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([np.zeros((14, 14, 3), np.uint8)], mode="stretch")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        preprocess_images([junk])


@pytest.fixture(scope="module")
def small_model() -> VGGT:
    torch.manual_seed(0)
    cfg = VGGTConfig.from_dict({
        "embed_dim": 32, "depth": 2, "num_heads": 2,
        "patch_embed": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "camera_head": {"dim_in": 64, "trunk_depth": 1, "num_heads": 2},
        "dpt": {"features": 8, "out_channels": [8, 8, 8, 8],
                "intermediate_layer_idx": [0, 0, 1, 1]},
    })
    return VGGT(cfg, enable_track=False).eval()


@pytest.mark.parametrize("images, match", [
    (np.zeros((1, 3, 28, 28), np.float32), "torch.Tensor"),
    (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), "float"),
    (torch.zeros(3, 28, 28), r"\[S, 3, H, W\]"),
    (torch.zeros(1, 28, 28, 3), "3 \\(RGB\\) channels"),
    (torch.zeros(1, 3, 30, 28), "multiples of 14"),
    (torch.zeros(1, 3, 0, 28), "multiples of 14"),
    (torch.full((1, 3, 28, 28), 255.0), r"\[0, 1\]"),
    (torch.full((1, 3, 28, 28), -0.5), r"\[0, 1\]"),
    (torch.full((1, 3, 28, 28), float("nan")), r"\[0, 1\]"),
])
def test_model_rejects_bad_images(small_model: VGGT, images, match) -> None:
    with pytest.raises(ValueError, match=match):
        small_model(images)


def test_model_rejects_frames_of_different_sizes(small_model: VGGT) -> None:
    with pytest.raises(ValueError, match="different sizes"):
        small_model([torch.rand(3, 28, 28), torch.rand(3, 28, 42)])
    with pytest.raises(ValueError, match="at least one"):
        small_model([])
    same = small_model.validate_images([torch.rand(3, 28, 28), torch.rand(3, 28, 28)])
    assert same.shape == (1, 2, 3, 28, 28)


def test_model_output_shapes_and_bad_controls(small_model: VGGT) -> None:
    from vggt4d_ros.model.hooks import AttentionControl
    images = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        out = small_model(images)
    assert out["pose_enc"].shape == (1, 2, 9) and len(out["pose_enc_list"]) == 4
    assert out["depth"].shape == (1, 2, 28, 42, 1) and out["depth_conf"].shape == (1, 2, 28, 42)
    assert out["world_points"].shape == (1, 2, 28, 42, 3)
    assert out["extrinsic"].shape == (1, 2, 3, 4) and out["intrinsic"].shape == (1, 2, 3, 3)
    assert out["images"].shape == (1, 2, 3, 28, 42)
    with pytest.raises(ValueError, match="key_keep has shape"):
        small_model(images, control=AttentionControl(key_keep=torch.ones(1, 2, 5, dtype=torch.bool),
                                                     key_mask_layers={0}))
    with pytest.raises(ValueError, match="outside"):
        small_model(images, control=AttentionControl(capture={"global": {7}},
                                                     on_qk=lambda *a: None))
    with pytest.raises(ValueError, match="on_qk is None"):
        small_model(images, control=AttentionControl(capture={"frame": {0}}))


def test_bf16_autocast_recipe_keeps_heads_float32(small_model: VGGT) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 28, 42)
    seen = []
    from vggt4d_ros.model.hooks import AttentionControl
    ctrl = AttentionControl(capture={"global": {0}},
                            on_qk=lambda kind, i, q, k: seen.append(q.dtype))
    with torch.no_grad():
        ref = small_model(images)
        out = small_model(images, control=ctrl, autocast_dtype=torch.bfloat16)
    # q reaches the hook in the autocast dtype of this device (CUDA LayerNorm -> float32,
    # CPU -> bfloat16); the hook must accept both.
    assert len(seen) == 1 and seen[0] in (torch.float32, torch.bfloat16)
    for key in ("pose_enc", "depth", "world_points", "extrinsic"):
        assert out[key].dtype == torch.float32, key
        assert not torch.equal(out[key], ref[key]), key    # bf16 really was used
        assert torch.allclose(out[key], ref[key], atol=0.1, rtol=0.1), key
