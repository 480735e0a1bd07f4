"""Every setting of the node as a declared ROS parameter, validated, turned into plain config.

One table (:data:`PARAMS`) lists name, default, type, range/choices, description and whether
the value may change at runtime. :func:`declare_all` declares them with ParameterDescriptors
(IntegerRange / FloatingPointRange, read_only where runtime change is unsupported) so that
defaults come from ``config/vggt4d.yaml`` via ``--ros-args --params-file``;
:func:`read_settings` checks cross-field rules and returns a :class:`NodeSettings`
(plain dataclass, no ROS types). The node registers :func:`validate_change` as its
on-set-parameters callback, which rejects invalid values with a clear reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter

from vggt4d_ros.stream.factory import NUMERICS


class ConfigError(ValueError):
    """Invalid configuration (parameter value or combination), with an actionable message."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``default`` fixes its type; ``lo``/``hi`` a numeric range;
    ``choices`` allowed strings; ``dynamic`` whether it may change while running."""

    name: str
    default: Any
    description: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: tuple[str, ...] = ()
    dynamic: bool = False
    step: Optional[float] = None


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
RELIABILITIES = ("best_effort", "reliable")
DROP_POLICIES = ("drop_oldest", "drop_newest")
CLUSTER_BACKENDS = ("torch", "sklearn")

PARAMS: tuple[ParamSpec, ...] = (
    # model
    ParamSpec("model.checkpoint", "facebook/VGGT-1B",
              "VGGT weights: a local .safetensors file/folder, a Hugging Face id, or "
              "'random_tiny' (tiny random weights: demos and tests only, outputs meaningless)"),
    ParamSpec("model.device", "auto", "inference device: auto (cuda if available, else cpu "
              "with a warning), cpu, cuda (error at start-up if unavailable)", choices=DEVICES),
    ParamSpec("model.dtype", "auto", "inference dtype: auto (bfloat16 autocast on cuda, "
              "float32 on cpu), float32, bfloat16, float16 (run as bfloat16 autocast)",
              choices=DTYPES),
    ParamSpec("model.numerics", "fast", "GPU numerics: fast (bf16 DPT depth head and the MLP "
              "GELU fused into its GEMM, tanh form: within the bf16 tolerance of the fp32 "
              "reference, docs/BENCHMARKS.md runs 43-47) or official (float32 heads, exact "
              "GELU: the official recipe, ~7 % slower); float32/CPU runs are unaffected",
              choices=NUMERICS),
    ParamSpec("model.image_width", 518, "working width in pixels the predictor resizes to "
              "(multiple of 14)", lo=28, hi=1022, step=14),
    ParamSpec("model.seed", 0, "seed of 'random_tiny' weights", lo=0, hi=2**31 - 1),
    ParamSpec("model.warmup_width", 0, "camera image width (pixels) to warm the model up for "
              "at start-up, before any topic exists: two synthetic windows compile the model "
              "and capture its CUDA graphs (the first real windows otherwise take ~1-2 min on "
              "CUDA); 0 = off (with model.warmup_height)", lo=0, hi=8192),
    ParamSpec("model.warmup_height", 0, "camera image height (pixels) of the start-up warm-up; "
              "0 = off (with model.warmup_width)", lo=0, hi=8192),
    # window
    ParamSpec("window.size", 16, "frames per window: new frames + overlap (keyframes come on "
              "top; on CUDA each distinct window size compiles once, ~15-25 s)",
              lo=2, hi=128),
    ParamSpec("window.stride", 8, "new frames per window; window.size - stride frames overlap "
              "with the previous window (must be < window.size)", lo=1, hi=127),
    ParamSpec("window.min_size", 0, "CUDA out-of-memory fallback: a window that does not fit "
              "is retried with fewer (the newest) frames, down to this many; 0 = stride + 1 "
              "(else stride < min_size <= size)", lo=0, hi=128),
    ParamSpec("window.keyframes", 0, "older keyframes added to each window for stability "
              "(windows grow by up to this many frames: new sizes compile once on CUDA)",
              lo=0, hi=32),
    ParamSpec("window.pipelined", True, "predict the next window on the GPU while the current "
              "one is aligned, emitted and published (same outputs; hides the host time "
              "between windows)"),
    # VGGT4D
    ParamSpec("vggt4d.dynamic", True, "run the VGGT4D dynamic-mask pipeline (false = plain "
              "VGGT, every pixel static)"),
    ParamSpec("vggt4d.refine", True, "refine masks with projection-gradient + photometric "
              "residuals"),
    ParamSpec("vggt4d.cluster_backend", "torch", "feature clustering backend",
              choices=CLUSTER_BACKENDS),
    ParamSpec("vggt4d.cuda_graphs", True, "CUDA: run the k-means loops and the threshold "
              "(torch backend) as CUDA-graph replays - same results, fewer kernel launches "
              "(H100 stream 25.3 vs 23.7 frames/s, docs/BENCHMARKS.md run 27), ~0.2 GB of "
              "graph memory; a capture that fails falls back to eager"),
    # frames (REP-105)
    ParamSpec("frames.odom_frame", "odom", "odometry frame (parent of base_frame)"),
    ParamSpec("frames.base_frame", "base_link", "robot body frame (child of odom_frame)"),
    ParamSpec("frames.camera_frame", "camera_optical_frame",
              "camera OPTICAL frame (z forward, x right, y down), child of base_frame; "
              "also the frame_id of images that arrive without one"),
    ParamSpec("frames.camera_xyz", [0.0, 0.0, 0.0], "camera position in base_frame, metres "
              "[x, y, z]"),
    ParamSpec("frames.camera_rpy", [0.0, 0.0, 0.0], "camera BODY orientation (x forward, y "
              "left, z up) in base_frame, radians [roll, pitch, yaw]; the optical rotation is "
              "applied on top"),
    ParamSpec("publish_tf", True, "broadcast odom -> base_link on /tf", dynamic=True),
    # QoS
    ParamSpec("qos.image.reliability", "best_effort", "image/camera_info subscription "
              "reliability (REP-2003 sensor data: best_effort)", choices=RELIABILITIES),
    ParamSpec("qos.image.depth", 5, "image/camera_info subscription history depth",
              lo=1, hi=1000),
    ParamSpec("qos.outputs.reliability", "reliable", "reliability of per-frame outputs "
              "(odom, path, masks, depth, clouds, status)", choices=RELIABILITIES),
    ParamSpec("qos.outputs.depth", 10, "history depth of per-frame outputs", lo=1, hi=1000),
    # input handling
    ParamSpec("queue_size", 8, "frames waiting for the inference worker (bounded; the "
              "window.stride frames of a window whose prediction already started come on top)",
              lo=1, hi=1000),
    ParamSpec("drop_policy", "drop_oldest", "when the queue is full: drop_oldest (lowest "
              "latency) or drop_newest", choices=DROP_POLICIES, dynamic=True),
    ParamSpec("input.max_width", 1280, "images wider than this (pixels) are downscaled "
              "(aspect kept) before queueing, bounding queue memory; the model works at "
              "model.image_width anyway", lo=28, hi=16384),
    ParamSpec("camera_info.enabled", True, "subscribe to camera_info and pair it by stamp"),
    ParamSpec("camera_info.tolerance", 0.001, "largest image/camera_info stamp difference "
              "accepted, seconds", lo=0.0, hi=1.0, dynamic=True),
    ParamSpec("stamps.backwards_reset", 0.5, "a stamp older than the last one by more than "
              "this (seconds) starts a new sequence (reset); smaller steps back are dropped",
              lo=0.0, hi=3600.0),
    ParamSpec("log_throttle", 5.0, "seconds between repeated warnings of one kind",
              lo=0.0, hi=3600.0, dynamic=True),
    # map
    ParamSpec("map.voxel_size", 0.05, "static map voxel edge, map units (metres up to scale)",
              lo=1e-4, hi=100.0),
    ParamSpec("map.max_voxels", 500_000, "static map bound (oldest voxels evicted)",
              lo=100, hi=50_000_000),
    ParamSpec("map.publish_period", 2.0, "seconds between ~/static_map publications "
              "(0 = only on save_map)", lo=0.0, hi=3600.0, dynamic=True),
    # files
    ParamSpec("path.max_poses", 2000, "poses kept in ~/path (oldest dropped; the whole path "
              "is republished every frame)", lo=1, hi=100_000, dynamic=True),
    ParamSpec("output_dir", "vggt4d_out", "directory for save_map outputs (PLY map, TUM "
              "trajectory); nothing is ever written outside it"),
)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}


def _ptype(default: Any) -> int:
    if isinstance(default, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(default, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(default, float):
        return ParameterType.PARAMETER_DOUBLE
    if isinstance(default, str):
        return ParameterType.PARAMETER_STRING
    if isinstance(default, list):
        return ParameterType.PARAMETER_DOUBLE_ARRAY
    raise TypeError(f"no parameter type for {default!r}")


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ParameterDescriptor of ``spec`` (type, range, description, read_only)."""
    desc = spec.description
    if spec.choices:
        desc += f" [one of: {', '.join(spec.choices)}]"
    d = ParameterDescriptor(name=spec.name, type=_ptype(spec.default), description=desc,
                            read_only=not spec.dynamic)
    if spec.lo is not None and isinstance(spec.default, int) and \
            not isinstance(spec.default, bool):
        # step: values must be from_value + n * step (0 = any integer in range)
        d.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi),
                                        step=int(spec.step or 0))]
    elif spec.lo is not None and isinstance(spec.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.lo),
                                                     to_value=float(spec.hi), step=0.0)]
    if spec.choices:
        d.additional_constraints = f"one of: {', '.join(spec.choices)}"
    return d


