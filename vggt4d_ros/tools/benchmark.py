"""``vggt4d-benchmark``: replay + eval over every sequence of a benchmark, one markdown table.

    vggt4d-benchmark DATASET_ROOT --dataset NAME --out DIR [--checkpoint facebook/VGGT-1B]

For each sequence: ``vggt4d-replay`` (same engine as the node, keep_all) into
``DIR/<seq>/replay``, then ``vggt4d-eval`` against the sequence's ground truth into
``DIR/<seq>/eval``; finally ``DIR/benchmark.md`` (table comparable to the paper's) and
``DIR/benchmark.json`` (every number). A sequence that fails is reported in the table
(status column) and the run goes on.

Protocols (``PROTOCOLS``; frame sampling as in the dynamic-scene evaluations that VGGT4D
follows — MonST3R / Easi3R-style — where our spec does not pin it down we say so):

============  =======================================  ======================  ===============
dataset       sequences (DATASET_ROOT layout)          frames                  metrics
============  =======================================  ======================  ===============
davis2016     ImageSets/2016/val.txt (20), 480p        all                     mask J&F
davis2017     ImageSets/2017/val.txt (30), 480p        all                     mask J&F
sintel        training/final, the 14 dynamic seqs of   all                     ATE, RPE;
              the MonST3R pose protocol (if present)                           depth; masks*
tum           */rgb.txt (TUM-dynamics freiburg3)       first 270, stride 3     ATE, RPE
bonn          */rgb.txt (rgbd_bonn_*)                  frames 30..139          ATE, RPE; depth
vkitti        Scene*/clone, Camera_0                   all                     ATE, RPE; depth
pointodyssey  */rgbs (root = the test split)           first 500               ATE, RPE; masks*
dycheck       */rgb/1x (iPhone), splits/train.json     all                     ATE, RPE; depth
============  =======================================  ======================  ===============

(* when the dataset ships them.) Trajectories: Sim(3) (Umeyama with scale) alignment of the
monocular prediction to the ground truth, ATE = RMSE of camera centres, RPE at 1 frame
(translation RMSE, rotation RMSE in degrees). Masks: J = IoU, F = boundary F-measure
(bound_th 0.008), means over frames, GT = union of all annotated objects. Depth: AbsRel and
δ<1.25 after one median scale per sequence. The paper's DyCheck figures are point-cloud
accuracy / distance metrics, which this runner does not compute (it reports ATE and depth);
the paper's VKITTI ATE (0.164) is shown next to ours.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vggt4d_ros.tools import replay as rp
from vggt4d_ros.tools.cli_util import first_line, report_failure
from vggt4d_ros.tools.datasets import FrameSource, InputError, list_sequences, open_source
from vggt4d_ros.tools.visualize import label_pictures, link_pictures

SINTEL_MONST3R_SEQUENCES = (
    "alley_2", "ambush_4", "ambush_5", "ambush_6", "cave_2", "cave_4", "market_2", "market_5",
    "market_6", "shaman_3", "sleeping_1", "sleeping_2", "temple_2", "temple_3")


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is run. ``kind``: datasets source kind; ``start``/``stride``/
    ``max_frames``: frame sampling per sequence; ``sequences``: preferred subset (None = all
    found); ``paper``: the paper's reported numbers for this benchmark (column → value)."""

    dataset: str
    kind: str
    start: int = 0
    stride: int = 1
    max_frames: int | None = None
    sequences: tuple[str, ...] | None = None
    alignment: str = "sim3"
    depth_alignment: str = "median"
    max_depth: float | None = None
    note: str = ""
    paper: tuple[tuple[str, float], ...] = ()


