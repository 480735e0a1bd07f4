"""Defined behaviour for imperfect input and failures: duplicate / out-of-order / backwards
stamps, image size changes, drop policies, reset, LOST with recovery, garbage or non-finite
predictions, identical repeated frames."""
import numpy as np
import pytest

from vggt4d_ros.geometry.sim3 import umeyama_sim3
from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.stream.predictor import WindowPrediction, WindowPredictor
from vggt4d_ros.stream.stitcher import COV_MAX_VAR
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld

CFG = dict(window_size=8, stride=4, voxel_size=0.1)


def _world(n=200, w=48, h=32, seed=0, objects=1):
    return SynthWorld(SynthConfig(width=w, height=h, num_frames=n, num_objects=objects, seed=seed))


def _gt(world, **kw):
    kw.setdefault("depth_noise", 0.005)
    kw.setdefault("rot_noise_deg", 0.05)
    kw.setdefault("trans_noise", 0.001)
    return GroundTruthPredictor(world, seed=5, **kw)


def _frame(gt, i, stamp=None):
    f = gt.render(i)
    return FrameInput(f.stamp_ns if stamp is None else stamp, f.image, "cam")


def _assert_finite(outs):
    for o in outs:
        assert np.isfinite(o.world_from_cam).all() and np.isfinite(o.cam_from_world).all()
        assert np.isfinite(o.covariance).all() and np.all(np.diag(o.covariance) > 0)
        np.testing.assert_allclose(o.world_from_cam @ o.cam_from_world, np.eye(4), atol=1e-9)


def test_predictor_protocol_and_config_validation():
    assert isinstance(_gt(_world(10)), WindowPredictor)
    with pytest.raises(ValueError):
        StreamConfig(window_size=8, stride=8)        # no overlap -> cannot stitch
    with pytest.raises(ValueError):
        StreamConfig(drop_policy="newest")
    engine = StreamEngine(_gt(_world(10)), StreamConfig(**CFG))
    with pytest.raises(ValueError):
        engine.push(FrameInput(0, np.zeros((32, 48, 3), np.float32)))
    with pytest.raises(ValueError):
        engine.push(FrameInput(0.5, np.zeros((32, 48, 3), np.uint8)))
    assert engine.state == "WAITING"


def test_duplicate_and_small_reorder_are_dropped_and_counted():
    gt = _gt(_world(40))
    engine = StreamEngine(gt, StreamConfig(**CFG))
    outs, accepted = [], []
    for i in range(20):
        outs += engine.push(_frame(gt, i))
        accepted.append(gt.render(i).stamp_ns)
        if i == 5:
            outs += engine.push(_frame(gt, 5))       # same stamp again
        if i == 10:
            outs += engine.push(_frame(gt, 7))       # 3 frames (0.1 s) back: reorder
    outs += engine.flush()
    c = engine.counters
    assert c.dropped == {"duplicate": 1, "out_of_order": 1}
    assert c.frames_in == 22 and c.frames_out == 20
    assert [o.stamp_ns for o in outs] == accepted    # each accepted frame exactly once, in order
    assert c.resets == {}


def test_backwards_jump_starts_a_new_sequence_bag_loop():
    gt = _gt(_world(60))
    engine = StreamEngine(gt, StreamConfig(**CFG))
    outs = []
    for i in range(45):                              # 1.5 s of frames
        outs += engine.push(_frame(gt, i))
    n_first = len(outs)
    outs += engine.push(_frame(gt, 0))               # loop: stamp back by 1.5 s > 1 s
    assert engine.counters.resets == {"stamp_backwards": 1}
    assert engine.state == "RESET" and engine.last_reset_reason == "stamp_backwards"
    assert len(outs) == 45 and n_first == 44         # the old sequence's tail was emitted first
    assert engine.trajectory() == []
    for i in range(1, 12):
        outs += engine.push(_frame(gt, i))
    assert engine.state == "TRACKING"
    second = outs[45:]
    # a new odometry frame
    np.testing.assert_allclose(second[0].world_from_cam, np.eye(4), atol=1e-9)
    assert second[0].stamp_ns == gt.render(0).stamp_ns
    _assert_finite(outs)


