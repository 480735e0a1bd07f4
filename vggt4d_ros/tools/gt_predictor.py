"""``GroundTruthPredictor``: a ``WindowPredictor`` that answers from the synthetic world.

It returns what an ideal VGGT would, corrupted in controlled ways, so that the streaming
engine can be tested without a model:

* gauge: each window gets its own world frame = its FIRST frame's camera (identity
  extrinsic, as VGGT) and its own random scale ``λ ~ logU(scale_range)`` (unknown scale);
* pose noise on every frame but the first: rotation ``rot_noise_deg`` (deg, per axis σ) and
  camera-centre noise ``trans_noise`` (σ relative to the frame's median true depth);
* depth noise: multiplicative, ``depth · (1 + depth_noise · N(0,1))`` per pixel;
* dynamic mask: the true mask, optionally corrupted (``mask_flip_prob`` per pixel,
  ``mask_dilate_px`` dilation: a too-large mask is the safe failure of a real model).

Frame keys → synthetic frame indices: by default through the image content (frames fed to
the engine must come from ``render(i)`` of this object, which remembers image → index in a
bounded table), or with ``index_of_key`` (e.g. ``lambda k: k`` when frame key = index).
The noise of a window is a deterministic function of ``seed`` and the window's frame indices.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from vggt4d_ros.stream.predictor import WindowPrediction


class GroundTruthPredictor:
    """WindowPredictor over a ``SynthWorld`` (or anything with ``render(i)`` returning frames with
    image, depth, mask, intrinsic, cam_from_world)."""

    def __init__(self, world, depth_noise: float = 0.01, rot_noise_deg: float = 0.1,
                 trans_noise: float = 0.002, scale_range: tuple[float, float] = (0.5, 2.0),
                 mask_flip_prob: float = 0.0, mask_dilate_px: int = 0, seed: int = 0,
                 index_of_key: Optional[Callable[[int], int]] = None, cache_size: int = 64,
                 table_size: int = 4096):
        if depth_noise < 0 or rot_noise_deg < 0 or trans_noise < 0 or not 0 <= mask_flip_prob <= 1:
            raise ValueError("noise levels must be >= 0 and mask_flip_prob in [0, 1]")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.world = world
        self.depth_noise = depth_noise
        self.rot_noise_deg = rot_noise_deg
        self.trans_noise = trans_noise
        self.scale_range = scale_range
        self.mask_flip_prob = mask_flip_prob
        self.mask_dilate_px = mask_dilate_px
        self.seed = seed
        self.index_of_key = index_of_key
        self._cache: OrderedDict[int, object] = OrderedDict()   # index -> rendered frame (bounded)
        self._cache_size = cache_size
        self._table: OrderedDict[bytes, int] = OrderedDict()    # image digest -> index (bounded)
        self._table_size = table_size
        self.calls = 0

    # ------------------------------------------------------------ frames
    @staticmethod
    def _digest(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()

    def render(self, i: int):
        """``world.render(i)``, remembered so that its image maps back to index ``i``."""
        frame = self._frame(i)
        self._table[self._digest(frame.image)] = i
        self._table.move_to_end(self._digest(frame.image))
        while len(self._table) > self._table_size:
            self._table.popitem(last=False)
        return frame

    def _frame(self, i: int):
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        frame = self.world.render(i)
        self._cache[i] = frame
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return frame

    def _index(self, key: int, image: np.ndarray) -> int:
        if self.index_of_key is not None:
            return int(self.index_of_key(key))
        digest = self._digest(image)
        if digest not in self._table:
            raise KeyError(f"frame key {key}: image was not produced by "
                           "GroundTruthPredictor.render() (or fell out of its table); pass "
                           "index_of_key to map keys to indices")
        return self._table[digest]

    # ------------------------------------------------------------ prediction
    def predict(self, images: np.ndarray, frame_keys: Sequence[int]) -> WindowPrediction:
        """images [S,H,W,3] uint8 (only used to look indices up) -> noisy GT in a random
        window gauge (first frame at identity, scale λ)."""
        t0 = time.perf_counter()
        self.calls += 1
        if images.ndim != 4 or len(images) != len(frame_keys):
            raise ValueError("images [S,H,W,3] and S frame keys expected, "
                             f"got {images.shape} / {len(frame_keys)}")
        idx = [self._index(k, img) for k, img in zip(frame_keys, images)]
        frames = [self._frame(i) for i in idx]
        rng = np.random.default_rng([self.seed, *idx])
        lam = float(np.exp(rng.uniform(*np.log(self.scale_range))))

        world_from_cam0 = np.linalg.inv(frames[0].cam_from_world)
        extr, depth, mask = [], [], []
        for s, f in enumerate(frames):
            cam_from_win = f.cam_from_world @ world_from_cam0   # window gauge: frame 0 = I
            cam_from_win[:3, 3] *= lam                                 # unknown scale
            d_true = f.depth.astype(np.float64)
            if s > 0:
                med = float(np.median(d_true[np.isfinite(d_true) & (d_true > 0)])) * lam
                win_from_cam = np.linalg.inv(cam_from_win)
                rotvec = np.radians(self.rot_noise_deg) * rng.normal(size=3)
                d_rot = Rotation.from_rotvec(rotvec).as_matrix()
                win_from_cam[:3, :3] = win_from_cam[:3, :3] @ d_rot
                win_from_cam[:3, 3] += self.trans_noise * med * rng.normal(size=3)
                cam_from_win = np.linalg.inv(win_from_cam)
            extr.append(cam_from_win[:3, :])
            noise = 1.0 + self.depth_noise * rng.standard_normal(d_true.shape)
            depth.append((d_true * lam * noise).astype(np.float32))
            mask.append(self._corrupt_mask(f.mask, rng))
        depth_arr = np.stack(depth)
        return WindowPrediction(
            extrinsic=np.stack(extr),
            intrinsic=np.stack([f.intrinsic for f in frames]).astype(np.float64),
            depth=depth_arr, depth_conf=np.full(depth_arr.shape, 2.0, np.float32),
            mask=np.stack(mask),
            timings={"gt_predict": time.perf_counter() - t0})

    def _corrupt_mask(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = mask.astype(bool).copy()
        if self.mask_dilate_px:
            k = np.ones((2 * self.mask_dilate_px + 1,) * 2, np.uint8)
            out = cv2.dilate(out.astype(np.uint8), k).astype(bool)
        if self.mask_flip_prob:
            out ^= rng.random(out.shape) < self.mask_flip_prob
        return out


# --------------------------------------------------------------------------- CLI
def run_engine_on_synth(predictor_name: str, frames: int = 300, width: int = 64, height: int = 48,
                        window: int = 16, stride: int = 8, keyframes: int = 2,
                        device: str = "cpu", checkpoint_width: int = 518,
                        seed: int = 0) -> dict:
    """Run the StreamEngine over the synthetic world and score it against the ground truth.

    predictor_name: "gt" (this module's noisy oracle) or a ``stream.factory`` checkpoint
    (path, Hugging Face id, "random_tiny"). Returns a JSON-able summary: ATE (RMS / max, metres
    of the synthetic world, after the best Sim(3)), counters, per-window state / residual /
    scale drift / timings, token-cache hits, peak GPU memory.
    """
    from vggt4d_ros.geometry.sim3 import umeyama_sim3
    from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
    from vggt4d_ros.tools.synth import SynthConfig, SynthWorld

    world = SynthWorld(SynthConfig(width=width, height=height, num_frames=frames, seed=seed))
    if predictor_name == "gt":
        pred = GroundTruthPredictor(world, seed=seed, index_of_key=lambda k: k)
    else:
        from vggt4d_ros.stream.factory import PredictorConfig, build_predictor
        pred = build_predictor(PredictorConfig(checkpoint=predictor_name, device=device,
                                               image_width=checkpoint_width,
                                               local_files_only=True))
    engine = StreamEngine(pred, StreamConfig(window_size=window, stride=stride,
                                             max_keyframes=keyframes))
    truth, outs, windows = {}, [], []
    t0 = time.perf_counter()
    for i in range(frames):
        f = world.render(i)
        truth[f.stamp_ns] = np.linalg.inv(f.cam_from_world)
        new = engine.push(FrameInput(f.stamp_ns, f.image))
        outs += new
        if new:
            w = engine.last_window
            windows.append({"window": w.window_index, "state": w.state,
                            "residual": round(float(w.residual), 5),
                            "scale_drift": round(float(w.scale_drift), 5),
                            "inliers": round(float(w.inlier_fraction), 3),
                            "predict_s": round(w.timings["predict_s"], 4),
                            "total_s": round(w.timings["total_s"], 4), "reason": w.reason})
    outs += engine.flush()
    est = np.array([o.world_from_cam[:3, 3] for o in outs])
    ref = np.array([truth[o.stamp_ns][:3, 3] for o in outs])
    err = np.linalg.norm(umeyama_sim3(est, ref).apply(est) - ref, axis=1)
    summary = {"predictor": predictor_name, "label": getattr(pred, "label", ""),
               "frames": frames, "size": [width, height], "window": window, "stride": stride,
               "keyframes": keyframes, "wall_s": round(time.perf_counter() - t0, 2),
               "ate_rms_m": float(np.sqrt(np.mean(err ** 2))), "ate_max_m": float(err.max()),
               "counters": vars(engine.counters), "map_voxels": len(engine.static_map),
               "cache_hits": getattr(pred, "cache_hits", None),
               "cache_misses": getattr(pred, "cache_misses", None), "windows": windows}
    import torch
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        summary["gpu"] = torch.cuda.get_device_name(0)
        summary["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vggt4d_ros.tools.gt_predictor --predictor gt|CHECKPOINT [--out DIR]``."""
    import argparse
    import json
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(description="StreamEngine on the synthetic world vs ground "
                                 "truth (GT oracle or a VGGT4D checkpoint)")
    ap.add_argument("--predictor", default="gt", help="gt | random_tiny | checkpoint path/id")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--keyframes", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-width", type=int, default=518, help="model working width")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for summary JSON")
    a = ap.parse_args(argv)
    summary = run_engine_on_synth(a.predictor, a.frames, a.width, a.height, a.window, a.stride,
                                  a.keyframes, a.device, a.image_width)
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "engine_synth_eval.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
