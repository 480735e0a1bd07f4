"""tools/numerics_check (fast VGGT4D path vs the reference path) on the CPU: in float32 the two
paths agree far inside the bf16 tolerance, and the tolerance check does flag deviations."""
import json
import math

import pytest
import torch

from vggt4d_ros.tools import numerics_check as nc

TINY_ARGS = ["--tiny", "--frames", "4", "--height", "56", "--width", "84", "--device", "cpu"]


def _rot(axis: torch.Tensor, deg: float) -> torch.Tensor:
    """Rotation [3, 3] of ``deg`` degrees about ``axis`` (Rodrigues)."""
    k = axis / axis.norm()
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    a = math.radians(deg)
    return torch.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def _cameras(s: int = 3, seed: int = 0):
    """Random camera-from-world extrinsics [S, 3, 4] and intrinsics [S, 3, 3] (56x84 image)."""
    g = torch.Generator().manual_seed(seed)
    rots = torch.stack([_rot(torch.randn(3, generator=g), float(30 * i + 10)) for i in range(s)])
    ext = torch.cat([rots, torch.randn(s, 3, 1, generator=g)], dim=-1)
    intr = torch.tensor([[60.0, 0, 42], [0, 60.0, 28], [0, 0, 1]]).repeat(s, 1, 1)
    return ext, intr


def test_tiny_fp32_fast_path_matches_reference(tmp_path):
    """The whole tool on the CPU (fp32 both ways): exit 0, report says pass, every compared
    quantity far inside the bf16 tolerance, and pass 2 really ran with key masking."""
    out = tmp_path / "numerics.json"
    assert nc.main(TINY_ARGS + ["--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["pass"] is True and rep["label"] == "random weights: geometry is meaningless"
    assert rep["frames"] == 4 and rep["size"] == [56, 84] and rep["date_utc"]
    assert {r["metric"] for r in rep["checks"] if r["group"] == "pass1"} >= {
        "rotation_deg", "translation_abs", "fov_abs", "depth_rel", "depth_conf_rel"}
    assert all(r["ok"] for r in rep["checks"])
    for group in ("pass1", "pass2_same_mask", "final"):
        m = rep["groups"][group]
        assert m["rotation_deg"] <= 1e-3 and m["translation_abs"] <= 1e-5, (group, m)
        assert m["points_rel"] <= 1e-4, (group, m)
    p1 = rep["groups"]["pass1"]
    assert p1["fov_abs"] <= 1e-5 and p1["depth_rel"] <= 1e-5 and p1["depth_conf_rel"] <= 1e-5
    info = rep["info"]
    assert info["pass2_key_masking_exercised"] and info["reference_dynamic_tokens"] > 0
    assert info["saliency_max_abs"] <= 1e-4 and info["coarse_mask_iou"] >= 0.99
    assert info["fast_repeatable"]
    assert set(rep["times_s"]) >= {"reference", "fast", "fast_pass2_same_mask"}


def test_tf32_off_restores_the_settings():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with nc.tf32_off():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_tool_exits_1_when_a_metric_is_out_of_tolerance(tmp_path, monkeypatch):
    """Same run, depth tolerance made impossible: the report fails and the exit code is 1."""
    monkeypatch.setitem(nc.TOLERANCES, "depth_rel", -1.0)
    out = tmp_path / "numerics.json"
    assert nc.main(TINY_ARGS + ["--json", str(out)]) == 1
    rep = json.loads(out.read_text())
    failed = [(r["group"], r["metric"]) for r in rep["checks"] if not r["ok"]]
    assert rep["pass"] is False and failed == [("pass1", "depth_rel")]


def test_rotation_angle_is_the_geodesic_angle():
    ext, _ = _cameras()
    for deg in (1e-3, 0.5, 2.0, 90.0, 179.0):
        pert = ext.clone()
        pert[:, :, :3] = _rot(torch.tensor([0.3, -1.0, 0.5]), deg) @ ext[:, :, :3]
        assert nc.rotation_angle_deg(pert, ext).tolist() == pytest.approx([deg] * 3,
                                                                          rel=1e-3, abs=1e-4)


def test_comparison_flags_out_of_tolerance_cameras_and_depth():
    """A 2 deg rotation, a 3e-2 translation, a depth off by 1 % of its range and a 3 %
    focal change all fail; the same perturbations well inside the bounds pass."""
    ext, intr = _cameras()
    g = torch.Generator().manual_seed(1)
    depth = 1.0 + torch.rand(3, 56, 84, generator=g)

    def groups(deg: float, dt: float, ddepth: float, focal: float):
        e = ext.clone()
        e[1, :, :3] = _rot(torch.tensor([1.0, 2.0, 0.0]), deg) @ ext[1, :, :3]
        e[2, 0, 3] += dt
        d = depth.clone()
        d[0, 5, 7] += ddepth * float(depth.abs().max())
        k = intr.clone()
        k[2, 0, 0] *= 1 + focal
        p1 = nc.group_metrics(e, ext, k, intr, d, depth, (56, 84), d, depth)
        p2 = nc.group_metrics(e, ext, k, intr, d, depth, (56, 84), dense=False)
        return {"pass1": p1, "pass2_same_mask": p2}

    bad = nc.evaluate(groups(2.0, 3e-2, 1e-2, 3e-2))
    failed = {(r["group"], r["metric"]) for r in bad if not r["ok"]}
    assert failed == {("pass1", "rotation_deg"), ("pass1", "translation_abs"),
                      ("pass1", "depth_rel"), ("pass1", "depth_conf_rel"),
                      ("pass1", "focal_rel"), ("pass1", "fov_abs"),
                      ("pass2_same_mask", "rotation_deg"),
                      ("pass2_same_mask", "translation_abs")}
    rotation = next(r for r in bad if r["metric"] == "rotation_deg")
    assert rotation["value"] == pytest.approx(2.0, rel=1e-3) and rotation["tolerance"] == 1.0
    good = nc.evaluate(groups(0.5, 1e-2, 1e-4, 5e-3))
    assert all(r["ok"] for r in good), [r for r in good if not r["ok"]]


def test_missing_or_nan_metric_fails():
    rows = nc.evaluate({"pass1": {"rotation_deg": float("nan")}},
                       toleranced={"pass1": ("rotation_deg", "depth_rel")})
    assert [r["ok"] for r in rows] == [False, False]


def test_focal_skips_zero_fov_frames():
    """Random weights give FoV = relu(x) = 0, f = inf in both paths: not a deviation."""
    ext, intr = _cameras(2)
    k = intr.clone()
    k[0, 0, 0] = k[0, 1, 1] = float("inf")
    m = nc.camera_metrics(ext, ext, k, k.clone(), (56, 84))
    assert m["fov_abs"] == 0.0 and m["focal_rel"] == 0.0 and m["focal_frames"] == 2


def test_cli_rejects_bad_arguments():
    for bad in (["--height", "100"], ["--frames", "1"], ["--fast-set", "nokey"]):
        with pytest.raises(SystemExit) as exc:
            nc.main(["--device", "cpu"] + bad)
        assert exc.value.code == 2
