"""StreamEngine with the ground-truth predictor on the synthetic world: accuracy and the map.

ATE bound (1,000 frames, 124 windows of 16 frames / stride 8, 64x48 images). Injected noise
per frame: 0.1 deg rotation, camera-centre noise 0.2 % of the median depth (≈ 8 mm at the
≈ 4 m median depth of the room), 1 % multiplicative depth noise, a fresh random gauge and
scale per window. Each window's Sim(3) is fitted on 8 noisy anchor frames, so its error is
about one frame's pose noise: ≈ 8 mm translation + 0.1 deg · 4 m ≈ 7 mm lever arm → ≈ 1 cm
per window. Chained over 124 windows as a random walk that is √124 ≈ 11 → ≈ 0.11 m worst
end-point drift; ATE (RMS after the best Sim(3)) is smaller. Measured: 0.060 m RMS,
0.13 m max without keyframes (0.036 m / 0.093 m with 2 keyframes). Bounds below: RMS
0.15 m and max 0.35 m (≈ 2.5x measured, well under the ≈ 2.4 m camera path extent, and far
below what one broken window would cause), and the noise-free run must be exact (1e-5).
"""
import numpy as np

from vggt4d_ros.geometry.sim3 import umeyama_sim3
from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.stream.stitcher import COV_MAX_VAR, COV_MIN_VAR
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld


def _run(num_frames, noise=True, keyframes=0, check_window=None, seed=0):
    world = SynthWorld(SynthConfig(width=64, height=48, num_frames=num_frames, num_objects=2,
                                   seed=seed))
    kw = dict(depth_noise=0.01, rot_noise_deg=0.1, trans_noise=0.002) if noise else \
        dict(depth_noise=0.0, rot_noise_deg=0.0, trans_noise=0.0)
    gt = GroundTruthPredictor(world, seed=1, **kw)
    engine = StreamEngine(gt, StreamConfig(window_size=16, stride=8, max_keyframes=keyframes,
                                           voxel_size=0.1))
    truth, outs, index_of_stamp = {}, [], {}
    for i in range(num_frames):
        f = gt.render(i)
        truth[f.stamp_ns] = np.linalg.inv(f.cam_from_world)
        index_of_stamp[f.stamp_ns] = i
        new = engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
        if new and check_window is not None:
            check_window(engine, gt, index_of_stamp)
        outs += new
    outs += engine.flush()
    if check_window is not None:
        check_window(engine, gt, index_of_stamp)
    return engine, outs, truth


def _ate(outs, truth):
    est = np.array([o.world_from_cam[:3, 3] for o in outs])
    ref = np.array([truth[o.stamp_ns][:3, 3] for o in outs])
    sim = umeyama_sim3(est, ref)
    err = np.linalg.norm(sim.apply(est) - ref, axis=1)
    return float(np.sqrt(np.mean(err ** 2))), float(err.max()), sim


def test_noise_free_stitching_is_exact_and_starts_at_identity():
    engine, outs, truth = _run(200, noise=False)
    rms, worst, _ = _ate(outs, truth)
    print(f"noise-free ATE rms={rms:.2e} max={worst:.2e}")
    assert worst < 1e-5
    np.testing.assert_allclose(outs[0].world_from_cam, np.eye(4), atol=1e-9)
    # relative pose of two frames far apart equals the truth up to the odometry scale
    o0, o1 = outs[0], outs[150]
    t_rel = (np.linalg.inv(o0.world_from_cam) @ o1.world_from_cam)[:3, 3]
    t_true = (np.linalg.inv(truth[o0.stamp_ns]) @ truth[o1.stamp_ns])[:3, 3]
    np.testing.assert_allclose(t_rel / np.linalg.norm(t_rel), t_true / np.linalg.norm(t_true),
                               atol=1e-5)
    assert engine.state == "TRACKING"


