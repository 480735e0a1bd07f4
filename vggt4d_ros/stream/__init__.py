"""Streaming engine: frame buffer, window scheduling, Sim(3) stitching of windows on static
points, per-frame outputs and a bounded-memory static voxel map. No ROS imports."""
