"""The vggt4d node in-process with real rclpy (publishers, subscriptions, services, parameters,
MultiThreadedExecutor): outputs, stamps, frames, TF tree, services, parameters, bad input.

The node builds its real engine (StreamEngine over stream.factory.build_predictor: the
VGGT4D pipeline on tiny random weights, CPU, 98x56 frames of the synthetic world, window 4
stride 2). Geometry from random weights is meaningless; these tests check the ROS contract.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from nav_msgs.msg import Odometry, Path as PathMsg  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from vggt4d_ros.msg import Status  # noqa: E402
from vggt4d_ros.ros import node as node_mod  # noqa: E402
from vggt4d_ros.ros.image_conv import array_to_image, bytes_to_uint8_array, image_to_array  # noqa: E402,E501
from vggt4d_ros.ros.pointcloud import cloud_to_arrays  # noqa: E402
from vggt4d_ros.ros.probe import ThreadSpinner, TopicProbe, qos_for  # noqa: E402
from vggt4d_ros.ros.stamp_match import stamp_to_ns  # noqa: E402
from vggt4d_ros.tools.synth import SynthConfig, SynthWorld  # noqa: E402

pytestmark = pytest.mark.ros
ROOT = Path(__file__).resolve().parents[1]
W, H = 98, 56
NS = "/vggt4d"


def topics(ns: str = NS) -> dict:
    """Every output of a node whose private namespace is ``ns`` → (type, subscription QoS)."""
    return {
        f"{ns}/odom": (Odometry, qos_for()),
        f"{ns}/path": (PathMsg, qos_for()),
        f"{ns}/dynamic_mask": (Image, qos_for()),
        f"{ns}/dynamic_mask/camera_info": (CameraInfo, qos_for()),
        f"{ns}/depth": (Image, qos_for()),
        f"{ns}/depth_static": (Image, qos_for()),
        f"{ns}/confidence": (Image, qos_for()),
        f"{ns}/static_points": (PointCloud2, qos_for()),
        f"{ns}/static_map": (PointCloud2, qos_for(transient_local=True, depth=1)),
        f"{ns}/status": (Status, qos_for(transient_local=True, depth=1)),
        "/diagnostics": (DiagnosticArray, qos_for()),
        "/tf": (TFMessage, qos_for(depth=200)),
        "/tf_static": (TFMessage, qos_for(transient_local=True, depth=1)),
    }


TOPICS = topics()


class Harness:
    """The node (real engine) + a probe on one executor spinning in a thread; frames from a
    synthetic world."""

    def __init__(self, overrides: dict, cli_args: list[str] | None = None,
                 num_frames: int = 200, namespace: str = "", engine_factory=None) -> None:
        # a second node of the same name in the same domain would answer our service calls:
        # extra harnesses run in their own namespace
        self.ns = f"{namespace}/vggt4d"
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.world = SynthWorld(SynthConfig(width=W, height=H, num_frames=num_frames,
                                            num_objects=1, seed=3))
        params = {"window.size": 4, "window.stride": 2, "model.checkpoint": "random_tiny",
                  "model.device": "cpu", "model.image_width": W,
                  "map.publish_period": 0.2, "log_throttle": 0.0, "queue_size": 64,
                  "qos.image.depth": 100}   # no frame lost off the wire on a loaded machine
        params.update(overrides)

        self.node = node_mod.Vggt4dNode(
            engine_factory=engine_factory, context=self.ctx, cli_args=cli_args,
            namespace=namespace or None,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        self.probe = TopicProbe("probe", context=self.ctx)
        for topic, (typ, qos) in topics(self.ns).items():
            self.probe.watch(topic, typ, qos)
        self.pub_image = self.probe.create_publisher(Image, f"{namespace}/image",
                                                     qos_for(depth=100))
        self.pub_info = self.probe.create_publisher(CameraInfo, f"{namespace}/camera_info",
                                                    qos_for(depth=100))
        self.spinner = ThreadSpinner(self.ctx, self.node, self.probe)
        self.next_index = 0
        self.wait_for_subscribers()

    def wait_for_subscribers(self) -> None:
        assert self.wait(lambda: self.pub_image.get_subscription_count() >= 1 and
                         self.pub_info.get_subscription_count() >= 1 and
                         self.node.pub_odom.get_subscription_count() >= 1), "no discovery"

    @staticmethod
    def wait(pred, timeout: float = 60.0) -> bool:
        """Poll until ``pred()``; the timeout is a safety net against hangs, not a measurement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.02)
        return pred()

    def frame_msgs(self, i: int, stamp_ns: int | None = None):
        f = self.world.render(i)
        stamp = rclpy.time.Time(nanoseconds=stamp_ns if stamp_ns is not None
                                else f.stamp_ns).to_msg()
        img = array_to_image(f.image, "rgb8", stamp=stamp, frame_id="camera_optical_frame")
        info = CameraInfo()
        info.header = img.header
        info.width, info.height = W, H
        info.k = [float(v) for v in f.intrinsic.ravel()]
        return img, info

    def send(self, n: int, with_info: bool = True) -> list[int]:
        """Publish the next n frames (camera_info first, as drivers do); returns their stamps."""
        stamps = []
        for _ in range(n):
            img, info = self.frame_msgs(self.next_index)
            self.next_index += 1
            if with_info:
                self.pub_info.publish(info)
            self.pub_image.publish(img)
            stamps.append(stamp_to_ns(img.header.stamp))
            # pace like a camera so that best-effort history never overflows
            self.wait(lambda: False, 0.03)
        return stamps

    def _own_diagnostics(self) -> list:
        """DiagnosticStatus entries of this harness's node (/diagnostics is shared)."""
        return [st for arr in self.probe.get("/diagnostics") for st in arr.status
                if st.name.startswith(f"{self.ns}:")]

    def diagnostics(self) -> dict[str, str]:
        own = self._own_diagnostics()
        return {kv.key: kv.value for kv in own[-1].values} if own else {}

    def fresh_diagnostics(self) -> dict[str, str]:
        """Diagnostics computed after this call (one report may already be on its way)."""
        n = len(self._own_diagnostics())
        assert self.wait(lambda: len(self._own_diagnostics()) > n + 1)
        return self.diagnostics()

    def close(self) -> None:
        self.spinner.close()


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    harness = Harness({"output_dir": str(out)})
    harness.out = out
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def stamps(h):
    """12 frames → every frame emitted (first window 4, then 4 windows of stride 2)."""
    s = h.send(12)
    per_frame = ("odom", "dynamic_mask", "dynamic_mask/camera_info", "depth", "depth_static",
                 "confidence")
    assert h.wait(lambda: all(len(h.probe.get(f"{NS}/{t}")) >= 12 for t in per_frame) and
                  len(h.probe.get("/tf")) >= 12 and h.probe.get(f"{NS}/static_points") and
                  len(h.probe.get(f"{NS}/path")) >= 12), h.probe.counts()
    assert h.wait(lambda: len(h.probe.get(f"{NS}/static_map")) >= 1)
    assert h.wait(lambda: len(h._own_diagnostics()) >= 1)
    return s


