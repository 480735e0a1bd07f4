"""Checkpoint loading: strict keys, readable errors, no unpickling beyond tensors, offline hub."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt4d_ros.model.checkpoint import (CheckpointError, compare_keys, load_vggt,
                                         read_state_dict, resolve_checkpoint)
from vggt4d_ros.model.config import VGGTConfig


def _tiny_cfg(golden_dir: Path) -> VGGTConfig:
    return VGGTConfig.from_json(golden_dir / "vggt" / "config.json")


def _weights(golden_dir: Path) -> Path:
    return golden_dir / "vggt" / "weights.safetensors"


@pytest.fixture(scope="module")
def golden_sd(golden_dir: Path) -> dict:
    return load_file(str(_weights(golden_dir)))


def _model_keys_without_heads_in_progress(model) -> set:
    return set(model.state_dict())


def test_load_safetensors_strict_equals_file(golden_dir: Path, golden_sd: dict) -> None:
    model = load_vggt(_weights(golden_dir), _tiny_cfg(golden_dir))
    sd = model.state_dict()
    assert set(sd) == set(golden_sd)
    for k, v in golden_sd.items():
        assert torch.equal(sd[k], v), k
    assert not model.training
    assert torch.allclose(model.aggregator._resnet_std.flatten(),
                          torch.tensor([0.229, 0.224, 0.225]))


def test_load_pt_weights_only(golden_dir: Path, golden_sd: dict, tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    torch.save(golden_sd, pt)
    model = load_vggt(pt, _tiny_cfg(golden_dir), dtype=torch.float64)
    key = "camera_head.embed_pose.weight"
    assert model.state_dict()[key].dtype == torch.float64
    assert torch.equal(model.state_dict()[key].float(), golden_sd[key])
    # A directory holding model.pt resolves to it.
    assert resolve_checkpoint(tmp_path) == pt


def test_missing_key_is_listed(golden_dir: Path, golden_sd: dict, tmp_path: Path) -> None:
    sd = dict(golden_sd)
    del sd["camera_head.trunk_norm.weight"]
    sd["camera_head.surprise"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as err:
        load_vggt(path, _tiny_cfg(golden_dir))
    msg = str(err.value)
    assert "1 missing keys: camera_head.trunk_norm.weight" in msg
    assert "1 unexpected keys: camera_head.surprise" in msg


def test_skip_track_head_allow_list(golden_dir: Path, golden_sd: dict, tmp_path: Path) -> None:
    model = load_vggt(_weights(golden_dir), _tiny_cfg(golden_dir), skip_track_head=True)
    assert model.track_head is None
    assert not any(k.startswith("track_head.") for k in model.state_dict())
    # Only track_head.* may be dropped: a missing depth-head key still fails.
    sd = {k: v for k, v in golden_sd.items() if k != "depth_head.norm.weight"}
    path = tmp_path / "no_depth_norm.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="depth_head.norm.weight"):
        load_vggt(path, _tiny_cfg(golden_dir), skip_track_head=True)


def test_truncated_and_corrupt_files(golden_dir: Path, golden_sd: dict, tmp_path: Path) -> None:
    data = _weights(golden_dir).read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vggt(trunc, _tiny_cfg(golden_dir))
    pt = tmp_path / "model.pt"
    torch.save(golden_sd, pt)
    trunc_pt = tmp_path / "trunc.pt"
    trunc_pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        load_vggt(trunc_pt, _tiny_cfg(golden_dir))
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError):
        read_state_dict(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("unpickled!",))


def test_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(path)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a VGGT checkpoint"):
        read_state_dict(tmp_path / "list.pt")


def test_wrong_architecture_reports_shapes(golden_dir: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_vggt(_weights(golden_dir), VGGTConfig.vggt_1b())   # tiny weights, 1B model
    msg = str(err.value)
    assert "shape mismatches" in msg and "aggregator.camera_token" in msg
    assert "different model size" in msg


def test_missing_file_and_offline_hub(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*facebook/VGGT-1B"):
        load_vggt(tmp_path / "nope.safetensors")
    # local_files_only with an empty cache = what an offline machine sees; no network used.
    with pytest.raises(CheckpointError) as err:
        load_vggt("facebook/VGGT-1B", cache_dir=tmp_path / "hf", local_files_only=True)
    msg = str(err.value)
    assert "facebook/VGGT-1B" in msg and "model.pt" in msg and "local path" in msg


def test_compare_keys_report() -> None:
    model = {"a": torch.zeros(2), "b": torch.zeros(3)}
    ckpt = {"b": torch.zeros(4), "c": torch.zeros(1)}
    missing, unexpected, shapes = compare_keys(model, ckpt)
    assert missing == ["a"] and unexpected == ["c"]
    assert shapes == ["b: checkpoint [4] vs model [3]"]
