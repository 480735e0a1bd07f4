"""The ROS-free odometry conventions shared by the node and the replay (stream/odom.py)."""
import numpy as np

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
