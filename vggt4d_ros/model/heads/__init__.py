"""Prediction heads: camera (pose encoding), DPT (depth / point maps), tracking."""
