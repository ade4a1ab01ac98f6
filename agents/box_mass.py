"""How much of a tiny model's box distribution holds the evidence: greedy against sampled pointing.

A tiny model writes its first crop as one box token (`agents.vlm.tiny.boxes.BoxVocab`). Greedy
decoding takes the most probable box; RL samples one. The two can differ far more than their
accuracies suggest: a model whose greedy box holds the evidence on most items may put only a
third of its probability on boxes that do, and then its sampled rollouts miss where its greedy
ones hit (docs/results.md, "The sampled pointer"). `first_box_hit_mass` measures this on
played ``image/single`` traces: the prompt and the oracle's text of the first turn up to the
box are given (teacher forcing), and the distribution over the next token is read.

``python -m agents.box_mass --model M --tasks T`` prints, for the items whose greedy box holds
the evidence and for those whose greedy box misses, the box mass on the evidence at several
sampling temperatures and the chance that a group of G sampled rollouts holds at least one
hit: whether RL's rollouts ever find the evidence where greedy decoding misses it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import numpy as np
import torch

from agents.traces import Trace
from agents.vlm.encoding import IGNORE_INDEX, encode_segments
from agents.vlm.hf import model_inputs, pad_items
from agents.vlm.tiny.boxes import BoxVocab
from pxr_env import ops
from pxr_env.tasks import TaskSource


def crop_holds(box: Sequence[float], size: tuple[int, int], evidence: Sequence[float], padding: float) -> bool:
    """Whether the env's padded crop of `box` (fractions) in an image of `size` = (width, height)
    holds the whole `evidence` box (pixels), as the env's ``crop_hit`` counts it."""
    left, top, right, bottom = ops.crop_box_pixels(tuple(box), size, padding)
    return left <= evidence[0] and top <= evidence[1] and right >= evidence[2] and bottom >= evidence[3]


def hitting_boxes(vocab: BoxVocab, size: tuple[int, int], evidence: Sequence[float], padding: float) -> np.ndarray:
    """``(len(vocab),)`` True where the env's padded crop of the box holds the whole evidence box
    (pixels of an image of `size` = (width, height)), as the env's ``crop_hit`` counts it."""
    return np.array([crop_holds(box, size, evidence, padding) for box in vocab.boxes], dtype=bool)


View = tuple[list[tuple[str, bool]], list[np.ndarray]]
"""A pointing view: the segments and images of `Trace.pointing`, whose trained turn holds the first box token."""


def box_ids(config: Any) -> slice:
    """The ids of a tiny model's box tokens (the frame-window tokens, if any, follow them)."""
    return slice(config.box_token_start_id, config.box_token_start_id + config.num_boxes)


@torch.no_grad()
def first_box_probs(model: Any, processor: Any, views: Sequence[View], batch_size: int = 16) -> torch.Tensor:
    """``(len(views), vocab)`` next-token probabilities (temperature 1) at the first box token of
    each view, after the text before it (teacher forcing). The model is left in its mode."""
    boxes = box_ids(model.config)
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        for first in range(0, len(views), batch_size):
            items, positions = [], []
            for segments, images in views[first:first + batch_size]:
                item = encode_segments(processor, segments, images)
                ids = item["input_ids"]
                box_at = ((ids >= boxes.start) & (ids < boxes.stop) & item["loss_mask"].bool()).nonzero().flatten()
                if len(box_at) == 0:
                    raise ValueError("a pointing view's trained turn holds no box token")
                items.append(item)
                positions.append(int(box_at[0]) - 1)
            logits = model(**model_inputs(pad_items(processor, items, "right"), next(model.parameters()).device)).logits
            rows.extend(torch.softmax(row[position].float(), dim=-1).cpu() for row, position in zip(logits, positions))
    finally:
        model.train(was_training)
    return torch.stack(rows) if rows else torch.zeros(0, model.config.vocab_size)


def first_box_hits(traces: Sequence[Trace], source: TaskSource, vocab: BoxVocab,
                   crop_padding: float) -> list[torch.Tensor]:
    """For each trace, ``(len(vocab),)`` True where the box's padded crop holds its sample's evidence."""
    rows = []
    for trace in traces:
        sample = source.get(trace.sample_id)
        height, width = sample.load_image().shape[:2]
        rows.append(torch.from_numpy(hitting_boxes(vocab, (width, height), sample.evidence_box, crop_padding)))
    return rows


def first_box_hit_mass(model: Any, processor: Any, traces: Sequence[Trace], source: TaskSource, vocab: BoxVocab,
                       crop_padding: float, batch_size: int = 16) -> list[dict[str, float]]:
    """For each ``image/single`` trace (written with `vocab`'s box tokens), in order: ``hit_mass``, the
    probability at temperature 1 that the first box holds the evidence; ``top_mass``, the
    probability of the most probable token; ``greedy_hit``, 1.0 when that token is a box that
    holds the evidence. The model is left in its mode."""
    others = sorted({t.kind for t in traces if t.kind != "image/single"})
    if others:
        raise ValueError(f"box mass is read on image/single traces (one crop of the evidence), got {others}")
    boxes = box_ids(model.config)
    probs = first_box_probs(model, processor, [t.pointing() for t in traces], batch_size)
    rows: list[dict[str, float]] = []
    for row, hits in zip(probs, first_box_hits(traces, source, vocab, crop_padding)):
        top = int(row.argmax())
        rows.append({"hit_mass": float(row[boxes][hits].sum()), "top_mass": float(row[top]),
                     "greedy_hit": float(boxes.start <= top < boxes.stop and bool(hits[top - boxes.start]))})
    return rows


