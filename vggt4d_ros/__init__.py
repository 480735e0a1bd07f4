"""vggt4d_ros: VGGT4D 4D perception (poses, depth, dynamic masks, static maps) for ROS 2.

Layers, each importing only those before it: ``geometry`` and ``model`` (VGGT) at the base,
``dynamic`` (VGGT4D) on both, ``stream`` (sliding-window engine) on those, then ``ros`` (the
only rclpy user) and ``tools`` (CLIs over the same engine), which do not import each other.
"""

__version__ = "0.1.0"

# Without a ROS install the generated message module `vggt4d_ros.msg` is built by
# scripts/build_interfaces.sh into <venv>/lib/vggt4d_ros_interfaces/vggt4d_ros (outside
# sys.path, so it never shadows these sources); add it to this package's path. In a ROS
# workspace colcon installs it next to these files and nothing needs to be added.
import os as _os
import sys as _sys

_GENERATED = _os.path.join(_sys.prefix, "lib", "vggt4d_ros_interfaces", "vggt4d_ros")
if _os.path.isdir(_GENERATED) and _GENERATED not in __path__:
    __path__.append(_GENERATED)
del _os, _sys