def test_image_size_change_resets_with_reason():
    gt_small, gt_big = _gt(_world(30)), _gt(_world(30, w=64, h=48))
    engine = StreamEngine(_Switch(gt_small, gt_big), StreamConfig(**CFG))
    outs = []
    for i in range(10):
        outs += engine.push(_frame(gt_small, i))
    for i in range(10, 20):
        outs += engine.push(_frame(gt_big, i))
    outs += engine.flush()
    assert engine.counters.resets == {"image_size_changed": 1}
    assert len(outs) == 20 and outs[-1].image.shape == (48, 64, 3)
    _assert_finite(outs)


class _Switch:
    """Predicts with whichever GT predictor rendered the images (by size)."""

    def __init__(self, *preds):
        self.preds = preds

    def predict(self, images, frame_keys):
        for p in self.preds:
            if p.world.config.height == images.shape[1]:
                return p.predict(images, frame_keys)
        raise AssertionError("no predictor for this size")


def test_drop_oldest_bounds_the_queue_keep_all_does_not():
    gt = _gt(_world(60))
    live = StreamEngine(gt, StreamConfig(**CFG, drop_policy="drop_oldest", max_queue=10))
    replay = StreamEngine(gt, StreamConfig(**CFG, drop_policy="keep_all"))
    for i in range(50):                               # the worker is busy: nothing polled
        assert live.submit(_frame(gt, i)) is None
        replay.submit(_frame(gt, i))
    assert live.counters.queue_depth == 10 and live.counters.dropped == {"queue_full": 40}
    assert replay.counters.queue_depth == 50 and replay.counters.dropped == {}
    outs = live.poll() + live.flush()
    # the newest frames were kept
    assert [o.stamp_ns for o in outs] == [gt.render(i).stamp_ns for i in range(40, 50)]
    assert len(replay.poll() + replay.flush()) == 50


def test_reset_clears_sequence_and_recovers():
    gt = _gt(_world(80))
    engine = StreamEngine(gt, StreamConfig(**CFG))
    for i in range(30):
        engine.push(_frame(gt, i))
    assert len(engine.static_map) > 0 and engine.trajectory()
    engine.push(_frame(gt, 30))
    engine.reset()
    assert engine.state == "RESET"
    assert len(engine.static_map) == 0 and engine.trajectory() == [] and engine.last_window is None
    assert engine.counters.resets == {"requested": 1} and engine.counters.dropped == {"reset": 3}
    outs = []
    for i in range(31, 45):
        outs += engine.push(_frame(gt, i))
    assert engine.state == "TRACKING"
    np.testing.assert_allclose(outs[0].world_from_cam, np.eye(4), atol=1e-9)


class _Faulty:
    """Wraps a predictor; calls listed in ``garbage`` return random geometry, ``nan`` NaNs,
    ``zero`` an all-invalid depth."""

    def __init__(self, inner, garbage=(), nan=(), zero=(), inf_focal=()):
        self.inner, self.garbage, self.nan, self.zero = inner, set(garbage), set(nan), set(zero)
        self.inf_focal = set(inf_focal)
        self.call = 0
        self.sizes = []

    def predict(self, images, frame_keys):
        self.sizes.append(len(frame_keys))
        p = self.inner.predict(images, frame_keys)
        k, self.call = self.call, self.call + 1
        rng = np.random.default_rng(k)
        if k in self.garbage:
            from scipy.spatial.transform import Rotation
            rot = Rotation.random(len(frame_keys), random_state=k).as_matrix()
            trans = rng.normal(size=(len(frame_keys), 3, 1)) * 5
            p.extrinsic = np.concatenate([rot, trans], axis=2)
            p.depth = rng.uniform(0.1, 10, p.depth.shape).astype(np.float32)
        if k in self.nan:
            p.extrinsic = np.full_like(p.extrinsic, np.nan)
            p.depth = np.full_like(p.depth, np.nan)
        if k in self.zero:
            p.depth = np.zeros_like(p.depth)
        if k in self.inf_focal:              # (the random tiny VGGT can predict this)
            p.intrinsic = p.intrinsic.copy()
            p.intrinsic[:, 0, 0] = p.intrinsic[:, 1, 1] = np.inf
        return p


