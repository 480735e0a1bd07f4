"""Pose encoding <-> camera matrices; quaternion <-> rotation (x, y, z, w scalar-last)."""
from __future__ import annotations

import math

import pytest
import torch

from vggt4d_ros.model.pose_encoding import (extri_intri_to_pose_encoding, mat_to_quat,
                                            pose_encoding_to_extri_intri, quat_to_mat)


def _random_quats(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[:, 3:] < 0, -q, q)


def test_quaternion_convention_scalar_last() -> None:
    # 90 degrees about z: x -> y.  q = (0, 0, sin45, cos45) in (x, y, z, w).
    q = torch.tensor([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    r = quat_to_mat(q)
    assert torch.allclose(r @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6)
    assert torch.allclose(quat_to_mat(torch.tensor([0.0, 0, 0, 1])), torch.eye(3))


def test_round_trip_including_near_180_degrees() -> None:
    q = _random_quats(500)
    q = torch.cat([q, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1e-9],
                                    [0.7071, 0.7071, 0, 0]], dtype=torch.float64)])
    q = q / q.norm(dim=-1, keepdim=True)
    r = quat_to_mat(q)
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3, dtype=r.dtype).expand_as(r),
                          atol=1e-12)
    back = mat_to_quat(r)
    assert torch.allclose(quat_to_mat(back), r, atol=1e-12)
    # Same rotation, sign fixed (w >= 0) -> equal up to the sign ambiguity at w = 0.
    assert torch.allclose(back.abs(), q.abs(), atol=1e-8)


def test_unnormalised_quaternion_gives_rotation() -> None:
    q = _random_quats(10) * 3.7
    r = quat_to_mat(q)
    assert torch.allclose(torch.linalg.det(r), torch.ones(10, dtype=r.dtype), atol=1e-12)


def test_pose_encoding_round_trip_and_intrinsics() -> None:
    h, w = 294, 518
    q = _random_quats(6, seed=3)
    t = torch.randn(6, 3, dtype=torch.float64)
    fov = torch.tensor([[0.9, 1.4]], dtype=torch.float64).expand(6, 2)
    enc = torch.cat([t, q, fov], dim=-1)[None]                # [1, 6, 9]
    ext, intr = pose_encoding_to_extri_intri(enc, (h, w))
    assert ext.shape == (1, 6, 3, 4) and intr.shape == (1, 6, 3, 3)
    assert float(intr[0, 0, 1, 1]) == pytest.approx(h / 2 / math.tan(0.45), rel=1e-12)
    assert float(intr[0, 0, 0, 0]) == pytest.approx(w / 2 / math.tan(0.7), rel=1e-12)
    assert intr[0, 0, 0, 2] == w / 2 and intr[0, 0, 1, 2] == h / 2 and intr[0, 0, 2, 2] == 1
    back = extri_intri_to_pose_encoding(ext, intr, (h, w))
    assert torch.allclose(back, enc, atol=1e-10)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="9 values"):
        pose_encoding_to_extri_intri(torch.zeros(2, 8), (10, 10))
    with pytest.raises(ValueError, match="image_size_hw"):
        pose_encoding_to_extri_intri(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="rotation"):
        mat_to_quat(torch.zeros(2, 3))
