"""How much of a tiny model's box distribution holds the evidence: greedy against sampled pointing.

A tiny model writes its first crop as one box token (`agents.vlm.tiny.boxes.BoxVocab`). Greedy
decoding takes the most probable box; RL samples one. The two can differ far more than their
accuracies suggest: a model whose greedy box holds the evidence on most items may put only a
third of its probability on boxes that do, and then its sampled rollouts miss where its greedy
ones hit (docs/results.md, "The sampled pointer"). `first_box_hit_mass` measures this on
played ``image/single`` traces: the prompt and the oracle's text of the first turn up to the
box are given (teacher forcing), and the distribution over the next token is read.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from agents.traces import Trace
from agents.vlm.encoding import encode_segments
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


@torch.no_grad()
def first_box_probs(model: Any, processor: Any, views: Sequence[View], batch_size: int = 16) -> torch.Tensor:
    """``(len(views), vocab)`` next-token probabilities (temperature 1) at the first box token of
    each view, after the text before it (teacher forcing). The model is left in its mode."""
    start = model.config.box_token_start_id
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        for first in range(0, len(views), batch_size):
            items, positions = [], []
            for segments, images in views[first:first + batch_size]:
                item = encode_segments(processor, segments, images)
                box_at = ((item["input_ids"] >= start) & item["loss_mask"].bool()).nonzero().flatten()
                if len(box_at) == 0:
                    raise ValueError("a pointing view's trained turn holds no box token")
                items.append(item)
                positions.append(int(box_at[0]) - 1)
            logits = model(**model_inputs(pad_items(processor, items, "right"), next(model.parameters()).device)).logits
            rows.extend(torch.softmax(row[position].float(), dim=-1).cpu() for row, position in zip(logits, positions))
    finally:
        model.train(was_training)
    return torch.stack(rows) if rows else torch.zeros(0, model.config.vocab_size)


def first_box_hit_mass(model: Any, processor: Any, traces: Sequence[Trace], source: TaskSource, vocab: BoxVocab,
                       crop_padding: float, batch_size: int = 16) -> list[dict[str, float]]:
    """For each ``image/single`` trace (written with `vocab`'s box tokens), in order: ``hit_mass``, the
    probability at temperature 1 that the first box holds the evidence; ``top_mass``, the
    probability of the most probable token; ``greedy_hit``, 1.0 when that token is a box that
    holds the evidence. The model is left in its mode."""
    others = sorted({t.kind for t in traces if t.kind != "image/single"})
    if others:
        raise ValueError(f"box mass is read on image/single traces (one crop of the evidence), got {others}")
    start = model.config.box_token_start_id
    probs = first_box_probs(model, processor, [t.pointing() for t in traces], batch_size)
    rows: list[dict[str, float]] = []
    for trace, row in zip(traces, probs):
        sample = source.get(trace.sample_id)
        height, width = sample.load_image().shape[:2]
        hits = torch.from_numpy(hitting_boxes(vocab, (width, height), sample.evidence_box, crop_padding))
        top = int(row.argmax())
        rows.append({"hit_mass": float(row[start:][hits].sum()), "top_mass": float(row[top]),
                     "greedy_hit": float(top >= start and bool(hits[top - start]))})
    return rows
