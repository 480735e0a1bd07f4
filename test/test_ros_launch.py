"""Launch, launcher and config files: the launch file (not runnable here, no launch packages)
is inspected with ast and must match the launcher's arguments and remappings; the YAML
declares exactly the node's parameters; the RViz config shows the node's topics in odom."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")
from vggt4d_ros.ros import launcher, params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "vggt4d.launch.py"
pytestmark = pytest.mark.ros


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _kw(call, key):
    return next(k.value for k in call.keywords if k.arg == key)


def test_launch_file_arguments_match_launcher():
    tree = ast.parse(LAUNCH.read_text())
    declared = []
    for c in _calls(tree, "DeclareLaunchArgument"):
        name = ast.literal_eval(c.args[0])
        declared.append((name, ast.literal_eval(_kw(c, "default_value")),
                         ast.literal_eval(_kw(c, "description"))))
    assert declared == list(launcher.LAUNCH_ARGUMENTS)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description"
               for n in tree.body)


def test_launch_file_node_package_executable_remappings():
    tree = ast.parse(LAUNCH.read_text())
    nodes = _calls(tree, "Node")
    assert nodes
    for n in nodes:
        assert ast.literal_eval(_kw(n, "package")) == "vggt4d_ros"
        assert ast.literal_eval(_kw(n, "executable")) == "vggt4d_node"
        remaps = [(ast.literal_eval(t.elts[0]), ast.literal_eval(t.elts[1].args[0]))
                  for t in _kw(n, "remappings").elts]
        assert remaps == list(launcher.REMAPPINGS)
    assert "vggt4d_node = vggt4d_ros.ros.node:main" in (ROOT / "setup.py").read_text()
    assert "vggt4d_node=vggt4d_ros.ros.node:main" in (ROOT / "CMakeLists.txt").read_text()
    # imports only the standard launch packages
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"launch", "launch.actions", "launch.conditions", "launch.substitutions",
                    "launch_ros.actions", "launch_ros.substitutions"}


def test_launcher_builds_the_same_command_line():
    values = launcher.parse_launch_args(["image_topic:=/cam/img", "use_sim_time:=true",
                                         "namespace:=robot1"])
    args = launcher.ros_arguments(values)
    assert args[0] == "--ros-args"
    pairs = list(zip(args, args[1:]))
    assert ("-r", "image:=/cam/img") in pairs and ("-r", "camera_info:=/camera/camera_info") \
        in pairs
    assert ("-r", "__ns:=/robot1") in pairs and ("-r", "__node:=vggt4d") in pairs
    assert ("-p", "use_sim_time:=true") in pairs
    assert ("--params-file", str(ROOT / "config" / "vggt4d.yaml")) in pairs
    for bad in (["nope:=1"], ["image_topic=/x"], ["use_sim_time:=maybe"]):
        with pytest.raises(ValueError):
            launcher.parse_launch_args(bad)
    out = subprocess.run([sys.executable, "-m", "vggt4d_ros.ros.launcher", "--print",
                          "image_topic:=/cam/img"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "image:=/cam/img" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "vggt4d_ros.ros.launcher", "--print",
                          "params_file:=/nonexistent.yaml"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_yaml_declares_exactly_the_node_parameters_with_valid_defaults():
    doc = yaml.safe_load((ROOT / "config" / "vggt4d.yaml").read_text())
    flat = _flatten(doc["/**"]["ros__parameters"])
    assert set(flat) == set(params.SPECS)
    for name, value in flat.items():
        assert params.check_value(name, value) is None, name
        assert value == params.SPECS[name].default, f"{name}: yaml and code defaults differ"
    assert params.check_combination(flat) is None


def test_every_parameter_has_a_descriptor_with_description_and_range():
    for spec in params.PARAMS:
        d = params.descriptor(spec)
        assert d.description and d.read_only == (not spec.dynamic)
        if spec.lo is not None:
            assert d.integer_range or d.floating_point_range, spec.name


def test_rviz_config_shows_node_topics_in_odom():
    cfg = yaml.safe_load((ROOT / "config" / "vggt4d.rviz").read_text())
    vm = cfg["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == "odom"
    shown = {(d["Class"], d.get("Topic", {}).get("Value")) for d in vm["Displays"]}
    for item in [("rviz_default_plugins/Image", "/camera/image_raw"),
                 ("rviz_default_plugins/Image", "/vggt4d/dynamic_mask"),
                 ("rviz_default_plugins/Odometry", "/vggt4d/odom"),
                 ("rviz_default_plugins/Path", "/vggt4d/path"),
                 ("rviz_default_plugins/PointCloud2", "/vggt4d/static_map"),
                 ("rviz_default_plugins/TF", None)]:
        assert item in shown, item
    static_map = next(d for d in vm["Displays"] if d.get("Topic", {}).get("Value") ==
                      "/vggt4d/static_map")
    assert static_map["Topic"]["Durability Policy"] == "Transient Local"


def test_launcher_passes_extra_ros_arguments():
    out = subprocess.run([sys.executable, "-m", "vggt4d_ros.ros.launcher", "--print",
                          "namespace:=r2", "--ros-args", "-p", "log_throttle:=60.0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("--log-level info -p log_throttle:=60.0")


def test_ros_readme_parameter_table_is_current():
    text = (ROOT / "vggt4d_ros" / "ros" / "README.md").read_text()
    assert params.markdown_table() in text, \
        "regenerate the table: python -m vggt4d_ros.ros.params"
