"""The curiosity ablation of Pixel Reasoner, at CPU scale, in one file.

From one warm-started tiny policy, run GRPO with and without the curiosity bonus (both
reward variants: the paper's formula and the released code's) over several seeds, on a
task mix where a share of the items is answerable without looking closer. Then write a
results table (mean ± std over seeds) and RaPR / accuracy curves.

The claims checked (REFERENCE sec 5): after the warm start the policy answers better
without operations than with them; without curiosity RaPR decays toward zero (the
learning trap); with curiosity RaPR stays at or above H and held-out accuracy ends
higher than both the warm start and the run without curiosity.

    python examples/curiosity_ablation.py --out runs/ablation            # the whole study
    python examples/curiosity_ablation.py --seeds 0 --arms none paper    # a part of it

Each arm of each seed is one `agents.grpo.GRPOTrainer` run in its own process
(`--jobs` at a time, one thread each); finished arms are skipped when the study is
re-run, and an interrupted arm resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ARMS: dict[str, dict[str, Any]] = {
    "none": {"curiosity": False},
    "paper": {"curiosity": True, "variant": "paper"},
    "code": {"curiosity": True, "variant": "code"},
}
"""The arms: GRPO without the curiosity bonus, with the paper's formula, with the released code's."""

CURVE_KEYS = ("train/rapr", "eval/rapr", "eval/accuracy", "train/needs_ops_rapr", "train/shortcut_rapr",
              "train/crop_hit_rate", "train/crop_area")


@dataclass
class Args:
    """Settings of the study; every GRPO field not listed keeps `agents.grpo.GRPOConfig`'s default."""

    warm_start: str = "checkpoints/tiny-ablation-start"
    """The warm-started policy every arm starts from."""
    out: str = "runs/ablation"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    tasks: Any = field(default_factory=lambda: {"zoom-read": {
        "questions": ["read", "read-choice"], "shortcut_share": 0.75, "hard_share": 0.0, "distractors": [0, 4],
        "backgrounds": ["plain"]}})
    """The task mix: three quarters of the items answerable from the overview (where a crop
    cannot hold the big tag), the rest uncluttered tags that need a crop (where the warm start
    points well): the two answering paths each win on their own items."""
    steps: int = 200
    max_minutes: float = 13.0
    """Wall-time budget per arm (each arm then evaluates and saves: about 14 minutes in all)."""
    queries_per_step: int = 4
    """Queries per GRPO step (x `group_size` rollouts): small steps, so that an arm makes about 50 of them."""
    group_size: int = 8
    lr: float = 2e-4
    alpha: float = 0.5
    """α, the weight of the curiosity bonus in the `paper` arm (the paper: 0.5); the `code` arm's
    formula, the released code's, has fixed constants and no α (REFERENCE sec 3)."""
    max_new_tokens: int = 96
    max_turns: int = 3
    eval_every: int = 10
    eval_queries: int = 64
    jobs: int = 2
    """Arms run at once (one CPU thread each)."""


def run_arm(args: Args, arm: str, seed: int) -> dict[str, float]:
    """One GRPO run; returns its final held-out metrics (cached in ``final_eval.json``)."""
    from agents.grpo import GRPOConfig, GRPOTrainer

    out = Path(args.out) / f"{arm}-s{seed}"
    done = out / "final_eval.json"
    if done.exists():
        return json.loads(done.read_text())
    config = GRPOConfig(
        model=args.warm_start, out=str(out), tasks=args.tasks, steps=args.steps, max_minutes=args.max_minutes,
        queries_per_step=args.queries_per_step, group_size=args.group_size, lr=args.lr, alpha=args.alpha,
        max_new_tokens=args.max_new_tokens, max_turns=args.max_turns, eval_every=args.eval_every,
        eval_queries=args.eval_queries, seed=seed, threads=1, resume=(out / "checkpoints").exists(),
        progress=False, **ARMS[arm])
    started = time.time()
    metrics = GRPOTrainer(config).train()
    print(f"[{arm} seed {seed}] {time.time() - started:.0f} s: accuracy {metrics['eval/accuracy']:.3f}, "
          f"RaPR {metrics['eval/rapr']:.3f}", flush=True)
    return metrics


def _run_arm_job(job: tuple[Args, str, int]) -> tuple[str, int, dict[str, float]]:
    args, arm, seed = job
    return arm, seed, run_arm(args, arm, seed)


def warm_start_metrics(args: Args) -> dict[str, float]:
    """The warm start's own held-out metrics: the first evaluation of any arm (step 0)."""
    from agents.logger import read_metrics

    rows = read_metrics(Path(args.out) / f"{args.arms[0]}-s{args.seeds[0]}")
    first = next(r for r in rows if "eval/accuracy" in r)
    return {k: v for k, v in first.items() if k.startswith("eval/")}


def first_train_row(args: Args) -> dict[str, float]:
    """The first training step's rollout statistics (sampled from the warm start), averaged over runs."""
    from agents.logger import read_metrics

    rows = []
    for arm in args.arms:
        for seed in args.seeds:
            records = [r for r in read_metrics(Path(args.out) / f"{arm}-s{seed}") if "train/rapr" in r]
            if records:
                rows.append(records[0])
    keys = {k for r in rows for k in r if k.startswith("train/")}
    return {k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) for k in keys}


def table(args: Args, results: dict[tuple[str, int], dict[str, float]]) -> str:
    """Markdown table: mean ± std over seeds of the final held-out metrics, per arm."""
    columns = ("eval/accuracy", "eval/rapr", "eval/needs_ops_accuracy", "eval/shortcut_accuracy", "eval/crop_hit_rate",
               "eval/op_error_rate")
    head = "| arm | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    start = warm_start_metrics(args)
    lines.append("| warm start | " + " | ".join(
        f"{start[c]:.3f}" if start.get(c) is not None else "–" for c in columns) + " |")
    for arm in args.arms:
        cells = []
        for c in columns:
            values = [results[(arm, s)].get(c) for s in args.seeds if results[(arm, s)].get(c) is not None]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Args()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, list):
            parser.add_argument(flag, nargs="+", type=type(value[0]), default=value)
        elif isinstance(value, dict):
            parser.add_argument(flag, type=json.loads, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = Args(**vars(parser.parse_args()))
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {sorted(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2))

    jobs = [(args, arm, seed) for seed in args.seeds for arm in args.arms]
    results: dict[tuple[str, int], dict[str, float]] = {}
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for arm, seed, metrics in pool.imap_unordered(_run_arm_job, jobs):
            results[(arm, seed)] = metrics

    from agents.logger import read_metrics
    from agents.plots import plot_curves

    runs = [out / f"{arm}-s{seed}" for arm in args.arms for seed in args.seeds]
    labels = [arm for arm in args.arms for _ in args.seeds]
    logged = {k for run in runs for r in read_metrics(run) for k in r}
    plot_curves(runs, [k for k in CURVE_KEYS if k in logged], out / "curves.png", labels=labels, smooth=0.6)
    start = first_train_row(args)
    report = [
        "## Final held-out metrics (mean ± std over seeds)", "", table(args, results), "",
        "## The warm start's sampled rollouts (first GRPO step, all runs)", "",
        f"accuracy with operations {start.get('train/accuracy_with_ops', float('nan')):.3f}, "
        f"without {start.get('train/accuracy_without_ops', float('nan')):.3f}; "
        f"RaPR {start.get('train/rapr', float('nan')):.3f}", "",
    ]
    (out / "results.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"curves: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
