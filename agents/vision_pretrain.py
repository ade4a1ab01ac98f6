"""Pretraining of the tiny model's image encoder on the crops its warm-start traces show.

A real VLM comes with a pretrained vision tower that already reads text in images; the
paper's warm start assumes one. The tiny model starts from scratch, and through the whole
decoder it learns to read a glyph that fills a fifth of its crop very slowly
(docs/results.md), while its image encoder alone, trained to name the glyph, learns it
within a few hundred steps. This stage gives the tiny model that pretrained tower: the
encoder names the target's glyph from the crops of ``image/single`` traces (played
through the env with the run's box writer and env settings, so they are the crops the
policy will see), through a max-pooled linear head that is dropped afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agents import distributed
from agents.traces import TraceMix, TraceOptions, synthesize_traces
from pxr_env.tasks import TaskSource
from pxr_env.tasks.synthetic.common import DIGITS, LETTERS

GLYPHS: tuple[str, ...] = (*DIGITS, *LETTERS)
"""The classes of the glyph head: every glyph the zoom-read family draws."""


@dataclass
class VisionPretrainConfig:
    """How long and on what the image encoder is pretrained (`SFTConfig.vision_pretrain`)."""

    tasks: dict[str, dict[str, Any]] | None = None
    """Task spec of the crops (None: the first SFT stage's)."""
    samples: int = 3000
    """Crops synthesized (``image/single`` traces of the task spec; held out of evaluation)."""
    steps: int = 300
    """Optimizer steps."""
    minutes: float | None = None
    """Stop earlier after this many training minutes (None: no limit)."""
    batch_size: int = 32
    """Crops per step."""
    lr: float = 1e-3
    """AdamW learning rate (constant)."""
    held_out: int = 200
    """Of `samples`, crops kept aside to measure the head's accuracy."""

    def __post_init__(self) -> None:
        if min(self.samples, self.steps, self.batch_size) < 1 or not 0 <= self.held_out < self.samples:
            raise ValueError("vision pretraining needs samples, steps, batch_size >= 1 and 0 <= held_out < samples")
        if self.lr <= 0 or self.minutes is not None and self.minutes <= 0:
            raise ValueError("vision pretraining needs lr > 0 and minutes > 0 when set")


def glyph_crops(source: TaskSource, n: int, seed: int, options: TraceOptions,
                workers: int = 1, progress: bool = False) -> tuple[list[np.ndarray], list[int], set[str]]:
    """Crops of `n` zoom-read ``image/single`` traces, the index in `GLYPHS` of the target's glyph,
    and the sample ids used. Samples without a single target glyph (colour and relative
    questions) are skipped."""
    traces = synthesize_traces(source, n, 0, mix=TraceMix(image={"image/single": 1.0}, video_share=0.0), seed=seed,
                               options=options, workers=workers, progress=progress)
    images, labels, ids = [], [], set()
    for trace in traces:
        sample = source.get(trace.sample_id)
        targets = sample.meta.get("targets", ())
        if sample.family != "zoom-read" or len(targets) != 1 or len(trace.images) != 2:
            continue
        images.append(trace.images[1])
        labels.append(GLYPHS.index(targets[0]["glyph"]))
        ids.add(trace.sample_id)
    if not images:
        raise ValueError("vision pretraining found no zoom-read crop with one target glyph in its task spec")
    return images, labels, ids


def pretrain_vision(vision: torch.nn.Module, image_processor: Any, images: Sequence[np.ndarray],
                    labels: Sequence[int], config: VisionPretrainConfig, seed: int = 0,
                    log: Callable[[int, dict[str, float]], None] | None = None,
                    progress: bool = False, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Train `vision` (the tiny model's image encoder) to name each crop's glyph.

    Tokens of each image are max-pooled and a linear head gives the glyph logits; the head
    is dropped at the end. `log` gets ``(step, {"pretrain/loss", "pretrain/held_out_accuracy"})``
    every 50 steps and at the end. Returns the last record plus ``pretrain/minutes``.
    `autocast` runs the forward passes in that dtype (mixed precision, e.g. ``torch.bfloat16``).
    In a process group (`agents.distributed`) each rank takes its share of every batch and
    the gradients are averaged, so the ranks stay identical and the minutes are their mean.
    """
    rank, world = distributed.rank_and_world()
    held = config.held_out
    train_x, train_y = images[held:], torch.tensor(labels[held:])
    test_x, test_y = images[:held], torch.tensor(labels[:held])
    width = vision.norm.weight.shape[0]
    device = vision.norm.weight.device
    train_y, test_y = train_y.to(device), test_y.to(device)
    head = torch.nn.Linear(width, len(GLYPHS), device=device)
    distributed.broadcast_parameters(head)
    trained = torch.nn.ModuleList([vision, head])
    params = list(trained.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 7])
    was_training = vision.training
    vision.train()

    def logits(batch: Sequence[np.ndarray]) -> torch.Tensor:
        encoded = {k: v.to(device) for k, v in image_processor(list(batch), return_tensors="pt").items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            tokens = vision(encoded["pixel_values"], encoded["image_grid_thw"]).float()
        counts = encoded["image_grid_thw"].prod(-1).tolist()
        return head(torch.stack([t.amax(0) for t in tokens.split(counts)]))

    def held_out_accuracy() -> float:
        if not held:
            return float("nan")
        vision.eval()
        with torch.no_grad():
            right = sum(int((logits(test_x[i:i + 50]).argmax(-1) == test_y[i:i + 50]).sum()) for i in range(0, held, 50))
        vision.train()
        return right / held

    record: dict[str, float] = {}
    minutes, losses = 0.0, []
    bar = tqdm(total=config.steps, desc="vision pretraining", unit="step", disable=not progress or rank > 0)
    for step in range(1, config.steps + 1):
        tick = time.perf_counter()
        pick = rng.integers(0, len(train_x), config.batch_size)[rank::world]
        loss = F.cross_entropy(logits([train_x[i] for i in pick]), train_y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(trained)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        minutes += distributed.all_reduce_sum(time.perf_counter() - tick) / world / 60
        losses.append(distributed.all_reduce_sum(loss.item()) / world)
        bar.update(1)
        last = step == config.steps or config.minutes is not None and minutes >= config.minutes
        if step % 50 == 0 or last:
            record = {"pretrain/loss": float(np.mean(losses)), "pretrain/held_out_accuracy": held_out_accuracy()}
            losses = []
            bar.set_postfix(loss=f"{record['pretrain/loss']:.3f}", acc=f"{record['pretrain/held_out_accuracy']:.2f}")
            if log is not None:
                log(step, record)
        if last:
            break
    bar.close()
    vision.train(was_training)
    return record | {"pretrain/minutes": minutes, "pretrain/steps": float(step)}
