"""Shared pytest fixtures: location of the optional golden data, deterministic seeds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VGGT4D_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Path of ../shared/golden; skips (saying why) when it is absent."""
    if not (GOLDEN_DIR / "vggt" / "weights.safetensors").is_file():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (optional input; set VGGT4D_GOLDEN)")
    return GOLDEN_DIR
