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


# layer -> internal layers it may import (besides itself)
ALLOWED = {"geometry": set(), "model": set(), "dynamic": {"model", "geometry"},
           "stream": {"model", "geometry", "dynamic"},
           "ros": {"model", "geometry", "dynamic", "stream", "msg"},
           "tools": {"model", "geometry", "dynamic", "stream"}}
def _internal_targets(path: Path) -> set[str]:
    """Top-level vggt4d_ros subpackages a module imports (absolute or relative imports)."""
    import ast
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])   # e.g. vggt4d_ros/model/heads
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                if len(parts) == 1:          # "from .. import x": x is the subpackage
                    parts += [a.name for a in node.names][:1]
            else:
                parts = (node.module or "").split(".")
        elif isinstance(node, ast.Import):
            parts = node.names[0].name.split(".")
        else:
            continue
        if parts[0] == "vggt4d_ros" and len(parts) > 1:
            targets.add(parts[1])
    return targets


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_lower_layers(layer):
    bad = [f"{p.relative_to(ROOT)} imports {t}"
           for p in (ROOT / "vggt4d_ros" / layer).rglob("*.py")
           for t in _internal_targets(p) if t != layer and t not in ALLOWED[layer]]
    assert not bad, bad
