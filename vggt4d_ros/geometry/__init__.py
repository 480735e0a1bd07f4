"""Geometry: rigid and similarity transforms (Umeyama Sim(3)), unprojection, voxel grids.
Pure numpy/torch; every function states its frames (camera-from-world vs world-from-camera)."""
