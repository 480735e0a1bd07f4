"""Point tracker used by VGGT's track head: correlation pyramid, update transformer, tracker."""
from .blocks import CorrPyramid, EfficientUpdateFormer
from .tracker import TrackerPredictor

__all__ = ["CorrPyramid", "EfficientUpdateFormer", "TrackerPredictor"]