@torch.no_grad()
def text_position_stats(model: Any, processor: Any, traces: Sequence[Trace], batch_size: int = 16) -> dict[str, float]:
    """How a box-token model holds up in its free text, teacher forced on `traces`.

    At every trained text position (a loss-masked label below the box tokens: the text before
    a crop call, the answer), ``text_box_mass`` is the mean probability the model puts on box
    tokens there, and ``text_nll`` the mean negative log-likelihood of the oracle's token.
    A pointer term that does not depend on the position leaks box probability into text under
    RL, and RL's sampled-token loss lets the text drift (docs/results.md, "The answer turn
    trained"); both show here before they show in greedy accuracy. ``text_tokens`` is the
    count of positions read. The model is left in its mode.
    """
    start = model.config.box_token_start_id
    was_training = model.training
    model.eval()
    mass = nll = 0.0
    count = 0
    try:
        for first in range(0, len(traces), batch_size):
            items = [encode_segments(processor, t.segments(), t.images) for t in traces[first:first + batch_size]]
            batch = pad_items(processor, items, "right")
            logits = model(**model_inputs(batch, next(model.parameters()).device)).logits[:, :-1].float().cpu()
            labels = batch["labels"][:, 1:]
            text = (labels != IGNORE_INDEX) & (labels < start)
            logp = torch.log_softmax(logits, dim=-1)
            mass += float(logp[..., box_ids(model.config)].exp().sum(-1)[text].sum())
            nll -= float(logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0][text].sum())
            count += int(text.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the traces hold no trained text position to read")
    return {"text_box_mass": mass / count, "text_nll": nll / count, "text_tokens": float(count)}


def tempered_hit_mass(box_probs: torch.Tensor, hits: torch.Tensor, temperature: float) -> float:
    """The probability that a box sampled at `temperature` from `box_probs` (a distribution over
    the box vocabulary, i.e. the temperature-1 policy restricted to box tokens) is one of `hits`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tempered = torch.softmax(torch.log(box_probs.double().clamp_min(1e-300)) / temperature, dim=0)
    return float(tempered[hits].sum())


def exploration_report(box_probs: torch.Tensor, hits: Sequence[torch.Tensor], temperatures: Sequence[float],
                       group_size: int) -> dict[str, dict[str, Any]]:
    """Box mass on the evidence at each temperature, and the chance that at least one of
    `group_size` sampled boxes holds it, over all items and split by whether the greedy box
    (the most probable one) holds it. `box_probs` is ``(n, len(vocab))``, rows renormalised
    over the box tokens."""
    greedy = np.array([bool(h[int(p.argmax())]) for p, h in zip(box_probs, hits)], dtype=bool)
    mass = np.array([[tempered_hit_mass(p, h, t) for t in temperatures] for p, h in zip(box_probs, hits)])
    report: dict[str, dict[str, Any]] = {}
    for name, keep in (("all", np.ones_like(greedy)), ("greedy hit", greedy), ("greedy miss", ~greedy)):
        entry: dict[str, Any] = {"items": int(keep.sum())}
        for column, t in enumerate(temperatures):
            kept = mass[keep, column] if keep.any() else None
            entry[f"hit_mass@{t:g}"] = None if kept is None else float(kept.mean())
            entry[f"group_hit@{t:g}"] = None if kept is None else float((1 - (1 - kept) ** group_size).mean())
        report[name] = entry
    return report


def load_for_pointing(model_dir: str, device: str = "cpu") -> tuple[Any, Any, dict[str, Any], Any]:
    """A saved policy for the pointing probes: its model, processor, env settings, and the
    `TraceOptions` that play oracle traces in its chat format with its box writing (box
    tokens for a tiny model, numbers otherwise)."""
    from transformers import AutoProcessor

    from agents.sft import box_vocab, trace_options
    from agents.vlm.chat import load_chat_format
    from agents.vlm.env_settings import load_env_settings
    from agents.vlm.hf import load_model

    model = load_model(model_dir, device=device)
    env_kwargs = load_env_settings(model_dir)
    options = trace_options(box_vocab(model.config), load_chat_format(model_dir), env_kwargs)
    return model, AutoProcessor.from_pretrained(model_dir), env_kwargs, options


def main(argv: Sequence[str] | None = None) -> int:
    from agents.sft import SFTConfig, box_vocab, eval_sample_ids, task_source
    from agents.traces import play_traces

    parser = argparse.ArgumentParser(description="Box mass on the evidence at sampling temperatures, by greedy hit or miss.")
    parser.add_argument("--model", required=True, help="checkpoint folder of a tiny model (box tokens)")
    parser.add_argument("--tasks", default='{"zoom-read": {}}', help="task spec JSON (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=200, help="held-out items per family, those of `agents.sft --evaluate`")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--group-size", type=int, default=4, help="rollouts per query (G) for group_hit")
    args = parser.parse_args(argv)

    model, processor, env_kwargs, options = load_for_pointing(args.model)
    vocab = box_vocab(model.config)
    if vocab is None:
        raise SystemExit(f"{args.model} writes its boxes as numbers, not box tokens: no box distribution to read")
    tasks = json.loads(args.tasks)
    source = task_source(tasks)
    ids = eval_sample_ids(tasks, args.samples, SFTConfig.eval_seed, set())
    traces = [t for t in play_traces(source, ids, options=options) if t.kind == "image/single"]
    probs = first_box_probs(model, processor, [t.pointing() for t in traces])[:, box_ids(model.config)]
    probs = probs / probs.sum(dim=1, keepdim=True)
    hits = first_box_hits(traces, source, vocab, env_kwargs.get("crop_padding", ops.CROP_PADDING))
    report = exploration_report(probs, hits, args.temperatures, args.group_size)
    print(json.dumps({name: {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}
                      for name, entry in report.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
