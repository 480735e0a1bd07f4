"""The demo behind ``make demo``: synthesise a dynamic scene bag, replay it, evaluate it.

    python -m vggt4d_ros.tools.demo --out out/demo [--checkpoint PATH|HF_ID|random_tiny]

Steps (all offline, no ROS runtime):
1. ``vggt4d-synth``: a textured room with moving objects, exact ground truth, written as a
   folder and a rosbag2 (``OUT/scene``; camera at ``/camera/image_raw``).
2. ``vggt4d-replay`` of the bag through the same stream engine as the node (``OUT/replay``).
3. ``vggt4d-eval`` against the synthetic ground truth (``OUT/eval/report.md``, printed at the end).

Weights: ``--checkpoint``, else ``$VGGT4D_CHECKPOINT``, else ``facebook/VGGT-1B``. A local
file/folder is used as is; a Hugging Face id is taken from the local cache, or downloaded
when the hub is reachable. When the weights cannot be had (missing path, offline hub) the demo
says so in one paragraph and runs the same pipeline on tiny random weights; every output of
such a run (summary, report, pictures) carries "random weights: geometry is meaningless".

The default scene (24 frames, 252x140, window 8, stride 4) finishes in a few minutes on a
2-core CPU with random weights. VGGT-1B on a CPU is much slower; use a GPU (``--device cuda``).
``OUT`` is replaced on every run if it holds a previous demo (``demo.json``); any other
non-empty folder is left alone (error).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from vggt4d_ros.tools.cli_util import exc_summary, report_failure

DEFAULT_CHECKPOINT = "facebook/VGGT-1B"
RANDOM_CHECKPOINT = "random_tiny"
MARKER = "demo.json"


@dataclass
class WeightChoice:
    """Which weights the demo runs on: ``checkpoint`` (local path, or ``random_tiny``),
    ``requested`` (what the user asked for), ``fallback_reason`` (None unless we fell back)."""

    checkpoint: str
    requested: str
    fallback_reason: str | None = None

    @property
    def random(self) -> bool:
        return self.checkpoint.startswith("random")


def _hub_reachable(repo_id: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(reachable, reason) for the Hugging Face hub, without downloading anything."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(repo_id, timeout=timeout_s)
        return True, ""
    except Exception as exc:  # DNS, timeout, HTTP errors: all mean "cannot have it now"
        return False, exc_summary(exc)


def choose_weights(requested: str | None) -> WeightChoice:
    """Resolve the demo's weights (see module docstring); never raises for missing weights."""
    req = requested or os.environ.get("VGGT4D_CHECKPOINT") or DEFAULT_CHECKPOINT
    if req.startswith("random"):
        return WeightChoice(req, req)
    from vggt4d_ros.model.checkpoint import CheckpointError, resolve_checkpoint
    path = Path(req).expanduser()
    if path.exists():
        try:
            return WeightChoice(str(resolve_checkpoint(path)), req)
        except CheckpointError as exc:
            return WeightChoice(RANDOM_CHECKPOINT, req, str(exc))
    try:
        return WeightChoice(str(resolve_checkpoint(req, local_files_only=True)), req)
    except CheckpointError as exc:
        if "/" not in req or path.suffix:
            return WeightChoice(RANDOM_CHECKPOINT, req, f"'{req}' is not a file: {exc}")
    ok, why = _hub_reachable(req)
    if not ok:
        return WeightChoice(RANDOM_CHECKPOINT, req,
                            f"'{req}' is not in the local Hugging Face cache and the hub cannot "
                            f"be reached ({why})")
    try:
        return WeightChoice(str(resolve_checkpoint(req)), req)
    except CheckpointError as exc:
        return WeightChoice(RANDOM_CHECKPOINT, req, str(exc))


def fallback_paragraph(choice: WeightChoice) -> str:
    """The one paragraph printed when the demo falls back to random weights."""
    return (
        f"NOTE: the VGGT weights '{choice.requested}' cannot be had here: "
        f"{choice.fallback_reason}. The demo therefore runs the SAME pipeline (synthesis, "
        "VGGT4D stream engine, replay, evaluation) on tiny RANDOM weights, so every pose, depth, "
        "mask and map it produces is meaningless and every output is labelled \"random weights: "
        "geometry is meaningless\". To run it for real, download facebook/VGGT-1B "
        "(model.safetensors) on a machine with internet and pass --checkpoint /path/to/"
        "model.safetensors or set VGGT4D_CHECKPOINT.")