PROTOCOLS: dict[str, Protocol] = {
    "davis2016": Protocol("davis2016", "davis", note="DAVIS-2016 val, all frames, J&F"),
    "davis2017": Protocol("davis2017", "davis", note="DAVIS-2017 val, all frames, J&F "
                                                     "(all objects merged into one dynamic mask)"),
    "sintel": Protocol("sintel", "sintel", sequences=SINTEL_MONST3R_SEQUENCES,
                       note="training/final, 14 dynamic sequences, all frames"),
    "tum": Protocol("tum", "tum", stride=3, max_frames=90,
                    note="TUM-dynamics, first 270 frames at stride 3"),
    "bonn": Protocol("bonn", "bonn", start=30, max_frames=110, max_depth=10.0,
                     note="Bonn RGB-D dynamic, frames 30-139; depth capped at 10 m"),
    "vkitti": Protocol("vkitti", "vkitti", max_depth=80.0, note="Scene*/clone Camera_0, all frames",
                       paper=(("ATE", 0.164),)),
    "pointodyssey": Protocol("pointodyssey", "pointodyssey", max_frames=500,
                             note="first 500 frames per sequence"),
    "dycheck": Protocol("dycheck", "dycheck", note="iPhone camera 0, train split frames"),
}

COLUMNS = (  # (header, section in metrics.json, key, format)
    ("ATE", "trajectory", "ate_rmse", "{:.4f}"),
    ("RPE-t", "trajectory", "rpe_trans_rmse", "{:.4f}"),
    ("RPE-r (deg)", "trajectory", "rpe_rot_rmse_deg", "{:.3f}"),
    ("J mean", "masks", "J_mean", "{:.3f}"),
    ("F mean", "masks", "F_mean", "{:.3f}"),
    ("J&F", "masks", "JF_mean", "{:.3f}"),
    ("AbsRel", "depth", "abs_rel", "{:.4f}"),
    ("δ<1.25", "depth", "delta1", "{:.3f}"),
)

PredictorFactory = Callable[[str, FrameSource], Any]


@dataclass
class SequenceResult:
    """One row of the table."""

    name: str
    frames: int
    status: str
    metrics: dict[str, float]
    replay_dir: str | None = None
    eval_dir: str | None = None


