"""vggt4d_ros: VGGT4D 4D perception (poses, depth, dynamic masks, static maps) for ROS 2.

Layers (imports only point downwards): ``model`` (VGGT) → ``dynamic`` (VGGT4D) →
``geometry`` → ``stream`` (sliding-window engine) → ``ros`` (the only rclpy user) and
``tools`` (CLIs over the same engine).
"""

__version__ = "0.1.0"
