"""VGGT (facebook/VGGT-1B), checkpoint-compatible, pure torch.

Patch embed (DINOv2 ViT-L/14 + registers), alternating frame/global attention aggregator with
2-D RoPE, camera head, DPT depth/point heads, track head, pose encoding, preprocessing and
strict checkpoint loading. Knows nothing of VGGT4D or ROS; exposes attention hooks
(Q/K capture, per-layer key masks) that ``dynamic`` uses.
"""
