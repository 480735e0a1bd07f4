"""sensor_msgs/Image <-> numpy, written once here (no cv_bridge).

Input encodings (camera → node): ``rgb8``, ``bgr8``, ``mono8``, ``rgba8``, ``bgra8``,
``yuv422`` (UYVY byte order, as in ROS) and ``yuv422_yuy2`` (YUYV). All are converted to an
RGB ``uint8`` array ``[H, W, 3]``. Output encodings (node → consumers): ``mono8``
(``[H, W]`` uint8), ``16UC1`` (``[H, W]`` uint16) and ``32FC1`` (``[H, W]`` float32); these
can also be read back with :func:`image_to_array`.

Row padding (``step > width * bytes_per_pixel``) and ``is_bigendian`` (multi-byte encodings)
are honoured. Every malformed message raises :class:`ImageConversionError` whose ``reason``
is a short machine-readable class (``unsupported_encoding``, ``zero_size``, ``truncated``,
``bad_step``) that the node uses as a diagnostics counter key.
"""
from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np
from sensor_msgs.msg import Image

# encoding -> (channels, numpy dtype)
_RAW_LAYOUT: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, np.dtype(np.uint8)),
    "bgr8": (3, np.dtype(np.uint8)),
    "rgba8": (4, np.dtype(np.uint8)),
    "bgra8": (4, np.dtype(np.uint8)),
    "mono8": (1, np.dtype(np.uint8)),
    "8UC1": (1, np.dtype(np.uint8)),
    "mono16": (1, np.dtype(np.uint16)),
    "16UC1": (1, np.dtype(np.uint16)),
    "32FC1": (1, np.dtype(np.float32)),
}
_YUV422 = ("yuv422", "yuv422_yuy2")

#: Encodings accepted by :func:`image_to_rgb` (the camera input side).
INPUT_ENCODINGS: tuple[str, ...] = ("rgb8", "bgr8", "mono8", "rgba8", "bgra8") + _YUV422
#: Encodings produced by :func:`array_to_image` (the output side).
OUTPUT_ENCODINGS: tuple[str, ...] = ("rgb8", "mono8", "16UC1", "32FC1")


