"""Package layout: every layer exists, documents its job, and the layering rule holds."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["model", "dynamic", "geometry", "stream", "ros", "tools"]
ROS_FREE = ["model", "dynamic", "geometry", "stream"]
ROS_IMPORT = re.compile(
    r"^\s*(import rclpy|from rclpy|import (sensor|nav|geometry|std|tf2|diagnostic|rosgraph)_(msgs|srvs)"
    r"|from (sensor|nav|geometry|std|tf2|diagnostic|rosgraph)_(msgs|srvs))",
    re.M,
)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_has_docstring(layer):
    mod = importlib.import_module(f"vggt4d_ros.{layer}")
    assert mod.__doc__ and len(mod.__doc__.strip()) > 20


@pytest.mark.parametrize("layer", ROS_FREE)
def test_no_ros_below_ros_layer(layer):
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "vggt4d_ros" / layer).rglob("*.py")
                 if ROS_IMPORT.search(p.read_text())]
    assert not offenders, f"ROS imports below ros/: {offenders}"
