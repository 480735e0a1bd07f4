"""``vggt4d-eval``: score a replay output folder against ground truth.

    vggt4d-eval PRED_DIR --gt GT [--out REPORT_DIR] [--align sim3] [--depth-align median]

PRED_DIR (written by ``vggt4d-replay``; every part optional, at least one needed):
    trajectory.txt        TUM ``timestamp tx ty tz qx qy qz qw`` (world_from_cam)
    masks/<name>.png      mono8 dynamic masks (non-zero / >127 = dynamic)
    depth/<name>.npz      key ``depth`` (or the only array), [H,W] float metres, or
    depth/<name>.png      uint16 millimetres (0 = invalid)
GT: anything ``vggt4d_ros.tools.datasets.open_source`` reads with ground truth (the
``vggt4d-synth`` folder, TUM, Bonn, Sintel, DAVIS, ...), or a TUM trajectory file.

Per-frame files are matched to GT frames through the replay's ``frames.txt`` (``index stamp_ns
window state source_name``: stem -> stamp -> GT frame with that stamp) when present, else by
name (``000000`` = GT frame ``000000``), else by a stem that is the frame stamp in
nanoseconds, else by order when the counts agree. Predicted
masks/depth at another resolution are resized to the GT size (nearest neighbour).

Writes REPORT_DIR (default PRED_DIR/eval): ``metrics.json``, ``report.md``,
``trajectory_topdown.png``, ``ate_per_frame.png``, ``masks_per_frame.png``,
``depth_per_frame.png`` (the ones that apply). Exit code 2 with a one-line error on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vggt4d_ros.tools.atomic import atomic_output_dir
from vggt4d_ros.tools import metrics as M


class EvalError(Exception):
    """Bad or missing input; the message is one line for the user."""


# --------------------------------------------------------------------------- inputs
@dataclass
class GroundTruth:
    """Ground truth per frame: names [S], stamps_ns [S], poses (world_from_cam or None),
    masks ([H,W] bool or None), depths ([H,W] float32 metres or None)."""

    source: str
    names: list[str] = field(default_factory=list)
    stamps_ns: list[int] = field(default_factory=list)
    poses: list[np.ndarray | None] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    depths: list[np.ndarray | None] = field(default_factory=list)

    def trajectory(self) -> M.Trajectory | None:
        idx = [i for i, p in enumerate(self.poses) if p is not None]
        if not idx:
            return None
        return M.Trajectory(np.array([self.stamps_ns[i] for i in idx]),
                            np.stack([self.poses[i] for i in idx]))


def load_ground_truth(path: Path, kind: str = "auto", **extra: Any) -> GroundTruth:
    """Ground truth of a dataset sequence / synth folder, or of a TUM trajectory file."""
    if not path.exists():
        raise EvalError(f"ground truth not found: {path}")
    if path.is_file() and path.suffix == ".txt":
        try:
            traj = M.read_tum(path)
        except ValueError as exc:
            raise EvalError(f"cannot read TUM trajectory {path}: {exc}") from exc
        return GroundTruth(str(path), [str(s) for s in traj.stamps_ns], list(traj.stamps_ns),
                           list(traj.poses), [None] * len(traj), [None] * len(traj))
    from vggt4d_ros.tools.datasets import InputError, open_source
    try:
        src = open_source(path, kind=kind, **extra)
        gt = GroundTruth(f"{path} ({src.kind})")
        for f in src:
            gt.names.append(f.name)
            gt.stamps_ns.append(int(f.stamp_ns))
            gt.poses.append(f.world_from_cam)
            gt.masks.append(None if f.mask is None else np.asarray(f.mask, bool))
            gt.depths.append(None if f.depth is None else np.asarray(f.depth, np.float32))
    except InputError as exc:
        raise EvalError(str(exc)) from exc
    if not gt.names:
        raise EvalError(f"ground truth {path} has no frames")
    return gt


def _read_mask_png(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        m = np.asarray(Image.open(path))
    except OSError as exc:
        raise EvalError(f"cannot read mask {path}: {exc}") from exc
    if m.ndim == 3:
        m = m[..., 0]
    return m > (127 if m.max(initial=0) > 1 else 0)


def _read_depth(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                key = "depth" if "depth" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise EvalError(f"{path}: no 'depth' array (has {z.files})")
                d = np.asarray(z[key], np.float32)
        else:
            from PIL import Image
            raw = np.asarray(Image.open(path))
            if raw.dtype != np.uint16:
                raise EvalError(f"{path}: depth PNG must be 16-bit millimetres, got {raw.dtype}")
            d = raw.astype(np.float32) / 1000.0
            d[raw == 0] = np.nan
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read depth {path}: {exc}") from exc
    d = np.squeeze(d)
    if d.ndim != 2:
        raise EvalError(f"{path}: depth must be [H,W], got {d.shape}")
    return d


def _files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts}


def read_frames_index(pred_dir: Path) -> dict[str, tuple[int, str]]:
    """``frames.txt`` of a replay folder (``index stamp_ns window state source_name``) as
    stem (``000000``) -> (stamp_ns, source_name); empty when absent."""
    path = pred_dir / "frames.txt"
    if not path.is_file():
        return {}
    out: dict[str, tuple[int, str]] = {}
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        try:
            out[f"{int(parts[0]):06d}"] = (int(parts[1]), parts[4] if len(parts) > 4 else "")
        except (ValueError, IndexError) as exc:
            raise EvalError(f"{path}:{ln}: expected 'index stamp_ns window state "
                            "source_name'") from exc
    return out


def match_frames(stems: Sequence[str], gt: GroundTruth, max_dt_ns: int,
                 frames_index: dict[str, tuple[int, str]] | None = None,
                 ) -> tuple[list[tuple[str, int]], str]:
    """Pair predicted per-frame files with GT frame indices; returns (pairs, method).

    Order of preference: the replay's ``frames.txt`` (stem -> stamp, matched to the GT stamp
    within ``max_dt_ns``), the GT frame name, a stem that is a stamp in ns, the file order
    when the counts agree.
    """
    stems = sorted(stems)
    gs = np.array(gt.stamps_ns, dtype=np.int64)

    def by_stamp(stamp: int) -> int | None:
        j = int(np.argmin(np.abs(gs - stamp)))
        return j if abs(int(gs[j]) - stamp) <= max_dt_ns else None

    if frames_index and any(s in frames_index for s in stems):
        pairs = [(s, j) for s in stems if s in frames_index
                 for j in [by_stamp(frames_index[s][0])] if j is not None]
        if pairs:
            return pairs, "frames.txt stamp"
    by_name = {n: i for i, n in enumerate(gt.names)}
    pairs = [(s, by_name[s]) for s in stems if s in by_name]
    if pairs:
        return pairs, "name"
    if stems and all(s.isdigit() for s in stems):
        pairs = [(s, j) for s in stems for j in [by_stamp(int(s))] if j is not None]
        if pairs:
            return pairs, "stamp"
    if len(stems) == len(gt.names):
        return list(zip(stems, range(len(stems)))), "order"
    return [], "none"


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape == shape:
        return a
    import cv2
    out = cv2.resize(a.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(a.dtype)


# --------------------------------------------------------------------------- plots
def _plot_trajectory(ts: M.TrajectoryScores, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = ts.gt_poses[:, :3, 3]
    p = ts.aligned_poses[:, :3, 3]
    # top-down: the two axes along which the ground truth moves most
    ax_idx = np.sort(np.argsort(np.ptp(g, axis=0))[::-1][:2])
    names = "xyz"
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(g[:, ax_idx[0]], g[:, ax_idx[1]], "k-", label="ground truth")
    ax.plot(p[:, ax_idx[0]], p[:, ax_idx[1]], "-", color="tab:red",
            label=f"prediction ({ts.alignment}-aligned)")
    ax.plot(g[0, ax_idx[0]], g[0, ax_idx[1]], "ko", ms=4)
    ax.set_xlabel(f"{names[ax_idx[0]]} [m]")
    ax.set_ylabel(f"{names[ax_idx[1]]} [m]")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"Trajectory (ATE RMSE {ts.ate_rmse:.4f} m)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_series(path: Path, title: str, ylabel: str, series: dict[str, np.ndarray]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, y in series.items():
        ax.plot(np.arange(len(y)), y, ".-", label=label)
    ax.set_xlabel("frame")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvalOptions:
    alignment: str = "sim3"
    rpe_delta: int = 1
    depth_alignment: str = "median"
    depth_per_frame: bool = False
    max_depth: float | None = None
    bound_th: float = 0.008
    max_dt_ns: int = 20_000_000
    plots: bool = True


def _matched(files: dict, gt: GroundTruth, gt_items: list, read: Callable[[Path], np.ndarray],
             opt: "EvalOptions", frames_index, what: str) -> tuple[list, list, str]:
    """Predictions paired with the ground-truth frames that have an item (mask / depth map).

    ``files`` stem -> predicted file; ``gt_items`` per ground-truth frame (None = absent).
    Returns (predictions resized to their ground truth, ground truths, how frames were
    matched); EvalError naming ``what`` when no prediction matches.
    """
    pairs, how = match_frames(list(files), gt, opt.max_dt_ns, frames_index)
    pairs = [(s, j) for s, j in pairs if gt_items[j] is not None]
    if not pairs:
        raise EvalError(f"no predicted {what} matches a ground-truth frame")
    preds = [_resize_nearest(read(files[s]), gt_items[j].shape) for s, j in pairs]
    return preds, [gt_items[j] for _, j in pairs], how


def evaluate(pred_dir: Path, gt: GroundTruth, out_dir: Path, opt: EvalOptions) -> dict:
    """Compute every metric that the prediction and ground truth allow, write the report
    folder (atomically) and return the metrics dictionary."""
    if not pred_dir.is_dir():
        raise EvalError(f"prediction folder not found: {pred_dir}")
    result: dict[str, Any] = {"pred_dir": str(pred_dir), "ground_truth": gt.source,
                              "options": {k: v for k, v in opt.__dict__.items()}}
    summary_path = pred_dir / "summary.json"
    if summary_path.is_file():
        try:
            summ = json.loads(summary_path.read_text())
            keep = ("weight", "label", "model", "checkpoint")   # what produced the prediction
            result["prediction_summary"] = {k: summ[k] for k in summ
                                            if any(w in k.lower() for w in keep)}
        except (json.JSONDecodeError, TypeError):
            pass
    with atomic_output_dir(out_dir) as tmp:
        _evaluate_into(pred_dir, gt, tmp, opt, result)
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
        (tmp / "report.md").write_text(_report_markdown(result))
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _evaluate_into(pred_dir: Path, gt: GroundTruth, tmp: Path, opt: EvalOptions,
                   result: dict) -> None:
    traj_path = pred_dir / "trajectory.txt"
    frames_index = read_frames_index(pred_dir)
    mask_files = _files(pred_dir / "masks", (".png",))
    depth_files = _files(pred_dir / "depth", (".npz", ".png"))
    if not traj_path.is_file() and not mask_files and not depth_files:
        raise EvalError(f"{pred_dir} has no trajectory.txt, masks/*.png or depth/*.npz|png "
                        "to evaluate")
    evaluated = []

    gt_traj = gt.trajectory()
    if traj_path.is_file() and gt_traj is not None:
        try:
            pred = M.read_tum(traj_path)
            ts = M.trajectory_scores(pred, gt_traj, opt.alignment, opt.rpe_delta, opt.max_dt_ns)
        except ValueError as exc:
            raise EvalError(f"trajectory: {exc}") from exc
        result["trajectory"] = ts.summary()
        result["trajectory"]["ate_per_frame"] = ts.ate_per_frame.tolist()
        evaluated.append("trajectory")
        if opt.plots:
            _plot_trajectory(ts, tmp / "trajectory_topdown.png")
            _plot_series(tmp / "ate_per_frame.png", "Absolute trajectory error per frame",
                         "ATE [m]", {"ATE": ts.ate_per_frame})

    gt_has_masks = any(m is not None for m in gt.masks)
    if mask_files and gt_has_masks:
        preds, gts, how = _matched(mask_files, gt, gt.masks, _read_mask_png, opt, frames_index,
                                   f"mask in {pred_dir / 'masks'}")
        ms = M.mask_scores(preds, gts, opt.bound_th)
        result["masks"] = {**ms.summary(), "matched_by": how, "J_per_frame": ms.j.tolist(),
                           "F_per_frame": ms.f.tolist()}
        evaluated.append("masks")
        if opt.plots:
            _plot_series(tmp / "masks_per_frame.png", "Dynamic mask accuracy per frame", "score",
                         {"J (IoU)": ms.j, "F (boundary)": ms.f})

    gt_has_depth = any(d is not None for d in gt.depths)
    if depth_files and gt_has_depth:
        preds, gts, how = _matched(depth_files, gt, gt.depths, _read_depth, opt, frames_index,
                                   f"depth in {pred_dir / 'depth'}")
        try:
            ds = M.depth_scores(preds, gts, opt.depth_alignment, opt.depth_per_frame,
                                max_depth=opt.max_depth)
        except ValueError as exc:
            raise EvalError(f"depth: {exc}") from exc
        result["depth"] = {**ds.summary(), "matched_by": how, "frames": len(preds),
                           "abs_rel_per_frame": ds.abs_rel_per_frame.tolist()}
        evaluated.append("depth")
        if opt.plots:
            _plot_series(tmp / "depth_per_frame.png", "Depth AbsRel per frame", "AbsRel",
                         {"AbsRel": ds.abs_rel_per_frame})
    if not evaluated:
        raise EvalError("nothing to evaluate: the ground truth has none of the predicted "
                        "quantities (trajectory, masks, depth)")
    result["evaluated"] = evaluated


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _report_markdown(r: dict) -> str:
    lines = ["# vggt4d_ros evaluation", "", f"- prediction: `{r['pred_dir']}`",
             f"- ground truth: `{r['ground_truth']}`"]
    for k, v in r.get("prediction_summary", {}).items():
        lines.append(f"- {k}: {v}")
    if "trajectory" in r:
        t = r["trajectory"]
        lines += ["", "## Trajectory", "",
                  f"{t['matched']} matched poses, {t['alignment']} alignment "
                  f"(scale {t['scale']:.4f}), RPE over {t['rpe_delta']} frame(s)."
                  + (f" Note: {t['note']}." if t.get("note") else "")
                  + (f" {t['dropped_nonfinite']} non-finite predicted poses left out."
                     if t.get("dropped_nonfinite") else ""), "",
                  "| metric | value |", "|---|---|",
                  f"| ATE RMSE [m] | {_fmt(t['ate_rmse'])} |",
                  f"| ATE mean / median / max [m] | {_fmt(t['ate_mean'])} / "
                  f"{_fmt(t['ate_median'])} / {_fmt(t['ate_max'])} |",
                  f"| RPE trans RMSE [m] | {_fmt(t['rpe_trans_rmse'])} |",
                  f"| RPE rot RMSE [deg] | {_fmt(t['rpe_rot_rmse_deg'])} |", "",
                  "![trajectory](trajectory_topdown.png)", "", "![ATE](ate_per_frame.png)"]
    if "masks" in r:
        m = r["masks"]
        lines += ["", "## Dynamic masks (DAVIS J & F)", "",
                  f"{m['frames']} frames (matched by {m['matched_by']}).", "",
                  "| | mean | recall | decay |", "|---|---|---|---|",
                  *[f"| {label} | {_fmt(m[k + '_mean'])} | {_fmt(m[k + '_recall'])} | "
                    f"{_fmt(m[k + '_decay'])} |" for label, k in (("J (IoU)", "J"),
                                                                  ("F (boundary)", "F"))],
                  f"| J&F | {_fmt(m['JF_mean'])} | | |", "",
                  "![masks](masks_per_frame.png)"]
    if "depth" in r:
        d = r["depth"]
        lines += ["", "## Depth", "",
                  f"{d['frames']} frames (matched by {d['matched_by']}), {d['alignment']} scale "
                  f"alignment, {d['valid_pixels']} valid pixels.", "",
                  "| metric | value |", "|---|---|",
                  f"| AbsRel | {_fmt(d['abs_rel'])} |", f"| δ < 1.25 | {_fmt(d['delta1'])} |", "",
                  "![depth](depth_per_frame.png)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vggt4d-eval",
        description="Score a vggt4d-replay output folder against ground truth "
                    "(ATE/RPE, mask J&F, depth AbsRel/δ1) and write a report.")
    p.add_argument("pred_dir", type=Path, help="replay output folder")
    p.add_argument("--gt", required=True, type=Path,
                   help="ground truth: synth folder, dataset sequence, or TUM trajectory file")
    p.add_argument("--gt-kind", default="auto", help="dataset kind of --gt (default: detect)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default PRED_DIR/eval)")
    p.add_argument("--align", choices=M.ALIGNMENTS, default="sim3", help="trajectory alignment")
    p.add_argument("--rpe-delta", type=int, default=1, help="RPE step, frames")
    p.add_argument("--depth-align", choices=M.DEPTH_ALIGNMENTS, default="median")
    p.add_argument("--depth-per-frame", action="store_true", help="fit the depth scale per frame")
    p.add_argument("--max-depth", type=float, default=None,
                   help="ignore GT depth beyond this, metres")
    p.add_argument("--bound-th", type=float, default=0.008,
                   help="F boundary tolerance: fraction of the image diagonal (>=1: pixels)")
    p.add_argument("--max-dt-ms", type=float, default=20.0, help="stamp matching tolerance, ms")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``vggt4d-eval``): 0 on success, 2 on bad input."""
    parser = _parser()
    a = parser.parse_args(argv)
    if a.rpe_delta < 1:
        parser.error(f"--rpe-delta must be >= 1, got {a.rpe_delta}")
    if not a.bound_th > 0:
        parser.error(f"--bound-th must be positive, got {a.bound_th}")
    opt = EvalOptions(alignment=a.align, rpe_delta=a.rpe_delta, depth_alignment=a.depth_align,
                      depth_per_frame=a.depth_per_frame, max_depth=a.max_depth,
                      bound_th=a.bound_th, max_dt_ns=int(a.max_dt_ms * 1e6), plots=not a.no_plots)
    out = a.out or (a.pred_dir / "eval")
    try:
        if not a.pred_dir.is_dir():
            raise EvalError(f"prediction folder not found: {a.pred_dir}")
        gt = load_ground_truth(a.gt, a.gt_kind)
        res = evaluate(a.pred_dir, gt, out, opt)
    except EvalError as exc:
        parser.error(str(exc))
    parts = []
    if "trajectory" in res:
        parts.append(f"ATE {res['trajectory']['ate_rmse']:.4f} m")
    if "masks" in res:
        parts.append(f"J {res['masks']['J_mean']:.3f} F {res['masks']['F_mean']:.3f}")
    if "depth" in res:
        parts.append(f"AbsRel {res['depth']['abs_rel']:.4f}")
    print(f"{', '.join(parts)}; report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