def _prepare_out(out: Path) -> None:
    """Replace a previous demo at ``out``; refuse to touch any other non-empty folder."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            return
        if out.is_dir() and (out / MARKER).is_file():
            shutil.rmtree(out)
            return
        raise FileExistsError(f"{out} exists and is not a previous demo output (no {MARKER}); "
                              "choose another --out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vggt4d-demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.add_argument("--checkpoint", default=None,
                   help="local weights, HF id or random_tiny (default: $VGGT4D_CHECKPOINT or "
                        f"{DEFAULT_CHECKPOINT}, falling back to random weights)")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--width", type=int, default=252, help="image width (multiple of 14)")
    p.add_argument("--height", type=int, default=140, help="image height (multiple of 14)")
    p.add_argument("--objects", type=int, default=2, help="moving objects (0-3)")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_demo(a: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    """Run the three steps; returns the report path."""
    from vggt4d_ros.tools import eval as ev
    from vggt4d_ros.tools import replay as rp
    from vggt4d_ros.tools.visualize import label_pictures, link_pictures
    from vggt4d_ros.tools.datasets import open_source
    from vggt4d_ros.tools.synth import SynthConfig, SynthWorld, write_outputs

    for name, v in (("width", a.width), ("height", a.height)):
        if v < 28 or v % 14:
            raise ValueError(f"--{name} must be a multiple of 14 (>= 28), got {v}")
    out = Path(a.out)
    _prepare_out(out)
    choice = choose_weights(a.checkpoint)
    if choice.fallback_reason:
        log(fallback_paragraph(choice))
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"checkpoint": choice.checkpoint,
                                          "requested": choice.requested,
                                          "fallback_reason": choice.fallback_reason,
                                          "weights": rp.RANDOM_WEIGHTS_NOTE if choice.random
                                          else f"checkpoint {choice.checkpoint}"}, indent=2))
    log(f"[1/3] synthesising {a.frames} frames {a.width}x{a.height} with {a.objects} moving "
        f"objects -> {out / 'scene'}")
    world = SynthWorld(SynthConfig(width=a.width, height=a.height, num_frames=a.frames,
                                   num_objects=a.objects, seed=a.seed))
    scene = write_outputs(world, out / "scene", folder=True, bags=["sqlite3"])
    log(f"[2/3] replaying {scene / 'bag_sqlite3'} (window {a.window}, stride {a.stride}, "
        f"weights: {'RANDOM (meaningless)' if choice.random else choice.checkpoint})")
    settings = rp.ReplaySettings(checkpoint=choice.checkpoint, window=a.window, stride=a.stride,
                                 resolution=a.width, device=a.device, seed=a.seed)
    res = rp.run_replay(open_source(scene / "bag_sqlite3"), out / "replay", settings,
                        progress=not a.quiet)
    log(f"[3/3] evaluating against the synthetic ground truth -> {out / 'eval'}")
    gt = ev.load_ground_truth(scene)
    ev.evaluate(res.out_dir, gt, out / "eval", ev.EvalOptions())
    report = out / "eval" / "report.md"
    link_pictures(report, res.out_dir)
    if choice.random:
        label_pictures(out / "eval", rp.RANDOM_WEIGHTS_NOTE)       # the eval plots too
        text = report.read_text()
        report.write_text(f"> **{rp.RANDOM_WEIGHTS_NOTE}** (the VGGT weights were not "
                          f"available; see {MARKER})\n\n" + text)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``make demo``). 0 ok, 2 bad arguments/output folder, 1 failure."""
    a = build_parser().parse_args(argv)
    try:
        report = run_demo(a)
    except (ValueError, FileExistsError) as exc:
        print(f"vggt4d-demo: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as exc:
        return report_failure("vggt4d-demo", exc)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
