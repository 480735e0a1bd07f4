"""sensor_msgs/PointCloud2 <-> numpy without sensor_msgs_py.

Layout written by :func:`points_to_cloud` (unorganised, ``height = 1``, little-endian,
``is_dense`` = all finite): ``x y z`` float32 (metres, in ``frame_id``), ``rgb`` float32 whose
bits are ``0x00RRGGBB`` (the PCL/RViz packing), ``confidence`` float32. ``point_step`` = 20.
:func:`cloud_to_arrays` reads any cloud with these float32 fields (any order, padding,
endianness) back.
"""
from __future__ import annotations

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField

from .image_conv import bytes_to_uint8_array

_FIELD_DTYPES = {
    PointField.INT8: np.int8, PointField.UINT8: np.uint8,
    PointField.INT16: np.int16, PointField.UINT16: np.uint16,
    PointField.INT32: np.int32, PointField.UINT32: np.uint32,
    PointField.FLOAT32: np.float32, PointField.FLOAT64: np.float64,
}


class PointCloudError(ValueError):
    """A PointCloud2 message is malformed or lacks a required field."""


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """``[M,3]`` uint8 RGB → ``[M]`` float32 whose bit pattern is ``0x00RRGGBB``."""
    c = np.asarray(colors, dtype=np.uint32).reshape(-1, 3)
    packed = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: ``[M]`` float32 → ``[M,3]`` uint8."""
    u = np.ascontiguousarray(rgb, dtype=np.float32).view(np.uint32)
    return np.stack([(u >> 16) & 255, (u >> 8) & 255, u & 255], axis=-1).astype(np.uint8)


def points_to_cloud(points: np.ndarray, colors: np.ndarray | None = None,
                    confidence: np.ndarray | None = None, *, frame_id: str,
                    stamp=None) -> PointCloud2:
    """Build an unorganised PointCloud2 (x y z rgb confidence).

    Args:
        points: ``[M,3]`` metres in ``frame_id``.
        colors: ``[M,3]`` uint8 RGB (grey 128 if None).
        confidence: ``[M]`` (1.0 if None).
        frame_id: the frame of the points (odom for the node's clouds).
        stamp: builtin_interfaces/Time (the source image stamp).
    """
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    m = pts.shape[0]
    cols = np.full((m, 3), 128, np.uint8) if colors is None else np.asarray(colors)
    conf = np.ones(m, np.float32) if confidence is None else np.asarray(confidence, np.float32)
    if cols.shape != (m, 3) or conf.shape != (m,):
        raise PointCloudError(f"shape mismatch: points {pts.shape}, colors {cols.shape}, "
                              f"confidence {conf.shape}")
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4"),
                      ("confidence", "<f4")])
    rec = np.empty(m, dtype)
    rec["x"], rec["y"], rec["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    rec["rgb"] = pack_rgb(cols)
    rec["confidence"] = conf
    msg = PointCloud2()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = 1, m
    msg.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, n in enumerate(("x", "y", "z", "rgb", "confidence"))]
    msg.is_bigendian = False
    msg.point_step = dtype.itemsize
    msg.row_step = dtype.itemsize * m
    msg.is_dense = bool(np.all(np.isfinite(pts)))
    msg.data = bytes_to_uint8_array(rec.tobytes())
    return msg


def cloud_to_arrays(msg: PointCloud2) -> dict[str, np.ndarray]:
    """Decode a PointCloud2 into ``{field name: [height*width] array}`` (native byte order),
    plus ``"points"`` ``[M,3]`` float32 and ``"colors"`` ``[M,3]`` uint8 when present."""
    n = int(msg.height) * int(msg.width)
    step, row_step = int(msg.point_step), int(msg.row_step)
    if n and (step <= 0 or row_step < step * int(msg.width)):
        raise PointCloudError(f"bad point_step {step} / row_step {row_step}")
    need = row_step * (int(msg.height) - 1) + step * int(msg.width) if n else 0
    if len(msg.data) < need:
        raise PointCloudError(f"cloud data truncated: {len(msg.data)} B, need {need} B")
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _FIELD_DTYPES:
            raise PointCloudError(f"field {f.name}: unknown datatype {f.datatype}")
        base = np.dtype(_FIELD_DTYPES[f.datatype]).newbyteorder(order)
        names.append(f.name)
        formats.append((base, (f.count,)) if f.count > 1 else base)
        offsets.append(f.offset)
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": step})
    buf = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    rows = [np.frombuffer(buf[r * row_step: r * row_step + step * int(msg.width)].tobytes(),
                          dtype=dtype) for r in range(int(msg.height))] if n else []
    rec = np.concatenate(rows) if rows else np.zeros(0, dtype)
    out = {name: rec[name].astype(rec[name].dtype.newbyteorder("=")) for name in names}
    if all(k in out for k in ("x", "y", "z")):
        out["points"] = np.stack([out["x"], out["y"], out["z"]], axis=-1).astype(np.float32)
    if "rgb" in out:
        out["colors"] = unpack_rgb(out["rgb"].astype(np.float32))
    return out
