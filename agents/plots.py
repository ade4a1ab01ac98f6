"""Learning curves from ``metrics.jsonl`` files: several runs on one figure, seeds as bands.

Runs that share a label (e.g. three seeds of "with curiosity") are drawn as their mean with a
band of ± one standard deviation; a label with a single run is a plain line. One panel per key.

    python -m agents.plots runs/curious-s0 runs/curious-s1 runs/plain-s0 \\
        --labels curiosity curiosity plain --keys train/rapr eval/accuracy --out curves.png
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from agents.logger import read_metrics


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard-style smoothing: a debiased exponential moving average.

    ``s_t = weight * s_{t-1} + (1 - weight) * x_t`` from ``s_{-1} = 0``, divided by
    ``1 - weight^(t+1)`` so the start is not pulled toward 0. ``weight = 0`` returns the
    values unchanged.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.empty(len(values))
    running = 0.0
    for t, x in enumerate(values):
        running = weight * running + (1.0 - weight) * x
        out[t] = running / (1.0 - weight ** (t + 1))
    return out


def curve(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of `key` over the records that have a finite value for it."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
    steps = np.array([s for s, _ in points], dtype=float)
    values = np.array([v for _, v in points], dtype=float)
    return steps, values


def aggregate(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and population standard deviation of several runs' curves: ``(steps, mean, std)``.

    The steps are those any run logged within the range every run covers; each run is
    linearly interpolated onto them (exact when all runs log the same steps).
    """
    start = max(steps[0] for steps, _ in curves)
    stop = min(steps[-1] for steps, _ in curves)
    if start > stop:
        raise ValueError("runs averaged together (same label) must share a range of steps; theirs do not overlap")
    grid = np.unique(np.concatenate([steps for steps, _ in curves]))
    grid = grid[(grid >= start) & (grid <= stop)]
    stacked = np.stack([np.interp(grid, steps, values) for steps, values in curves])
    return grid, stacked.mean(axis=0), stacked.std(axis=0)


def run_label(run: str | os.PathLike[str]) -> str:
    """A run's default label: its directory name (the parent's, for a ``metrics.jsonl`` path)."""
    path = Path(run)
    return path.parent.name if path.is_file() else path.name


def plot_curves(
    runs: Sequence[str | os.PathLike[str]],
    keys: Sequence[str],
    out_png: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> Path:
    """Draw `keys` of `runs` (run directories or ``metrics.jsonl`` files) into `out_png`.

    Args:
        runs: the runs to draw.
        keys: metric keys, one panel each (e.g. ``train/rapr``, ``eval/accuracy``).
        out_png: the image to write (its folder is created).
        labels: one per run; runs sharing a label are averaged, with a ± std band. By
            default each run is labelled by its directory name.
        smooth: `ema` weight applied to each run before averaging (0: none).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    if not runs or not keys:
        raise ValueError("plot_curves needs at least one run and one key")
    if labels is None:
        labels = [run_label(run) for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs: give one label per run")
    records = [read_metrics(run) for run in runs]
    order = list(dict.fromkeys(labels))

    fig = Figure(figsize=(5.0 * len(keys), 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        drawn = False
        for index, label in enumerate(order):
            curves = []
            for run_records, label_of_run in zip(records, labels):
                steps, values = curve(run_records, key)
                if label_of_run == label and len(steps):
                    curves.append((steps, ema(values, smooth) if smooth else values))
            if not curves:
                continue
            color = f"C{index % 10}"
            if len(curves) > 1 and max(c[0][0] for c in curves) > min(c[0][-1] for c in curves):
                for k, (steps, values) in enumerate(curves):  # disjoint step ranges: no mean to take
                    ax.plot(steps, values, color=color, label=label if k == 0 else None, marker="o", markersize=3)
                drawn = True
                continue
            steps, mean, std = aggregate(curves)
            name = label if len(curves) == 1 else f"{label} (n={len(curves)})"
            marker = "o" if len(steps) <= 30 else None  # sparse points (evaluations) stay visible
            ax.plot(steps, mean, color=color, label=name, marker=marker, markersize=3)
            if len(curves) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            available = sorted({k for rs in records for r in rs for k in r} - {"step", "time"})
            raise ValueError(f"no run logged {key!r}; keys logged: {available}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m agents.plots RUN_DIR [RUN_DIR ...] --keys K [K ...] --out PNG``."""
    parser = argparse.ArgumentParser(prog="python -m agents.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--keys", nargs="+", required=True, help="metric keys, one panel each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one label per run; equal labels are averaged as seeds")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1)")
    args = parser.parse_args(argv)
    try:
        out = plot_curves(args.runs, args.keys, args.out, labels=args.labels, smooth=args.smooth)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