def test_1000_frames_ate_bounded_no_drift_explosion_and_static_map_has_no_moving_points():
    fused_checked = {"windows": 0, "points": 0}

    def check_window(engine, gt, index_of_stamp):
        win = engine.last_window
        if win is None or win.state != "TRACKING" or fused_checked.get("last") == win.window_index:
            return
        fused_checked["last"] = win.window_index
        for stamp in np.unique(win.source_stamp_ns):
            sel = win.source_stamp_ns == stamp
            obj = gt._frame(index_of_stamp[int(stamp)]).object_id
            u, v = win.source_uv[sel, 0], win.source_uv[sel, 1]
            assert np.all(obj[v, u] == -1), "a pixel of a moving object reached the static map"
        fused_checked["windows"] += 1
        fused_checked["points"] += len(win.static_points)

    engine, outs, truth = _run(1000, check_window=check_window)
    # exactly once, in order
    assert [o.stamp_ns for o in outs] == sorted(truth)
    c = engine.counters
    assert c.frames_out == 1000 and c.frames_in == 1000 and c.lost_windows == 0
    assert all(o.state == "TRACKING" for o in outs)
    rms, worst, sim = _ate(outs, truth)
    # drift explosion check: the two halves, aligned separately, need the same scale
    half = len(outs) // 2
    s1, s2 = _ate(outs[:half], truth)[2].scale, _ate(outs[half:], truth)[2].scale
    print(f"ATE rms={rms:.4f} m max={worst:.4f} m; half-scale ratio {s2 / s1:.4f}; "
          f"map voxels {len(engine.static_map)}; windows checked {fused_checked}")
    assert rms < 0.15 and worst < 0.35
    assert abs(np.log(s2 / s1)) < 0.05
    assert fused_checked["windows"] >= 120 and fused_checked["points"] > 0
    # covariance is finite, positive and inside the documented range
    cov = np.stack([o.covariance for o in outs])
    diag = np.diagonal(cov, axis1=1, axis2=2)
    assert np.all(np.isfinite(cov)) and np.all(diag >= COV_MIN_VAR) and np.all(diag <= COV_MAX_VAR)
    # the map holds points, all finite; dynamic masks reach the outputs
    arr = engine.static_map.to_arrays()
    assert len(arr["points"]) > 1000 and np.isfinite(arr["points"]).all()
    assert any(o.mask.any() for o in outs)
    traj = engine.trajectory()
    assert len(traj) == 1000 and traj[0][0] == outs[0].stamp_ns


def test_keyframes_join_windows_and_keep_accuracy():
    calls = []

    class Spy(GroundTruthPredictor):
        def predict(self, images, frame_keys):
            calls.append(len(frame_keys))
            return super().predict(images, frame_keys)

    world = SynthWorld(SynthConfig(width=64, height=48, num_frames=300, num_objects=1, seed=3))
    gt = Spy(world, seed=2)
    engine = StreamEngine(gt, StreamConfig(window_size=8, stride=4, max_keyframes=2,
                                           keyframe_min_parallax=0.05, voxel_size=0.1))
    outs, truth = [], {}
    for i in range(300):
        f = gt.render(i)
        truth[f.stamp_ns] = np.linalg.inv(f.cam_from_world)
        outs += engine.push(FrameInput(f.stamp_ns, f.image))
    outs += engine.flush()
    assert len(outs) == 300
    assert max(calls) == 10 and calls[0] == 8     # keyframes are added, at most max_keyframes
    rms, _, _ = _ate(outs, truth)
    assert rms < 0.15


def test_mask_dilation_equals_the_scipy_maximum_filter():
    """The engine's OpenCV dilation of the dynamic masks (before static points are taken) is
    exactly scipy's square maximum filter with a False border, for radii 1-3 and masks that
    touch the image border."""
    from scipy import ndimage

    from vggt4d_ros.stream.engine import _dilate_masks
    rng = np.random.default_rng(0)
    masks = rng.random((4, 37, 53)) < 0.03
    masks[0, 0, :] = masks[1, :, -1] = True
    masks[3] = False
    for radius in (1, 2, 3):
        size = 2 * radius + 1
        want = ndimage.maximum_filter(masks, size=(1, size, size), mode="constant", cval=False)
        assert np.array_equal(_dilate_masks(masks, radius), want)
