"""SE(3) helpers and Umeyama Sim(3): exact recovery, degenerate inputs, robust rejection."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from vggt4d_ros.geometry.sim3 import (DegenerateSim3Error, Sim3, robust_umeyama_sim3,
                                      try_umeyama_sim3, umeyama_sim3)
from vggt4d_ros.geometry.transforms import (camera_center, compose, invert_se3, make_se3,
                                            pose_to_tqxyzw, quat_xyzw_from_rotmat,
                                            rotmat_from_quat_xyzw, to_3x4, to_homogeneous,
                                            transform_points, tqxyzw_to_pose)


def _random_se3(rng, n):
    rot = Rotation.random(n, random_state=int(rng.integers(1 << 30))).as_matrix()
    return make_se3(rot, rng.normal(size=(n, 3)))


def test_invert_compose_numpy_and_torch():
    rng = np.random.default_rng(0)
    cam_from_world = _random_se3(rng, 5)
    world_from_cam = invert_se3(cam_from_world)
    np.testing.assert_allclose(compose(cam_from_world, world_from_cam),
                               np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-12)
    # 3x4 in -> 3x4 out, and the same numbers through torch
    inv34 = invert_se3(to_3x4(cam_from_world))
    assert inv34.shape == (5, 3, 4)
    inv_t = invert_se3(torch.from_numpy(cam_from_world))
    assert isinstance(inv_t, torch.Tensor)
    np.testing.assert_allclose(inv_t.numpy(), world_from_cam, atol=1e-12)
    np.testing.assert_allclose(to_homogeneous(inv34), world_from_cam, atol=1e-12)
    # camera centre: the point that maps to the camera origin
    c = camera_center(cam_from_world)
    np.testing.assert_allclose(transform_points(cam_from_world, c[:, None, :])[:, 0], 0, atol=1e-12)


def test_quaternion_order_is_xyzw_and_roundtrips():
    rot_z90 = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    q = quat_xyzw_from_rotmat(rot_z90)
    np.testing.assert_allclose(q, [0, 0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    rng = np.random.default_rng(1)
    poses = _random_se3(rng, 7)
    np.testing.assert_allclose(tqxyzw_to_pose(pose_to_tqxyzw(poses)), poses, atol=1e-12)
    assert np.all(pose_to_tqxyzw(poses)[:, 6] >= 0)
    np.testing.assert_allclose(rotmat_from_quat_xyzw(q * 3.0), rot_z90, atol=1e-12)
    with pytest.raises(ValueError):
        rotmat_from_quat_xyzw(np.zeros(4))
    with pytest.raises(ValueError):
        invert_se3(np.eye(3))


@pytest.mark.parametrize("with_weights", [False, True])
def test_umeyama_recovers_known_sim3_exactly(with_weights):
    rng = np.random.default_rng(2)
    src = rng.normal(size=(50, 3)) * [3.0, 1.0, 0.5]
    truth = Sim3(2.7, Rotation.random(random_state=3).as_matrix(), np.array([1.0, -2.0, 0.5]))
    dst = truth.apply(src)
    w = rng.uniform(0.1, 2.0, 50) if with_weights else None
    est = umeyama_sim3(src, dst, w)
    assert est.scale == pytest.approx(2.7, rel=1e-10)
    np.testing.assert_allclose(est.rotation, truth.rotation, atol=1e-10)
    np.testing.assert_allclose(est.translation, truth.translation, atol=1e-10)
    # rigid fit keeps scale 1
    rigid_dst = Sim3(1.0, truth.rotation, truth.translation).apply(src)
    rigid = umeyama_sim3(src, rigid_dst, with_scale=False)
    assert rigid.scale == 1.0
    np.testing.assert_allclose(rigid.rotation, truth.rotation, atol=1e-10)


def test_sim3_algebra_and_pose_transform():
    rng = np.random.default_rng(4)
    a = Sim3(0.5, Rotation.random(random_state=5).as_matrix(), rng.normal(size=3))
    b = Sim3(3.0, Rotation.random(random_state=6).as_matrix(), rng.normal(size=3))
    pts = rng.normal(size=(10, 3))
    np.testing.assert_allclose(a.compose(b).apply(pts), a.apply(b.apply(pts)), atol=1e-12)
    np.testing.assert_allclose(a.inverse().apply(a.apply(pts)), pts, atol=1e-12)
    np.testing.assert_allclose(a.matrix() @ np.append(pts[0], 1.0),
                               np.append(a.apply(pts[0]), 1.0), atol=1e-12)
    # a camera pose moved by a Sim(3): a point seen at depth d is seen at depth s*d
    world_from_cam = _random_se3(rng, 1)[0]
    p_cam = np.array([0.1, -0.2, 2.0])
    p_world = transform_points(world_from_cam, p_cam[None])[0]
    new_world_from_cam = a.transform_world_from_cam(world_from_cam)
    p_cam_new = transform_points(invert_se3(new_world_from_cam), a.apply(p_world)[None])[0]
    np.testing.assert_allclose(p_cam_new, a.scale * p_cam, atol=1e-12)


@pytest.mark.parametrize("case", ["too_few", "coincident", "collinear", "nan", "zero_weights"])
def test_umeyama_rejects_degenerate_inputs(case):
    rng = np.random.default_rng(7)
    if case == "too_few":
        src = rng.normal(size=(2, 3))
    elif case == "coincident":
        src = np.ones((20, 3))
    elif case == "collinear":
        src = np.outer(np.linspace(-1, 1, 20), [1.0, 2.0, 3.0])
    else:
        src = rng.normal(size=(20, 3))
    dst = src * 2 + 1
    w = None
    if case == "nan":
        src[3, 1] = np.nan
    if case == "zero_weights":
        w = np.zeros(20)
        w[:2] = 1
    with pytest.raises(DegenerateSim3Error) as err:
        umeyama_sim3(src, dst, w)
    assert err.value.reason
    sim, reason = try_umeyama_sim3(src, dst, w)
    assert sim is None and reason == err.value.reason


def test_coplanar_points_are_not_degenerate():
    rng = np.random.default_rng(8)
    src = np.c_[rng.normal(size=(30, 2)), np.zeros(30)]
    truth = Sim3(1.3, Rotation.random(random_state=9).as_matrix(), np.array([0.2, 0.3, -1.0]))
    est = umeyama_sim3(src, truth.apply(src))
    np.testing.assert_allclose(est.rotation, truth.rotation, atol=1e-9)
    assert np.linalg.det(est.rotation) == pytest.approx(1.0)


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError):
        umeyama_sim3(np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        umeyama_sim3(np.zeros((5, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        umeyama_sim3(np.zeros((5, 3)), np.zeros((5, 3)), weights=-np.ones(5))


def test_robust_umeyama_rejects_outliers():
    rng = np.random.default_rng(10)
    src = rng.normal(size=(400, 3))
    truth = Sim3(0.8, Rotation.random(random_state=11).as_matrix(), np.array([3.0, 0.0, 1.0]))
    dst = truth.apply(src) + rng.normal(scale=1e-3, size=src.shape)
    bad = rng.choice(400, 80, replace=False)
    dst[bad] += rng.normal(scale=2.0, size=(80, 3))
    plain = umeyama_sim3(src, dst)
    robust = robust_umeyama_sim3(src, dst, weights=rng.uniform(0.5, 1.0, 400))
    assert abs(plain.scale - 0.8) > 1e-2          # the outliers do bias a plain fit
    assert robust.sim3.scale == pytest.approx(0.8, abs=1e-3)
    np.testing.assert_allclose(robust.sim3.rotation, truth.rotation, atol=5e-3)
    assert not robust.inliers[bad].any() or robust.inliers[bad].mean() < 0.05
    assert robust.inlier_fraction > 0.7
    assert robust.residual_rms < 5e-3
