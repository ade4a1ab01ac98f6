"""Does the pointer read the question? The question-swap probe.

A policy that crops the right object in a scene with one candidate may have learned only
where candidates sit. This probe takes items that hold other objects of the kind the
question names (zoom-read ``read`` / ``read-choice``: another glyph-bearing tag; chart
``bar``: another bar, ``poster``: another panel, ``table``: a cell of another row and
column), rewrites the question to name one of them, and lets the model write
its first turn greedily for both questions on the same image. Per item it records where
the first crop lands:

- ``hit``: under the original question the crop holds the asked object;
- ``follows``: under the rewritten question it holds the newly named object, not the first;
- ``stays``: under the rewritten question it holds the originally asked object, not the new one;
- ``changed``: the two boxes differ;
- ``tv`` (box-token models): the total variation between the first box's distributions
  under the two questions, with the oracle's first turn given up to its box (teacher
  forcing), which shows a question's pull on the pointer before it flips a greedy box.

A pointer that ignores the question has ``follows`` near zero and ``stays`` near ``hit``;
one that reads it has ``follows`` near ``hit``. ``python -m agents.question_swap --model M``
prints the summary (docs/results.md, "Why the pointer ignores the question").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from agents.box_mass import box_ids, crop_holds, first_box_probs, load_for_pointing
from agents.traces import Trace
from agents.vlm.chat import IM_END
from agents.vlm.encoding import encode_segments
from agents.vlm.hf import model_inputs, pad_items
from pxr_env import ops
from pxr_env.actions import parse_turn
from pxr_env.tasks import Sample, TaskSource

SWAP_TASKS: dict[str, dict[str, Any]] = {
    "zoom-read": {"questions": ["read", "read-choice"], "shortcut_share": 0.0, "hard_share": 1.0},
    "chart": {"questions": ["bar"], "shortcut_share": 0.0},
}
"""The default items of the probe: hard zoom-read items (4-8 other tags) and bar charts (4-7 bars)."""


@dataclass(frozen=True)
class Swap:
    """How to rename the asked object of one sample: the phrase in the question, its replacement,
    and the pixel box of the object the replacement names."""

    phrase: str
    replacement: str
    other_box: tuple[float, float, float, float]


def swap_for(sample: Sample) -> Swap | None:
    """The rename of `sample`'s asked object into another object of its image, or None where
    the sample has none (or its family and question kind are not covered)."""
    meta = sample.meta
    if sample.family == "zoom-read" and meta.get("kind") in ("read", "read-choice"):
        target = meta["targets"][0]
        others = [t for t in meta["tags"] if not t["target"]
                  and (t["colour"], t["shape"]) != (target["colour"], target["shape"])]
        if not others:
            return None
        return Swap(f"the {target['colour']} {target['shape']}", f"the {others[0]['colour']} {others[0]['shape']}",
                    tuple(others[0]["box"]))
    if sample.family == "chart" and meta.get("kind") in ("bar", "poster", "table"):
        target = meta["target"]
        if meta["kind"] == "table":  # another row and another column: the asked cell shares neither
            others = [v for v in meta["values"] if v["row"] != target["row"] and v["column"] != target["column"]]
            name = "for {row} in {column}"
        else:
            others = [v for v in meta["values"] if not v["target"]]
            name = "the {colour} bar" if meta["kind"] == "bar" else "the {heading} panel"
        if not others:
            return None
        return Swap(name.format(**target), name.format(**others[0]), tuple(others[0]["box"]))
    return None


def _holds(box: tuple[float, float, float, float] | None, evidence: Sequence[float], size: tuple[int, int],
           padding: float) -> bool:
    """Whether the env's padded crop of `box` (fractions; None: no crop) holds the whole `evidence` (pixels)."""
    return box is not None and crop_holds(box, size, evidence, padding)


