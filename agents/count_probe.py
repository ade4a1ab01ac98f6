"""How well a count head counts: the answers read from the oracle's crop, its sum, its tokens.

On held-out count items (by default without shortcut items), each played with the oracle's single
crop (`agents.traces.play_traces`) and asked as a reading stage's item (`Trace.reading`):

- **Reading**: the greedy answer, scored against the count (per tier).
- **The head's sum** ``E`` at the position that writes the answer's first digit
  (`agents.sft.count_answer_labels`), the answer teacher-forced: its correlation with the count,
  how often it rounds to the count, its mean error.
- **Its cells**: each cell of the crop (a token, or a part of one with ``count_subcells``) at
  probability > 0.5 against the targets (`agents.sft.count_token_labels`: the cells that hold a
  counted thing's centre), as precision and recall.

``python -m agents.count_probe --model M`` prints them as JSON; ``--plot F.png`` draws the first
items' crops, the counted centres marked, above the head's cell probabilities (docs/results.md,
"Count: reading the crop, and a count head").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

PROBE_TASKS: dict[str, dict[str, Any]] = {"count": {"shortcut_share": 0.0}}
"""The default items: the easy and hard tiers, whose answers need the crop."""


@dataclass(frozen=True)
class CountReading:
    """One item: its count, whether the greedy answer was right, the head's ``E`` at the answer's
    first digit, and per cell of the crop (a token, or a part of one) the head's probability and the target."""

    sample_id: str
    tier: str
    count: int
    correct: float
    expected: float
    probabilities: np.ndarray
    """``(rows, cols)`` cells (token rows and columns times ``count_subcells``): the head's
    probabilities at the answer's first digit."""
    targets: np.ndarray
    """``(rows, cols)``: 1 where a cell holds a counted centre."""
    crop: np.ndarray
    """The crop the item showed (``H x W x 3``, before the processor resizes it to the token grid)."""


@torch.no_grad()
def count_readings(model: Any, processor: Any, traces: Sequence[Any], source: Any) -> list[CountReading]:
    """Read each count trace's reading item: greedily (scored) and teacher-forced (the head's ``E``
    and cell probabilities where the answer's first digit is written). `model` needs the count head."""
    from agents.sft import count_answer_labels, count_cell_targets, count_token_labels, oracle_op_scores
    from agents.vlm.encoding import collate, encode_segments
    from agents.vlm.hf import model_inputs
    from agents.vlm.tiny import digit_token_ids

    if getattr(model, "count", None) is None:
        raise ValueError("the count probe reads a model with a count head (TinyVLMConfig.count_head)")
    if any(t.info.get("family") != "count" for t in traces):
        raise ValueError("the count probe reads count traces alone")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = oracle_op_scores(model, processor, traces, source, reading=True)
    digits, image_token = digit_token_ids(processor.tokenizer), model.config.image_token_id
    s = getattr(model.config, "count_subcells", 1)
    rows = []
    try:
        for trace, correct in zip(traces, scores):
            segments, images = trace.reading()
            item = encode_segments(processor, segments, images)
            first = (count_answer_labels(item, digits) >= 0).nonzero().flatten()
            if not len(first):
                raise ValueError(f"{trace.sample_id}: its answer writes no one-digit count")
            position = int(first[0]) - 1  # the position that predicts the digit
            batch = model_inputs(collate([item], processor.tokenizer.pad_token_id), device)
            out = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_mask")})
            _, grid_h, grid_w = (int(v) for v in item["image_grid_thw"][-1])
            labels = count_token_labels(item, trace.info, image_token, s)
            targets = count_cell_targets(labels[labels >= 0], s)
            probabilities = torch.sigmoid(out.count_scores[0, position, -1, :grid_h * grid_w * s * s].float())
            rows.append(CountReading(
                sample_id=trace.sample_id, tier=str(source.get(trace.sample_id).meta.get("tier")),
                count=digits.index(int(item["input_ids"][position + 1])),
                correct=float(correct), expected=float(out.count_expected[0, position]),
                probabilities=cell_grid(probabilities.cpu(), grid_h, grid_w, s).numpy(),
                targets=cell_grid(targets, grid_h, grid_w, s).numpy(),
                crop=np.asarray(images[-1])))
    finally:
        model.train(was_training)
    return rows


