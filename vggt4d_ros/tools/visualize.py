"""Pictures people look at: mask overlays, colour-mapped depth/confidence, map renderings, video.

Everything is drawn with numpy + OpenCV (no GUI, no display). Used by ``vggt4d-replay``, which
writes into ``DIR/viz/``::

    viz/overlay/<name>.png      input frame with the dynamic mask (red tint + contour)
    viz/depth/<name>.png        depth, turbo colour map on inverse depth (near = warm)
    viz/confidence/<name>.png   confidence, viridis colour map on log confidence
    viz/map_topdown.png         static map seen from above + camera path (green→red in time)
    viz/map_perspective.png     static map from a virtual camera behind/above the path
    viz/overlays.gif            short animation of the overlays (subsampled, <= max frames)
    viz/overlays.mp4            same as MP4 (OpenCV mp4v) when the codec is available

Every picture can carry a label banner (``label=``); replay passes
``RANDOM_WEIGHTS_LABEL`` when random weights were used.

Frames: the static map and the camera poses are in the odometry frame of the engine
(``world_from_cam`` 4x4, OpenCV optical camera axes). "Up" for the top-down view is estimated
as the mean of the cameras' -y axes (cameras are roughly upright), so the rendering works for
any world convention.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = [
    "RANDOM_WEIGHTS_LABEL", "draw_label", "overlay_mask", "colorize_depth",
    "colorize_confidence", "render_topdown", "render_perspective", "write_gif", "write_mp4",
    "VizWriter", "pictures_markdown", "link_pictures", "label_pictures",
]

RANDOM_WEIGHTS_LABEL = "random weights: geometry is meaningless"
MASK_COLOR = (255, 40, 40)


def draw_label(img: np.ndarray, text: str | None) -> np.ndarray:
    """``img`` [H,W,3] uint8 RGB with a dark banner carrying ``text`` added ABOVE it.

    Returns [H+band,W,3] (the picture itself is not covered; ``out[band:] == img``). The text
    goes on two lines (split at the space nearest its middle) when that lets it be drawn larger
    on a narrow image; the font scales with the width. No-op (a copy) for empty text.
    """
    src = np.ascontiguousarray(img, dtype=np.uint8)
    if not text:
        return src.copy()
    w = src.shape[1]
    font = cv2.FONT_HERSHEY_SIMPLEX
    lines = [text]
    width1 = cv2.getTextSize(text, font, 1.0, 1)[0][0]
    if " " in text and 0.95 * w / width1 < 0.45:          # one line would be tiny: use two
        spaces = [i for i, c in enumerate(text) if c == " "]
        cut = min(spaces, key=lambda i: abs(i - len(text) / 2))
        lines = [text[:cut], text[cut + 1:]]
        width1 = max(cv2.getTextSize(t, font, 1.0, 1)[0][0] for t in lines)
    scale = max(0.25, min(0.6, 0.95 * w / max(width1, 1)))
    thick = 1
    (_, th), base = cv2.getTextSize(lines[0], font, scale, thick)
    step = th + base + 2
    band = np.full((step * len(lines) + 4, w, 3), 16, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(band, line, (3, th + 3 + k * step), font, scale, (255, 255, 0), thick,
                    cv2.LINE_AA)
    return np.concatenate([band, src], axis=0)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
                 color: tuple[int, int, int] = MASK_COLOR) -> np.ndarray:
    """Tint dynamic pixels of ``image`` [H,W,3] uint8 RGB with ``color`` and outline them.

    ``mask`` [H,W] bool (True = dynamic) must have the image's size.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    out = out.round().clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out


