"""Synthetic dynamic world with exact ground truth (renderer + ``vggt4d-synth`` CLI).

A room of procedurally textured planes with a few static boxes, seen by a smoothly moving
pinhole camera, plus 0-3 independently moving textured objects (boxes and spheres). Every
frame is rendered by exact, vectorised ray casting in numpy (nearest hit over all
primitives), so depth, dynamic masks, intrinsics and poses are exact.

Conventions
-----------
* World frame: REP-103 (x forward along the room, y left, z up), metres. The floor is z = 0.
* Camera frame: OpenCV optical axes (x right, y down, z forward).
  ``cam_from_world`` maps world points into the camera: ``X_cam = R X_world + t``.
* Pixels: integer pixel ``(u, v)`` is the ray through ``K^-1 [u, v, 1]`` (OpenCV/ROS
  convention: integer coordinates are pixel centres), ``cx = W/2``, ``cy = H/2``.
* Depth is the camera z of the hit point (not the ray length), metres.
* Texture and shading depend only on the surface point (Lambert with a fixed light),
  never on the viewpoint, so a static point has the same colour in every frame.

Output folder of the CLI (``--out DIR``)::

    DIR/rgb/000000.png          RGB frames
    DIR/depth/000000.npz        "depth" [H,W] float32 metres, "object_id" [H,W] int16
    DIR/masks/000000.png        mono8, 255 = dynamic
    DIR/groundtruth.txt         TUM: timestamp tx ty tz qx qy qz qw (world_from_cam)
    DIR/rgb.txt                 TUM-style list: timestamp rgb/000000.png
    DIR/gt.npz                  stamps_ns [S] int64, intrinsics [S,3,3], cam_from_world [S,4,4]
    DIR/camera.json             width, height, K, fps, config
    DIR/bag_sqlite3/, DIR/bag_mcap/   rosbag2 (with --bag): /camera/image_raw (rgb8),
                                /camera/camera_info (frame camera_optical_frame),
                                /ground_truth/odom (world -> camera_optical_frame pose,
                                twist in the camera frame); log time = header stamp
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

CAMERA_FRAME_ID = "camera_optical_frame"
WORLD_FRAME_ID = "world"
IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
GT_ODOM_TOPIC = "/ground_truth/odom"

_NOISE_SIZE = 256          # lattice period of the value noise (cells)
_NOISE_OCTAVES = 3
_LIGHT_DIR = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
# body (x fwd, y left, z up) from optical (x right, y down, z fwd): columns = optical axes in body
_BODY_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic world. All lengths in metres, angles in degrees.

    The camera path is periodic (period ``cam_period_s``), so any number of frames stays
    inside the room.
    """

    width: int = 518
    height: int = 294
    num_frames: int = 64
    num_objects: int = 2
    seed: int = 0
    fps: float = 30.0
    hfov_deg: float = 70.0
    start_stamp_ns: int = 1_700_000_000_000_000_000
    room_min: tuple[float, float, float] = (-6.0, -3.0, 0.0)
    room_max: tuple[float, float, float] = (8.0, 3.0, 3.0)
    num_static_boxes: int = 3
    cam_start_x_m: float = -2.0
    cam_height_m: float = 1.4
    cam_amplitude_m: float = 1.2
    cam_period_s: float = 6.0
    yaw_amplitude_deg: float = 12.0
    pitch_amplitude_deg: float = 4.0
    pitch_offset_deg: float = 4.0      # look slightly down (positive = nose down)
    roll_amplitude_deg: float = 2.0
    object_speed: float = 1.0          # multiplies every object's angular frequency

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 0 <= self.num_objects <= 3:
            raise ValueError(f"num_objects must be in 0..3, got {self.num_objects}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if not 1.0 < self.hfov_deg < 170.0:
            raise ValueError(f"hfov_deg must be in (1, 170), got {self.hfov_deg}")
        if not 0 <= self.num_static_boxes <= 6:
            raise ValueError(f"num_static_boxes must be in 0..6, got {self.num_static_boxes}")
        if self.cam_period_s <= 0:
            raise ValueError(f"cam_period_s must be positive, got {self.cam_period_s}")


# --------------------------------------------------------------------------- frame records
@dataclass
class SynthFrame:
    """One rendered frame.

    image [H,W,3] uint8 RGB; depth [H,W] float32 metres (camera z); mask [H,W] bool
    (True = dynamic); object_id [H,W] int16 (-1 static, k = moving object k);
    intrinsic [3,3] float64 pixels; cam_from_world [4,4] float64 (OpenCV optical axes);
    stamp_ns int (nanoseconds).
    """

    index: int
    image: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    object_id: np.ndarray
    intrinsic: np.ndarray
    cam_from_world: np.ndarray
    stamp_ns: int

    @property
    def world_from_cam(self) -> np.ndarray:
        """[4,4] camera pose in the world (inverse of cam_from_world)."""
        return invert_se3(self.cam_from_world)


@dataclass
class SynthSequence:
    """All frames stacked: image [S,H,W,3] uint8, depth [S,H,W] float32, mask [S,H,W] bool,
    object_id [S,H,W] int16, intrinsic [S,3,3], cam_from_world [S,4,4], stamp_ns [S] int64."""

    image: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    object_id: np.ndarray
    intrinsic: np.ndarray
    cam_from_world: np.ndarray
    stamp_ns: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])


