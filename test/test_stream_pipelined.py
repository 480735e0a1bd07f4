"""Pipelined engine (StreamConfig.pipelined): window n+1 is predicted while window n is aligned
and emitted. The outputs must never depend on it: pipelined and serial engines emit the same
frames, poses, depths, masks, states and map, whatever the timing; the predictor runs on one
thread, one window at a time."""
import threading
import time

import numpy as np
import pytest

from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld

CFG = dict(window_size=8, stride=4, voxel_size=0.1)


def _gt(n=120, seed=0):
    world = SynthWorld(SynthConfig(width=48, height=32, num_frames=n, num_objects=1, seed=seed))
    return GroundTruthPredictor(world, seed=5, depth_noise=0.005, rot_noise_deg=0.05,
                                trans_noise=0.001)


class _Scripted:
    """Wraps the ground-truth predictor. Faults are keyed by the window's NEWEST frame key
    (not by call count), so that a discarded early prediction does not shift them: windows
    ending in ``garbage`` return random geometry, those ending in ``fail`` raise. Records the
    calling thread and checks that calls never overlap."""

    def __init__(self, inner, garbage=(), fail=(), delay_s=0.0):
        self.inner, self.garbage, self.fail, self.delay_s = inner, set(garbage), set(fail), delay_s
        self.calls, self.threads = [], set()
        self._busy = threading.Lock()
        self.overlapping = 0

    def predict(self, images, frame_keys):
        if not self._busy.acquire(blocking=False):
            self.overlapping += 1
            self._busy.acquire()
        try:
            self.threads.add(threading.current_thread().name)
            self.calls.append(tuple(frame_keys))
            time.sleep(self.delay_s)
            last = frame_keys[-1]
            if last in self.fail:
                raise RuntimeError(f"injected failure at frame {last}")
            p = self.inner.predict(images, frame_keys)
            if last in self.garbage:
                from scipy.spatial.transform import Rotation
                rng = np.random.default_rng(last)
                rot = Rotation.random(len(frame_keys), random_state=last).as_matrix()
                p.extrinsic = np.concatenate([rot, rng.normal(size=(len(frame_keys), 3, 1)) * 5],
                                             axis=2)
                p.depth = rng.uniform(0.1, 10, p.depth.shape).astype(np.float32)
            return p
        finally:
            self._busy.release()


def _drain(engine, outs, errors):
    """poll until a poll completes (a failed window raises once; the rest is kept)."""
    while True:
        try:
            outs += engine.poll()
            return
        except RuntimeError as exc:
            errors.append(str(exc))


def _run_all_queued(gt, n, pipelined, keyframes=0, garbage=(), fail=(), one_window=False):
    """Every frame queued before the engine runs: the most lookahead a pipelined engine gets."""
    pred = _Scripted(gt, garbage, fail)
    engine = StreamEngine(pred, StreamConfig(**CFG, max_keyframes=keyframes,
                                             pipelined=pipelined))
    for i in range(n):
        f = gt.render(i)
        engine.submit(FrameInput(f.stamp_ns, f.image, "cam"))
    outs, errors = [], []
    if one_window:
        while True:
            try:
                new = engine.poll(max_windows=1)
            except RuntimeError as exc:
                errors.append(str(exc))
                continue
            if not new and not engine.counters.queue_depth:
                break
            outs += new
    _drain(engine, outs, errors)
    outs += engine.flush()
    engine.close()
    return engine, pred, outs, errors


def _assert_same_outputs(a, b):
    assert [o.stamp_ns for o in a] == [o.stamp_ns for o in b]
    for x, y in zip(a, b):
        assert (x.state, x.window_index, x.trusted, x.sequence) == \
            (y.state, y.window_index, y.trusted, y.sequence)
        np.testing.assert_array_equal(x.world_from_cam, y.world_from_cam)
        np.testing.assert_array_equal(x.covariance, y.covariance)
        np.testing.assert_array_equal(x.depth, y.depth)
        np.testing.assert_array_equal(x.mask, y.mask)