def cell_grid(cells: torch.Tensor, rows: int, cols: int, subcells: int) -> torch.Tensor:
    """Token-major cell values ``(rows * cols * subcells**2,)`` -> the ``(rows * subcells, cols * subcells)`` picture."""
    s = subcells
    return cells.reshape(rows, cols, s, s).permute(0, 2, 1, 3).reshape(rows * s, cols * s)


def summarize_readings(rows: Sequence[CountReading]) -> dict[str, Any]:
    """Reading accuracy (all and per tier), ``E`` against the counts (correlation, rounded exact per
    tier, mean absolute error, means) and the cells at p > 0.5 against the targets (precision, recall)."""
    if not rows:
        raise ValueError("no count readings to summarize")
    expected = np.array([r.expected for r in rows])
    counts = np.array([r.count for r in rows])
    exact = np.round(expected) == counts
    marked = np.concatenate([(r.probabilities > 0.5).ravel() for r in rows])
    held = np.concatenate([(r.targets > 0).ravel() for r in rows])
    out: dict[str, Any] = {
        "items": len(rows),
        "reading": float(np.mean([r.correct for r in rows])),
        "expected_corr": float(np.corrcoef(expected, counts)[0, 1]) if len(rows) > 1 and counts.std() > 0 else None,
        "expected_exact": float(exact.mean()),
        "expected_mae": float(np.abs(expected - counts).mean()),
        "expected_mean": float(expected.mean()),
        "count_mean": float(counts.mean()),
        "cell_precision": float((marked & held).sum() / marked.sum()) if marked.any() else None,
        "cell_recall": float((marked & held).sum() / held.sum()) if held.any() else None,
    }
    for tier in sorted({r.tier for r in rows}):
        mine = [i for i, r in enumerate(rows) if r.tier == tier]
        out[f"{tier}/items"] = len(mine)
        out[f"{tier}/reading"] = float(np.mean([rows[i].correct for i in mine]))
        out[f"{tier}/expected_exact"] = float(exact[mine].mean())
    return out


def plot_readings(rows: Sequence[CountReading], path: str, n: int = 8) -> None:
    """The first `n` items: each crop with its counted cells outlined, above the head's cell
    probabilities; titled with the count and ``E``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = list(rows[:n])
    if not shown:
        raise ValueError("no count readings to plot")
    fig, axes = plt.subplots(2, len(shown), figsize=(2.4 * len(shown), 5.2), squeeze=False)
    for col, row in enumerate(shown):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(row.crop)
        grid_h, grid_w = row.targets.shape
        cell_h, cell_w = row.crop.shape[0] / grid_h, row.crop.shape[1] / grid_w
        for y, x in zip(*np.nonzero(row.targets)):
            top.add_patch(Rectangle((x * cell_w - 0.5, y * cell_h - 0.5), cell_w, cell_h, fill=False, ec="white", lw=1))
        top.set_title(f"{row.tier}: {row.count}, E = {row.expected:.1f}" + (" ✓" if row.correct else ""), fontsize=9)
        bottom.imshow(row.probabilities, vmin=0, vmax=1, cmap="magma")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("crop, counted cells")
    axes[1, 0].set_ylabel("head's cell probability")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoProcessor

    from agents.sft import SFTConfig, box_vocab, eval_sample_ids, task_source, trace_options
    from agents.traces import play_traces
    from agents.vlm.hf import TransformersPolicy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id) of a model with a count head")
    parser.add_argument("--tasks", default=json.dumps(PROBE_TASKS), help="count task spec JSON (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=150, help="held-out items (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=SFTConfig.eval_seed,
                        help="held-out seeds start here (default: those of agents.sft --evaluate, %(default)s)")
    parser.add_argument("--plot", help="PNG of the first items' crops and the head's cell probabilities")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    tasks = json.loads(args.tasks)
    if list(tasks) != ["count"]:
        raise SystemExit(f"the count probe reads the count family alone, got {sorted(tasks)}")
    torch.set_num_threads(args.threads)
    source = task_source(tasks)
    policy = TransformersPolicy.from_pretrained(args.model)
    ids = eval_sample_ids(tasks, args.samples, args.first_seed, set())
    options = trace_options(box_vocab(policy.model.config), policy.chat_format, policy.env_kwargs)
    traces = play_traces(source, ids, options=options)
    rows = count_readings(policy.model, AutoProcessor.from_pretrained(args.model), traces, source)
    if args.plot:
        plot_readings(rows, args.plot)
    print(json.dumps({"model": args.model, "tasks": tasks, "samples": args.samples, **summarize_readings(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