def _run(pred, world_gt, n, **cfg):
    engine = StreamEngine(pred, StreamConfig(**{**CFG, **cfg}))
    outs, truth = [], {}
    engine.windows_seen = []
    for i in range(n):
        f = world_gt.render(i)
        truth[f.stamp_ns] = np.linalg.inv(f.cam_from_world)
        new = engine.push(FrameInput(f.stamp_ns, f.image))
        if new:
            engine.windows_seen.append(engine.last_window)
        outs += new
    outs += engine.flush()
    return engine, outs, truth


@pytest.mark.parametrize("recovery_windows", [4, 0])
def test_garbage_window_goes_lost_then_recovers_cleanly(recovery_windows):
    gt = _gt(_world(120, objects=1))
    faulty = _Faulty(gt, garbage={6})
    engine, outs, truth = _run(faulty, gt, 120, recovery_anchor_windows=recovery_windows)
    # the recovery anchor replaces an overlap frame: every full window has the same size
    # (a new size is a new compiled shape on CUDA - a long stall in the first LOST window)
    assert set(faulty.sizes[1:-1]) == {CFG["window_size"]}
    lost = [o for o in outs if o.state == "LOST"]
    c = engine.counters
    assert lost and lost[0].window_index == 6
    assert c.lost_events == 1 and c.recoveries == 1
    assert outs[-1].state == "TRACKING" and engine.state == "TRACKING"
    assert all(np.all(np.diag(o.covariance) == COV_MAX_VAR) for o in lost)
    _assert_finite(outs)
    lost_windows = [w for w in engine.windows_seen if w.state == "LOST"]
    assert all("re-anchored" in w.reason for w in lost_windows)
    assert "residual" in lost_windows[0].reason

    def ate(sel):
        est = np.array([o.world_from_cam[:3, 3] for o in sel])
        ref = np.array([truth[o.stamp_ns][:3, 3] for o in sel])
        err = np.linalg.norm(umeyama_sim3(est, ref).apply(est) - ref, axis=1)
        return float(np.sqrt(np.mean(err ** 2)))

    if recovery_windows:
        # the last good frame joins the next window: one LOST window, then tracking resumes
        # in the SAME odometry frame (every TRACKING frame before and after is consistent)
        assert [w.window_index for w in lost_windows] == [6]
        assert ate([o for o in outs if o.state == "TRACKING"]) < 0.05
    else:
        # no trusted anchor after the garbage window: the next window is re-anchored at the
        # last good pose (hold), then the new segment tracks on its own
        assert [w.window_index for w in lost_windows] == [6, 7]
        assert "hold at last good pose" in lost_windows[1].reason
        assert ate([o for o in outs if o.window_index > 7]) < 0.05
    assert len(engine.static_map) > 0


def test_nonfinite_prediction_holds_pose_without_nan():
    gt = _gt(_world(60))
    engine, outs, _ = _run(_Faulty(gt, nan={3}, zero={4}, inf_focal={7}), gt, 60)
    lost = [o for o in outs if o.state == "LOST"]
    assert {o.window_index for o in lost} >= {3, 4, 7}
    _assert_finite(outs)
    for bad in (3, 7):                                 # NaN pose / infinite focal length
        held = [o for o in outs if o.window_index == bad]
        prev = [o for o in outs if o.window_index == bad - 1][-1]
        for o in held:                                 # hold: the last emitted pose
            np.testing.assert_allclose(o.world_from_cam, prev.world_from_cam)
    assert engine.state == "TRACKING" and engine.counters.recoveries >= 1


def test_first_window_garbage_is_lost_not_nan():
    gt = _gt(_world(40))
    engine, outs, _ = _run(_Faulty(gt, nan={0}), gt, 40)
    assert outs[0].state == "LOST"
    _assert_finite(outs)
    assert engine.state == "TRACKING"


@pytest.mark.parametrize("noise", [False, True])
def test_identical_repeated_frames_hold_pose(noise):
    world = _world(5)
    gt = _gt(world) if noise else _gt(world, depth_noise=0.0, rot_noise_deg=0.0, trans_noise=0.0)
    engine = StreamEngine(gt, StreamConfig(**CFG))
    img = gt.render(2).image
    outs = []
    for k in range(40):                                 # camera standing still: same image
        outs += engine.push(FrameInput(1_000 + k * 33_000_000, img))
    outs += engine.flush()
    assert len(outs) == 40
    assert all(o.state == "TRACKING" for o in outs)
    _assert_finite(outs)
    centres = np.array([o.world_from_cam[:3, 3] for o in outs])
    depth = float(np.median(outs[0].depth))
    tol = 1e-6 if not noise else 0.02
    assert np.abs(centres).max() < tol * depth
    if not noise:
        assert engine.last_window.residual < 1e-6


