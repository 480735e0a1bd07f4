"""Model sizes: the golden tiny config and the full VGGT-1B (built on the meta device)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from vggt4d_ros.model.config import VGGTConfig
from vggt4d_ros.model.vggt import VGGT


@pytest.fixture(scope="module")
def vggt_1b_meta() -> VGGT:
    with torch.device("meta"):
        return VGGT(VGGTConfig.vggt_1b())


def test_vggt_1b_key_and_parameter_count(vggt_1b_meta: VGGT) -> None:
    sd = vggt_1b_meta.state_dict()
    assert len(sd) == 1797
    assert sum(p.numel() for p in vggt_1b_meta.parameters()) == 1_256_537_516
    by_module = Counter()
    for name, p in vggt_1b_meta.named_parameters():
        parts = name.split(".")
        by_module[".".join(parts[:2]) if parts[0] == "aggregator" else parts[0]] += p.numel()
    # Spec breakdown (VGGT_ARCH.md "Size and keys"), in millions.
    assert round(by_module["aggregator.patch_embed"] / 1e5) == 3044
    assert round(by_module["aggregator.frame_blocks"] / 1e5) == 3024
    assert round(by_module["aggregator.global_blocks"] / 1e5) == 3024
    assert round(by_module["track_head"] / 1e6) == 66
    assert round(by_module["depth_head"] / 1e5) == 327 == round(by_module["point_head"] / 1e5)
    trunk = sum(p.numel() for n, p in vggt_1b_meta.named_parameters()
                if n.startswith("camera_head.trunk."))
    assert round(trunk / 1e5) == 2014
    assert tuple(sd["aggregator.patch_embed.pos_embed"].shape) == (1, 1 + 37 * 37, 1024)
    assert tuple(sd["aggregator.camera_token"].shape) == (1, 2, 1, 1024)
    assert tuple(sd["aggregator.register_token"].shape) == (1, 2, 4, 1024)
    assert tuple(sd["aggregator.frame_blocks.0.attn.q_norm.weight"].shape) == (64,)


def test_vggt_1b_key_names_match_official_layout(golden_dir: Path, vggt_1b_meta: VGGT) -> None:
    """The tiny official model has the same key names except for the number of DINO blocks."""
    tiny = {ln.split("\t")[0] for ln in
            (golden_dir / "vggt" / "weights_keys.tsv").read_text().splitlines() if ln.strip()}
    dino_block = re.compile(r"^aggregator\.patch_embed\.blocks\.(\d+)\.(.*)$")

    def normalise(keys):
        out = set()
        for k in keys:
            m = dino_block.match(k)
            out.add(f"aggregator.patch_embed.blocks.N.{m.group(2)}" if m else k)
        return out

    assert normalise(vggt_1b_meta.state_dict()) == normalise(tiny)
    blocks = {int(m.group(1)) for k in vggt_1b_meta.state_dict() if (m := dino_block.match(k))}
    assert blocks == set(range(24))


def test_from_json_reads_golden_config(golden_dir: Path) -> None:
    cfg = VGGTConfig.from_json(golden_dir / "vggt" / "config.json")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.head_dim) == (64, 24, 4, 16)
    assert cfg.patch_embed.embed_dim == 64 and cfg.patch_embed.depth == 2
    assert cfg.patch_embed.pos_grid == 37 and cfg.patch_embed.init_values == 1.0
    assert cfg.camera_head.dim_in == 128 and cfg.camera_head.trunk_depth == 4
    assert cfg.dpt.out_channels == (16, 32, 64, 64) and cfg.dpt.features == 32
    assert cfg.track_head.hidden_size == 64
    assert cfg.track_head.feature_extractor.out_channels == (16, 32, 64, 64)
    assert cfg.track_head.feature_extractor.down_ratio == 2
    assert not cfg.track_head.feature_extractor.pos_embed
    assert cfg.num_special_tokens == 5


def test_vggt_1b_defaults() -> None:
    cfg = VGGTConfig.vggt_1b()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.rope_freq) == (1024, 24, 16, 100.0)
    assert cfg.patch_embed.embed_dim == 1024 and cfg.patch_embed.depth == 24
    assert cfg.camera_head.dim_in == 2048 and cfg.camera_head.num_iterations == 4
    assert cfg.dpt.out_channels == (256, 512, 1024, 1024)
    assert cfg.dpt.intermediate_layer_idx == (4, 11, 17, 23)
    assert cfg.track_head.features == 128 and cfg.track_head.hidden_size == 384


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        VGGTConfig(embed_dim=100, num_heads=16)
    with pytest.raises(ValueError, match="not found"):
        VGGTConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VGGTConfig.from_json(tmp_path / "bad.json")


def test_config_json_round_trip(tmp_path: Path) -> None:
    import json
    cfg = VGGTConfig.vggt_1b()
    cfg.track_head.hidden_size = 96
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert VGGTConfig.from_json(path) == cfg