SCENARIOS = {
    "tracking": dict(),
    "keyframes": dict(keyframes=2),
    # window ending at frame 31 is garbage: LOST, then the last good frame re-shown (the
    # early prediction of the next window assumed TRACKING: a miss)
    "lost_and_recovery": dict(garbage={31}),
    "predictor_raises": dict(fail={23, 47}),
}


@pytest.mark.parametrize("one_window", [False, True])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pipelined_emits_exactly_what_the_serial_engine_emits(scenario, one_window):
    kw = SCENARIOS[scenario]
    gt = _gt(100)
    serial, _, ref, ref_errors = _run_all_queued(gt, 100, False, **kw)
    piped, pred, outs, errors = _run_all_queued(gt, 100, True, one_window=one_window, **kw)
    _assert_same_outputs(outs, ref)
    assert errors == ref_errors
    a, b = piped.counters, serial.counters
    assert (a.frames_out, a.dropped, a.windows, a.lost_windows, a.recoveries) == \
        (b.frames_out, b.dropped, b.windows, b.lost_windows, b.recoveries)
    assert len(piped.static_map) == len(serial.static_map)
    np.testing.assert_array_equal(piped.trajectory_arrays()[1], serial.trajectory_arrays()[1])
    # the predictor ran on the engine's prediction thread only, never two windows at once
    assert pred.threads == {"vggt4d_predict_0"} and pred.overlapping == 0
    assert a.lookahead_hits >= 10 and b.lookahead_hits == b.lookahead_misses == 0
    if scenario == "lost_and_recovery":
        assert a.lost_windows >= 1 and a.lookahead_misses >= 1
    if scenario == "predictor_raises":
        assert len(errors) == 2 and a.dropped == {"inference_error": 8}


def test_submit_starts_the_next_window_while_the_caller_is_busy():
    gt = _gt(40)
    pred = _Scripted(gt)
    engine = StreamEngine(pred, StreamConfig(**CFG))
    frames = [gt.render(i) for i in range(12)]
    outs = []
    for f in frames[:8]:
        outs += engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
    assert len(outs) == 8 and len(pred.calls) == 1
    for f in frames[8:12]:                    # completes the next window; nobody polls
        engine.submit(FrameInput(f.stamp_ns, f.image, "cam"))
    deadline = time.monotonic() + 30
    while len(pred.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pred.calls) == 2               # started by submit, on the prediction thread
    assert pred.calls[1] == tuple(range(4, 12))   # overlap frames 4-7, new frames 8-11
    outs += engine.poll()
    assert len(outs) == 12 and len(pred.calls) == 2
    assert engine.counters.lookahead_hits == 1 and engine.counters.lookahead_misses == 0
    engine.close()


def test_reset_discards_a_started_prediction():
    gt = _gt(40)
    frames = [gt.render(i) for i in range(40)]

    def script(pipelined):
        pred = _Scripted(gt, delay_s=0.05)
        engine = StreamEngine(pred, StreamConfig(**CFG, pipelined=pipelined))
        for f in frames[:8]:
            engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
        for f in frames[8:12]:
            engine.submit(FrameInput(f.stamp_ns, f.image, "cam"))   # starts window 1 early
        engine.reset()
        assert engine.counters.dropped == {"reset": 4}
        outs = [o for f in frames[12:28] for o in engine.push(FrameInput(f.stamp_ns, f.image))]
        engine.close()
        return engine, pred, outs

    engine, pred, outs = script(True)
    serial, _, ref = script(False)
    # the new sequence starts at identity, exactly as without pipelining: nothing of the
    # discarded prediction (frames 4-11, new sequence 0) was used
    _assert_same_outputs(outs, ref)
    assert outs[0].sequence == 1
    np.testing.assert_allclose(outs[0].world_from_cam, np.eye(4), atol=1e-9)
    assert tuple(range(4, 12)) in pred.calls        # it did start
    assert engine.counters.lookahead_misses == 0     # dropped at the reset, never compared


