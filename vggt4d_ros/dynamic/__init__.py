"""VGGT4D: dynamic saliency from attention Gram statistics, mask clustering/thresholding,
mask refinement, early-stage key suppression and the two-pass pipeline. Pure torch."""