def test_every_topic_carries_source_stamps_and_frames(h, stamps):
    got = {t: h.probe.get(t) for t in TOPICS}
    assert all(got.values()), [t for t, m in got.items() if not m]
    src = set(stamps)
    per_frame = [f"{NS}/odom", f"{NS}/dynamic_mask", f"{NS}/dynamic_mask/camera_info",
                 f"{NS}/depth", f"{NS}/depth_static", f"{NS}/confidence"]
    for topic in per_frame:
        assert [stamp_to_ns(m.header.stamp) for m in got[topic]] == stamps, topic
    for topic in (f"{NS}/static_points", f"{NS}/static_map", f"{NS}/path"):
        for m in got[topic]:
            assert stamp_to_ns(m.header.stamp) in src, topic
            assert m.header.frame_id == "odom", topic
    for m in got[f"{NS}/odom"]:
        assert (m.header.frame_id, m.child_frame_id) == ("odom", "base_link")
    for topic in per_frame[1:]:
        assert {m.header.frame_id for m in got[topic]} == {"camera_optical_frame"}, topic


def test_image_encodings_sizes_and_values(h, stamps):
    mask = h.probe.get(f"{NS}/dynamic_mask")[-1]
    depth = h.probe.get(f"{NS}/depth")[-1]
    static = h.probe.get(f"{NS}/depth_static")[-1]
    conf = h.probe.get(f"{NS}/confidence")[-1]
    info = h.probe.get(f"{NS}/dynamic_mask/camera_info")[-1]
    assert (mask.encoding, depth.encoding, static.encoding, conf.encoding) == \
        ("mono8", "32FC1", "32FC1", "32FC1")
    for m in (mask, depth, static, conf):
        assert (m.height, m.width) == (mask.height, mask.width) and m.height > 0
        assert len(m.data) == m.step * m.height
    assert (info.height, info.width) == (mask.height, mask.width)
    assert info.k[0] > 0 and info.k[4] > 0 and info.k[8] == 1.0
    mk = image_to_array(mask)
    assert set(np.unique(mk)) <= {0, 255}
    d, ds = image_to_array(depth), image_to_array(static)
    dyn = mk == 255
    assert np.all(np.isnan(ds[dyn])) and np.array_equal(ds[~dyn], d[~dyn])
    # the synthetic world has a moving object: some frame has dynamic pixels
    assert any(np.any(image_to_array(m) == 255) for m in h.probe.get(f"{NS}/dynamic_mask"))


