"""Sudden scene cut through the engine: the camera feed switches to another scene (a different
synthetic world). A model sees one scene per window, so the window spanning the cut predicts
the old anchors as the new scene -> alignment fails -> LOST, re-anchored at the last good pose
(no jump, no NaN, no reset) -> TRACKING again in the same odometry frame."""
import numpy as np

from vggt4d_ros.geometry.sim3 import umeyama_sim3
from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld

CUT, N = 24, 64


def _gt(seed: int) -> GroundTruthPredictor:
    world = SynthWorld(SynthConfig(width=48, height=32, num_frames=N, num_objects=1, seed=seed))
    return GroundTruthPredictor(world, seed=5, depth_noise=0.005, rot_noise_deg=0.05,
                                trans_noise=0.001)


class SceneCutModel:
    """Frames of scene A, then of scene B; a window that contains any B frame is predicted as
    scene B, its A frames seen as copies of its first B frame (one scene per window)."""

    def __init__(self) -> None:
        self.a, self.b = _gt(0), _gt(4)
        self.b_images = {self.b.render(i).image.tobytes() for i in range(CUT, N)}

    def frame(self, i: int):
        return (self.a if i < CUT else self.b).render(i)

    def predict(self, images, frame_keys):
        in_b = [im.tobytes() in self.b_images for im in images]
        if not any(in_b):
            return self.a.predict(images, frame_keys)
        first_b = images[in_b.index(True)]
        return self.b.predict(np.stack([im if b else first_b for im, b in zip(images, in_b)]),
                              frame_keys)


def test_scene_cut_goes_lost_reanchors_and_tracks_again():
    model = SceneCutModel()
    cfg = StreamConfig(window_size=8, stride=4, voxel_size=0.1)
    engine = StreamEngine(model, cfg)
    outs, windows = [], []
    for i in range(N):
        f = model.frame(i)
        new = engine.push(FrameInput(f.stamp_ns, f.image, "cam"))
        if new:
            windows.append((engine.last_window.state, engine.last_window.reason))
        outs += new
    outs += engine.flush()
    assert len(outs) == N and engine.counters.resets == {}
    states = [s for s, _ in windows]
    cut_window = next(o.window_index for o in outs if o.stamp_ns == model.frame(CUT).stamp_ns)
    assert all(s == "TRACKING" for s in states[:cut_window])
    assert states[cut_window] == "LOST" and "re-anchored" in windows[cut_window][1]
    # back to TRACKING within the recovery budget (+1), and it stays there
    budget = getattr(cfg, "recovery_anchor_windows", 0)
    back = states.index("TRACKING", cut_window)
    assert back <= cut_window + budget + 1 and set(states[back:]) == {"TRACKING"}
    assert engine.counters.lost_events == 1 and engine.counters.recoveries == 1
    # honest state: finite poses everywhere, maximal covariance while LOST
    for o in outs:
        assert np.isfinite(o.world_from_cam).all() and np.isfinite(o.covariance).all()
    # re-anchored at the last good pose: no jump at the cut
    c = np.stack([o.world_from_cam[:3, 3] for o in outs])
    step = np.median(np.linalg.norm(np.diff(c[:CUT], axis=0), axis=1))
    assert np.linalg.norm(c[CUT] - c[CUT - 1]) < 5 * step
    # after recovery, scene B's trajectory is as good as scene B streamed on its own
    first = min(i for i, o in enumerate(outs) if o.window_index >= back)
    alone = StreamEngine(model.b, StreamConfig(window_size=8, stride=4, voxel_size=0.1))
    ref = []
    for i in range(CUT, N):
        f = model.frame(i)
        ref += alone.push(FrameInput(f.stamp_ns, f.image, "cam"))
    ref += alone.flush()
    c_ref = np.stack([o.world_from_cam[:3, 3] for o in ref])[first - CUT:]
    assert _ate(c[first:], model, first) < 1.5 * _ate(c_ref, model, first) + 1e-3


def _ate(centres, model, first) -> float:
    """Mean camera-centre error after a Sim(3) fit, frames first..N-1 of scene B."""
    true = np.stack([np.linalg.inv(model.frame(i).cam_from_world)[:3, 3]
                     for i in range(first, N)])
    return float(np.linalg.norm(umeyama_sim3(centres, true).apply(centres) - true,
                                axis=1).mean())
