"""Package metadata agrees with the code: every import has a declared dependency (package.xml
for a ROS install, requirements*.txt for the venv), versions match, console scripts exist."""
from __future__ import annotations

import ast
import importlib
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> (rosdep key in package.xml, pip requirement name)
THIRD_PARTY = {
    "numpy": ("python3-numpy", "numpy"), "torch": ("python3-torch", None),
    # Triton ships with PyTorch's CUDA wheels; imported lazily on CUDA only (refine_fast)
    "triton": ("python3-torch", None),
    "scipy": ("python3-scipy", "scipy"), "cv2": ("python3-opencv", "opencv-python-headless"),
    "PIL": ("python3-pil", "pillow"), "tqdm": ("python3-tqdm", "tqdm"),
    "safetensors": ("python3-safetensors", "safetensors"),
    "huggingface_hub": ("python3-huggingface-hub", "huggingface_hub"),
    "sklearn": ("python3-sklearn", "scikit-learn"), "skimage": ("python3-skimage", "scikit-image"),
    "rosbags": ("rosbags-pip", "rosbags"), "evo": ("evo-pip", "evo"),
    "matplotlib": ("python3-matplotlib", "matplotlib"),
}
ROS_PACKAGE = re.compile(r"^(rclpy|ament_index_python|rcl_interfaces|builtin_interfaces|"
                         r"[a-z0-9_]+_(msgs|srvs))$")


def _package_xml() -> ET.Element:
    return ET.parse(ROOT / "package.xml").getroot()


def _declared(kinds=("depend", "exec_depend")) -> set[str]:
    return {e.text.strip() for k in kinds for e in _package_xml().iter(k)}


def _requirements() -> set[str]:
    names = set()
    for f in ROOT.glob("requirements*.txt"):
        for line in f.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.add(re.split(r"[=<>\[ ]", line)[0].lower().replace("_", "-"))
    return names


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "vggt4d_ros").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "vggt4d_ros":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_package_xml_is_format3_with_the_core_dependencies():
    root = _package_xml()
    assert root.get("format") == "3" and root.findtext("name") == "vggt4d_ros"
    assert root.findtext("license") == "Apache-2.0"
    core = {"rclpy", "sensor_msgs", "nav_msgs", "geometry_msgs", "tf2_msgs", "std_srvs",
            "diagnostic_msgs", "python3-torch", "python3-numpy"}
    assert core <= _declared(), core - _declared()


def test_every_import_is_a_declared_dependency():
    declared, reqs = _declared(), _requirements()
    missing = []
    for module, files in sorted(_third_party_imports().items()):
        if ROS_PACKAGE.match(module):
            if module not in declared:
                missing.append(f"package.xml lacks {module} (imported in {sorted(files)[0]})")
            continue
        if module not in THIRD_PARTY:
            missing.append(f"unknown third-party import {module!r} in {sorted(files)}: "
                           "declare it here, in package.xml and in requirements.txt")
            continue
        rosdep, pip_name = THIRD_PARTY[module]
        if rosdep not in declared:
            missing.append(f"package.xml lacks {rosdep} (for {module})")
        if pip_name and pip_name.lower().replace("_", "-") not in reqs:
            missing.append(f"requirements lack {pip_name} (for {module})")
    assert not missing, "\n".join(missing)


def test_versions_agree():
    setup_py = (ROOT / "setup.py").read_text()
    version = re.search(r'version="([^"]+)"', setup_py).group(1)
    import vggt4d_ros
    assert _package_xml().findtext("version") == version == vggt4d_ros.__version__


def test_console_scripts_resolve():
    setup_py = (ROOT / "setup.py").read_text()
    scripts = re.findall(r'"([\w-]+) = ([\w.]+):(\w+)"', setup_py)
    assert len(scripts) >= 8
    for name, module, func in scripts:
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("path", ["LICENSE", "README.md", ".ci/run", "resource/vggt4d_ros",
                                  "config/vggt4d.yaml", "launch/vggt4d.launch.py",
                                  "msg/Status.msg", "CMakeLists.txt"])
def test_package_files_exist(path):
    assert (ROOT / path).is_file(), path
