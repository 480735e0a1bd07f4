"""ament_python-style setup for vggt4d_ros (also used by `pip install -e .` without ROS)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vggt4d_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/msg", glob("msg/*.msg")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="vggt4d_ros developers",
    maintainer_email="vggt4d-ros@example.org",
    description="VGGT4D 4D perception (odometry, dynamic masks, depth, static maps) as a ROS 2 node",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vggt4d_node = vggt4d_ros.ros.node:main",
            "vggt4d-launch = vggt4d_ros.ros.launcher:main",
            "vggt4d-bag-play = vggt4d_ros.ros.bag_player:main",
            "vggt4d-synth = vggt4d_ros.tools.synth:main",
            "vggt4d-replay = vggt4d_ros.tools.replay:main",
            "vggt4d-eval = vggt4d_ros.tools.eval:main",
            "vggt4d-benchmark = vggt4d_ros.tools.benchmark:main",
            "vggt4d-bench = vggt4d_ros.tools.bench:main",
            "vggt4d-demo = vggt4d_ros.tools.demo:main",
        ],
    },
)
