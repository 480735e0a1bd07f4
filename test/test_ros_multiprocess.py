"""Three processes over DDS on loopback (own ROS_DOMAIN_ID, LOCALHOST discovery): the bag
player (vggt4d-bag-play, /clock), the node started by vggt4d-launch (real StreamEngine +
VGGT4D pipeline on tiny random weights, CPU, use_sim_time) and a checker
(python -m vggt4d_ros.ros.probe). Every advertised topic must carry the bag's stamps and
the right frames; the node must shut down cleanly on SIGINT."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 12                      # window 4, stride 2: 4 + 4 x 2 frames, all emitted
W, H = 126, 70


def _factory_available() -> bool:
    try:
        import vggt4d_ros.stream.factory  # noqa: F401
        return True
    except ImportError:
        return False


def _env() -> dict:
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    base = int(env.get("ROS_DOMAIN_ID", "120"))
    env["ROS_DOMAIN_ID"] = str(100 + (base + 37) % 100)    # not the in-process tests' domain
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _params_file(tmp_path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "config" / "vggt4d.yaml").read_text())
    p = doc["/**"]["ros__parameters"]
    p["model"].update(checkpoint="random_tiny", device="cpu", image_width=W)
    p["window"].update(size=4, stride=2)
    p["queue_size"] = 64
    # a replay feeds frames faster than a loaded CI machine may take them off the wire:
    # keep every one in the (best-effort) subscription history
    p["qos"]["image"]["depth"] = 100
    p["map"]["publish_period"] = 0.5
    p["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.skipif(not _factory_available(), reason="vggt4d_ros.stream.factory not there yet")
def test_bag_node_checker_as_three_processes(tmp_path):
    from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs
    world = SynthWorld(SynthConfig(width=W, height=H, num_frames=N_FRAMES, num_objects=1,
                                   seed=4))
    bag = write_outputs(world, tmp_path / "synth", folder=False, bags=["sqlite3"]) / \
        "bag_sqlite3"
    stamps = [world.render(i).stamp_ns for i in range(N_FRAMES)]
    env = _env()
    per_frame = {"/vggt4d/odom": "nav_msgs/msg/Odometry",
                 "/vggt4d/dynamic_mask": "sensor_msgs/msg/Image",
                 "/vggt4d/dynamic_mask/camera_info": "sensor_msgs/msg/CameraInfo",
                 "/vggt4d/depth": "sensor_msgs/msg/Image",
                 "/vggt4d/depth_static": "sensor_msgs/msg/Image",
                 "/vggt4d/confidence": "sensor_msgs/msg/Image",
                 "/tf": "tf2_msgs/msg/TFMessage"}
    others = ["/vggt4d/path:nav_msgs/msg/Path:n=1",
              "/vggt4d/static_points:sensor_msgs/msg/PointCloud2:n=1",
              "/vggt4d/static_map:sensor_msgs/msg/PointCloud2:tl:n=1",
              "/vggt4d/status:vggt4d_ros/msg/Status:tl:n=1",
              "/tf_static:tf2_msgs/msg/TFMessage:tl:n=1",
              "/diagnostics:diagnostic_msgs/msg/DiagnosticArray:n=2"]
    topic_args = [a for t, typ in per_frame.items()
                  for a in ("--topic", f"{t}:{typ}:n={N_FRAMES}")]
    topic_args += [a for spec in others for a in ("--topic", spec)]
    # ready only once every topic has the node's publisher: the first window must not be
    # published before discovery matched the checker (it was lost on a loaded CI machine)
    checker = subprocess.Popen([sys.executable, "-m", "vggt4d_ros.ros.probe", "--duration",
                                "400", "--wait-for-publishers", "120", *topic_args], env=env,
                               stdout=subprocess.PIPE, text=True)
    node = subprocess.Popen([sys.executable, "-m", "vggt4d_ros.ros.launcher",
                             f"params_file:={_params_file(tmp_path)}", "use_sim_time:=true",
                             "image_topic:=/camera/image_raw",
                             "camera_info_topic:=/camera/camera_info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    player = None
    try:
        assert json.loads(checker.stdout.readline()) == {"ready": True}
        player = subprocess.run(
            [sys.executable, "-m", "vggt4d_ros.ros.bag_player", str(bag), "--rate", "1.0",
             "--topics", "/camera/image_raw", "/camera/camera_info",
             "--wait-for-subscribers", "120", "--start-delay", "1.0"],
            env=env, capture_output=True, text=True, timeout=300)
        assert player.returncode == 0, player.stderr
        out, _ = checker.communicate(timeout=420)
        result = json.loads(out.strip().splitlines()[-1])["topics"]
    finally:
        for p in (checker, node):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        try:
            node_out, _ = node.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            node_out, _ = node.communicate()
        checker.kill() if checker.poll() is None else None
    assert node.returncode == 0, node_out[-3000:]
    for topic in per_frame:
        if topic == "/tf":
            got = [t[2] for m in result[topic] for t in m["transforms"]]
            assert {tuple(t[:2]) for m in result[topic] for t in m["transforms"]} == \
                {("odom", "base_link")}
        else:
            got = [m["stamp_ns"] for m in result[topic]]
        assert got == stamps, topic
    for m in result["/vggt4d/odom"]:
        assert (m["frame_id"], m["child_frame_id"]) == ("odom", "base_link")
    for topic in ("/vggt4d/dynamic_mask", "/vggt4d/depth", "/vggt4d/depth_static",
                  "/vggt4d/confidence"):
        encs = {(m["encoding"], m["frame_id"], m["width"] > 0, m["height"] > 0)
                for m in result[topic]}
        assert encs == {("mono8" if "mask" in topic else "32FC1", "camera_optical_frame",
                         True, True)}, topic
    static = result["/tf_static"][-1]["transforms"]
    assert [tuple(t[:2]) for t in static] == [("base_link", "camera_optical_frame")]
    for topic in ("/vggt4d/path", "/vggt4d/static_points", "/vggt4d/static_map"):
        for m in result[topic]:
            assert m["frame_id"] == "odom" and m["stamp_ns"] in stamps, topic
    # use_sim_time: diagnostics are stamped with the bag's clock, not the wall clock
    # (0 before the first /clock message)
    diag_stamps = [m["stamp_ns"] for m in result["/diagnostics"]]
    assert all(s == 0 or stamps[0] <= s <= stamps[-1] for s in diag_stamps), diag_stamps
    assert any(s > 0 for s in diag_stamps), diag_stamps


def test_repeated_bad_input_logs_one_line_per_kind_and_counts_each(tmp_path):
    """A camera sending broken images: the node (own process, started by vggt4d-launch) logs
    ONE line per kind within log_throttle, counts every frame in /diagnostics, keeps running
    and still answers its reset service."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from vggt4d_ros.ros.image_conv import bytes_to_uint8_array
    from vggt4d_ros.ros.probe import TopicProbe, qos_for, spin_until
    env = _env()
    env["ROS_DOMAIN_ID"] = str(int(env["ROS_DOMAIN_ID"]) - 1 if int(env["ROS_DOMAIN_ID"]) > 100
                               else 199)
    node = subprocess.Popen([sys.executable, "-m", "vggt4d_ros.ros.launcher",
                             f"params_file:={_params_file(tmp_path)}", "image_topic:=/cam",
                             "--ros-args", "-p", "log_throttle:=600.0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
    probe = TopicProbe("bad_input_camera", context=ctx)
    probe.watch("/diagnostics", DiagnosticArray, qos_for())
    pub = probe.create_publisher(Image, "/cam", qos_for(depth=50))
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(probe)
    try:
        assert spin_until(ex, lambda: pub.get_subscription_count() > 0, 120.0), "no node"
        for i in range(5):
            bad = Image(height=4, width=4, encoding="bayer_rggb8", step=4)
            bad.header.stamp.sec = 100 + i
            bad.data = bytes_to_uint8_array(bytes(16))
            pub.publish(bad)
            short = Image(height=4, width=4, encoding="rgb8", step=12)
            short.header.stamp.sec = 200 + i
            short.data = bytes_to_uint8_array(bytes(20))
            pub.publish(short)
            spin_until(ex, lambda: False, 0.1)

        def counts():
            for arr in reversed(probe.get("/diagnostics")):
                d = {kv.key: kv.value for kv in arr.status[0].values}
                return int(d["bad_input.unsupported_encoding"]), int(d["bad_input.truncated"])
            return 0, 0
        assert spin_until(ex, lambda: counts() == (5, 5), 120.0), counts()
        cli = probe.create_client(Trigger, "/vggt4d/reset")
        assert cli.wait_for_service(timeout_sec=60)
        fut = cli.call_async(Trigger.Request())
        assert spin_until(ex, fut.done, 60.0) and fut.result().success
    finally:
        ex.shutdown()
        probe.destroy_node()
        rclpy.try_shutdown(context=ctx)
        node.send_signal(signal.SIGINT)
        try:
            out, _ = node.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            out, _ = node.communicate()
    assert node.returncode == 0, out[-3000:]
    lines = out.splitlines()
    enc = [ln for ln in lines if "[unsupported_encoding]" in ln]
    trunc = [ln for ln in lines if "[truncated]" in ln]
    assert len(enc) == 1 and "bayer_rggb8" in enc[0], enc
    assert len(trunc) == 1 and "truncated" in trunc[0], trunc
