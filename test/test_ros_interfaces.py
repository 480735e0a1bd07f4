"""Generated interfaces: vggt4d_ros/msg/Status and tf2_msgs/TFMessage import and travel over
real rclpy publishers/subscriptions; the build script is idempotent."""
import os
import subprocess
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from vggt4d_ros.ros.probe import TopicProbe, qos_for, spin_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ros


@pytest.fixture
def ctx():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def test_status_constants_and_fields():
    from vggt4d_ros.msg import Status
    assert (Status.WAITING, Status.TRACKING, Status.LOST, Status.RESET) == (0, 1, 2, 3)
    s = Status(state=Status.LOST, state_name="LOST", frames_dropped=3, message="scene cut")
    assert s.frames_dropped == 3 and s.message == "scene cut"


def _roundtrip(ctx, msg_type, msg, topic):
    node = TopicProbe("iface_probe", context=ctx)
    pub = node.create_publisher(msg_type, topic, qos_for())
    node.watch(topic, msg_type, qos_for())
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    try:
        def published_and_received():
            pub.publish(msg)
            return len(node.get(topic)) >= 3
        assert spin_until(ex, published_and_received, 20.0), "no message came back"
        return node.get(topic)[0]
    finally:
        ex.shutdown()
        node.destroy_node()


def test_status_pub_sub(ctx):
    from vggt4d_ros.msg import Status
    sent = Status(state=Status.TRACKING, state_name="TRACKING", frames_received=10,
                  windows=2, last_alignment_residual=0.25, queue_depth=1, message="ok")
    sent.header.frame_id = "odom"
    got = _roundtrip(ctx, Status, sent, "/test_iface/status")
    assert got == sent


def test_tfmessage_pub_sub(ctx):
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = "odom", "base_link"
    t.transform.rotation.w = 1.0
    t.transform.translation.x = 1.5
    got = _roundtrip(ctx, TFMessage, TFMessage(transforms=[t]), "/test_iface/tf")
    assert got.transforms[0].child_frame_id == "base_link"
    assert got.transforms[0].transform.translation.x == 1.5


def test_build_script_is_idempotent():
    venv = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv"))
    out = subprocess.run([str(ROOT / "scripts" / "build_interfaces.sh"), str(venv)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "already importable" in out.stdout


def test_cmakelists_generates_our_msgs_and_installs_python():
    text = (ROOT / "CMakeLists.txt").read_text()
    for msg in (ROOT / "msg").glob("*.msg"):
        assert f"msg/{msg.name}" in text
    assert "rosidl_generate_interfaces" in text and "ament_python_install_package" in text
    assert "<member_of_group>rosidl_interface_packages</member_of_group>" in \
        (ROOT / "package.xml").read_text()
