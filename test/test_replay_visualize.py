"""Pictures written by replay: overlays, colour maps, map renderings, GIF/MP4, labels."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vggt4d_ros.tools import visualize as vz


def _image(h: int = 40, w: int = 60) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = 90
    return img


def test_visualize_overlay_tints_only_dynamic_pixels() -> None:
    img = _image()
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    out = vz.overlay_mask(img, mask)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out[15, 20, 0] > 100                      # tinted red inside
    np.testing.assert_array_equal(out[30:, 40:], img[30:, 40:])   # untouched far outside
    with pytest.raises(ValueError, match="does not match"):
        vz.overlay_mask(img, mask[:10])


def test_visualize_depth_and_confidence_colour_maps() -> None:
    d = np.tile(np.linspace(1.0, 10.0, 60, dtype=np.float32), (40, 1))
    d[0, 0], d[0, 1], d[0, 2] = 0.0, np.nan, np.inf
    rgb = vz.colorize_depth(d)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    assert (rgb[0, :3] == 0).all()                   # invalid depth → black
    assert not np.array_equal(rgb[20, 5], rgb[20, 55])   # near and far differ
    c = vz.colorize_confidence(np.tile(np.linspace(1, 50, 60, dtype=np.float32), (40, 1)))
    assert c.shape == (40, 60, 3) and not np.array_equal(c[5, 0], c[5, -1])
    assert vz.colorize_depth(np.zeros((4, 4), np.float32)).max() == 0   # all invalid


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A floor (z=0 in a z-up world) with red/blue halves and cameras looking along +x."""
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(0, 10, 4000), rng.uniform(-3, 3, 4000), np.zeros(4000)], 1)
    cols = np.where(pts[:, 1:2] > 0, [[255, 0, 0]], [[0, 0, 255]]).astype(np.uint8)
    optical_in_world = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])   # x fwd, z up world
    poses = []
    for i in range(5):
        t = np.eye(4)
        t[:3, :3] = optical_in_world
        t[:3, 3] = [i * 0.5, 0.0, 1.5]
        poses.append(t)
    return pts, cols, np.stack(poses)


def test_visualize_topdown_and_perspective_render_the_map() -> None:
    pts, cols, poses = _scene()
    top = vz.render_topdown(pts, cols, poses, size=200)
    assert top.shape == (200, 200, 3)
    red = (top[..., 0] > 200) & (top[..., 2] < 50)
    blue = (top[..., 2] > 200) & (top[..., 0] < 50)
    assert red.sum() > 500 and blue.sum() > 500
    # camera looks up the image (forward = up); y (left) of the world is left in the image
    ys, xs = np.nonzero(red)
    yb, xb = np.nonzero(blue)
    assert xs.mean() < xb.mean()
    persp = vz.render_perspective(pts, cols, poses, size=(120, 160))
    assert persp.shape == (120, 160, 3) and (persp != 24).any()
    # empty inputs do not crash
    assert vz.render_topdown(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), poses).shape[0] == 640
    assert vz.render_perspective(np.zeros((0, 3)), np.zeros((0, 3), np.uint8),
                                 np.zeros((0, 4, 4))).shape == (480, 640, 3)


def test_visualize_label_is_drawn() -> None:
    img = np.full((140, 252, 3), 128, np.uint8)
    out = vz.draw_label(img, vz.RANDOM_WEIGHTS_LABEL)
    band = out.shape[0] - img.shape[0]
    assert 10 < band < 80 and out.shape[1] == img.shape[1]      # a banner above, not over
    assert np.array_equal(out[band:], img)
    assert (out[:band, ..., 0] > 200).any()                    # yellow text on the banner
    assert np.array_equal(vz.draw_label(img, None), img)


def test_visualize_writer_gif_mp4_and_markdown(tmp_path: Path) -> None:
    viz = vz.VizWriter(tmp_path / "viz", label=vz.RANDOM_WEIGHTS_LABEL, max_video_frames=4)
    for i in range(10):
        img = _image()
        img[..., 0] = 20 * i
        mask = np.zeros((40, 60), bool)
        mask[5:10, i:i + 5] = True
        viz.add_frame(f"{i:06d}", img, mask, np.full((40, 60), 2.0 + i, np.float32),
                      np.full((40, 60), 1.5, np.float32))
    pts, cols, poses = _scene()
    files = viz.finish(pts, cols, poses)
    assert set(files) >= {"map_topdown", "map_perspective", "gif"}
    with Image.open(tmp_path / "viz" / "overlays.gif") as gif:
        assert 2 <= gif.n_frames <= 4                    # thinned to max_video_frames
    if "mp4" in files:
        cap = cv2.VideoCapture(str(tmp_path / "viz" / "overlays.mp4"))
        assert cap.isOpened() and cap.read()[0]
        cap.release()
    for sub in ("overlay", "depth", "confidence"):
        assert len(list((tmp_path / "viz" / sub).glob("*.png"))) == 10
    md = vz.pictures_markdown(tmp_path / "viz", tmp_path / "eval")
    assert "](../viz/map_topdown.png)" in md and "../viz/overlays.gif" in md
    assert vz.pictures_markdown(tmp_path / "nothing", tmp_path) == ""
