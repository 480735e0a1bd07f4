"""Start the vggt4d node with its parameters file and topic remappings.

    ros2 launch vggt4d_ros vggt4d.launch.py image_topic:=/camera/image_raw use_sim_time:=true

Without a ROS install (no launch packages) use the equivalent `vggt4d-launch` with the same
arguments (vggt4d_ros/ros/launcher.py; a test keeps the two in step).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution(
        [FindPackageShare("vggt4d_ros"), "config", "vggt4d.yaml"])
    params_file = LaunchConfiguration("params_file")
    use_sim_time = LaunchConfiguration("use_sim_time")
    has_params_file = PythonExpression(["'", params_file, "' != ''"])

    def node(params, condition):
        return Node(
            package="vggt4d_ros",
            executable="vggt4d_node",
            name=LaunchConfiguration("node_name"),
            namespace=LaunchConfiguration("namespace"),
            parameters=[params, {"use_sim_time": use_sim_time}],
            remappings=[
                ("image", LaunchConfiguration("image_topic")),
                ("camera_info", LaunchConfiguration("camera_info_topic")),
            ],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
            output="screen",
            emulate_tty=True,
            condition=condition,
        )

    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value="",
                              description="YAML parameters file (default: config/vggt4d.yaml "
                                          "of the package)"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of the node"),
        DeclareLaunchArgument("node_name", default_value="vggt4d",
                              description="name of the node"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="input image topic (remaps 'image')"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info",
                              description="camera info topic (remaps 'camera_info')"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="node log level"),
        node(params_file, IfCondition(has_params_file)),
        node(default_params, UnlessCondition(has_params_file)),
    ])