def _first_box(text: str, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """The box of a first turn's ``crop_image`` call on image 1, as fractions; None for anything else."""
    call = parse_turn(text).tool_call
    if call is None or call.name != "crop_image":
        return None
    try:
        return ops.normalize_bbox(call.arguments.get("bbox_2d"), size)
    except ops.OpError:
        return None


@torch.no_grad()
def first_turns(model: Any, processor: Any, prompts: Sequence[tuple[str, list[np.ndarray]]],
                batch_size: int = 16, max_new_tokens: int = 96) -> list[str]:
    """The greedy first turn for each (prompt text, images) pair."""
    device = next(model.parameters()).device
    end = processor.tokenizer.convert_tokens_to_ids(IM_END)
    texts: list[str] = []
    for first in range(0, len(prompts), batch_size):
        items = [encode_segments(processor, [(text, False)], images) for text, images in prompts[first:first + batch_size]]
        inputs = model_inputs(pad_items(processor, items, "left"), device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                             pad_token_id=processor.tokenizer.pad_token_id)
        texts.extend(processor.tokenizer.decode(ids, skip_special_tokens=True)
                     for ids in out[:, inputs["input_ids"].shape[1]:])
    return texts


def question_swap(model: Any, processor: Any, traces: Sequence[Trace], source: TaskSource, crop_padding: float,
                  batch_size: int = 16) -> list[dict[str, Any]]:
    """One row per trace whose sample has a `Swap`: the sample id, both first boxes, the four flags
    and ``tv`` (None for a model without box tokens)."""
    was_training = model.training
    model.eval()
    try:
        chosen, prompts, views = [], [], []
        for trace in traces:
            sample = source.get(trace.sample_id)
            swap = swap_for(sample)
            if swap is None:
                continue
            segments, images = trace.pointing()
            prompt = segments[0][0]  # system and user messages, up to the assistant's first turn
            if prompt.count(swap.phrase) != 1:
                raise ValueError(f"{trace.sample_id}: the prompt names {swap.phrase!r} "
                                 f"{prompt.count(swap.phrase)} times, expected once")
            chosen.append((sample, swap))
            swapped = prompt.replace(swap.phrase, swap.replacement)
            prompts += [(prompt, images), (swapped, images)]
            views += [(segments, images), ([(swapped, False), *segments[1:]], images)]
        texts = first_turns(model, processor, prompts, batch_size)
        boxes = box_ids(model.config) if getattr(model.config, "box_token_start_id", None) is not None else None
        probs = first_box_probs(model, processor, views, batch_size)[:, boxes] if boxes is not None else None
    finally:
        model.train(was_training)
    rows = []
    for i, (sample, swap) in enumerate(chosen):
        height, width = sample.load_image().shape[:2]
        original, swapped = (_first_box(texts[2 * i + j], (width, height)) for j in (0, 1))
        new = _holds(swapped, swap.other_box, (width, height), crop_padding)
        old = _holds(swapped, sample.evidence_box, (width, height), crop_padding)
        rows.append({"sample_id": sample.sample_id, "box": original, "swapped_box": swapped,
                     "hit": _holds(original, sample.evidence_box, (width, height), crop_padding),
                     "follows": new and not old, "stays": old and not new, "changed": original != swapped,
                     "tv": None if probs is None else float(0.5 * (probs[2 * i] - probs[2 * i + 1]).abs().sum())})
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Item count, the share of items with each flag and the mean ``tv`` (where measured)."""
    out: dict[str, float] = {"items": len(rows)}
    for key in ("hit", "follows", "stays", "changed"):
        out[key] = sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")
    tvs = [r["tv"] for r in rows if r["tv"] is not None]
    if tvs:
        out["tv"] = sum(tvs) / len(tvs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from agents.sft import eval_sample_ids, task_source
    from agents.traces import play_traces

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id) of the policy")
    parser.add_argument("--tasks", default=json.dumps(SWAP_TASKS), help="task spec JSON (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=40, help="items per family (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=10_000_000, help="held-out seeds start here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    model, processor, env_kwargs, options = load_for_pointing(args.model, args.device)
    tasks = json.loads(args.tasks)
    source = task_source(tasks)
    report = {}
    for family in tasks:
        ids = eval_sample_ids({family: tasks[family]}, args.samples, args.first_seed, set())
        traces = [t for t in play_traces(source, ids, options=options) if t.kind == "image/single"]
        rows = question_swap(model, processor, traces, source, env_kwargs.get("crop_padding", ops.CROP_PADDING))
        report[family] = summarize(rows)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
