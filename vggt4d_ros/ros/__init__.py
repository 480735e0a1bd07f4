"""ROS 2 edge: the rclpy node, parameters, QoS, message <-> numpy conversions, TF, services,
diagnostics, launcher and bag player. The ONLY layer that imports rclpy or ROS messages."""
