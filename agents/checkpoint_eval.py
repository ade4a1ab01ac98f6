"""Evaluate a training run's checkpoints on held-out items: how the policy changed, step by step.

A GRPO or PPO run saves a checkpoint every ``save_every`` steps (``RUN/checkpoints/step-N/model``:
the weights and config, no processor), and evaluates itself on a few queries as it goes. This
command evaluates the starting model (step 0) and each checkpoint closed loop and greedy on the
same held-out items, with the keys of ``agents.sft --evaluate`` (accuracy, crop hit and IoU,
reading given the oracle's crop, a tiny model's box mass on the evidence); the processor, chat
format and env settings are the starting model's (the run's ``config.json`` names it). With
``--text-stats`` it also reads the free text (`agents.box_mass.text_position_stats`: box
probability and the oracle text's NLL at text positions), where RL's drift shows first.

One record per step is appended to ``RUN/checkpoint_evals.jsonl`` (keys ``heldout/<metric>``);
steps already there are skipped, so a later call picks up the checkpoints saved since, and a
run still training can be followed. `agents.plots` draws the file:

    python -m agents.checkpoint_eval runs/grpo --tasks '{"zoom-read": {}}' --samples 200 --text-stats
    python -m agents.plots runs/grpo/checkpoint_evals.jsonl --keys heldout/accuracy heldout/crop_hit --out c.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from agents.checkpoint import list_checkpoints
from agents.logger import read_metrics

EVALS_FILE = "checkpoint_evals.jsonl"
PREFIX = "heldout/"


def run_start_model(run: str | Path) -> str:
    """The model a run started from: ``model`` of its ``config.json``."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {run}: is it a GRPO or PPO run directory?")
    start = json.loads(path.read_text()).get("model")
    if not start:
        raise ValueError(f"{path} names no starting model ('model')")
    return start


def run_models(run: str | Path) -> dict[int, str]:
    """Step -> model folder: 0 for the starting model, N for ``checkpoints/step-N/model``."""
    models = {0: run_start_model(run)}
    for checkpoint in list_checkpoints(Path(run) / "checkpoints"):
        if not (checkpoint / "model").is_dir():
            raise FileNotFoundError(f"{checkpoint} holds no model/ folder (a save_pretrained model) to evaluate")
        models[int(checkpoint.name.split("-")[1])] = str(checkpoint / "model")
    return models


def evaluate_run(run: str | Path, tasks: Mapping[str, Any], samples: int, text_stats: bool = False,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the steps of `run` not yet in its ``checkpoint_evals.jsonl``, appending a record
    each; returns all records by step. The tasks and sample count must be those of the records
    already there (else the curve would mix item sets). Every model is played with the starting
    model's processor, chat format and env settings; the items, the answer-only bound and the
    oracle traces of `text_stats` are the same for all of them and made once."""
    from transformers import AutoProcessor

    from agents.box_mass import text_position_stats
    from agents.sft import (SFTConfig, answer_only_bound, box_vocab, eval_sample_ids, evaluate, task_source,
                            trace_options)
    from agents.traces import play_traces
    from agents.vlm.chat import load_chat_format
    from agents.vlm.env_settings import load_env_settings
    from agents.vlm.hf import load_model

    path = Path(run) / EVALS_FILE
    done = read_metrics(path) if path.is_file() else []
    for record in done:
        if record.get("tasks") != dict(tasks) or record.get("samples") != samples:
            raise ValueError(f"{path} holds evaluations on other items (tasks {record.get('tasks')}, samples "
                             f"{record.get('samples')}): give the same --tasks and --samples, or another run")
    seen = {r["step"] for r in done}
    todo = {step: weights for step, weights in run_models(run).items() if step not in seen}
    if not todo:
        return sorted(done, key=lambda r: r["step"])
    start = run_start_model(run)
    processor = AutoProcessor.from_pretrained(start)
    chat_format, env_kwargs = load_chat_format(start), load_env_settings(start)
    ids = eval_sample_ids(tasks, samples, SFTConfig.eval_seed, set())
    bound = answer_only_bound(tasks, ids)
    traces = None  # oracle traces for text_stats, written with the box tokens of the first model loaded
    for step, weights in tqdm(sorted(todo.items()), desc="checkpoints", disable=not progress):
        model = load_model(weights)
        metrics = evaluate(model, processor, chat_format, tasks, ids, env_kwargs=env_kwargs) | bound
        vocab = box_vocab(model.config)
        if text_stats and vocab is not None:
            if traces is None:
                traces = [t for t in play_traces(task_source(tasks), ids,
                                                 options=trace_options(vocab, chat_format, env_kwargs))
                          if t.kind == "image/single"]
            if traces:
                metrics |= text_position_stats(model, processor, traces)
        record = {"step": step, "model": weights, "tasks": dict(tasks), "samples": samples,
                  **{PREFIX + k: v for k, v in metrics.items()}}
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        done.append(record)
    return sorted(done, key=lambda r: r["step"])


TABLE_KEYS = ("accuracy", "crop_hit", "crop_iou", "acc_when_hit", "acc_oracle_ops", "box_hit_mass", "text_box_mass",
              "text_nll")


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The records as a markdown table, one row per step, the `TABLE_KEYS` any record has."""
    keys = [k for k in TABLE_KEYS if any(PREFIX + k in r for r in records)]
    lines = ["| step | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for r in records:
        cells = [f"{r[PREFIX + k]:.4g}" if r.get(PREFIX + k) is not None else "–" for k in keys]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.checkpoint_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a GRPO or PPO run directory (config.json, checkpoints/)")
    parser.add_argument("--tasks", default='{"zoom-read": {}}', help="task spec JSON (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=100, help="held-out items per family, those of "
                                                                 "`agents.sft --evaluate` (default: %(default)s)")
    parser.add_argument("--text-stats", action="store_true",
                        help="also box mass and text NLL at the text positions of oracle traces (tiny models)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        records = evaluate_run(args.run, json.loads(args.tasks), args.samples, args.text_stats,
                               progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(markdown_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
