"""Synthetic world: exact geometry, exact masks, determinism (vggt4d_ros.tools.synth)."""
from __future__ import annotations

import numpy as np
import pytest

from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, invert_se3

W, H = 160, 96


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return SynthWorld(SynthConfig(width=W, height=H, num_frames=12, num_objects=3, seed=3))


def _unproject(depth: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    """World points [H,W,3] of integer pixel coordinates (pixel centres, OpenCV)."""
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float64)
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    pc = np.stack([x, y, depth.astype(np.float64)], axis=-1)
    wfc = invert_se3(cam_from_world)
    return pc @ wfc[:3, :3].T + wfc[:3, 3]


def _project(pw: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray):
    pc = pw @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    uv = pc[..., :2] / pc[..., 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    return uv, pc[..., 2]


def test_frame_fields_shapes_and_conventions(world: SynthWorld) -> None:
    f = world.render(0)
    assert f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
    assert f.depth.shape == (H, W) and f.depth.dtype == np.float32
    assert f.mask.dtype == bool and f.object_id.dtype == np.int16
    assert np.array_equal(f.mask, f.object_id >= 0)
    assert np.isfinite(f.depth).all() and (f.depth > 0).all()
    R = f.cam_from_world[:3, :3]
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
    # optical axes: camera looks roughly along world +x (room length), image y points down (-z)
    wfc = f.world_from_cam
    assert wfc[:3, 2] @ np.array([1.0, 0, 0]) > 0.8
    assert wfc[:3, 1] @ np.array([0, 0, -1.0]) > 0.8
    assert f.stamp_ns == world.config.start_stamp_ns
    assert world.render(3).stamp_ns - f.stamp_ns == round(3 * 1e9 / world.config.fps)


def test_every_object_is_visible_and_masks_nonempty(world: SynthWorld) -> None:
    seq = world.render_all()
    for k in range(3):
        assert (seq.object_id == k).any(axis=(1, 2)).mean() > 0.5, f"object {k} rarely visible"
    assert seq.mask.any(axis=(1, 2)).all()


def test_reprojection_colour_matches_on_static_pixels(world: SynthWorld) -> None:
    """Depth of frame i + GT poses + K reproject onto the same colours in frame j."""
    for i, j in [(0, 5), (2, 11), (7, 1)]:
        fi, fj = world.render(i), world.render(j)
        pw = _unproject(fi.depth, fi.intrinsic, fi.cam_from_world)
        uv, z = _project(pw, fj.intrinsic, fj.cam_from_world)
        un, vn = np.rint(uv[..., 0]).astype(int), np.rint(uv[..., 1]).astype(int)
        inside = (un >= 0) & (un < W) & (vn >= 0) & (vn < H) & (z > 0) & ~fi.mask
        un_c, vn_c = np.clip(un, 0, W - 1), np.clip(vn, 0, H - 1)
        # visible in j: the rendered depth there agrees with the reprojected depth
        visible = inside & ~fj.mask[vn_c, un_c] & (np.abs(fj.depth[vn_c, un_c] - z) < 0.02 * z)
        assert visible.mean() > 0.4
        err = np.abs(fi.image.astype(int) - fj.image[vn_c, un_c].astype(int)).max(axis=-1)[visible]
        # nearest sampling moves up to half a pixel: small errors on smooth texture, large on
        # checker/stripe edges only
        assert np.median(err) <= 2, f"median colour error {np.median(err)} for ({i},{j})"


def test_reprojected_points_hit_exactly_the_same_surface(world: SynthWorld) -> None:
    """Casting a ray from camera j at the world point of a pixel of frame i hits that exact
    point (when not occluded) and sees the same colour: exact geometry, no sampling."""
    i, j = 1, 9
    fi = world.render(i)
    pw = _unproject(fi.depth, fi.intrinsic, fi.cam_from_world)[~fi.mask][::7]
    wfc_j = world.world_from_cam_at(world.time_s(j))
    o = wfc_j[:3, 3]
    s, rgb, obj = world.cast_rays(world.time_s(j), o, pw - o)
    visible = np.abs(s - 1.0) < 1e-6
    assert visible.mean() > 0.5
    assert (s < 1.0 + 1e-6).all(), "a ray went through the surface it should hit"
    assert (obj[visible] == -1).all()
    # the colour of the same points rendered at time i
    wfc_i = world.world_from_cam_at(world.time_s(i))
    s_i, rgb_i, _ = world.cast_rays(world.time_s(i), wfc_i[:3, 3], pw - wfc_i[:3, 3])
    assert np.allclose(s_i, 1.0, atol=1e-6)
    assert np.abs(rgb[visible] - rgb_i[visible]).max() < 1e-4


def test_masks_cover_exactly_the_moving_objects() -> None:
    """Removing the objects changes exactly the masked pixels, and only by hiding them."""
    cfg = dict(width=W, height=H, num_frames=6, seed=5)
    with_objs = SynthWorld(SynthConfig(num_objects=2, **cfg))
    empty = SynthWorld(SynthConfig(num_objects=0, **cfg))
    for i in (0, 5):
        a, b = with_objs.render(i), empty.render(i)
        assert np.allclose(a.cam_from_world, b.cam_from_world)
        assert not b.mask.any()
        static = ~a.mask
        assert np.array_equal(a.depth[static], b.depth[static])
        assert np.array_equal(a.image[static], b.image[static])
        assert (a.depth[a.mask] < b.depth[a.mask]).all()   # objects are in front of the room
        assert a.mask.sum() > 20


def test_render_is_deterministic_from_seed() -> None:
    cfg = SynthConfig(width=64, height=48, num_frames=3, num_objects=2, seed=11)
    a, b = SynthWorld(cfg).render(2), SynthWorld(cfg).render(2)
    for name in ("image", "depth", "object_id", "cam_from_world", "intrinsic"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = SynthWorld(SynthConfig(width=64, height=48, num_frames=3, num_objects=2, seed=12)).render(2)
    assert not np.array_equal(a.image, c.image)


def test_render_all_stacks_lazy_frames() -> None:
    w = SynthWorld(SynthConfig(width=40, height=30, num_frames=4, num_objects=1, seed=0))
    seq = w.render_all()
    assert len(seq) == 4 and seq.image.shape == (4, 30, 40, 3) and seq.stamp_ns.dtype == np.int64
    assert np.array_equal(seq.image[3], w.render(3).image)
    assert np.all(np.diff(seq.stamp_ns) > 0)


@pytest.mark.parametrize("kwargs", [dict(width=0), dict(height=-1), dict(num_frames=0),
                                    dict(num_objects=4), dict(num_objects=-1), dict(fps=0.0)])
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)


def test_render_index_out_of_range() -> None:
    w = SynthWorld(SynthConfig(width=8, height=8, num_frames=2, num_objects=0))
    with pytest.raises(IndexError):
        w.render(2)


def test_camera_twist_matches_pose_differences(world: SynthWorld) -> None:
    """Twist (camera frame) integrates to the next pose over a short step."""
    t, dt = world.time_s(4), 1e-3
    tw = world.camera_twist_at(t)
    a, b = world.world_from_cam_at(t), world.world_from_cam_at(t + dt)
    assert np.allclose(a[:3, :3].T @ (b[:3, 3] - a[:3, 3]) / dt, tw[:3], atol=1e-2)
    from scipy.spatial.transform import Rotation
    w = Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).as_rotvec() / dt
    assert np.allclose(w, tw[3:], atol=1e-2)
    assert np.linalg.norm(tw[:3]) > 0.05          # the camera really moves