class ImageConversionError(ValueError):
    """A sensor_msgs/Image could not be converted.

    Attributes:
        reason: short class of the problem, used as a diagnostics counter key.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class _Geometry:
    height: int
    width: int
    step: int
    row_bytes: int


def _bytes_per_pixel(encoding: str) -> int:
    if encoding in _YUV422:
        return 2
    channels, dtype = _RAW_LAYOUT[encoding]
    return channels * dtype.itemsize


def _check_geometry(msg: Image, encoding: str) -> _Geometry:
    """Validate height/width/step/data length; returns the row geometry in bytes."""
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError("zero_size", f"image has zero size ({w}x{h}, {encoding})")
    row_bytes = w * _bytes_per_pixel(encoding)
    if encoding in _YUV422 and w % 2:
        raise ImageConversionError("bad_step", f"{encoding} needs an even width, got {w}")
    if step < row_bytes:
        raise ImageConversionError(
            "bad_step", f"step {step} B < width {w} x {row_bytes // w} B/px = {row_bytes} B")
    need = step * (h - 1) + row_bytes
    have = len(msg.data)
    if have < need:
        raise ImageConversionError(
            "truncated", f"image data truncated: {have} B for {w}x{h} {encoding} "
                         f"with step {step} (need {need} B)")
    return _Geometry(h, w, step, row_bytes)


def _rows(msg: Image, geo: _Geometry) -> np.ndarray:
    """The pixel bytes as ``[H, row_bytes]`` uint8, row padding removed (a view when possible)."""
    buf = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    if geo.step == geo.row_bytes:
        return buf[: geo.height * geo.row_bytes].reshape(geo.height, geo.row_bytes)
    padded = np.lib.stride_tricks.as_strided(
        buf, shape=(geo.height, geo.row_bytes), strides=(geo.step, 1), writeable=False)
    return padded


def _yuv422_to_rgb(rows: np.ndarray, width: int, encoding: str) -> np.ndarray:
    """Packed 4:2:2 → RGB uint8 ``[H, W, 3]`` (BT.601, full-swing as in OpenCV's YUV2RGB)."""
    quads = rows.reshape(rows.shape[0], width // 2, 4).astype(np.float32)
    if encoding == "yuv422":       # UYVY: U0 Y0 V0 Y1
        u, y0, v, y1 = quads[..., 0], quads[..., 1], quads[..., 2], quads[..., 3]
    else:                          # YUYV: Y0 U0 Y1 V0
        y0, u, y1, v = quads[..., 0], quads[..., 1], quads[..., 2], quads[..., 3]
    y = np.stack([y0, y1], axis=-1).reshape(rows.shape[0], width)
    u = np.repeat(u, 2, axis=1) - 128.0
    v = np.repeat(v, 2, axis=1) - 128.0
    r = y + 1.402 * v
    g = y - 0.344136 * u - 0.714136 * v
    b = y + 1.772 * u
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def image_to_array(msg: Image) -> np.ndarray:
    """Decode an Image into its natural array, without colour conversion.

    Returns ``[H, W]`` for one-channel encodings (uint8/uint16/float32, native byte order),
    ``[H, W, C]`` for multi-channel 8-bit encodings and ``[H, W, 3]`` RGB for yuv422 variants.
    Raises ImageConversionError for unsupported encodings or malformed data.
    """
    enc = msg.encoding
    if enc not in _RAW_LAYOUT and enc not in _YUV422:
        raise ImageConversionError(
            "unsupported_encoding",
            f"unsupported image encoding '{enc}' (supported: {', '.join(INPUT_ENCODINGS)}; "
            f"outputs {', '.join(OUTPUT_ENCODINGS)})")
    geo = _check_geometry(msg, enc)
    rows = _rows(msg, geo)
    if enc in _YUV422:
        return _yuv422_to_rgb(rows, geo.width, enc)
    channels, dtype = _RAW_LAYOUT[enc]
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    arr = np.ascontiguousarray(rows).view(dtype)
    arr = arr.reshape(geo.height, geo.width, channels) if channels > 1 else \
        arr.reshape(geo.height, geo.width)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def image_to_rgb(msg: Image) -> np.ndarray:
    """Decode a camera Image into RGB ``uint8 [H, W, 3]`` (a fresh, contiguous array).

    mono8 is replicated to three channels; alpha is dropped; BGR is reordered.
    Raises ImageConversionError (``reason`` = unsupported_encoding / zero_size / truncated /
    bad_step).
    """
    enc = msg.encoding
    if enc not in INPUT_ENCODINGS:
        raise ImageConversionError(
            "unsupported_encoding",
            f"unsupported input encoding '{enc}' (supported: {', '.join(INPUT_ENCODINGS)})")
    arr = image_to_array(msg)
    if enc in _YUV422 or enc == "rgb8":
        out = arr
    elif enc == "bgr8":
        out = arr[..., ::-1]
    elif enc == "rgba8":
        out = arr[..., :3]
    elif enc == "bgra8":
        out = arr[..., 2::-1]
    else:  # mono8
        out = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _encoding_for(arr: np.ndarray) -> str:
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return "mono8"
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return "rgb8"
    if arr.dtype == np.uint16 and arr.ndim == 2:
        return "16UC1"
    if arr.dtype == np.float32 and arr.ndim == 2:
        return "32FC1"
    raise ImageConversionError(
        "unsupported_encoding",
        f"no Image encoding for array dtype {arr.dtype} shape {arr.shape} "
        "(use uint8 [H,W] / [H,W,3], uint16 [H,W], float32 [H,W])")


def array_to_image(arr: np.ndarray, encoding: str | None = None, *, stamp=None,
                   frame_id: str = "", bigendian: bool = False) -> Image:
    """Encode ``arr`` into a sensor_msgs/Image (no row padding).

    Args:
        arr: ``[H, W]`` uint8 (mono8), uint16 (16UC1), float32 (32FC1) or ``[H, W, 3]`` uint8
            (rgb8 or bgr8, channel order as given).
        encoding: defaults to the natural encoding of the array; must agree with its layout.
        stamp: builtin_interfaces/Time copied into the header (the source image's stamp).
        frame_id: header frame_id (an optical frame for camera-aligned images).
        bigendian: write multi-byte pixels big-endian (for tests of the reader).
    """
    arr = np.asarray(arr)
    natural = _encoding_for(arr)
    enc = encoding or natural
    if enc not in _RAW_LAYOUT or _RAW_LAYOUT[enc][1] != arr.dtype or \
            (_RAW_LAYOUT[enc][0] == 1) != (arr.ndim == 2):
        raise ImageConversionError(
            "unsupported_encoding", f"array dtype {arr.dtype} shape {arr.shape} "
                                    f"cannot be written as '{enc}'")
    if arr.size == 0:
        raise ImageConversionError("zero_size", f"cannot encode an empty array {arr.shape}")
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = enc
    if arr.dtype.itemsize > 1:
        target = ">" if bigendian else "<"
        arr = arr.astype(arr.dtype.newbyteorder(target), copy=False)
        msg.is_bigendian = int(bigendian)
    else:
        msg.is_bigendian = 0
    data = np.ascontiguousarray(arr)
    msg.step = int(data.strides[0])
    msg.data = bytes_to_uint8_array(data.tobytes())
    return msg


def bytes_to_uint8_array(data: bytes) -> array.array:
    """``bytes`` → ``array.array('B')``: rclpy's fast path for ``uint8[]`` fields (a plain bytes
    object would be validated element by element in Python)."""
    out = array.array("B")
    out.frombytes(data)
    return out