# --------------------------------------------------------------------------- small maths
def invert_se3(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform [4,4] (e.g. cam_from_world -> world_from_cam)."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_to_quaternion_xyzw(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with w >= 0 of a rotation matrix [3,3]."""
    m = np.asarray(R, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    qa = np.array(q)
    qa /= np.linalg.norm(qa)
    return -qa if qa[3] < 0 else qa


# --------------------------------------------------------------------------- texture
@dataclass
class _FaceTexture:
    """Texture parameters of one face (surface coordinates u, v in metres)."""

    color_a: np.ndarray          # [3] in [0,1]
    color_b: np.ndarray          # [3]
    noise_freq: float            # cycles per metre of the lowest octave
    offset: np.ndarray           # [2] lattice offset (decorrelates faces)
    checker_m: float             # checker cell size, metres
    checker_amp: float           # modulation depth of the checker
    stripe_color: np.ndarray     # [3] colour of the thin stripes
    stripe_m: float              # stripe period, metres


class _Texturer:
    """Deterministic multi-octave value noise + coloured checker + stripes."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.table = rng.random((_NOISE_OCTAVES, _NOISE_SIZE, _NOISE_SIZE)).astype(np.float32)
        self.flat = self.table.reshape(_NOISE_OCTAVES, -1)     # 1-D gathers are faster

    def _value_noise(self, x: np.ndarray, y: np.ndarray, octave: int) -> np.ndarray:
        """Smooth value noise in [0,1] at lattice coordinates x, y ([M] float)."""
        x = x.astype(np.float32)
        y = y.astype(np.float32)
        xf = np.floor(x)
        yf = np.floor(y)
        fx = x - xf
        fy = y - yf
        fx = fx * fx * (3.0 - 2.0 * fx)     # smoothstep: C1-continuous across cells
        fy = fy * fy * (3.0 - 2.0 * fy)
        mask = _NOISE_SIZE - 1               # power of two: & == mod, also for negatives
        i0 = xf.astype(np.int32) & mask
        j0 = yf.astype(np.int32) & mask
        r0 = i0 * _NOISE_SIZE
        r1 = ((i0 + 1) & mask) * _NOISE_SIZE
        j1 = (j0 + 1) & mask
        tab = self.flat[octave]
        t00, t10 = tab.take(r0 + j0), tab.take(r1 + j0)
        t01, t11 = tab.take(r0 + j1), tab.take(r1 + j1)
        a = t00 + (t10 - t00) * fx
        b = t01 + (t11 - t01) * fx
        return a + (b - a) * fy

    def color(self, u: np.ndarray, v: np.ndarray, tex: _FaceTexture) -> np.ndarray:
        """RGB [M,3] float32 in [0,1] at surface coordinates u, v ([M], metres)."""
        n = np.zeros(u.shape, np.float32)
        amp, total = 1.0, 0.0
        for o in range(_NOISE_OCTAVES):
            f = tex.noise_freq * (2.0 ** o)
            n += amp * self._value_noise(u * f + tex.offset[0], v * f + tex.offset[1], o)
            total += amp
            amp *= 0.55
        n /= total
        n = np.clip((n - 0.5) * 1.8 + 0.5, 0.0, 1.0)   # stretch contrast
        rgb = tex.color_a[None, :] + (tex.color_b - tex.color_a)[None, :] * n[:, None]
        chk = (np.floor(u / tex.checker_m) + np.floor(v / tex.checker_m)) % 2.0
        rgb = rgb * (1.0 - tex.checker_amp * chk.astype(np.float32))[:, None]
        stripe = (np.mod(u + 0.5 * v, tex.stripe_m) < 0.06 * tex.stripe_m)
        rgb[stripe] = 0.5 * rgb[stripe] + 0.5 * tex.stripe_color[None, :]
        return rgb.astype(np.float32)


def _random_face_texture(rng: np.random.Generator, saturated: bool) -> _FaceTexture:
    if saturated:   # moving objects: vivid colours
        hue_a = rng.random(3)
        a = 0.15 + 0.85 * (hue_a / hue_a.max())
        b = 1.0 - 0.8 * rng.random(3)
        b = b * 0.4
    else:           # walls: muted but still high-contrast
        base = 0.35 + 0.4 * rng.random()
        a = np.clip(base + 0.25 * (rng.random(3) - 0.5), 0.05, 1.0)
        b = np.clip(a * (0.2 + 0.3 * rng.random()) + 0.1 * rng.random(3), 0.0, 1.0)
    return _FaceTexture(
        color_a=a.astype(np.float32),
        color_b=b.astype(np.float32),
        noise_freq=float(rng.uniform(1.2, 2.5)),
        offset=rng.uniform(0, _NOISE_SIZE, 2),
        checker_m=float(rng.uniform(0.25, 0.6)),
        checker_amp=float(rng.uniform(0.15, 0.35)),
        stripe_color=rng.random(3).astype(np.float32),
        stripe_m=float(rng.uniform(0.5, 1.2)),
    )


# --------------------------------------------------------------------------- primitives
@dataclass
class _Primitive:
    """A box (half extents) or sphere (radius) with a pose function and 6 face textures.

    ``pose(t)`` returns (R [3,3], c [3]) world_from_local at time t seconds.
    ``inside`` = True for the room: rays start inside and hit its inner faces.
    """

    kind: str                     # "box" | "sphere"
    size: np.ndarray              # box: half extents [3]; sphere: [r, r, r]
    textures: list[_FaceTexture]
    object_id: int                # -1 static, k moving object
    inside: bool = False
    center0: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw0: float = 0.0
    motion: dict | None = None    # None = static

    def pose(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """World_from_local rotation [3,3] and centre [3] (metres) at time t (seconds)."""
        if self.motion is None:
            return _rot_z(self.yaw0), self.center0
        m = self.motion
        c = self.center0 + np.array([
            m["ax"] * math.sin(m["wx"] * t + m["px"]),
            m["ay"] * math.sin(m["wy"] * t + m["py"]),
            m["az"] * abs(math.sin(m["wz"] * t + m["pz"])),
        ])
        R = _rot_z(self.yaw0 + m["wyaw"] * t) @ _rot_x(m["wroll"] * t)
        return R, c

    def intersect(self, o: np.ndarray, d: np.ndarray, t_s: float) -> np.ndarray:
        """Ray parameter of the nearest hit (inf on miss) for rays o + s d, o [3], d [N,3]."""
        R, c = self.pose(t_s)
        ol = R.T @ (o - c)           # ray origin in local coordinates
        dl = d @ R                    # = (R^T d^T)^T
        if self.kind == "sphere":
            return _sphere_hit(ol, dl, float(self.size[0]))
        return _box_hit(ol, dl, self.size, self.inside)

    def shade(self, p: np.ndarray, t_s: float, tex: _Texturer) -> np.ndarray:
        """RGB [M,3] float32 of world points p [M,3] lying on this primitive."""
        R, c = self.pose(t_s)
        pl = (p - c) @ R              # local coordinates [M,3]
        rgb = np.empty((p.shape[0], 3), np.float32)
        if self.kind == "sphere":
            r = float(self.size[0])
            nl = pl / r
            lon = np.arctan2(nl[:, 1], nl[:, 0])
            lat = np.arcsin(np.clip(nl[:, 2], -1.0, 1.0))
            rgb[:] = tex.color(lon * r, lat * r, self.textures[0])
            normal = nl @ R.T
        else:
            a0, a1, a2 = (np.abs(pl[:, k]) / self.size[k] for k in range(3))
            # the face = the axis where the point is furthest out (relative to the half size)
            axis = np.where((a0 >= a1) & (a0 >= a2), 0, np.where(a1 >= a2, 1, 2))
            normal_l = np.zeros_like(pl)
            for k in range(3):
                on_k = axis == k
                positive = pl[:, k] > 0
                for sgn, face, sel in ((-1.0, 2 * k, on_k & ~positive),
                                       (1.0, 2 * k + 1, on_k & positive)):
                    if not sel.any():
                        continue
                    normal_l[sel, k] = -sgn if self.inside else sgn
                    a, b = [j for j in range(3) if j != k]
                    rgb[sel] = tex.color(pl[sel, a], pl[sel, b], self.textures[face])
            normal = normal_l @ R.T
        lambert = np.clip(normal @ _LIGHT_DIR, 0.0, 1.0).astype(np.float32)
        return rgb * (0.55 + 0.45 * lambert)[:, None]


def _sphere_hit(ol: np.ndarray, dl: np.ndarray, r: float) -> np.ndarray:
    a = np.einsum("ij,ij->i", dl, dl)
    b = dl @ ol
    cc = float(ol @ ol) - r * r
    disc = b * b - a * cc
    out = np.full(dl.shape[0], np.inf)
    ok = disc >= 0
    s = (-b[ok] - np.sqrt(disc[ok])) / a[ok]
    s[s <= 1e-9] = np.inf        # behind the camera (or camera inside: never in this world)
    out[ok] = s
    return out


def _box_hit(ol: np.ndarray, dl: np.ndarray, half: np.ndarray, inside: bool) -> np.ndarray:
    """Slab test against the local box [-half, half]; per-axis [N] arrays (fast in numpy)."""
    t_near = np.full(dl.shape[0], -np.inf)
    t_far = np.full(dl.shape[0], np.inf)
    for k in range(3):
        dk = dl[:, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half[k] - ol[k]) / dk
            t2 = (half[k] - ol[k]) / dk
        # dk == 0: the ray is parallel to this slab: inside it (t1, t2 = -inf, +inf in some
        # order, or nan when the origin is on the plane) -> no constraint; outside -> miss.
        lo = np.fmin(t1, t2)
        hi = np.fmax(t1, t2)
        np.maximum(t_near, np.where(np.isnan(lo), -np.inf, lo), out=t_near)
        np.minimum(t_far, np.where(np.isnan(hi), np.inf, hi), out=t_far)
    if inside:
        return np.where(t_far > 0, t_far, np.inf)
    hit = (t_near <= t_far) & (t_near > 1e-9)
    return np.where(hit, t_near, np.inf)


# --------------------------------------------------------------------------- the world
class SynthWorld:
    """Procedural dynamic scene; ``render(i)`` renders frame i lazily (exact ray casting).

    Deterministic from ``config.seed``: the same config always gives identical frames.
    The static scene and camera path do not depend on ``num_objects`` (objects are drawn
    from the seed last), so a world with ``num_objects=0`` is the same scene emptied.
    """

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config or SynthConfig()
        rng = np.random.default_rng(self.config.seed)
        self._tex = _Texturer(rng)
        self._phase = rng.uniform(0, 2 * math.pi, 4)
        self.primitives: list[_Primitive] = [self._make_room(rng)]
        self.primitives += self._make_static_boxes(rng)
        self.primitives += self._make_objects(rng)
        self._K = self._intrinsic()
        self._pix_dirs = self._camera_rays()

    # ---- scene construction
    def _make_room(self, rng: np.random.Generator) -> _Primitive:
        lo, hi = np.array(self.config.room_min), np.array(self.config.room_max)
        textures = [_random_face_texture(rng, False) for _ in range(6)]
        return _Primitive("box", (hi - lo) / 2, textures, -1, inside=True, center0=(hi + lo) / 2)

    def _make_static_boxes(self, rng: np.random.Generator) -> list[_Primitive]:
        lo, hi = np.array(self.config.room_min), np.array(self.config.room_max)
        boxes = []
        for b in range(self.config.num_static_boxes):
            half = np.array([rng.uniform(0.2, 0.45), rng.uniform(0.2, 0.45),
                             rng.uniform(0.25, 0.9)])
            side = 1.0 if b % 2 == 0 else -1.0       # alternate walls, keep the middle free
            x = rng.uniform(0.5, hi[0] - 1.0)
            wall_y = hi[1] - 0.9 if side > 0 else lo[1] + 0.9
            y = wall_y + rng.uniform(-0.2, 0.2)
            textures = [_random_face_texture(rng, False) for _ in range(6)]
            boxes.append(_Primitive("box", half, textures, -1, center0=np.array([x, y, half[2]]),
                                    yaw0=rng.uniform(-0.5, 0.5)))
        return boxes

    def _make_objects(self, rng: np.random.Generator) -> list[_Primitive]:
        objs = []
        speed = self.config.object_speed
        for k in range(self.config.num_objects):
            is_sphere = k % 2 == 1
            band_x = 2.2 + 1.5 * k            # one x band per object: they rarely touch
            if is_sphere:
                r = rng.uniform(0.3, 0.45)
                size = np.array([r, r, r])
                center = np.array([band_x, rng.uniform(-0.6, 0.6), r])
                az = rng.uniform(0.2, 0.5)                 # bounces
            else:
                size = np.array([rng.uniform(0.25, 0.45), rng.uniform(0.25, 0.45),
                                 rng.uniform(0.3, 0.6)])
                center = np.array([band_x, rng.uniform(-0.6, 0.6), size[2]])
                az = 0.0
            motion = {
                "ax": rng.uniform(0.2, 0.4), "ay": rng.uniform(0.6, 1.2), "az": az,
                "wx": speed * rng.uniform(1.0, 2.0) * rng.choice([-1, 1]),
                "wy": speed * rng.uniform(1.0, 2.0) * rng.choice([-1, 1]),
                "wz": speed * rng.uniform(2.0, 3.0),
                "px": rng.uniform(0, 2 * math.pi), "py": rng.uniform(0, 2 * math.pi),
                "pz": rng.uniform(0, 2 * math.pi),
                "wyaw": speed * rng.uniform(0.5, 1.5) * rng.choice([-1, 1]),
                "wroll": speed * rng.uniform(0.5, 1.5) if is_sphere else 0.0,
            }
            objs.append(_Primitive("sphere" if is_sphere else "box", size,
                                   [_random_face_texture(rng, True) for _ in range(6)], k,
                                   center0=center, yaw0=rng.uniform(0, math.pi), motion=motion))
        return objs

    # ---- camera
    def _intrinsic(self) -> np.ndarray:
        W, H = self.config.width, self.config.height
        f = (W / 2.0) / math.tan(math.radians(self.config.hfov_deg) / 2.0)
        return np.array([[f, 0.0, W / 2.0], [0.0, f, H / 2.0], [0.0, 0.0, 1.0]])

    def _camera_rays(self) -> np.ndarray:
        """[H*W,3] camera-frame ray directions with z = 1 (so the ray parameter is depth)."""
        W, H = self.config.width, self.config.height
        u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        K = self._K
        return np.stack([(u.ravel() - K[0, 2]) / K[0, 0], (v.ravel() - K[1, 2]) / K[1, 1],
                         np.ones(H * W)], axis=1)

    def time_s(self, i: int) -> float:
        """Time of frame i in seconds since the first frame."""
        return i / self.config.fps

    def stamp_ns(self, i: int) -> int:
        """ROS stamp of frame i, nanoseconds."""
        return int(self.config.start_stamp_ns + round(i * 1e9 / self.config.fps))

    def world_from_cam_at(self, t_s: float) -> np.ndarray:
        """[4,4] camera pose (optical frame) in the world at time t_s seconds."""
        c = self.config
        ph = 2 * math.pi * t_s / c.cam_period_s
        p0, p1, p2, p3 = self._phase
        pos = np.array([
            c.cam_start_x_m + c.cam_amplitude_m * math.sin(ph + p0),
            0.8 * c.cam_amplitude_m * math.sin(0.5 * ph + p1),
            c.cam_height_m + 0.15 * math.sin(1.3 * ph + p2),
        ])
        yaw = math.radians(c.yaw_amplitude_deg) * math.sin(0.7 * ph + p3)
        pitch = math.radians(c.pitch_offset_deg + c.pitch_amplitude_deg * math.sin(1.1 * ph + p1))
        roll = math.radians(c.roll_amplitude_deg) * math.sin(0.9 * ph + p2)
        T = np.eye(4)
        T[:3, :3] = _rot_z(yaw) @ _rot_y(pitch) @ _rot_x(roll) @ _BODY_FROM_OPTICAL
        T[:3, 3] = pos
        return T

    def camera_twist_at(self, t_s: float, h: float = 1e-4) -> np.ndarray:
        """Camera velocity (vx, vy, vz, wx, wy, wz) at t_s in the camera optical frame
        (m/s, rad/s), by central differences of the analytic path (ROS Odometry twist)."""
        from scipy.spatial.transform import Rotation
        a, b = self.world_from_cam_at(t_s - h), self.world_from_cam_at(t_s + h)
        R = self.world_from_cam_at(t_s)[:3, :3]
        v = R.T @ (b[:3, 3] - a[:3, 3]) / (2 * h)
        w = Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).as_rotvec() / (2 * h)
        return np.concatenate([v, w])

    def cam_from_world(self, i: int) -> np.ndarray:
        """[4,4] camera-from-world of frame i (OpenCV optical axes)."""
        return invert_se3(self.world_from_cam_at(self.time_s(i)))

    @property
    def intrinsic(self) -> np.ndarray:
        """[3,3] pinhole intrinsics (pixels), identical for every frame."""
        return self._K.copy()

    # ---- ray casting
    def cast_rays(self, t_s: float, origin: np.ndarray, dirs: np.ndarray,
                  candidates: Sequence[np.ndarray | None] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cast world rays ``origin + s * dirs`` at time t_s (seconds).

        origin [3] metres (world), dirs [N,3] (world, any length). ``candidates``: optional
        per-primitive ray indices that can hit it (None = all rays); a pure speed-up.
        Returns (s [N] ray parameter of the nearest hit, rgb [N,3] float32 in [0,1],
        object_id [N] int16, -1 = static). Every ray from inside the room hits something.
        """
        dirs = np.asarray(dirs, dtype=np.float64)
        n = dirs.shape[0]
        s = np.full(n, np.inf)                     # running nearest hit (z-buffer)
        nearest = np.full(n, -1, np.int32)
        for pi, prim in enumerate(self.primitives):
            idx = None if candidates is None else candidates[pi]
            if idx is None:
                hit = prim.intersect(origin, dirs, t_s)
                closer = hit < s
                s[closer] = hit[closer]
                nearest[closer] = pi
            elif idx.size:
                hit = prim.intersect(origin, dirs[idx], t_s)
                closer = hit < s[idx]
                s[idx[closer]] = hit[closer]
                nearest[idx[closer]] = pi
        points = origin[None, :] + s[:, None] * dirs
        rgb = np.zeros((dirs.shape[0], 3), np.float32)
        obj = np.full(dirs.shape[0], -1, np.int16)
        for pi, prim in enumerate(self.primitives):
            sel = nearest == pi
            if sel.any():
                rgb[sel] = prim.shade(points[sel], t_s, self._tex)
                obj[sel] = prim.object_id
        return s, rgb, obj

    def _screen_candidates(self, prim: _Primitive, t_s: float, cam_from_world: np.ndarray
                           ) -> np.ndarray | None:
        """Flat pixel indices inside the projected bounding box of ``prim`` (None = all).

        The primitive lies in its bounding sphere, which lies in a camera-axis-aligned cube;
        with every cube corner in front of the camera, the projection of the cube is the
        convex hull of its projected corners, so the pixel box of those corners is
        conservative (culling never changes the image).
        """
        W, H = self.config.width, self.config.height
        _, c = prim.pose(t_s)
        rho = float(np.linalg.norm(prim.size)) * 1.001 + 1e-6
        cc = cam_from_world[:3, :3] @ c + cam_from_world[:3, 3]
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        corners = cc[None, :] + rho * signs
        if corners[:, 2].min() <= 1e-3:
            return None
        uv = corners[:, :2] / corners[:, 2:3] * np.diag(self._K)[:2] + self._K[:2, 2]
        u0 = max(int(np.floor(uv[:, 0].min())) - 1, 0)
        u1 = min(int(np.ceil(uv[:, 0].max())) + 1, W - 1)
        v0 = max(int(np.floor(uv[:, 1].min())) - 1, 0)
        v1 = min(int(np.ceil(uv[:, 1].max())) + 1, H - 1)
        if u0 > u1 or v0 > v1:
            return np.zeros(0, np.int64)
        return (np.arange(v0, v1 + 1)[:, None] * W + np.arange(u0, u1 + 1)[None, :]).ravel()

    def render(self, i: int) -> SynthFrame:
        """Render frame i (0 <= i < num_frames) by exact ray casting."""
        if not 0 <= i < self.config.num_frames:
            raise IndexError(f"frame {i} outside 0..{self.config.num_frames - 1}")
        H, W = self.config.height, self.config.width
        t_s = self.time_s(i)
        wfc = self.world_from_cam_at(t_s)
        dirs = self._pix_dirs @ wfc[:3, :3].T          # z_cam = 1 => s is the depth
        cfw = invert_se3(wfc)
        candidates = [None if p.inside else self._screen_candidates(p, t_s, cfw)
                      for p in self.primitives]
        s, rgb, obj = self.cast_rays(t_s, wfc[:3, 3], dirs, candidates)
        image = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8).reshape(H, W, 3)
        object_id = obj.reshape(H, W)
        return SynthFrame(index=i, image=image, depth=s.astype(np.float32).reshape(H, W),
                          mask=object_id >= 0, object_id=object_id, intrinsic=self._K.copy(),
                          cam_from_world=invert_se3(wfc), stamp_ns=self.stamp_ns(i))

    def __len__(self) -> int:
        return self.config.num_frames

    def __iter__(self):
        return (self.render(i) for i in range(self.config.num_frames))

    def render_all(self) -> SynthSequence:
        """Render every frame and stack the fields (see SynthSequence for shapes)."""
        frames = list(self)
        return SynthSequence(
            image=np.stack([f.image for f in frames]),
            depth=np.stack([f.depth for f in frames]),
            mask=np.stack([f.mask for f in frames]),
            object_id=np.stack([f.object_id for f in frames]),
            intrinsic=np.stack([f.intrinsic for f in frames]),
            cam_from_world=np.stack([f.cam_from_world for f in frames]),
            stamp_ns=np.array([f.stamp_ns for f in frames], dtype=np.int64),
        )


# --------------------------------------------------------------------------- writers + CLI
def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(array).save(path, compress_level=3)


def _frame_bag_messages(world: SynthWorld, f: SynthFrame, typestore=None):
    """(topic, stamp_ns, msg) triples of one frame: image, camera info, GT odometry."""
    from vggt4d_ros.tools import rosbag_io as bio
    H, W = f.image.shape[:2]
    yield IMAGE_TOPIC, f.stamp_ns, bio.image_msg(f.image, f.stamp_ns, CAMERA_FRAME_ID, "rgb8",
                                                 typestore)
    yield CAMERA_INFO_TOPIC, f.stamp_ns, bio.camera_info_msg(f.intrinsic, W, H, f.stamp_ns,
                                                             CAMERA_FRAME_ID, typestore=typestore)
    twist = world.camera_twist_at(world.time_s(f.index))
    yield GT_ODOM_TOPIC, f.stamp_ns, bio.odometry_msg(f.world_from_cam, f.stamp_ns, WORLD_FRAME_ID,
                                                      CAMERA_FRAME_ID, twist=twist,
                                                      typestore=typestore)


def write_outputs(world: SynthWorld, out_dir: str | Path, folder: bool = True,
                  bags: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Render every frame once and write the folder layout and/or bags (see module doc).

    Atomic: everything is written into a temporary sibling folder that is renamed to
    ``out_dir`` at the end. ``out_dir`` must not exist or be empty (unless ``overwrite``).
    """
    from vggt4d_ros.tools import rosbag_io as bio
    from vggt4d_ros.tools.atomic import atomic_output_dir
    from vggt4d_ros.tools.metrics import write_tum
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
    if not folder and not bags:
        raise ValueError("nothing to write: folder disabled and no bag storage given")
    with atomic_output_dir(out) as tmp:
        writers = [bio.BagWriter(tmp / f"bag_{st}", st) for st in bags]
        if folder:
            for sub in ("rgb", "depth", "masks"):
                (tmp / sub).mkdir()
        stamps, poses = [], []
        for f in world:
            name = f"{f.index:06d}"
            if folder:
                _save_png(tmp / "rgb" / f"{name}.png", f.image)
                _save_png(tmp / "masks" / f"{name}.png", f.mask.astype(np.uint8) * 255)
                np.savez_compressed(tmp / "depth" / f"{name}.npz", depth=f.depth,
                                    object_id=f.object_id)
            for w in writers:
                for topic, stamp, msg in _frame_bag_messages(world, f):
                    w.write(topic, stamp, msg)
            stamps.append(f.stamp_ns)
            poses.append(f.cam_from_world)
        for w in writers:
            w.close()
        if folder:
            cfw = np.stack(poses)
            wfc = np.stack([invert_se3(T) for T in cfw])
            write_tum(tmp / "groundtruth.txt", stamps, wfc)
            (tmp / "rgb.txt").write_text("# timestamp filename\n" + "".join(
                f"{s // 1_000_000_000}.{s % 1_000_000_000:09d} rgb/{i:06d}.png\n"
                for i, s in enumerate(stamps)))
            K = world.intrinsic
            np.savez(tmp / "gt.npz", stamps_ns=np.array(stamps, np.int64),
                     intrinsics=np.repeat(K[None], len(stamps), 0), cam_from_world=cfw)
            cfg = asdict(world.config)
            (tmp / "camera.json").write_text(json.dumps(
                {"width": world.config.width, "height": world.config.height, "K": K.tolist(),
                 "fps": world.config.fps, "frame_id": CAMERA_FRAME_ID, "config": cfg}, indent=2))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vggt4d-synth",
        description="Render a synthetic dynamic scene with exact ground truth into a folder "
                    "(PNG + npz + TUM) and/or a rosbag2 (sqlite3 / mcap).")
    p.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    p.add_argument("--width", type=int, default=518, help="image width, pixels")
    p.add_argument("--height", type=int, default=294, help="image height, pixels")
    p.add_argument("--frames", type=int, default=64, help="number of frames")
    p.add_argument("--objects", type=int, default=2, help="moving objects, 0..3")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed = same scene)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate, Hz (sets the stamps)")
    p.add_argument("--bag", choices=["sqlite3", "mcap", "both"], default=None,
                   help="also write DIR/bag_<storage> rosbag2(s)")
    p.add_argument("--no-folder", action="store_true", help="write only the bag(s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``vggt4d-synth``); returns 0, exits 2 on bad arguments."""
    parser = _parser()
    a = parser.parse_args(argv)
    if a.width < 1 or a.height < 1:
        parser.error(f"--width/--height must be positive, got {a.width}x{a.height}")
    if a.frames < 1:
        parser.error(f"--frames must be >= 1, got {a.frames}")
    if not 0 <= a.objects <= 3:
        parser.error(f"--objects must be in 0..3, got {a.objects}")
    if not a.fps > 0:
        parser.error(f"--fps must be positive, got {a.fps}")
    if a.no_folder and a.bag is None:
        parser.error("--no-folder needs --bag (nothing would be written)")
    if a.out.exists() and not a.out.is_dir():
        parser.error(f"--out {a.out} exists and is not a folder")
    if a.out.is_dir() and any(a.out.iterdir()) and not a.overwrite:
        parser.error(f"--out {a.out} is not empty (use --overwrite)")
    bags = [] if a.bag is None else (["sqlite3", "mcap"] if a.bag == "both" else [a.bag])
    world = SynthWorld(SynthConfig(width=a.width, height=a.height, num_frames=a.frames,
                                   num_objects=a.objects, seed=a.seed, fps=a.fps))
    out = write_outputs(world, a.out, folder=not a.no_folder, bags=bags, overwrite=a.overwrite)
    print(f"wrote {a.frames} frames ({a.width}x{a.height}, {a.objects} moving objects) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
