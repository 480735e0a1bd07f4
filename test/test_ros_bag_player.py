"""vggt4d-bag-play: a synthetic rosbag2 (sqlite3 and mcap) is published unchanged with its
recorded stamps, remapped, with /clock carrying bag time, at a rate factor, and looped."""
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from vggt4d_ros.ros import bag_player  # noqa: E402
from vggt4d_ros.ros.image_conv import image_to_rgb  # noqa: E402
from vggt4d_ros.ros.probe import TopicProbe, qos_for  # noqa: E402
from vggt4d_ros.ros.stamp_match import stamp_to_ns  # noqa: E402
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs  # noqa: E402

pytestmark = pytest.mark.ros
N = 6


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    world = SynthWorld(SynthConfig(width=56, height=42, num_frames=N, num_objects=1, seed=2,
                                   fps=20.0))
    out = write_outputs(world, tmp_path_factory.mktemp("bags") / "synth", folder=False,
                        bags=["sqlite3", "mcap"])
    frames = [world.render(i) for i in range(N)]
    return out, frames


def _play(bag, frames, plays=1, **kw):
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    probe = TopicProbe("bag_probe", context=ctx)
    probe.watch("/image", Image, qos_for(depth=100))
    probe.watch("/camera/camera_info", CameraInfo, qos_for(depth=100))
    probe.watch("/clock", Clock, qos_for(reliable=False, depth=1000))
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(probe)
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [ex.spin_once(timeout_sec=0.05)
                                               for _ in iter(stop.is_set, True)], daemon=True)
    spinner.start()
    player = bag_player.BagPlayer(bag, remaps={"/camera/image_raw": "/image"},
                                  topics=["/camera/image_raw", "/camera/camera_info"],
                                  context=ctx, **kw)
    try:
        assert player.wait_for_subscribers(30.0)
        t0 = time.monotonic()
        for _ in range(plays):
            assert player.play_once() == 2 * N
        wall = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while len(probe.get("/image")) < N * plays and time.monotonic() < deadline:
            time.sleep(0.02)
        return probe.get("/image"), probe.get("/camera/camera_info"), probe.get("/clock"), wall
    finally:
        stop.set()
        spinner.join(timeout=5)
        player.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_plays_recorded_messages_unchanged_with_clock(bags, storage):
    out, frames = bags
    images, infos, clocks, _ = _play(out / f"bag_{storage}", frames, rate=4.0)
    assert [stamp_to_ns(m.header.stamp) for m in images] == [f.stamp_ns for f in frames]
    for m, f in zip(images, frames):
        np.testing.assert_array_equal(image_to_rgb(m), f.image)
    assert len(infos) == N
    clock_ns = [stamp_to_ns(c.clock) for c in clocks]
    assert clock_ns == sorted(clock_ns)
    assert clock_ns[0] >= frames[0].stamp_ns and clock_ns[-1] == frames[-1].stamp_ns
    assert set(f.stamp_ns for f in frames) <= set(clock_ns)


def test_remaps_and_errors(bags, tmp_path):
    assert bag_player.parse_remaps(["/a:=/b"]) == {"/a": "/b"}
    with pytest.raises(ValueError):
        bag_player.parse_remaps(["/a=/b"])
    with pytest.raises(FileNotFoundError):
        list(bag_player.read_raw(tmp_path))
    out, _ = bags
    with pytest.raises(KeyError, match="available"):
        list(bag_player.read_raw(out / "bag_sqlite3", ["/nope"]))
    assert bag_player.main([str(tmp_path / "missing")]) == 2


def test_loop_replays_with_the_same_stamps(bags):
    out, frames = bags
    images, _, clocks, _ = _play(out / "bag_sqlite3", frames, rate=8.0, plays=2)
    stamps = [stamp_to_ns(m.header.stamp) for m in images]
    assert stamps == [f.stamp_ns for f in frames] * 2     # stamps jump back at the loop
