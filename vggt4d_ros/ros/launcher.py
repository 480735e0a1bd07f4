"""``vggt4d-launch``: what ``ros2 launch vggt4d_ros vggt4d.launch.py`` does, without the launch
packages (not installable here).

Same arguments (name, default, meaning) as ``launch/vggt4d.launch.py`` — a test compares the
two — same params file, same remappings. The node runs in this process (default) or as a
child process (``--subprocess``), started with the equivalent command line:

    vggt4d_node --ros-args -r __node:=vggt4d -r __ns:=<namespace> --params-file <file>
                -p use_sim_time:=<bool> -r image:=<image_topic>
                -r camera_info:=<camera_info_topic> --log-level <level>

    vggt4d-launch image_topic:=/camera/image_raw use_sim_time:=true
    vggt4d-launch --print          # show the command line and exit
    vggt4d-launch params_file:=my.yaml --ros-args -p window.size:=8   # extra node arguments
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional

#: (name, default, description) — identical to the DeclareLaunchArgument list of the launch
#: file. ``params_file`` default "" = the installed/package config/vggt4d.yaml.
LAUNCH_ARGUMENTS: tuple[tuple[str, str, str], ...] = (
    ("params_file", "", "YAML parameters file (default: config/vggt4d.yaml of the package)"),
    ("namespace", "", "namespace of the node"),
    ("node_name", "vggt4d", "name of the node"),
    ("image_topic", "/camera/image_raw", "input image topic (remaps 'image')"),
    ("camera_info_topic", "/camera/camera_info", "camera info topic (remaps 'camera_info')"),
    ("use_sim_time", "false", "use /clock (bag replay)"),
    ("log_level", "info", "node log level"),
)
#: remapping (node name → launch argument giving the target)
REMAPPINGS: tuple[tuple[str, str], ...] = (("image", "image_topic"),
                                           ("camera_info", "camera_info_topic"))


def default_params_file() -> Path:
    """``share/vggt4d_ros/config/vggt4d.yaml`` of an install, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        p = Path(get_package_share_directory("vggt4d_ros")) / "config" / "vggt4d.yaml"
        if p.is_file():
            return p
    except Exception:  # not installed as an ament package
        pass
    p = Path(__file__).resolve().parents[2] / "config" / "vggt4d.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"default params file not found ({p}); pass params_file:=...")
    return p


def parse_launch_args(items: list[str]) -> dict[str, str]:
    """``["name:=value", ...]`` → full argument dict (defaults filled in); unknown names and
    malformed items raise ValueError listing the valid ones."""
    values = {name: default for name, default, _ in LAUNCH_ARGUMENTS}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or name not in values:
            raise ValueError(f"bad launch argument {item!r}; use name:=value with name in "
                             f"{', '.join(values)}")
        values[name] = value
    if values["use_sim_time"].lower() not in ("true", "false"):
        raise ValueError(f"use_sim_time must be true or false, got {values['use_sim_time']!r}")
    return values


def ros_arguments(values: dict[str, str]) -> list[str]:
    """The node's ``--ros-args ...`` list for the launch argument values."""
    params_file = values["params_file"] or str(default_params_file())
    if not Path(params_file).is_file():
        raise FileNotFoundError(f"params_file {params_file} does not exist")
    args = ["--ros-args", "-r", f"__node:={values['node_name']}"]
    if values["namespace"]:
        ns = values["namespace"] if values["namespace"].startswith("/") else \
            "/" + values["namespace"]
        args += ["-r", f"__ns:={ns}"]
    args += ["--params-file", params_file,
             "-p", f"use_sim_time:={values['use_sim_time'].lower()}"]
    for name, arg in REMAPPINGS:
        args += ["-r", f"{name}:={values[arg]}"]
    args += ["--log-level", values["log_level"]]
    return args


def main(args: Optional[list[str]] = None) -> int:
    """Console script ``vggt4d-launch``."""
    ap = argparse.ArgumentParser(
        prog="vggt4d-launch", description=__doc__.split("\n\n")[0],
        epilog="arguments: " + "; ".join(f"{n}:= (default '{d}') {h}"
                                         for n, d, h in LAUNCH_ARGUMENTS))
    ap.add_argument("launch_args", nargs="*", metavar="name:=value")
    ap.add_argument("--subprocess", action="store_true",
                    help="run the node as a child process instead of in this process")
    ap.add_argument("--print", action="store_true", help="print the node command and exit")
    argv = list(sys.argv[1:] if args is None else args)
    extra: list[str] = []
    if "--ros-args" in argv:          # further ROS arguments for the node, e.g. -p name:=value
        i = argv.index("--ros-args")
        argv, extra = argv[:i], argv[i + 1:]
    opts = ap.parse_args(argv)
    try:
        values = parse_launch_args(opts.launch_args)
        ros_args = ros_arguments(values)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    ros_args += extra
    cmd = [sys.executable, "-m", "vggt4d_ros.ros.node", *ros_args]
    if opts.print:
        print(" ".join(cmd))
        return 0
    if opts.subprocess:
        proc = subprocess.Popen(cmd)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
    from vggt4d_ros.ros.node import main as node_main
    return node_main(args=["vggt4d_node", *ros_args])


if __name__ == "__main__":
    sys.exit(main())
