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
    for _ in range(2):   # the first run rebuilds when msg/, CMakeLists or package.xml changed
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


@pytest.mark.slow
def test_full_cmake_package_build_as_colcon_would(tmp_path):
    """The ROS-workspace path: CMakeLists.txt (ament_cmake + rosidl + Python sources + entry
    scripts + launch/config) builds and installs into a fresh prefix, where `vggt4d_ros` is
    our package and `vggt4d_ros.msg` the generated module."""
    import shutil
    import sys
    venv = Path(sys.prefix)
    src = tmp_path / "src" / "vggt4d_ros"
    src.mkdir(parents=True)
    for name in ("CMakeLists.txt", "package.xml"):
        shutil.copy(ROOT / name, src / name)
    for name in ("msg", "launch", "config", "vggt4d_ros"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    prefix, build = tmp_path / "install", tmp_path / "build"
    env = dict(os.environ, AMENT_PREFIX_PATH=str(venv), CMAKE_PREFIX_PATH=str(venv),
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    for cmd in (["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}",
                 f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
                ["cmake", "--build", str(build), "-j", "2"],
                ["cmake", "--install", str(build)]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for exe in ("vggt4d_node", "vggt4d-launch", "vggt4d-bag-play"):
        assert os.access(prefix / "lib" / "vggt4d_ros" / exe, os.X_OK), exe
    for f in ("launch/vggt4d.launch.py", "config/vggt4d.yaml", "config/vggt4d.rviz",
              "msg/Status.msg", "package.xml"):
        assert (prefix / "share" / "vggt4d_ros" / f).is_file(), f
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    check = ("import vggt4d_ros, vggt4d_ros.ros.params as p; from vggt4d_ros.msg import Status;"
             "print(vggt4d_ros.__file__); print(Status.TRACKING)")
    env2 = dict(os.environ, PYTHONPATH=str(site),
                LD_LIBRARY_PATH=f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    out = subprocess.run([sys.executable, "-c", check], env=env2, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "vggt4d_ros" / "__init__.py"), "1"]
