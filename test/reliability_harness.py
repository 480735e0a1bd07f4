"""Test helper for test_reliability_*.py: the real vggt4d node (real rclpy, MultiThreadedExecutor)
plus a probe node, in their own context and DDS domain (LOCALHOST discovery), so that parallel
test runs on one machine never talk to each other."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger

from vggt4d_ros.msg import Status
from vggt4d_ros.ros import node as node_mod
from vggt4d_ros.ros.image_conv import array_to_image
from vggt4d_ros.ros.probe import ThreadSpinner, TopicProbe, qos_for

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
#: one DDS domain per test process (pid-based, 200..229; other test files use 0 and 100..199):
#: parallel runs stay apart; names are namespaced and /diagnostics is filtered by node too
DOMAIN_ID = 200 + os.getpid() % 30

TINY = {"window.size": 4, "window.stride": 2, "model.checkpoint": "random_tiny",
        "model.device": "cpu", "model.image_width": 56, "map.publish_period": 0.0,
        "log_throttle": 0.0, "queue_size": 64, "camera_info.enabled": False}


def wait_for(pred: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll until ``pred()``; the timeout is a safety net against hangs, not a measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def new_context() -> rclpy.Context:
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    return ctx


class NodeHarness:
    """The node + a probe (odom, status, diagnostics) spinning on one executor thread."""

    def __init__(self, overrides: dict[str, Any], namespace: str = "/rel",
                 engine_factory: Optional[Callable] = None) -> None:
        self.ctx = new_context()
        self.ns = f"{namespace}/vggt4d"
        params = {**TINY, **overrides}
        try:
            self.node = node_mod.Vggt4dNode(
                engine_factory=engine_factory, context=self.ctx, namespace=namespace,
                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        except BaseException:
            rclpy.try_shutdown(context=self.ctx)
            raise
        self.probe = TopicProbe("rel_probe", context=self.ctx)
        self.probe.watch(f"{self.ns}/odom", Odometry, qos_for())
        self.probe.watch(f"{self.ns}/status", Status, qos_for(transient_local=True, depth=1))
        self.probe.watch("/diagnostics", DiagnosticArray, qos_for())
        self.pub_image = self.probe.create_publisher(Image, f"{namespace}/image",
                                                     qos_for(depth=100))
        self.pub_info = self.probe.create_publisher(CameraInfo, f"{namespace}/camera_info",
                                                    qos_for(depth=100))
        self.spinner = ThreadSpinner(self.ctx, self.node, self.probe)
        assert wait_for(lambda: self.pub_image.get_subscription_count() >= 1
                        and self.node.pub_odom.get_subscription_count() >= 1), "no discovery"

    def image(self, rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8") -> Image:
        stamp = rclpy.time.Time(nanoseconds=stamp_ns).to_msg()
        return array_to_image(rgb, encoding, stamp=stamp, frame_id="camera_optical_frame")

    def send(self, rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8") -> None:
        """Publish one image, paced like a camera (best-effort history never overflows)."""
        self.pub_image.publish(self.image(rgb, stamp_ns, encoding))
        time.sleep(0.03)

    def odoms(self) -> list[Odometry]:
        return self.probe.get(f"{self.ns}/odom")

    def _own_diagnostics(self) -> list:
        """This node's DiagnosticStatus messages, oldest first (others on /diagnostics skipped)."""
        name = self.node.get_fully_qualified_name()
        return [st for arr in self.probe.get("/diagnostics") for st in arr.status
                if st.name.startswith(name + ":")]

    def diagnostics(self) -> dict[str, str]:
        own = self._own_diagnostics()
        return {kv.key: kv.value for kv in own[-1].values} if own else {}

    def fresh_diagnostics(self) -> dict[str, str]:
        n = len(self._own_diagnostics())
        assert wait_for(lambda: len(self._own_diagnostics()) > n)
        return self.diagnostics()

    def call(self, name: str) -> Trigger.Response:
        cli = self.probe.create_client(Trigger, f"{self.ns}/{name}")
        try:
            assert cli.wait_for_service(timeout_sec=30)
            fut = cli.call_async(Trigger.Request())
            assert wait_for(fut.done)
            return fut.result()
        finally:
            self.probe.destroy_client(cli)

    def close(self) -> None:
        self.spinner.close()


def synth_frames(n: int, width: int = 56, height: int = 42, seed: int = 3):
    """n frames (image [H,W,3] uint8, stamp_ns) of the synthetic world."""
    from vggt4d_ros.tools.synth import SynthConfig, SynthWorld
    world = SynthWorld(SynthConfig(width=width, height=height, num_frames=n, num_objects=1,
                                   seed=seed))
    return [(f.image, f.stamp_ns) for f in (world.render(i) for i in range(n))]
