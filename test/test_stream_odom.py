"""The ROS-free odometry conventions shared by the node and the replay (stream/odom.py)."""
import numpy as np
import pytest

from vggt4d_ros.stream.odom import LINK_FROM_OPTICAL, OdomFrames, covariance_in_base


def test_base_starts_at_identity_and_camera_moves_forward_along_base_x():
    frames = OdomFrames(LINK_FROM_OPTICAL)
    np.testing.assert_allclose(frames.odom_from_base(np.eye(4)), np.eye(4), atol=1e-12)
    w_c = np.eye(4)
    w_c[2, 3] = 1.0                     # one metre along the optical z axis (forward)
    np.testing.assert_allclose(frames.odom_from_base(w_c)[:3, 3], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(frames.points_to_odom(np.array([[0.0, 0.0, 2.0]]))[0],
                               [2.0, 0.0, 0.0], atol=1e-6)


def test_covariance_in_base_rotates_and_never_degenerates():
    cov = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = covariance_in_base(cov, LINK_FROM_OPTICAL)
    # optical z (3) -> base x, optical x (1) -> base -y, optical y (2) -> base -z
    np.testing.assert_allclose(np.diag(out), [3.0, 1.0, 2.0, 6.0, 4.0, 5.0])
    assert np.all(np.diag(covariance_in_base(np.zeros((6, 6)), LINK_FROM_OPTICAL)) > 0)
    assert np.all(np.diag(covariance_in_base(None, LINK_FROM_OPTICAL)) < 1e300)


def _pose(yaw: float, t) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    m = np.eye(4)
    m[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    m[:3, 3] = t
    return m


def test_twist_estimator_body_velocity_and_unknowns():
    """Constant forward speed 2 m/s along the body x axis while yawing at 0.5 rad/s: the twist
    is (2, 0, 0, 0, 0, 0.5) in base_link axes; variance = summed pose variances / dt².
    Unknown (zeros, 1e6) for the first frame, a new sequence, an untrusted frame and the
    frame after it, a gap > max_gap_s, a non-finite pose."""
    from vggt4d_ros.stream.odom import UNKNOWN_TWIST_VARIANCE, TwistEstimator
    est = TwistEstimator(max_gap_s=0.5)
    cov = np.eye(6) * 1e-4
    dt_ns = 100_000_000
    yaw_rate, speed = 0.5, 2.0

    def pose_at(k: int) -> np.ndarray:
        # exact arc: forward speed v, yaw rate w -> position on a circle of radius v / w
        t = k * 0.1
        r = speed / yaw_rate
        return _pose(yaw_rate * t, [r * np.sin(yaw_rate * t), r * (1 - np.cos(yaw_rate * t)), 0])

    def unknown(result) -> bool:
        tw, c = result
        return np.all(tw == 0) and np.allclose(np.diag(c), UNKNOWN_TWIST_VARIANCE)
    assert unknown(est.update(0, 0, pose_at(0), cov, True))            # first frame
    tw, c = est.update(dt_ns, 0, pose_at(1), cov, True)
    # chord of the arc: the backward difference sees the mean heading of the step
    assert tw[3:] == pytest.approx([0, 0, yaw_rate], abs=1e-9)
    assert np.linalg.norm(tw[:3]) == pytest.approx(speed, rel=1e-3) and abs(tw[2]) < 1e-12
    assert np.diag(c) == pytest.approx([2e-4 / 0.01] * 6)
    assert unknown(est.update(2 * dt_ns, 1, pose_at(2), cov, True))    # new sequence
    assert not unknown(est.update(3 * dt_ns, 1, pose_at(3), cov, True))
    assert unknown(est.update(4 * dt_ns, 1, pose_at(4), cov, False))   # held pose
    assert unknown(est.update(5 * dt_ns, 1, pose_at(5), cov, True))    # ... and after it
    assert unknown(est.update(5 * dt_ns + 600_000_000, 1, pose_at(6), cov, True))   # gap
    bad = pose_at(7)
    bad[0, 3] = np.nan
    assert unknown(est.update(5 * dt_ns + 700_000_000, 1, bad, cov, True))
    est.reset()
    assert unknown(est.update(9 * dt_ns, 1, pose_at(9), cov, True))
    with pytest.raises(ValueError):
        TwistEstimator(max_gap_s=0)
