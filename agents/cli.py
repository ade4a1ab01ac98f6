"""The ``pxr`` command line.

``pxr eval`` plays episodes of a task suite with a policy and reports per-family metrics::

    pxr eval --policy oracle --tasks synthetic --episodes 40 --seed 0 --out runs/eval-oracle
    pxr eval --policy runs/sft/checkpoint --tasks '{"vstar": "/data/vstar_bench"}' --episodes 191 \\
        --batch-size 16 --temperature 0 --out runs/eval-vstar

`--policy` is a baseline (``oracle``: looks at the evidence, then gives the gold answer;
``oracle-no-ops``: gives the gold answer at once; ``reader``: looks at the evidence, then
answers what the synthetic suite's template reader reads there; ``reader-no-ops``: answers
what the reader reads in the initial view, the "no zoom" bound; ``random``;
``answer-only``: the first option or 0 at once) or a model folder / hub id, played by `agents.vlm.hf.TransformersPolicy`
or, with ``--backend vllm``, by `agents.vlm.vllm_backend.VLLMPolicy`.
`--tasks` is a task-source name (``synthetic``, ``zoom-read``, ...) or a JSON spec as
``gymnasium.make("PixelQA-v0", tasks=...)`` takes it. The same ``--seed`` gives the same
sample ids, trajectories and table. The output folder gets ``trajectories.jsonl``,
``metrics.json``, the images and ``index.html`` (see `agents.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym

import pxr_env  # registers PixelQA-v0
from agents.baselines import AnswerOnlyPolicy, OraclePolicy, RandomPolicy, ReaderPolicy
from agents.metrics import format_table, summarize_by
from agents.report import write_report
from agents.rollout import collect
from agents.vlm.env_settings import load_env_settings

BASELINES = ("oracle", "oracle-no-ops", "reader", "reader-no-ops", "random", "answer-only")


def parse_tasks(text: str) -> Any:
    """`--tasks` as the env's ``tasks=`` argument: JSON when it looks like JSON, else a name."""
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--tasks looks like JSON but does not parse: {exc}") from None
    return stripped


def build_policy(args: argparse.Namespace, envs: Sequence[gym.Env]) -> Any:
    """The policy `--policy` names (a baseline, or a model loaded with the transformers backend)."""
    if args.policy == "oracle":
        return OraclePolicy(envs[0].unwrapped.task_source)
    if args.policy == "oracle-no-ops":
        return OraclePolicy(envs[0].unwrapped.task_source, use_operations=False)
    if args.policy in ("reader", "reader-no-ops"):
        return ReaderPolicy(envs[0].unwrapped.task_source, use_operations=args.policy == "reader")
    if args.policy == "random":
        return RandomPolicy(seed=args.seed)
    if args.policy == "answer-only":
        return AnswerOnlyPolicy()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.backend == "vllm":
        from agents.vlm.vllm_backend import VLLMPolicy

        try:
            return VLLMPolicy.from_pretrained(args.policy, dtype=args.dtype, **sampling)
        except ImportError as exc:
            raise SystemExit(str(exc)) from None
    from agents.vlm.hf import TransformersPolicy

    return TransformersPolicy.from_pretrained(args.policy, device=args.device, dtype=args.dtype, **sampling)


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="play episodes with a policy and report metrics",
                       description="Play episodes with a policy, print per-family metrics, write trajectories.")
    p.add_argument("--policy", required=True, help=f"{' | '.join(BASELINES)} | a model folder or hub id")
    p.add_argument("--tasks", default="synthetic", help="task source name or JSON spec (default: synthetic)")
    p.add_argument("--episodes", type=int, default=20, help="samples to draw (default: 20)")
    p.add_argument("--group-size", type=int, default=1, help="episodes per sample (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="episodes played at once (default: 8)")
    p.add_argument("--pixel-bounds", choices=("tiny", "train", "eval"),
                   help="image size preset of the env (default: the model's saved env settings, else tiny)")
    p.add_argument("--max-turns", type=int, default=pxr_env.MAX_TURNS,
                   help=f"turns before an episode is cut without an answer (default: {pxr_env.MAX_TURNS})")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per model turn")
    p.add_argument("--backend", default="transformers", choices=("transformers", "vllm"),
                   help="how a model policy generates (default: transformers; vllm needs a GPU)")
    p.add_argument("--device", default="cpu", help="device of the transformers backend")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """Play, print the table, write the report; returns the exit status."""
    if min(args.episodes, args.batch_size, args.group_size, args.max_turns) < 1:
        raise SystemExit("--episodes, --batch-size, --group-size and --max-turns must be >= 1")
    tasks = parse_tasks(args.tasks)
    settings = load_env_settings(args.policy) if args.policy not in BASELINES else {}
    if args.pixel_bounds:
        settings["pixel_bounds"] = args.pixel_bounds
    try:
        envs = [gym.make("PixelQA-v0", tasks=tasks, render_mode="rgb_array", max_episode_steps=args.max_turns,
                         **settings) for _ in range(args.batch_size)]
    except (ValueError, OSError) as exc:
        raise SystemExit(f"cannot build the tasks {args.tasks!r}: {exc}") from None
    policy = build_policy(args, envs)
    trajectories = collect(policy, envs, num_samples=args.episodes, group_size=args.group_size, seed=args.seed,
                           render=True, progress=not args.no_progress)
    for env in envs:
        env.close()
    rows = summarize_by(t.info for t in trajectories)
    print(format_table(rows))
    config = {key: str(value) for key, value in sorted(vars(args).items()) if key != "no_progress"}
    page = write_report(args.out, trajectories, rows, title=f"pxr eval: {args.policy} on {args.tasks}", config=config)
    print(f"trajectories: {args.out / 'trajectories.jsonl'}\nbrowse: {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pxr`` command."""
    parser = argparse.ArgumentParser(prog="pxr", description="Pixel-space reasoning environments and agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