def test_bad_prediction_shapes_raise():
    class Bad:
        def predict(self, images, frame_keys):
            s = len(frame_keys)
            return WindowPrediction(np.zeros((s, 3, 4)), np.zeros((s, 3, 3)), np.ones((s, 8, 8)),
                                    np.ones((s, 8, 7)), np.zeros((s, 8, 8), bool))
    engine = StreamEngine(Bad(), StreamConfig(**CFG))
    with pytest.raises(ValueError, match="depth_conf"):
        for k in range(8):
            engine.push(FrameInput(k + 1, np.zeros((8, 8, 3), np.uint8)))


def test_threaded_producer_worker_and_concurrent_reset_keep_counts_consistent():
    """Camera callback thread submits, a worker polls, a service thread resets once: every
    submitted frame is either emitted exactly once or counted as dropped."""
    import threading

    gt = _gt(_world(200))
    frames = [_frame(gt, i) for i in range(200)]
    engine = StreamEngine(gt, StreamConfig(**CFG, drop_policy="drop_oldest", max_queue=6))
    outs, done, errors = [], threading.Event(), []

    def worker():
        try:
            while not done.is_set():
                outs.extend(engine.poll())
            outs.extend(engine.flush())
        except Exception as exc:            # surfaced below
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    for i, f in enumerate(frames):
        engine.submit(f)
        if i == 100:
            engine.reset()
    done.set()
    t.join(timeout=120)
    assert not t.is_alive() and not errors
    c = engine.counters
    assert c.frames_in == 200 and c.resets == {"requested": 1}
    assert c.frames_out == len(outs) and c.frames_out + sum(c.dropped.values()) == 200
    stamps = [o.stamp_ns for o in outs]
    assert len(set(stamps)) == len(stamps)
    _assert_finite(outs)


def test_flush_of_a_short_first_window_and_repeated_flush():
    gt = _gt(_world(10))
    engine = StreamEngine(gt, StreamConfig(**CFG))
    assert engine.flush() == []
    assert engine.push(_frame(gt, 0)) == [] and engine.state == "WAITING"
    outs = engine.flush()                     # a one-frame window
    assert len(outs) == 1 and outs[0].state == "TRACKING"
    np.testing.assert_allclose(outs[0].world_from_cam, np.eye(4), atol=1e-9)
    assert engine.flush() == []
    outs = [o for i in range(1, 6) for o in engine.push(_frame(gt, i))] + engine.flush()
    assert len(outs) == 5 and engine.counters.frames_out == 6
    _assert_finite(outs)


def test_predictor_exception_drops_only_that_window_and_keeps_the_rest():
    class Failing:
        def __init__(self, inner, fail_calls):
            self.inner, self.fail_calls, self.call = inner, set(fail_calls), 0

        def predict(self, images, frame_keys):
            k, self.call = self.call, self.call + 1
            if k in self.fail_calls:
                raise RuntimeError("CUDA out of memory (injected)")
            return self.inner.predict(images, frame_keys)

    gt = _gt(_world(60))
    engine = StreamEngine(Failing(gt, {2}), StreamConfig(**CFG))
    for i in range(20):                      # windows: 0 at frame 8, 1 at 12, 2 (fails) at 16
        engine.submit(_frame(gt, i))
    with pytest.raises(RuntimeError, match="injected"):
        engine.poll()
    c = engine.counters
    assert c.dropped == {"inference_error": 4}
    outs = engine.poll()                     # outputs of windows 0-1 + what followed
    for i in range(20, 40):
        outs += engine.push(_frame(gt, i))
    outs += engine.flush()
    c = engine.counters
    assert c.frames_out == len(outs) == 36 and c.frames_out + sum(c.dropped.values()) == 40
    assert len({o.stamp_ns for o in outs}) == 36
    assert engine.state == "TRACKING"
    _assert_finite(outs)