# --------------------------------------------------------------------------- ground truth
def ground_truth_from_replay(replay_dir: Path) -> Any:
    """``eval.GroundTruth`` from a replay's ``gt/`` folder and ``frames.txt`` (frame names =
    the replay's own ``000000`` names, so prediction and ground truth pair exactly)."""
    from vggt4d_ros.tools import eval as ev
    from vggt4d_ros.tools.metrics import read_tum
    import cv2
    gt_dir = replay_dir / "gt"
    rows = [ln.split() for ln in (replay_dir / "frames.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    poses: dict[int, np.ndarray] = {}
    if (gt_dir / "groundtruth.txt").is_file():
        t = read_tum(gt_dir / "groundtruth.txt")
        poses = {int(s): p for s, p in zip(t.stamps_ns, t.poses)}
    gt = ev.GroundTruth(f"{gt_dir} (replay ground truth)")
    for row in rows:
        name, stamp = f"{int(row[0]):06d}", int(row[1])
        gt.names.append(name)
        gt.stamps_ns.append(stamp)
        gt.poses.append(poses.get(stamp))
        m = gt_dir / "masks" / f"{name}.png"
        gt.masks.append(cv2.imread(str(m), cv2.IMREAD_UNCHANGED) > 0 if m.is_file() else None)
        d = gt_dir / "depth" / f"{name}.npz"
        if d.is_file():
            with np.load(d, allow_pickle=False) as z:
                gt.depths.append(np.asarray(z["depth"], np.float32))
        else:
            gt.depths.append(None)
    return gt


# --------------------------------------------------------------------------- running
def _pick_sequences(root: Path, proto: Protocol,
                    only: Sequence[str] | None) -> list[tuple[str, Path]]:
    seqs = list_sequences(root, proto.dataset)
    if only:
        missing = sorted(set(only) - {n for n, _ in seqs})
        if missing:
            raise InputError(f"sequence(s) {', '.join(missing)} not under {root}; found: "
                             + ", ".join(n for n, _ in seqs))
        return [(n, p) for n, p in seqs if n in set(only)]
    if proto.sequences:
        pref = [(n, p) for n, p in seqs if n in set(proto.sequences)]
        if pref:
            return pref
    return seqs


def _metrics_of(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for header, section, key, _ in COLUMNS:
        v = result.get(section, {}).get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[header] = float(v)
    return out


def run_benchmark(root: str | Path, dataset: str, out_dir: str | Path,
                  settings: rp.ReplaySettings, predictor_factory: PredictorFactory | None = None,
                  sequences: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
                  overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one benchmark; returns the benchmark.json content.

    Args:
        predictor_factory: ``(sequence_name, source) -> WindowPredictor``; default builds the
            predictor from ``settings`` (a fresh one per sequence, so no per-frame cache
            survives from one sequence to the next).
        overrides: protocol fields to change (``start``, ``stride``, ``max_frames``).
    """
    from vggt4d_ros.tools import eval as ev
    ds = dataset.lower()
    if ds not in PROTOCOLS:
        raise InputError(f"unknown dataset '{dataset}' (one of: {', '.join(PROTOCOLS)})")
    proto = PROTOCOLS[ds]
    if overrides:
        proto = Protocol(**{**asdict(proto), **{k: v for k, v in overrides.items()
                                                 if v is not None}})
    root, out = Path(root), Path(out_dir)
    seqs = _pick_sequences(root, proto, sequences)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output {out} is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    factory = predictor_factory or _shared_model_factory(settings)
    rows: list[SequenceResult] = []
    for k, (name, path) in enumerate(seqs):
        log(f"[{k + 1}/{len(seqs)}] {proto.dataset}/{name}")
        rows.append(_run_sequence(name, path, proto, settings, factory, out / name, ev,
                                  progress))
    weights = rp.RANDOM_WEIGHTS_NOTE if rp.is_random_weights(settings.checkpoint) \
        else f"checkpoint {settings.checkpoint}"
    report = {"dataset": proto.dataset, "root": str(root), "protocol": asdict(proto),
              "settings": asdict(settings), "weights": weights,
              "sequences": [asdict(r) for r in rows], "mean": _mean_row(rows)}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmark.md").write_text(benchmark_markdown(report))
    return report


def _shared_model_factory(settings: rp.ReplaySettings) -> PredictorFactory:
    """Predictor per sequence that loads the model ONCE: later sequences get a fresh
    ``Vggt4dWindowPredictor`` (empty per-frame token cache, since frame keys restart with each
    engine) around the same pipeline; other predictor types are rebuilt from ``settings``."""
    first: list[Any] = []

    def make(name: str, src: FrameSource) -> Any:
        if not first:
            first.append(rp.make_predictor(settings))
            return first[0]
        p = first[0]
        if hasattr(p, "pipeline") and hasattr(p, "image_width"):
            return type(p)(p.pipeline, p.image_width, str(p.device),
                           getattr(p, "_cache_size", 64), getattr(p, "label", ""))
        return rp.make_predictor(settings)
    return make


def _run_sequence(name: str, path: Path, proto: Protocol, settings: rp.ReplaySettings,
                  factory: PredictorFactory, seq_out: Path, ev: Any,
                  progress: bool) -> SequenceResult:
    """Replay + eval of one sequence; failures become a status string, never an exception."""
    try:
        src = open_source(path, kind=proto.kind, stride=proto.stride,
                          max_frames=proto.max_frames, start=proto.start)
        res = rp.run_replay(src, seq_out / "replay", settings, predictor=factory(name, src),
                            progress=progress)
        gt = ground_truth_from_replay(res.out_dir)
        opt = ev.EvalOptions(alignment=proto.alignment, depth_alignment=proto.depth_alignment,
                             max_depth=proto.max_depth)
        result = ev.evaluate(res.out_dir, gt, seq_out / "eval", opt)
        link_pictures(seq_out / "eval" / "report.md", res.out_dir)
        if rp.is_random_weights(settings.checkpoint) or \
                res.summary.get("weights") == rp.RANDOM_WEIGHTS_NOTE:
            label_pictures(seq_out / "eval", rp.RANDOM_WEIGHTS_NOTE)
        return SequenceResult(name, res.summary["frames"]["processed"], "ok",
                              _metrics_of(result), str(res.out_dir), str(seq_out / "eval"))
    except (InputError, rp.ReplayError, ev.EvalError, ValueError, RuntimeError, OSError) as exc:
        return SequenceResult(name, 0, f"failed: {first_line(exc) or type(exc).__name__}", {})


def _mean_row(rows: Sequence[SequenceResult]) -> dict[str, float]:
    ok = [r for r in rows if r.status == "ok"]
    cols = {h for r in ok for h in r.metrics}
    return {h: float(np.mean([r.metrics[h] for r in ok if h in r.metrics])) for h in sorted(cols)}


def benchmark_markdown(report: dict[str, Any]) -> str:
    """The markdown table (rows: sequences, mean, paper)."""
    rows = report["sequences"]
    used = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in rows)]
    proto = report["protocol"]
    lines = [f"# VGGT4D benchmark: {report['dataset']}", "",
             f"- weights: **{report['weights']}**",
             f"- protocol: {proto['note']} (start {proto['start']}, stride {proto['stride']}, "
             f"max frames {proto['max_frames']}); trajectory alignment {proto['alignment']}, "
             f"depth alignment {proto['depth_alignment']}",
             f"- window {report['settings']['window']}, stride {report['settings']['stride']}, "
             f"resolution {report['settings']['resolution']}", ""]
    head = ["sequence", "frames"] + [c[0] for c in used] + ["status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["frames"])]
        cells += [c[3].format(r["metrics"][c[0]]) if c[0] in r["metrics"] else "–" for c in used]
        lines.append("| " + " | ".join(cells + [r["status"]]) + " |")
    mean = report["mean"]
    lines.append("| **mean** | | " + " | ".join(
        c[3].format(mean[c[0]]) if c[0] in mean else "–" for c in used) + " | |")
    paper = dict(proto.get("paper") or ())
    if paper:
        lines.append("| *paper (VGGT4D)* | | " + " | ".join(
            c[3].format(paper[c[0]]) if c[0] in paper else "" for c in used) + " | |")
    lines.append("")
    if report["weights"] == rp.RANDOM_WEIGHTS_NOTE:
        lines += [f"**{rp.RANDOM_WEIGHTS_NOTE}** — these numbers only show that the pipeline "
                  "runs.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vggt4d-benchmark",
        description="Replay and evaluate every sequence of a benchmark with the paper's protocol; "
                    "writes DIR/benchmark.md (one table) and DIR/benchmark.json.")
    p.add_argument("root", type=Path, help="dataset root (see the module docs for layouts)")
    p.add_argument("--dataset", required=True, choices=sorted(PROTOCOLS))
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequences", default=None, help="comma-separated subset of sequences")
    p.add_argument("--checkpoint", default=os.environ.get("VGGT4D_CHECKPOINT",
                                                          "facebook/VGGT-1B"))
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--resolution", type=int, default=518)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--frame-stride", type=int, default=None, help="override protocol stride")
    p.add_argument("--max-frames", type=int, default=None, help="override protocol frame cap")
    p.add_argument("--start", type=int, default=None, help="override protocol first frame")
    p.add_argument("--no-viz", action="store_true", help="no pictures (faster)")
    p.add_argument("--no-bag", action="store_true", help="no output bags (smaller)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vggt4d-benchmark`` (0 ok, 2 bad input, 1 failure)."""
    a = build_parser().parse_args(argv)
    try:
        if a.window < 2 or not 1 <= a.stride < a.window:
            raise InputError("need --window >= 2 and 1 <= --stride < --window")
        settings = rp.ReplaySettings(checkpoint=a.checkpoint, window=a.window, stride=a.stride,
                                     resolution=a.resolution, device=a.device, dtype=a.dtype,
                                     viz=not a.no_viz, bag=not a.no_bag)
        report = run_benchmark(
            a.root, a.dataset, a.out, settings,
            sequences=a.sequences.split(",") if a.sequences else None,
            overrides={"stride": a.frame_stride, "max_frames": a.max_frames, "start": a.start},
            overwrite=a.overwrite, progress=not a.quiet,
            log=(lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr)))
    except InputError as exc:
        print(f"vggt4d-benchmark: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        return report_failure("vggt4d-benchmark", exc)
    ok = sum(r["status"] == "ok" for r in report["sequences"])
    print(f"{ok}/{len(report['sequences'])} sequences ok; table: {Path(a.out) / 'benchmark.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
