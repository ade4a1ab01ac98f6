"""The main job on the embedded default: the shipped pixel reasoner against the baselines,
then a short curiosity-GRPO session from the warm start.

1. ``pxr eval`` of each policy on fresh seeds of the synthetic suite (zoom-read, count,
   chart, video): the curiosity-trained and the warm-started tiny models (greedy), the
   template reader with and without looking closer (what perception allows), random,
   and answer-only. Each gets a per-family table, ``trajectories.jsonl`` and a browsable
   ``index.html`` under ``outputs/demo/<policy>/``; a summary table compares them.
2. A few minutes of GRPO with the curiosity bonus from the warm start, with a progress
   bar; metrics under ``outputs/demo/grpo/`` (TensorBoard and ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from agents.cli import main as pxr

MODELS = {"tiny-curious": "checkpoints/tiny-curious", "tiny-warmstart": "checkpoints/tiny-warmstart"}
BASELINES = ("reader", "reader-no-ops", "random", "answer-only")
FAMILIES = ("zoom-read", "count", "chart", "video")


def evaluate(policy: str, path: str, args: argparse.Namespace) -> dict:
    """Run ``pxr eval`` for one policy; return its metrics.json rows."""
    out = args.out / policy
    argv = ["eval", "--policy", path, "--tasks", "synthetic", "--episodes", str(args.episodes),
            "--seed", str(args.seed), "--out", str(out), "--batch-size", str(args.batch_size)]
    if policy in MODELS:
        argv += ["--temperature", "0", "--max-new-tokens", "96", "--max-turns", "3"]
    print(f"\n== {policy} ==", flush=True)
    pxr(argv)
    return json.loads((out / "metrics.json").read_text())["rows"]


def summary(results: dict[str, dict]) -> str:
    """One row per policy: accuracy per family and overall, RaPR, crop hit rate."""
    head = ["policy", *FAMILIES, "all", "RaPR", "crop hit"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for policy, rows in results.items():
        cells = [f"{rows[f]['accuracy']:.2f}" if f in rows else "–" for f in (*FAMILIES, "all")]
        hit = rows["all"].get("crop_hit_rate")
        cells += [f"{rows['all']['rapr']:.2f}", "–" if hit is None else f"{hit:.2f}"]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=32, help="episodes per policy (default: 32)")
    parser.add_argument("--seed", type=int, default=20_261_125, help="fresh seeds, unseen in training")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grpo-steps", type=int, default=8, help="GRPO steps of the session")
    parser.add_argument("--grpo-minutes", type=float, default=2.0, help="wall-time cap of the GRPO session")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args()
    missing = [path for path in MODELS.values() if not (Path(path) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"missing shipped checkpoints {missing}: rebuild them with the commands in docs/results.md")
    started = time.time()
    results = {name: evaluate(name, path, args) for name, path in MODELS.items()}
    results.update({name: evaluate(name, name, args) for name in BASELINES})
    table = summary(results)
    print(f"\n== accuracy on {args.episodes} fresh synthetic questions (seed {args.seed}) ==\n{table}")
    (args.out / "summary.md").write_text(table + "\n")

    from agents.grpo import GRPOConfig, GRPOTrainer

    print(f"\n== {args.grpo_steps} steps of curiosity-GRPO from the warm start ==", flush=True)
    config = GRPOConfig(model=MODELS["tiny-warmstart"], out=str(args.out / "grpo"), steps=args.grpo_steps,
                        tasks={"zoom-read": {"questions": ["read", "read-choice"]}},
                        queries_per_step=4, group_size=8, lr=2e-4, max_new_tokens=96, max_turns=3, eval_every=0,
                        eval_queries=16, max_minutes=args.grpo_minutes, save_every=args.grpo_steps, resume=False)
    shutil.rmtree(args.out / "grpo", ignore_errors=True)
    final = GRPOTrainer(config).train()
    print(f"after GRPO: held-out accuracy {final['eval/accuracy']:.2f}, RaPR {final['eval/rapr']:.2f}")
    print(f"\nreports: {args.out}/<policy>/index.html; GRPO metrics: {args.out / 'grpo'}; "
          f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