def test_odometry_covariance_and_path(h, stamps):
    odoms = h.probe.get(f"{NS}/odom")
    first = odoms[0].pose.pose
    assert (first.position.x, first.position.y, first.position.z) == pytest.approx((0, 0, 0),
                                                                                   abs=1e-6)
    for m in odoms:
        cov = np.array(m.pose.covariance).reshape(6, 6)
        assert np.all(np.isfinite(cov)) and np.all(np.diag(cov) > 0) and cov.max() < 1e300
        assert np.all(np.diag(np.array(m.twist.covariance).reshape(6, 6)) > 0)
        q = m.pose.pose.orientation
        assert math.isclose(q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2, 1.0, rel_tol=1e-6)
    path = h.probe.get(f"{NS}/path")[-1]
    assert [stamp_to_ns(p.header.stamp) for p in path.poses] == stamps
    cloud = cloud_to_arrays(h.probe.get(f"{NS}/static_map")[-1])
    assert cloud["points"].shape[0] > 0 and np.all(np.isfinite(cloud["points"]))
    assert [f.name for f in h.probe.get(f"{NS}/static_points")[-1].fields] == \
        ["x", "y", "z", "rgb", "confidence"]


def test_tf_tree_has_one_parent_per_frame(h, stamps):
    parents: dict[str, set[str]] = {}
    for topic in ("/tf", "/tf_static"):
        for msg in h.probe.get(topic):
            for t in msg.transforms:
                parents.setdefault(t.child_frame_id, set()).add(t.header.frame_id)
    assert parents == {"base_link": {"odom"}, "camera_optical_frame": {"base_link"}}
    tf_stamps = [stamp_to_ns(t.header.stamp) for m in h.probe.get("/tf") for t in m.transforms]
    assert tf_stamps == stamps
    static = h.probe.get("/tf_static")[-1].transforms[0]
    # default mount: optical frame rotated from base_link (z forward = base x)
    q = static.transform.rotation
    assert (q.x, q.y, q.z, q.w) == pytest.approx((-0.5, 0.5, -0.5, 0.5), abs=1e-9)


def test_status_and_diagnostics(h, stamps):
    # the status of a window follows its frames' outputs
    assert h.wait(lambda: stamp_to_ns(h.probe.get(f"{NS}/status")[-1].header.stamp) ==
                  stamps[-1])
    st = h.probe.get(f"{NS}/status")[-1]
    assert st.state == Status.TRACKING and st.state_name == "TRACKING"
    assert st.frames_processed >= 12 and st.windows >= 5 and st.header.frame_id == "odom"
    assert stamp_to_ns(st.header.stamp) == stamps[-1]
    d = h.fresh_diagnostics()
    assert d["state"] == "TRACKING" and int(d["frames_processed"]) >= 12
    for key in node_mod.BAD_INPUT_CLASSES:
        assert f"bad_input.{key}" in d
    assert float(d["latency_p50_s"]) > 0 and d["gpu_memory_allocated_mb"].startswith("n/a")
    # camera_info was sent with every frame: the focal cross-check ran (random weights: any
    # positive ratio)
    assert float(d["focal_ratio_model_over_camera_info"]) > 0


def _call(h, name: str) -> Trigger.Response:
    cli = h.probe.create_client(Trigger, f"{h.ns}/{name}")
    try:
        assert cli.wait_for_service(timeout_sec=30)
        fut = cli.call_async(Trigger.Request())
        assert h.wait(fut.done)
        return fut.result()
    finally:
        h.probe.destroy_client(cli)


