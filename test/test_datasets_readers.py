"""Dataset readers on tiny fixtures written in each benchmark's official layout."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vggt4d_ros.tools import datasets as ds
from vggt4d_ros.tools.datasets import InputError, open_source

H, W = 12, 16


def _rgb(i: int) -> np.ndarray:
    """Deterministic test image whose frame index is readable from pixel (0,0)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 10 * i
    img[..., 1] = 100
    img[..., 2] = 200
    return img


def _write_rgb(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _pose(i: int) -> np.ndarray:
    """world_from_cam: rotation about y by 0.1*i rad, translation (i, 2i, 3i) * 0.1."""
    a = 0.1 * i
    t = np.eye(4)
    t[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    t[:3, 3] = [0.1 * i, 0.2 * i, 0.3 * i]
    return t


def _rot_to_quat(r: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation about y only (test poses) → (qx, qy, qz, qw)."""
    a = np.arctan2(r[0, 2], r[0, 0])
    return 0.0, float(np.sin(a / 2)), 0.0, float(np.cos(a / 2))


def _check_image(frame: ds.Frame, i: int) -> None:
    assert frame.image.shape == (H, W, 3) and frame.image.dtype == np.uint8
    # JPEG is lossy: compare loosely; the red channel carries the frame index.
    assert abs(int(frame.image[H // 2, W // 2, 0]) - 10 * i) <= 3
    assert abs(int(frame.image[H // 2, W // 2, 2]) - 200) <= 3


def test_datasets_image_folder_sorted_naturally(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        _write_rgb(tmp_path / f"img{i}.png", _rgb(i))
    src = open_source(tmp_path)
    assert src.kind == "images" and len(src) == 3
    frames = list(src)
    assert [f.name for f in frames] == ["img1", "img2", "img10"]
    _check_image(frames[2], 10)
    assert [f.stamp_ns for f in frames] == [0, round(1e9 / 30), round(2e9 / 30)]


def test_datasets_stride_and_max_frames_keep_true_stamps(tmp_path: Path) -> None:
    for i in range(7):
        _write_rgb(tmp_path / f"{i:03d}.png", _rgb(i))
    src = open_source(tmp_path, stride=2, max_frames=3, fps=10.0)
    frames = list(src)
    assert len(src) == 3 and [f.index for f in frames] == [0, 1, 2]
    assert [f.name for f in frames] == ["000", "002", "004"]
    assert [f.stamp_ns for f in frames] == [0, 200_000_000, 400_000_000]
    late = list(open_source(tmp_path, stride=3, start=2, fps=10.0))
    assert [f.name for f in late] == ["002", "005"] and late[1].stamp_ns == 500_000_000


def test_datasets_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot tell"):
        open_source(tmp_path)
    with pytest.raises(InputError, match="no images"):
        open_source(tmp_path, kind="images")
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "missing")


def test_datasets_corrupt_image_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        list(open_source(tmp_path))


def test_datasets_video(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (W, H))
    assert vw.isOpened()
    for i in range(5):
        vw.write(cv2.cvtColor(_rgb(i * 2), cv2.COLOR_RGB2BGR))
    vw.release()
    src = open_source(path)
    assert src.kind == "video" and len(src) == 5
    frames = list(src)
    assert frames[3].stamp_ns == round(3e9 / 15)
    assert abs(int(frames[3].image[H // 2, W // 2, 0]) - 60) <= 6


def test_datasets_davis_2016_and_2017_annotations(tmp_path: Path) -> None:
    root = tmp_path / "DAVIS"
    for seq in ("bear", "dogs"):
        for i in range(3):
            _write_rgb(root / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg", _rgb(i))
    ann = root / "Annotations" / "480p"
    (ann / "bear").mkdir(parents=True)
    (ann / "dogs").mkdir(parents=True)
    for i in range(3):
        m = np.zeros((H, W), np.uint8)
        m[2:5, 3:9] = 255                      # 2016: binary 0/255
        cv2.imwrite(str(ann / "bear" / f"{i:05d}.png"), m)
        pal = Image.fromarray(np.where(m > 0, 2, 0).astype(np.uint8), mode="P")
        pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
        pal.save(ann / "dogs" / f"{i:05d}.png")  # 2017: palette object ids
    (root / "ImageSets" / "2016").mkdir(parents=True)
    (root / "ImageSets" / "2016" / "val.txt").write_text("bear\n")
    for seq in ("bear", "dogs"):
        src = open_source(root / "JPEGImages" / "480p" / seq)
        assert src.kind == "davis" and src.has_gt_mask and len(src) == 3
        f = list(src)[1]
        _check_image(f, 1)
        assert f.stamp_ns == round(1e9 / 24)
        assert f.mask is not None and f.mask.sum() == 18 and f.mask[3, 4] and not f.mask[0, 0]
        assert f.world_from_cam is None
    assert [n for n, _ in ds.list_sequences(root, "davis2016")] == ["bear"]
    assert [n for n, _ in ds.list_sequences(root, "davis2017")] == ["bear", "dogs"]


def _write_sintel_cam(path: Path, k: np.ndarray, cam_from_world: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<f", ds.SINTEL_TAG) + k.astype("<f8").tobytes()
                     + cam_from_world[:3, :4].astype("<f8").tobytes())


def _write_sintel_dpt(path: Path, depth: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = depth.shape
    path.write_bytes(struct.pack("<fii", ds.SINTEL_TAG, w, h) + depth.astype("<f4").tobytes())


def test_datasets_sintel_cameras_depth_masks(tmp_path: Path) -> None:
    tr = tmp_path / "MPI-Sintel" / "training"
    k = np.array([[100.0, 0, 8], [0, 100.0, 6], [0, 0, 1]])
    for i in range(1, 4):
        name = f"frame_{i:04d}"
        _write_rgb(tr / "final" / "alley_2" / f"{name}.png", _rgb(i))
        _write_sintel_cam(tr / "camdata_left" / "alley_2" / f"{name}.cam", k,
                          np.linalg.inv(_pose(i)))
        _write_sintel_dpt(tr / "depth" / "alley_2" / f"{name}.dpt",
                          np.full((H, W), 2.5 * i, np.float32))
        m = np.zeros((H, W), np.uint8)
        m[:i, :] = 255
        (tr / "dynamic_label_perfect" / "alley_2").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tr / "dynamic_label_perfect" / "alley_2" / f"{name}.png"), m)
    src = open_source(tr / "final" / "alley_2")
    assert src.kind == "sintel" and src.has_gt_pose and src.has_gt_depth and src.has_gt_mask
    frames = list(src)
    assert [f.name for f in frames] == ["frame_0001", "frame_0002", "frame_0003"]
    f = frames[1]
    _check_image(f, 2)
    np.testing.assert_allclose(f.world_from_cam, _pose(2), atol=1e-12)   # direction!
    np.testing.assert_allclose(f.intrinsic, k)
    assert f.depth.dtype == np.float32 and np.all(f.depth == 5.0)
    assert f.mask.sum() == 2 * W
    assert [n for n, _ in ds.list_sequences(tmp_path / "MPI-Sintel", "sintel")] == ["alley_2"]
    (tr / "depth" / "alley_2" / "frame_0002.dpt").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="dpt"):
        list(open_source(tr / "final" / "alley_2"))


def _write_tum(seq: Path, n: int, t0: float = 1305031102.175304) -> list[float]:
    lines, gt, stamps = ["# color images", "# timestamp filename"], ["# ground truth"], []
    for i in range(n):
        t = t0 + i / 30.0
        stamps.append(t)
        _write_rgb(seq / "rgb" / f"{t:.6f}.png", _rgb(i))
        lines.append(f"{t:.6f} rgb/{t:.6f}.png")
        p = _pose(i)
        qx, qy, qz, qw = _rot_to_quat(p[:3, :3])
        # GT runs at a different rate; offset by 5 ms (within 20 ms association window)
        gt.append(f"{t + 0.005:.4f} {p[0, 3]} {p[1, 3]} {p[2, 3]} {qx} {qy} {qz} {qw}")
    (seq / "rgb.txt").write_text("\n".join(lines) + "\n")
    (seq / "groundtruth.txt").write_text("\n".join(gt) + "\n")
    dl = []
    for i, t in enumerate(stamps):
        d = np.full((H, W), 5000 * (i + 1), np.uint16)
        (seq / "depth").mkdir(exist_ok=True)
        cv2.imwrite(str(seq / "depth" / f"{t + 0.01:.6f}.png"), d)
        dl.append(f"{t + 0.01:.6f} depth/{t + 0.01:.6f}.png")
    (seq / "depth.txt").write_text("\n".join(dl) + "\n")
    return stamps


@pytest.mark.parametrize("name,kind,fx", [
    ("rgbd_dataset_freiburg3_walking_xyz", "tum", 535.4),
    ("rgbd_bonn_balloon", "bonn", 542.822841),
])
def test_datasets_tum_and_bonn(tmp_path: Path, name: str, kind: str, fx: float) -> None:
    seq = tmp_path / name
    stamps = _write_tum(seq, 4)
    src = open_source(seq)
    assert src.kind == kind and len(src) == 4 and src.has_gt_pose and src.has_gt_depth
    frames = list(src)
    assert frames[2].stamp_ns == int(f"{stamps[2]:.6f}".replace(".", "")) * 1000
    np.testing.assert_allclose(frames[2].world_from_cam, _pose(2), atol=1e-9)
    assert frames[2].intrinsic[0, 0] == pytest.approx(fx)
    assert frames[3].depth[0, 0] == pytest.approx(4.0)
    _check_image(frames[3], 3)
    assert [n for n, _ in ds.list_sequences(tmp_path, kind)] == [name]


def test_datasets_tum_frame_without_gt_has_no_pose(tmp_path: Path) -> None:
    seq = tmp_path / "rgbd_dataset_freiburg1_xyz"
    _write_tum(seq, 3)
    gt = (seq / "groundtruth.txt").read_text().splitlines()
    (seq / "groundtruth.txt").write_text("\n".join(gt[:2]) + "\n")   # only frame 0 has GT
    frames = list(open_source(seq))
    assert frames[0].world_from_cam is not None
    assert frames[1].world_from_cam is None and frames[2].world_from_cam is None


@pytest.mark.parametrize("textgt_subdir", [False, True])
def test_datasets_vkitti2(tmp_path: Path, textgt_subdir: bool) -> None:
    var = tmp_path / "vkitti2" / "Scene01" / "clone"
    ext = ["frame cameraID r1,1 r1,2 r1,3 t1 r2,1 r2,2 r2,3 t2 r3,1 r3,2 r3,3 t3 0 0 0 1"]
    intr = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
    for i in range(3):
        _write_rgb(var / "frames" / "rgb" / "Camera_0" / f"rgb_{i:05d}.jpg", _rgb(i))
        for cam in (0, 1):
            m = np.linalg.inv(_pose(i + 10 * cam))
            ext.append(f"{i} {cam} " + " ".join(f"{v:.12f}" for v in m.reshape(-1)))
            intr.append(f"{i} {cam} 725.0087 725.0087 620.5 187")
        d = np.full((H, W), 100 * (i + 1), np.uint16)
        (var / "frames" / "depth" / "Camera_0").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(var / "frames" / "depth" / "Camera_0" / f"depth_{i:05d}.png"), d)
    txt = var / "textgt" if textgt_subdir else var
    txt.mkdir(parents=True, exist_ok=True)
    (txt / "extrinsic.txt").write_text("\n".join(ext) + "\n")
    (txt / "intrinsic.txt").write_text("\n".join(intr) + "\n")
    src = open_source(var)
    assert src.kind == "vkitti" and src.has_gt_pose and len(src) == 3
    assert src.name == "Scene01_clone"
    f = list(src)[2]
    np.testing.assert_allclose(f.world_from_cam, _pose(2), atol=1e-9)
    assert f.intrinsic[0, 2] == pytest.approx(620.5)
    assert f.depth[0, 0] == pytest.approx(3.0)
    assert f.stamp_ns == 200_000_000
    _check_image(f, 2)
    assert [n for n, _ in ds.list_sequences(tmp_path / "vkitti2", "vkitti")] == ["Scene01_clone"]


def test_datasets_point_odyssey(tmp_path: Path) -> None:
    seq = tmp_path / "val" / "cnb_dlab_0215_3rd"
    n = 3
    extr = np.stack([np.linalg.inv(_pose(i)) for i in range(n)])
    intr = np.stack([np.array([[320.0, 0, 8], [0, 320.0, 6], [0, 0, 1]])] * n)
    for i in range(n):
        _write_rgb(seq / "rgbs" / f"rgb_{i:05d}.jpg", _rgb(i))
        (seq / "depths").mkdir(exist_ok=True)
        cv2.imwrite(str(seq / "depths" / f"depth_{i:05d}.png"),
                    np.full((H, W), 65535 // 1000 * (i + 1), np.uint16))
        (seq / "masks").mkdir(exist_ok=True)
        m = np.zeros((H, W), np.uint8)
        m[0, : i + 1] = 1
        cv2.imwrite(str(seq / "masks" / f"mask_{i:05d}.png"), m)
    np.savez(seq / "anno.npz", extrinsics=extr, intrinsics=intr,
             trajs_2d=np.zeros((n, 1, 2)), trajs_3d=np.zeros((n, 1, 3)))
    src = open_source(seq)
    assert src.kind == "pointodyssey" and src.has_gt_pose and src.has_gt_mask
    frames = list(src)
    np.testing.assert_allclose(frames[1].world_from_cam, _pose(1), atol=1e-9)
    assert frames[1].intrinsic[0, 0] == 320.0
    assert frames[2].mask.sum() == 3
    assert frames[0].depth[0, 0] == pytest.approx(65 / 65535 * 1000)
    _check_image(frames[2], 2)
    assert [n for n, _ in ds.list_sequences(tmp_path / "val", "pointodyssey")] == [seq.name]


def test_datasets_dycheck_iphone(tmp_path: Path) -> None:
    seq = tmp_path / "iphone" / "apple"
    names = []
    for i in range(4):
        stem = f"0_{i:05d}"
        names.append(stem)
        _write_rgb(seq / "rgb" / "1x" / f"{stem}.png", _rgb(i))
        _write_rgb(seq / "rgb" / "1x" / f"1_{i:05d}.png", _rgb(0))   # other camera, ignored
        p = _pose(i)
        cam = {"orientation": p[:3, :3].T.tolist(), "position": p[:3, 3].tolist(),
               "focal_length": 200.0, "principal_point": [8.0, 6.0], "skew": 0.0,
               "pixel_aspect_ratio": 1.0, "radial_distortion": [0.0, 0.0, 0.0],
               "tangential_distortion": [0.0, 0.0], "image_size": [W, H]}
        (seq / "camera").mkdir(parents=True, exist_ok=True)
        (seq / "camera" / f"{stem}.json").write_text(json.dumps(cam))
        (seq / "depth" / "1x").mkdir(parents=True, exist_ok=True)
        np.save(seq / "depth" / "1x" / f"{stem}.npy", np.full((H, W, 1), 0.5 * i, np.float32))
    src = open_source(seq)
    assert src.kind == "dycheck" and len(src) == 4 and src.has_gt_pose
    f = list(src)[3]
    np.testing.assert_allclose(f.world_from_cam, _pose(3), atol=1e-12)
    assert f.intrinsic[1, 1] == 200.0 and f.depth.shape == (H, W) and f.depth[0, 0] == 1.5
    _check_image(f, 3)
    (seq / "splits").mkdir()
    (seq / "splits" / "train.json").write_text(json.dumps({"frame_names": names[::2]}))
    assert [f.name for f in open_source(seq)] == ["0_00000", "0_00002"]
    assert [n for n, _ in ds.list_sequences(tmp_path / "iphone", "dycheck")] == ["apple"]


def test_datasets_unknown_dataset_and_kind(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown dataset"):
        ds.list_sequences(tmp_path, "kitti360")
    _write_rgb(tmp_path / "a.png", _rgb(0))
    with pytest.raises(InputError, match="unknown input kind"):
        open_source(tmp_path, kind="nope")


def test_datasets_quaternion_matches_rotation() -> None:
    r = _pose(3)[:3, :3]
    np.testing.assert_allclose(ds.quat_to_rot(*_rot_to_quat(r)), r, atol=1e-12)
    # 90 degrees about z: x axis → y axis
    s = np.sqrt(0.5)
    np.testing.assert_allclose(ds.quat_to_rot(0, 0, s, s) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_datasets_synth_folder(tmp_path: Path) -> None:
    seq = tmp_path / "synth"
    n = 3
    stamps = np.array([1_700_000_000_000_000_000 + i * 33_333_333 for i in range(n)], np.int64)
    k = np.array([[50.0, 0, 8], [0, 50.0, 6], [0, 0, 1]])
    for i in range(n):
        _write_rgb(seq / "rgb" / f"{i:06d}.png", _rgb(i))
        m = np.zeros((H, W), np.uint8)
        m[i, :] = 255
        (seq / "masks").mkdir(exist_ok=True)
        cv2.imwrite(str(seq / "masks" / f"{i:06d}.png"), m)
        (seq / "depth").mkdir(exist_ok=True)
        np.savez_compressed(seq / "depth" / f"{i:06d}.npz", depth=np.full((H, W), i + 1.0,
                            np.float32), object_id=np.full((H, W), -1, np.int16))
    np.savez(seq / "gt.npz", stamps_ns=stamps, intrinsics=np.stack([k] * n),
             cam_from_world=np.stack([np.linalg.inv(_pose(i)) for i in range(n)]))
    (seq / "camera.json").write_text("{}")
    (seq / "rgb.txt").write_text("# timestamp filename\n")
    src = open_source(seq)
    assert src.kind == "synth" and len(src) == 3
    f = list(src)[2]
    assert f.stamp_ns == int(stamps[2])
    np.testing.assert_allclose(f.world_from_cam, _pose(2), atol=1e-9)
    assert f.mask.sum() == W and f.mask[2].all() and f.depth[0, 0] == 3.0
    np.testing.assert_array_equal(f.image, _rgb(2))