def _robust_range(vals: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> tuple[float, float]:
    """Percentile range of finite values (defaults to (0, 1) when there are none)."""
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(vals, [lo, hi])
    return float(a), float(b if b > a else a + 1e-6)


def _apply_cmap(x01: np.ndarray, cmap: int, invalid: np.ndarray) -> np.ndarray:
    """[H,W] values in [0,1] → [H,W,3] uint8 RGB via an OpenCV colour map; invalid → black."""
    u8 = (np.nan_to_num(x01, nan=0.0).clip(0, 1) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(u8, cmap), cv2.COLOR_BGR2RGB)
    rgb[invalid] = 0
    return rgb


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """Depth [H,W] (metres, any scale; <=0 or non-finite = invalid) → [H,W,3] uint8 RGB.

    Turbo colour map on inverse depth with a 2–98 % robust range (near = red, far = blue).
    """
    d = np.asarray(depth, np.float32)
    invalid = ~np.isfinite(d) | (d <= 0)
    inv = np.where(invalid, np.nan, 1.0 / np.where(invalid, 1.0, d))
    a, b = _robust_range(inv)
    return _apply_cmap((inv - a) / (b - a), cv2.COLORMAP_TURBO, invalid)


def colorize_confidence(conf: np.ndarray) -> np.ndarray:
    """Confidence [H,W] (>= 0; VGGT confidences start at 1) → [H,W,3] uint8 RGB (viridis, log)."""
    c = np.asarray(conf, np.float32)
    invalid = ~np.isfinite(c)
    lg = np.log(np.maximum(np.where(invalid, 1.0, c), 1e-6))
    a, b = _robust_range(np.where(invalid, np.nan, lg))
    return _apply_cmap((lg - a) / (b - a), cv2.COLORMAP_VIRIDIS, invalid)


# --------------------------------------------------------------------------- map renderings
def _splat(uv: np.ndarray, depth: np.ndarray, colors: np.ndarray, size: tuple[int, int],
           radius: int = 1, background: int = 24) -> np.ndarray:
    """Z-buffered point splatting: nearest point wins each pixel (square splats).

    Args:
        uv: [M,2] float pixel coordinates; depth: [M] (smaller = nearer); colors: [M,3] uint8.
        size: (height, width) of the output image.
    """
    h, w = size
    img = np.full((h, w, 3), background, np.uint8)
    zbuf = np.full((h, w), np.inf, np.float64)
    ui, vi = np.round(uv[:, 0]).astype(np.int64), np.round(uv[:, 1]).astype(np.int64)
    order = np.argsort(-depth, kind="stable")          # far first; near overwrite
    for du in range(-radius + 1, radius):
        for dv in range(-radius + 1, radius):
            u, v = ui[order] + du, vi[order] + dv
            ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
            u, v, z, c = u[ok], v[ok], depth[order][ok], colors[order][ok]
            # with far-first order, the last write of each pixel is the nearest point
            flat = v * w + u
            _, last = np.unique(flat[::-1], return_index=True)
            sel = len(flat) - 1 - last
            closer = z[sel] < zbuf.reshape(-1)[flat[sel]]
            sel = sel[closer]
            zbuf.reshape(-1)[flat[sel]] = z[sel]
            img.reshape(-1, 3)[flat[sel]] = c[sel]
    return img


def _up_vector(world_from_cam: np.ndarray) -> np.ndarray:
    """Mean of the cameras' -y (optical 'up') axes in world, normalised; [3]."""
    up = -world_from_cam[:, :3, 1].mean(axis=0)
    n = np.linalg.norm(up)
    return up / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _draw_path(img: np.ndarray, uv: np.ndarray, ok: np.ndarray | None = None) -> None:
    """Draw the camera path [T,2] in place, colour going green → red with time."""
    t = len(uv)
    for i in range(t - 1):
        if ok is not None and not (ok[i] and ok[i + 1]):
            continue
        f = i / max(t - 2, 1)
        col = (int(255 * f), int(255 * (1 - f)), 0)
        p0, p1 = tuple(int(round(x)) for x in uv[i]), tuple(int(round(x)) for x in uv[i + 1])
        cv2.line(img, p0, p1, col, 2, cv2.LINE_AA)
    for i in range(t):                      # every camera as a dot, so short paths show too
        if ok is not None and not ok[i]:
            continue
        f = i / max(t - 1, 1)
        cv2.circle(img, tuple(int(round(x)) for x in uv[i]), 2,
                   (int(255 * f), int(255 * (1 - f)), 0), -1, cv2.LINE_AA)
    if t and (ok is None or ok[0]):
        cv2.circle(img, tuple(int(round(x)) for x in uv[0]), 5, (0, 255, 0), 1, cv2.LINE_AA)


def render_topdown(points: np.ndarray, colors: np.ndarray, world_from_cam: np.ndarray,
                   size: int = 640, label: str | None = None) -> np.ndarray:
    """Top-down orthographic view of the static map with the camera path.

    Args:
        points: [M,3] float (odom frame, metres up to scale); colors: [M,3] uint8 RGB.
        world_from_cam: [T,4,4] camera poses (odom frame) for the path.
        size: output is ``size x size`` pixels.
    Returns:
        [size,size,3] uint8 RGB.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    poses = np.asarray(world_from_cam, np.float64).reshape(-1, 4, 4)
    up = _up_vector(poses) if len(poses) else np.array([0.0, 0.0, 1.0])
    # in-plane axes: e1 = the camera's mean forward projected on the ground plane
    fwd = poses[:, :3, 2].mean(axis=0) if len(poses) else np.array([1.0, 0.0, 0.0])
    e1 = fwd - up * (fwd @ up)
    if np.linalg.norm(e1) < 1e-9:
        e1 = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0, 1.0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    cams = poses[:, :3, 3]
    if len(pts) and len(cams):
        # drop the ceiling / overhangs: points higher than the cameras by > 10 % of the scene
        dist = float(np.median(np.linalg.norm(pts - cams.mean(axis=0), axis=1)))
        keep = pts @ up <= (cams @ up).max() + 0.1 * dist
        pts, colors = pts[keep], np.asarray(colors).reshape(-1, 3)[keep]
    allp = np.concatenate([pts, cams]) if len(pts) else cams
    if len(allp) == 0:
        return draw_label(np.full((size, size, 3), 24, np.uint8), label)
    # screen: right = -e2 (looking down along -up with e1 pointing up the image)
    xy_all = np.stack([-(allp @ e2), allp @ e1], axis=1)
    lo, hi = np.percentile(xy_all, 1, axis=0), np.percentile(xy_all, 99, axis=0)
    lo, hi = np.minimum(lo, xy_all[len(pts):].min(0)), np.maximum(hi, xy_all[len(pts):].max(0))
    span = max(float((hi - lo).max()), 1e-6) * 1.1
    mid = (lo + hi) / 2

    def to_px(p: np.ndarray) -> np.ndarray:
        xy = np.stack([-(p @ e2), p @ e1], axis=1)
        return np.stack([(xy[:, 0] - mid[0]) / span * size + size / 2,
                         size / 2 - (xy[:, 1] - mid[1]) / span * size], axis=1)

    img = _splat(to_px(pts), -(pts @ up), np.asarray(colors, np.uint8).reshape(-1, 3),
                 (size, size), radius=2) if len(pts) else np.full((size, size, 3), 24, np.uint8)
    _draw_path(img, to_px(cams))
    return draw_label(img, label)


def render_perspective(points: np.ndarray, colors: np.ndarray, world_from_cam: np.ndarray,
                       size: tuple[int, int] = (480, 640), label: str | None = None) -> np.ndarray:
    """Perspective view of the static map and camera path from a virtual camera.

    The virtual camera sits behind the first camera and above the path (along the estimated
    up vector), looking at the centroid of the map. Args as :func:`render_topdown`;
    ``size`` = (height, width). Returns [H,W,3] uint8 RGB.
    """
    h, w = size
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    poses = np.asarray(world_from_cam, np.float64).reshape(-1, 4, 4)
    if len(poses) == 0 and len(pts) == 0:
        return draw_label(np.full((h, w, 3), 24, np.uint8), label)
    up = _up_vector(poses) if len(poses) else np.array([0.0, 0.0, 1.0])
    cams = poses[:, :3, 3]
    allp = np.concatenate([pts, cams]) if len(pts) else cams
    # aim between the map and the cameras so that both are in view
    target = 0.5 * (np.median(pts, axis=0) + cams.mean(axis=0)) if len(pts) and len(cams) \
        else np.median(allp, axis=0)
    extent = max(float(np.percentile(np.linalg.norm(allp - target, axis=1), 90)), 1e-6)
    back = -poses[0, :3, 2] if len(poses) else np.array([-1.0, 0.0, 0.0])
    back = back - up * (back @ up)
    back = back / np.linalg.norm(back) if np.linalg.norm(back) > 1e-9 else np.array([1.0, 0, 0])
    eye = target + extent * (1.6 * back + 1.2 * up)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x = x / np.linalg.norm(x) if np.linalg.norm(x) > 1e-9 else np.array([1.0, 0, 0])
    y = np.cross(z, x)                                    # optical: y down
    r = np.stack([x, y, z])                               # cam_from_world rotation
    f = 0.9 * w

    def project(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pc = (p - eye) @ r.T
        zc = np.maximum(pc[:, 2], 1e-9)
        return np.stack([f * pc[:, 0] / zc + w / 2, f * pc[:, 1] / zc + h / 2], 1), pc[:, 2]

    img = np.full((h, w, 3), 24, np.uint8)
    if len(pts):
        uv, zc = project(pts)
        front = zc > 1e-3 * extent
        img = _splat(uv[front], zc[front], np.asarray(colors, np.uint8).reshape(-1, 3)[front],
                     (h, w), radius=2)
    if len(cams):
        uv, zc = project(cams)
        _draw_path(img, uv, zc > 1e-3 * extent)
    return draw_label(img, label)


# --------------------------------------------------------------------------- video
def write_gif(frames: Sequence[np.ndarray], path: Path, fps: float = 8.0) -> Path:
    """Write RGB uint8 frames (same size) as a looping GIF with Pillow; returns ``path``."""
    from PIL import Image
    if not frames:
        raise ValueError("no frames for GIF")
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], loop=0,
                duration=int(round(1000 / fps)), optimize=False)
    return Path(path)


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: float = 8.0) -> Path | None:
    """Write RGB uint8 frames as MP4 (OpenCV mp4v). Returns None if no encoder is available."""
    if not frames:
        raise ValueError("no frames for MP4")
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not vw.isOpened():
        return None
    try:
        for f in frames:
            vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        vw.release()
    return Path(path) if Path(path).is_file() and Path(path).stat().st_size > 0 else None


def _save_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


class VizWriter:
    """Incremental writer of the replay pictures into ``out_dir`` (see module docstring).

    Args:
        out_dir: the ``viz`` folder (created).
        label: banner text drawn on every picture (e.g. RANDOM_WEIGHTS_LABEL) or None.
        max_video_frames: the GIF/MP4 keep at most this many frames (evenly subsampled).
        video_width: overlay frames are resized to this width for the GIF/MP4.
    """

    def __init__(self, out_dir: Path, label: str | None = None, max_video_frames: int = 60,
                 video_width: int = 320) -> None:
        self.out_dir = Path(out_dir)
        self.label = label
        self.max_video_frames = max_video_frames
        self.video_width = video_width
        self._video: list[np.ndarray] = []
        self._n = 0

    def add_frame(self, name: str, image: np.ndarray, mask: np.ndarray | None,
                  depth: np.ndarray | None, confidence: np.ndarray | None) -> None:
        """Write overlay/depth/confidence PNGs of one frame (image [H,W,3] uint8 RGB)."""
        ov = overlay_mask(image, mask) if mask is not None else image
        ov = draw_label(ov, self.label)
        _save_png(self.out_dir / "overlay" / f"{name}.png", ov)
        if depth is not None:
            _save_png(self.out_dir / "depth" / f"{name}.png",
                      draw_label(colorize_depth(depth), self.label))
        if confidence is not None:
            _save_png(self.out_dir / "confidence" / f"{name}.png",
                      draw_label(colorize_confidence(confidence), self.label))
        self._keep_for_video(ov)

    def _keep_for_video(self, frame: np.ndarray) -> None:
        """Keep every k-th overlay, doubling k (and thinning) when the buffer is full."""
        self._n += 1
        h, w = frame.shape[:2]
        small = frame if w <= self.video_width else cv2.resize(
            frame, (self.video_width, int(round(h * self.video_width / w))),
            interpolation=cv2.INTER_AREA)
        step = getattr(self, "_step", 1)
        if (self._n - 1) % step == 0:
            self._video.append(small)
        if len(self._video) > self.max_video_frames:
            self._video = self._video[::2]
            self._step = step * 2

    def finish(self, points: np.ndarray, colors: np.ndarray, world_from_cam: np.ndarray,
               fps: float = 8.0) -> dict[str, str]:
        """Write map renderings and the overlay GIF/MP4; return {kind: path relative to out}."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out: dict[str, str] = {}
        _save_png(self.out_dir / "map_topdown.png",
                  render_topdown(points, colors, world_from_cam, label=self.label))
        out["map_topdown"] = "map_topdown.png"
        _save_png(self.out_dir / "map_perspective.png",
                  render_perspective(points, colors, world_from_cam, label=self.label))
        out["map_perspective"] = "map_perspective.png"
        if self._video:
            write_gif(self._video, self.out_dir / "overlays.gif", fps)
            out["gif"] = "overlays.gif"
            if write_mp4(self._video, self.out_dir / "overlays.mp4", fps) is not None:
                out["mp4"] = "overlays.mp4"
        return out


def pictures_markdown(viz_dir: Path, relative_to: Path) -> str:
    """Markdown section linking the replay pictures in ``viz_dir`` (paths relative to
    ``relative_to``, e.g. the folder of an eval report.md); "" when there are none."""
    import os
    viz_dir = Path(viz_dir)
    items = [("Static map, top-down", "map_topdown.png"),
             ("Static map, perspective", "map_perspective.png"),
             ("Mask overlays (animation)", "overlays.gif")]
    present = [(t, f) for t, f in items if (viz_dir / f).is_file()]
    if not present:
        return ""
    lines = ["## Pictures", ""]
    for title, f in present:
        rel = os.path.relpath(viz_dir / f, relative_to)
        lines.append(f"![{title}]({rel})")
    for sub, title in (("overlay", "mask overlays"), ("depth", "depth"),
                       ("confidence", "confidence")):
        if (viz_dir / sub).is_dir():
            rel = os.path.relpath(viz_dir / sub, relative_to)
            lines.append(f"- per-frame {title}: [{sub}/]({rel}/)")
    if (viz_dir / "overlays.mp4").is_file():
        rel = os.path.relpath(viz_dir / "overlays.mp4", relative_to)
        lines.append(f"- video: [overlays.mp4]({rel})")
    return "\n".join(lines) + "\n"


def link_pictures(report_md: Path, replay_dir: Path) -> bool:
    """Append a "Pictures" section linking ``replay_dir/viz`` to an eval ``report.md``.

    Returns True if something was appended (both the report and pictures exist)."""
    report_md = Path(report_md)
    if not report_md.is_file():
        return False
    md = pictures_markdown(Path(replay_dir) / "viz", report_md.parent)
    if md:
        report_md.write_text(report_md.read_text().rstrip("\n") + "\n\n" + md)
    return bool(md)


def label_pictures(folder: Path, label: str) -> list[Path]:
    """Draw ``label`` onto every PNG directly in ``folder`` (e.g. eval plots of a run on random
    weights, which the eval tool draws without it); returns the files changed."""
    done = []
    for png in sorted(Path(folder).glob("*.png")):
        img = cv2.imread(str(png), cv2.IMREAD_COLOR)
        if img is None:
            continue
        rgb = draw_label(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), label)
        _save_png(png, rgb)
        done.append(png)
    return done