def test_save_map_writes_inside_output_dir(h, stamps):
    res = _call(h, "save_map")
    assert res.success, res.message
    ply, tum = h.out / "static_map.ply", h.out / "trajectory.tum"
    assert ply.read_bytes().startswith(b"ply\nformat binary_little_endian")
    rows = [ln.split() for ln in tum.read_text().splitlines()]
    assert len(rows) >= 12 and all(len(r) == 8 for r in rows)
    assert sorted(p.name for p in h.out.iterdir()) == ["static_map.ply", "trajectory.tum"]


def test_save_map_refuses_symlink_escape(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.ply"
    (out / "static_map.ply").symlink_to(victim)
    harness = Harness({"output_dir": str(out)}, namespace="/symlink_test")
    try:
        res = _call(harness, "save_map")
        assert not res.success and "outside output_dir" in res.message
        assert not victim.exists()
    finally:
        harness.close()


def test_parameters_rejected_at_runtime_with_reason(h):
    cases = {
        "window.size": (8, "read-only"),
        "map.publish_period": (-1.0, ""),
        "drop_policy": ("drop_everything", "drop_oldest"),
        "log_throttle": ("fast", ""),
    }
    before = h.node.bad_input["invalid_parameter"]
    for name, (value, reason) in cases.items():
        res = h.node.set_parameters([Parameter(name, value=value)])[0]
        assert not res.successful, name
        assert reason in res.reason, (name, res.reason)
    # each refusal is counted, also those rclpy makes itself (read-only, range, type)
    assert h.node.bad_input["invalid_parameter"] == before + len(cases)
    assert h.wait(lambda: int(h.diagnostics().get("bad_input.invalid_parameter", 0)) >=
                  before + len(cases))
    assert h.node.get_parameter("window.size").value == 4
    ok = h.node.set_parameters([Parameter("map.publish_period", value=0.5)])[0]
    assert ok.successful and h.node.settings["map.publish_period"] == 0.5


def test_invalid_parameters_refused_at_startup():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        for bad in ({"window.stride": 4}, {"drop_policy": "nope"}, {"model.image_width": 500},
                    {"frames.camera_xyz": [0.0, 1.0]}, {"frames.base_frame": "odom"}):
            overrides = {"window.size": 4, "window.stride": 2, **bad}
            with pytest.raises(node_mod.StartupError) as e:
                node_mod.Vggt4dNode(engine_factory=lambda s, d: None, context=ctx,
                                    parameter_overrides=[Parameter(k, value=v)
                                                         for k, v in overrides.items()])
            assert str(e.value)
    finally:
        rclpy.try_shutdown(context=ctx)


def test_model_warm_up_at_startup_runs_two_windows():
    """model.warmup_width/height: two synthetic windows of that camera's working size go
    through the real predictor (random_tiny, CPU) while the node starts - all of the first
    window's frames and the second's stride new ones embedded -; the per-frame caches are
    empty after. A half-set size is refused at start-up."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    seen = []
    try:
        def factory(settings, device):
            engine = node_mod.default_engine_factory(settings, device)
            seen.append(engine.predictor)
            return engine
        base = {"window.size": 4, "window.stride": 2, "model.checkpoint": "random_tiny",
                "model.device": "cpu", "model.image_width": 56}
        node = node_mod.Vggt4dNode(
            engine_factory=factory, context=ctx,
            parameter_overrides=[Parameter(k, value=v) for k, v in
                                 {**base, "model.warmup_width": 640,
                                  "model.warmup_height": 480}.items()])
        try:
            predictor = seen[0]
            assert node.warmup_s > 0
            assert predictor.cache_misses == 4 + 2 and predictor.cache_hits == 2
            assert not predictor._cache and not predictor._image_cache    # emptied after
            assert predictor.last_window_frames == 4 and predictor.oom_retries == 0
        finally:
            node.destroy_node()
        with pytest.raises(node_mod.StartupError, match="warmup"):
            node_mod.Vggt4dNode(engine_factory=lambda s, d: None, context=ctx,
                                parameter_overrides=[Parameter(k, value=v) for k, v in
                                                     {**base, "model.warmup_width": 640}.items()])
    finally:
        rclpy.try_shutdown(context=ctx)


def test_cuda_unavailable_is_a_startup_error_before_advertising():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    built = []
    try:
        with pytest.raises(node_mod.StartupError, match="cuda"):
            node_mod.Vggt4dNode(engine_factory=lambda s, d: built.append(d), context=ctx,
                                cuda_available=False,
                                parameter_overrides=[Parameter("model.device", value="cuda")])
        assert not built
        assert node_mod.resolve_device("auto", cuda_available=False)[0] == "cpu"
        assert node_mod.resolve_device("auto", cuda_available=True) == ("cuda", "")
    finally:
        rclpy.try_shutdown(context=ctx)


def test_params_file_is_honoured(tmp_path):
    yaml_text = (ROOT / "config" / "vggt4d.yaml").read_text()
    yaml_text = yaml_text.replace("odom_frame: odom", "odom_frame: world_odom")
    yaml_text = yaml_text.replace("voxel_size: 0.05", "voxel_size: 0.07")
    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml_text)
    harness = Harness({}, cli_args=["--ros-args", "--params-file", str(params_file)],
                      namespace="/params_test")
    try:
        s = harness.node.settings
        assert s["frames.odom_frame"] == "world_odom" and s["map.voxel_size"] == 0.07
        assert s["model.checkpoint"] == "random_tiny"      # overrides beat the file
        assert harness.node.engine.config.voxel_size == 0.07
        harness.send(4)
        odom = f"{harness.ns}/odom"
        assert harness.wait(lambda: harness.probe.get(odom))
        assert harness.probe.get(odom)[0].header.frame_id == "world_odom"
    finally:
        harness.close()


def test_huge_images_are_downscaled_before_queueing(h):
    max_w = h.node.settings["input.max_width"]
    out = h.node._limit_size(np.zeros((1000, 3 * max_w, 3), np.uint8))
    assert out.shape == (333, max_w, 3) and out.dtype == np.uint8
    small = np.zeros((10, 20, 3), np.uint8)
    assert h.node._limit_size(small) is small


def _bad_image(h, kind: str):
    img, _ = h.frame_msgs(h.next_index)
    if kind == "unsupported_encoding":
        img.encoding = "bayer_rggb8"
    elif kind == "zero_size":
        img.height = 0
    elif kind == "truncated":
        img.data = bytes_to_uint8_array(bytes(img.data)[: len(img.data) // 2])
    return img


def _processed(h) -> int:
    return h.node.frames_processed


@pytest.mark.parametrize("kind", ["unsupported_encoding", "zero_size", "truncated",
                                  "missing_camera_info", "invalid_camera_info",
                                  "stamp_backwards", "image_size_changed",
                                  "stamp_not_increasing"])
def test_bad_input_is_logged_counted_and_survived(h, stamps, kind):
    before = h.node.bad_input[kind]
    if kind in ("unsupported_encoding", "zero_size", "truncated"):
        h.pub_image.publish(_bad_image(h, kind))
    elif kind == "missing_camera_info":
        h.send(1, with_info=False)
        h.send(1)                         # reported when the next image arrives
    elif kind == "invalid_camera_info":
        _, info = h.frame_msgs(h.next_index)
        info.k = [float("nan")] * 9
        h.pub_info.publish(info)
    elif kind == "stamp_backwards":
        img, info = h.frame_msgs(0)       # the bag starts again
        h.pub_info.publish(info)
        h.pub_image.publish(img)
    elif kind == "stamp_not_increasing":
        # the newest frame sent so far must have reached the node first: a stamp read while
        # frames are still on the wire can be > stamps.backwards_reset older than the newest
        # one by the time this frame arrives (then it counts as stamp_backwards instead)
        newest = stamp_to_ns(h.frame_msgs(h.next_index - 1)[0].header.stamp)
        assert h.wait(lambda: h.node._last_stamp == newest)
        img, info = h.frame_msgs(h.next_index, stamp_ns=newest)
        h.pub_info.publish(info)
        h.pub_image.publish(img)
    elif kind == "image_size_changed":
        img, info = h.frame_msgs(h.next_index)
        small = image_to_array(img)[: H // 2, : W // 2].copy()
        h.next_index += 1
        h.pub_image.publish(array_to_image(small, "rgb8", stamp=img.header.stamp,
                                           frame_id="camera_optical_frame"))
    assert h.wait(lambda: h.node.bad_input[kind] > before), kind
    assert h.wait(lambda: int(h.diagnostics().get(f"bad_input.{kind}", 0)) > before)
    # the node keeps running: new good frames are processed
    n = _processed(h)
    h.send(6)
    assert h.wait(lambda: _processed(h) > n), f"no output after {kind}"


def test_reset_service_starts_a_new_sequence(h, stamps):
    assert h.node.set_parameters([Parameter("path.max_poses", value=3)])[0].successful
    res = _call(h, "reset")
    assert res.success
    assert h.wait(lambda: h.probe.get(f"{NS}/status")[-1].state == Status.RESET)
    new = h.send(4)

    def new_odoms():
        return [m for m in h.probe.get(f"{NS}/odom") if stamp_to_ns(m.header.stamp) in new]
    assert h.wait(lambda: len(new_odoms()) == 4)
    first = new_odoms()[0].pose.pose.position
    assert (first.x, first.y, first.z) == pytest.approx((0, 0, 0), abs=1e-6)
    assert h.wait(lambda: [stamp_to_ns(p.header.stamp)
                           for p in h.probe.get(f"{NS}/path")[-1].poses] == new[-3:])


def test_publish_tf_toggles_at_runtime(h, stamps):
    assert h.node.set_parameters([Parameter("publish_tf", value=False)])[0].successful
    try:
        new = h.send(4)
        conf = f"{NS}/confidence"        # published after the frame's odometry and TF
        assert h.wait(lambda: sum(stamp_to_ns(m.header.stamp) in new
                                  for m in h.probe.get(conf)) >= 2)
        tf_stamps = {stamp_to_ns(t.header.stamp) for m in h.probe.get("/tf")
                     for t in m.transforms}
        assert not tf_stamps & set(new)
    finally:
        assert h.node.set_parameters([Parameter("publish_tf", value=True)])[0].successful


class FailingOncePredictor:
    """The real VGGT4D predictor, except that its second window raises (an injected fault,
    like a CUDA error inside the model)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def predict(self, images, frame_keys):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected inference failure")
        return self.inner.predict(images, frame_keys)


def test_inference_exception_is_counted_and_the_node_lives():
    from vggt4d_ros.stream.engine import StreamEngine
    from vggt4d_ros.stream.factory import build_predictor

    def factory(settings, device):
        pred = FailingOncePredictor(build_predictor(node_mod.predictor_config(settings, device)))
        return StreamEngine(pred, node_mod.stream_config(settings))
    harness = Harness({}, namespace="/fault_test", engine_factory=factory)
    try:
        harness.send(6)           # window 1 (4 frames) ok, window 2 raises
        assert harness.wait(lambda: harness.node.bad_input["inference_error"] == 1)
        n = harness.node.frames_processed
        harness.send(8)           # a new sequence starts after the failed window
        assert harness.wait(lambda: harness.node.frames_processed > n)
        d = harness.fresh_diagnostics()
        assert d["bad_input.inference_error"] == "1"
        assert int(d["resets.inference_error"]) == 1
    finally:
        harness.close()


def test_parameter_services_describe_and_refuse_like_ros2_param(h):
    """What `ros2 param describe` / `ros2 param set` see, through the node's real services."""
    from rcl_interfaces.msg import Parameter as ParamMsg, ParameterType, ParameterValue
    from rcl_interfaces.srv import DescribeParameters, SetParameters

    def call(srv_type, name, request):
        cli = h.probe.create_client(srv_type, f"{h.ns}/{name}")
        try:
            assert cli.wait_for_service(timeout_sec=30)
            fut = cli.call_async(request)
            assert h.wait(fut.done)
            return fut.result()
        finally:
            h.probe.destroy_client(cli)
    desc = call(DescribeParameters, "describe_parameters",
                DescribeParameters.Request(names=["window.size", "map.voxel_size",
                                                  "drop_policy"])).descriptors
    assert desc[0].type == ParameterType.PARAMETER_INTEGER and desc[0].read_only
    assert (desc[0].integer_range[0].from_value, desc[0].integer_range[0].to_value) == (2, 128)
    assert desc[1].floating_point_range[0].from_value > 0 and desc[1].description
    assert not desc[2].read_only and "drop_newest" in desc[2].additional_constraints
    bad = ParamMsg(name="drop_policy", value=ParameterValue(
        type=ParameterType.PARAMETER_STRING, string_value="drop_all"))
    res = call(SetParameters, "set_parameters", SetParameters.Request(parameters=[bad]))
    assert not res.results[0].successful and "drop_oldest" in res.results[0].reason
    assert h.node.get_parameter("drop_policy").value == "drop_oldest"


def test_odometry_follows_the_true_motion_in_rep105_axes():
    """Frame conventions end to end: with a predictor that answers from the synthetic world
    (tools.gt_predictor: no noise, random per-window scale), ~/odom must be the true
    base_link motion expressed in odom (x forward, y left, z up; origin = first frame),
    up to one global scale."""
    from scipy.spatial.transform import Rotation

    from vggt4d_ros.ros.transforms import LINK_FROM_OPTICAL, invert, pose_to_matrix
    from vggt4d_ros.stream.engine import StreamEngine
    from vggt4d_ros.tools.gt_predictor import GroundTruthPredictor
    world = SynthWorld(SynthConfig(width=W, height=H, num_frames=200, num_objects=1, seed=3))

    def factory(settings, device):     # the harness renders the same (deterministic) world
        pred = GroundTruthPredictor(world, depth_noise=0.0, rot_noise_deg=0.0, trans_noise=0.0,
                                    seed=2, index_of_key=lambda k: k)
        return StreamEngine(pred, node_mod.stream_config(settings))
    harness = Harness({"window.size": 6, "window.stride": 3}, namespace="/gt_test",
                      engine_factory=factory)
    try:
        stamps = harness.send(15)
        odom = f"{harness.ns}/odom"
        assert harness.wait(lambda: len(harness.probe.get(odom)) == 15)
        got = [pose_to_matrix(m.pose.pose) for m in harness.probe.get(odom)]
        assert [stamp_to_ns(m.header.stamp) for m in harness.probe.get(odom)] == stamps
        base_from_cam = LINK_FROM_OPTICAL            # default mount: no offset
        w_c = [invert(world.render(i).cam_from_world) for i in range(15)]
        want = [base_from_cam @ invert(w_c[0]) @ w @ invert(base_from_cam) for w in w_c]
        for g, w in zip(got, want):
            angle = Rotation.from_matrix(g[:3, :3].T @ w[:3, :3]).magnitude()
            assert np.degrees(angle) < 1.0
        t_got = np.array([g[:3, 3] for g in got])
        t_want = np.array([w[:3, 3] for w in want])
        scale = np.sum(t_got * t_want) / np.sum(t_want * t_want)
        assert scale > 0
        err = np.linalg.norm(t_got - scale * t_want, axis=1).max()
        assert err < 0.05 * np.linalg.norm(scale * t_want, axis=1).max()
        # twist (REP-105: base_link axes): unknown for the first frame, then the true body
        # velocity between consecutive frames (odometry units, i.e. x scale)
        msgs = harness.probe.get(odom)
        tw0 = np.array(msgs[0].twist.covariance).reshape(6, 6)
        assert np.allclose(np.diag(tw0), 1e6)
        lin_err, ang_err, lin_max = [], [], 0.0
        for k in range(1, 15):
            dt = (stamps[k] - stamps[k - 1]) * 1e-9
            ra, rb = want[k - 1][:3, :3], want[k][:3, :3]
            lin = rb.T @ (want[k][:3, 3] - want[k - 1][:3, 3]) * scale / dt
            ang = Rotation.from_matrix(ra.T @ rb).as_rotvec() / dt
            t = msgs[k].twist.twist
            got_lin = np.array([t.linear.x, t.linear.y, t.linear.z])
            got_ang = np.array([t.angular.x, t.angular.y, t.angular.z])
            cov = np.diag(np.array(msgs[k].twist.covariance).reshape(6, 6))
            assert np.all(cov > 0) and np.all(cov < 1e6)
            lin_err.append(np.linalg.norm(got_lin - lin))
            ang_err.append(np.linalg.norm(got_ang - ang))
            lin_max = max(lin_max, np.linalg.norm(lin))
        assert lin_max > 0 and max(lin_err) < 0.01 * lin_max     # measured 3e-7 (of 0.86)
        assert max(ang_err) < 1e-3                               # rad/s; measured 5e-8
    finally:
        harness.close()