def check_value(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is invalid for parameter ``name`` (None when valid). Type, range,
    choices and the per-parameter rules."""
    spec = SPECS.get(name)
    if spec is None:
        return None  # not ours (e.g. use_sim_time)
    want = spec.default
    if isinstance(want, bool):
        ok = isinstance(value, bool)
    elif isinstance(want, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(want, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(want, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        return f"{name}: expected {type(want).__name__}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}: must be finite, got {value}"
    if spec.lo is not None and not isinstance(value, (str, list, tuple, bool)):
        if not spec.lo <= value <= spec.hi:
            return f"{name}: {value} outside [{spec.lo}, {spec.hi}]"
    if spec.step and isinstance(value, int) and value % int(spec.step):
        return f"{name}: {value} is not a multiple of {int(spec.step)}"
    if spec.choices and value not in spec.choices:
        return f"{name}: {value!r} is not one of {', '.join(spec.choices)}"
    if name in ("frames.camera_xyz", "frames.camera_rpy"):
        if len(value) != 3 or not all(math.isfinite(v) for v in value):
            return f"{name}: expected 3 finite numbers, got {list(value)!r}"
    if name.startswith("frames.") and isinstance(value, str):
        if not value or value.startswith("/") or any(c.isspace() for c in value):
            return f"{name}: frame ids must be non-empty, without a leading '/' or spaces " \
                   f"(got {value!r})"
    if name == "model.checkpoint" and not value.strip():
        return f"{name}: empty; give a .safetensors path, a Hugging Face id or 'random_tiny'"
    if name == "output_dir" and not value.strip():
        return f"{name}: empty"
    return None


def check_combination(values: dict[str, Any]) -> Optional[str]:
    """Cross-parameter rules; None when consistent."""
    size, stride = values["window.size"], values["window.stride"]
    if stride >= size:
        return f"window.stride ({stride}) must be smaller than window.size ({size}) so that " \
               "windows overlap (the overlap aligns them)"
    low = values.get("window.min_size", 0)
    if low and not stride < low <= size:
        return f"window.min_size ({low}) must be 0 (auto) or in (window.stride, window.size] " \
               f"= ({stride}, {size}] so that every new frame is still predicted"
    warm = (values.get("model.warmup_width", 0), values.get("model.warmup_height", 0))
    if (warm[0] > 0) != (warm[1] > 0):
        return f"model.warmup_width and model.warmup_height must both be 0 (no warm-up) or " \
               f"both positive, got {list(warm)}"
    frames = [values["frames.odom_frame"], values["frames.base_frame"],
              values["frames.camera_frame"]]
    if len(set(frames)) != 3:
        return f"frames.odom_frame, base_frame and camera_frame must differ, got {frames}"
    return None


def declare_all(node: Node) -> None:
    """Declare every parameter of :data:`PARAMS` on ``node`` (values from the params file
    override the defaults). Raises ConfigError naming the parameter when rclpy refuses a
    value (wrong type, out of range)."""
    for spec in PARAMS:
        try:
            node.declare_parameter(spec.name, spec.default, descriptor(spec))
        except Exception as exc:  # rclpy raises several exception types here
            raise ConfigError(f"parameter {spec.name}: {exc}") from exc


@dataclass
class NodeSettings:
    """All settings, as plain Python values (see :data:`PARAMS` for meaning and units)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def read_settings(node: Node) -> NodeSettings:
    """Read and validate every declared parameter; raises ConfigError with the reason."""
    values = {spec.name: node.get_parameter(spec.name).value for spec in PARAMS}
    for name, value in values.items():
        if isinstance(SPECS[name].default, list):
            values[name] = [float(v) for v in value]
        elif isinstance(SPECS[name].default, float) and isinstance(value, int):
            values[name] = float(value)
        reason = check_value(name, values[name])
        if reason:
            raise ConfigError(f"invalid parameter {reason}")
    reason = check_combination(values)
    if reason:
        raise ConfigError(f"invalid parameters: {reason}")
    return NodeSettings(values)


def validate_change(current: dict[str, Any], params: Sequence[Parameter]) -> SetParametersResult:
    """on-set-parameters callback body: reject read-only changes, bad types/ranges/choices and
    inconsistent combinations, with the reason (shown to ``ros2 param set`` users)."""
    proposed = dict(current)
    for p in params:
        if p.name not in SPECS:
            continue
        if not SPECS[p.name].dynamic and p.name in current and current[p.name] != p.value:
            return SetParametersResult(
                successful=False, reason=f"{p.name} is read-only at runtime; restart the node")
        value = p.value
        if isinstance(SPECS[p.name].default, float) and isinstance(value, int) and \
                not isinstance(value, bool):
            value = float(value)
        reason = check_value(p.name, value)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        proposed[p.name] = value
    if all(k in proposed for k in ("window.size", "window.stride", "window.keyframes",
                                   "frames.odom_frame", "frames.base_frame",
                                   "frames.camera_frame")):
        reason = check_combination(proposed)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
    return SetParametersResult(successful=True)


def markdown_table() -> str:
    """Every parameter as a Markdown table (name, type, default, range/choices, runtime,
    description), for the README."""
    rows = ["| parameter | type | default | range / choices | runtime | description |",
            "|---|---|---|---|---|---|"]
    for p in PARAMS:
        typ = {bool: "bool", int: "int", float: "double", str: "string", list: "double[]"}[
            type(p.default)]
        rng = ", ".join(p.choices) if p.choices else (
            f"[{p.lo:g}, {p.hi:g}]" + (f" step {p.step:g}" if p.step else "")
            if p.lo is not None else "")
        rows.append(f"| `{p.name}` | {typ} | `{p.default}` | {rng} | "
                    f"{'yes' if p.dynamic else 'no'} | {p.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