def test_poll_max_windows_and_close():
    gt = _gt(40)
    pred = _Scripted(gt)
    engine = StreamEngine(pred, StreamConfig(**CFG))
    with pytest.raises(ValueError, match="max_windows"):
        engine.poll(max_windows=0)
    for i in range(20):                       # windows at frames 8, 12, 16, 20
        f = gt.render(i)
        engine.submit(FrameInput(f.stamp_ns, f.image))
    assert len(engine.poll(max_windows=1)) == 8 and engine.counters.windows == 1
    assert engine.counters.queue_depth == 12    # (window 1 started: 4 of them pinned)
    assert len(engine.poll(max_windows=2)) == 8 and engine.counters.windows == 3
    assert pred.threads == {"vggt4d_predict_0"}
    engine.close()
    engine.close()                            # idempotent
    # after close, windows are predicted in the calling thread
    pred.threads.clear()
    assert len(engine.poll()) == 4 and engine.counters.windows == 4
    assert pred.threads == {threading.current_thread().name}


def test_drop_oldest_never_drops_the_frames_of_a_started_prediction():
    """Live input with a queue as small as the stride: the frames of a window whose prediction
    already started are pinned in the queue, so later arrivals drop other frames, not those (a
    dropped one would void the prediction: a second prediction of the window, falling further
    behind)."""
    gt = _gt(40)
    pred = _Scripted(gt, delay_s=0.05)
    engine = StreamEngine(pred, StreamConfig(**CFG, drop_policy="drop_oldest", max_queue=4))
    frames = [gt.render(i) for i in range(20)]
    outs = []
    for f in frames[:8]:
        outs += engine.push(FrameInput(f.stamp_ns, f.image))
    for f in frames[8:12]:                    # window 1 complete: its prediction starts
        engine.submit(FrameInput(f.stamp_ns, f.image))
    assert engine.counters.queue_depth == 4 and engine.counters.pending == 0
    for f in frames[12:18]:                   # 6 more arrive before the worker polls again
        engine.submit(FrameInput(f.stamp_ns, f.image))
    c = engine.counters
    # the bound holds for the waiting frames (4); the started window's 4 are pinned on top
    assert c.dropped == {"queue_full": 2} and c.queue_depth == 4 + 4
    outs += engine.poll()
    c = engine.counters
    assert c.lookahead_hits == 2 and c.lookahead_misses == 0
    # window 1 = frames 8-11 (all kept), window 2 = the 4 newest queued: 14-17 (12, 13 dropped)
    assert [o.stamp_ns for o in outs[8:]] == [f.stamp_ns for f in frames[8:12] + frames[14:18]]
    assert c.frames_out + sum(c.dropped.values()) + c.queue_depth + c.pending == c.frames_in
    engine.close()


def test_a_size_change_behind_a_sequence_tail_is_never_planned_as_its_continuation():
    """The window that ends a sequence (pending frames run before a reset marker) plans
    nothing: the frames behind the marker (another image size) start a new sequence. Found by
    the node tests: the camera callback's submit raised from np.stack of mixed sizes."""
    gt = _gt(40)
    # frame keys are assigned in submission order: key k is world frame k (the GT predictor
    # cannot look the half-size images up by content)
    keyed = GroundTruthPredictor(gt.world, seed=5, index_of_key=lambda k: k)
    big = [gt.render(i) for i in range(10)]
    small = [np.ascontiguousarray(gt.render(i).image[::2, ::2]) for i in range(10, 20)]

    def script(pipelined):
        engine = StreamEngine(_Scripted(keyed), StreamConfig(**CFG, pipelined=pipelined))
        outs = []
        for f in big:                         # window 0 at frame 8; frames 8, 9 pending
            outs += engine.push(FrameInput(f.stamp_ns, f.image))
        for i, img in enumerate(small):       # reset marker + 10 frames of another size
            assert engine.submit(FrameInput(big[-1].stamp_ns + (i + 1) * 10**8, img)) is None
        outs += engine.poll() + engine.flush()
        engine.close()
        return engine, outs

    engine, outs = script(True)
    serial, ref = script(False)
    assert [o.stamp_ns for o in outs] == [o.stamp_ns for o in ref]
    assert [o.sequence for o in outs] == [0] * 10 + [1] * 10
    assert engine.counters.resets == {"image_size_changed": 1}
    assert engine.counters.lookahead_misses == 0
