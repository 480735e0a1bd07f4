"""Reusable transformer building blocks (attention, MLP, LayerScale, RoPE, blocks)."""
