"""Warm start (SFT) of a VLM policy on synthesized traces, with closed-loop evaluation in the env.

`train_sft(config)` trains with the masked next-token loss of `agents.vlm.encoding.collate`
(tool outputs and deliberate mistakes carry ``-100`` labels), AdamW and a cosine schedule
with warmup, and every `SFTConfig.eval_every` steps plays held-out samples through the
real environment with the model being trained (`TransformersPolicy`, greedy): its own
crops are executed, the crops fed back, the answer scored. Metrics go to `MetricLogger`
(``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``eval/accuracy``, ``eval/rapr``,
``eval/crop_hit``, ... and ``eval/<family>/...``).

**Curriculum.** `SFTConfig.stages` is a list of `SFTStage`: each names its task families
with their difficulty knobs and its trace counts and mix; a stage ends after its
``steps`` or ``minutes`` (of training time), the last one runs to the end. Each stage's
traces are synthesized when the stage starts and encoded as they come; only the current
stage's items are held, their images as uint8 patches (4x smaller than float). A
``reading`` stage trains on the question, the final crop (or the selected frames) and the
answer alone (`Trace.reading`), with its own batch size; a ``pointing`` stage on the
question, the original image and the first crop call alone (`Trace.pointing`).

**Resume.** A checkpoint (`agents.checkpoint.save_checkpoint`) every `SFTConfig.checkpoint_every`
steps holds the model, optimizer, schedule, RNG states and the training clock; the
batch of step ``s`` is a pure function of ``(seed, stage, s)``, so ``resume=True`` continues
a killed run with no lost or repeated step and the same weights as an uninterrupted run.

**Output.** The final model, processor and `ChatFormat` are written with ``save_pretrained``
to ``out/final`` (or `SFTConfig.export_dir`), loadable with
``TransformersPolicy.from_pretrained``.

Run::

    torchrun --standalone --nproc-per-node 2 -m agents.sft --preset warmstart --out runs/warmstart \
        --export checkpoints/tiny-warmstart

(``python -m agents.sft ...`` runs the same in one process, at about half the steps per minute;
``--preset warmstart-float32`` is the schedule for a CPU without native bfloat16.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import pxr_env  # noqa: F401  (registers PixelQA-v0)
from agents import distributed
from agents.box_mass import first_box_hit_mass
from agents.checkpoint import capture_rng_states, latest_checkpoint, load_checkpoint, save_checkpoint
from agents.logger import MetricLogger
from agents.metrics import summarize, summarize_by
from agents.rollout import collect
from agents.schedules import cosine_factor
from agents.traces import Trace, TraceMix, TraceOptions, iter_traces, play_traces
from agents.vision_pretrain import (VisionPretrainConfig, evidence_crops, frame_glyphs, glyph_crops, initial_frames,
                                    initial_views, pretrain_tower, pretrain_vision)
from agents.vlm.chat import IM_END, ChatFormat, save_chat_format
from agents.vlm.env_settings import save_env_settings
from agents.vlm.encoding import IGNORE_INDEX, collate, encode_segments
from agents.vlm.hf import TransformersPolicy, freeze_parameters, load_model, matching_parameters, model_inputs, pad_items
from agents.vlm.tiny import (BoxVocab, TinyVLMConfig, build_tiny_model, build_tiny_processor, digit_token_ids,
                             frame_windows, with_frame_windows)
from agents.vlm.tiny.modeling_tiny_vlm import image_slots
from pxr_env import ops
from pxr_env.actions import extract_answer
from pxr_env.scoring import score_answer
from pxr_env.tasks import MixtureSource, TaskSource
from pxr_env.tasks.synthetic import FAMILIES

TINY_SYSTEM = ("Answer the question about the image or video. When a detail is too small, look closer "
               "with a <tool_call>. Put the final answer in \\boxed{}.")
"""Short system prompt of the tiny model (the standard tool prompt is ~410 tokens of a ~600-token trace)."""

TaskSpec = Mapping[str, Mapping[str, Any]]
"""Family name -> constructor knobs, with an optional ``"weight"`` entry (default 1)."""

@dataclass(frozen=True)
class BoxSnapper:
    """The tiny model's box writer: the box of `vocab`'s tokens that best overlaps a box (picklable)."""

    vocab: BoxVocab = field(default_factory=BoxVocab)

    def __call__(self, box: Sequence[float]) -> tuple[float, ...]:
        return self.vocab.boxes[self.vocab.snap(box)]


snap_to_box_tokens = BoxSnapper()
"""The box writer of the default box vocabulary (grid 14, `DEFAULT_BOX_SIZES`)."""


def box_vocab(model_config: Any) -> BoxVocab | None:
    """The box vocabulary of a tiny model's config (None for a model that writes its numbers)."""
    if not hasattr(model_config, "pointer_grid"):
        return None
    return BoxVocab(model_config.pointer_grid, tuple(model_config.box_sizes))


def trace_options(boxes: BoxVocab | None, chat_format: ChatFormat,
                  env_kwargs: Mapping[str, Any] | None = None) -> TraceOptions:
    """Oracle traces written as a model writes: its boxes snapped to the box tokens of `boxes`
    (None: written as numbers), its chat format, its env settings."""
    return TraceOptions(box_writer=None if boxes is None else BoxSnapper(boxes), chat_format=chat_format,
                        env_kwargs=dict(env_kwargs or {}))


def task_source(spec: TaskSpec) -> TaskSource:
    """A task source from a `TaskSpec` (one family, or a weighted mixture)."""
    if not spec:
        raise ValueError("a task spec needs at least one family, e.g. {'zoom-read': {}}")
    sources, weights = [], []
    for name, knobs in spec.items():
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}; families: {sorted(FAMILIES)}")
        knobs = dict(knobs)
        weights.append(float(knobs.pop("weight", 1.0)))
        sources.append(FAMILIES[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}))
    return sources[0] if len(sources) == 1 else MixtureSource(sources, weights)


BOX_VOCAB_KEYS = frozenset({"pointer_grid", "box_sizes"})
FRAME_VOCAB_KEYS = frozenset({"frame_windows", "max_frames"})
"""Tiny-model config keys that set the box vocabulary, and so the processor's box tokens."""


@dataclass
class SFTStage:
    """One curriculum stage: which tasks, how many traces of which kinds, how long."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"zoom-read": {}})
    """Families and their knobs (`TaskSpec`), e.g. ``{"zoom-read": {"shortcut_share": 0.0}}``."""
    n_pixel: int = 1000
    """Pixel-space traces synthesized for the stage."""
    n_text: int = 0
    """Textual traces (answer at once; on shortcut items only)."""
    image_mix: dict[str, float] = field(default_factory=lambda: dict(TraceMix().image))
    """Shares of the image trace kinds (`agents.traces.TraceMix.image`)."""
    video_mix: dict[str, float] = field(default_factory=lambda: dict(TraceMix().video))
    """Shares of the video trace kinds."""
    steps: int | None = None
    """Optimizer steps after which the stage ends (None: no step limit)."""
    minutes: float | None = None
    """Training minutes after which the stage ends (None: no time limit)."""
    reading: bool = False
    """Train reading alone: each trace becomes its question with its last observation (the final
    crop, or the selected frames of a video trace) as the only images, and its final turn, the
    only trained piece (`Trace.reading`). A tiny model learns to read through its decoder far
    sooner when the loss is the answer (docs/results.md)."""
    pointing: bool = False
    """Train the first decision alone: each trace becomes its question with the original image
    and its first turn (the first crop), the only trained piece (`Trace.pointing`), so that a
    step of short items spends its compute on where to look."""
    batch_size: int | None = None
    """Sequences per micro-batch in this stage (None: `SFTConfig.batch_size`); reading items are short."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name prefixes held fixed during this stage only (on top of `SFTConfig.freeze`),
    e.g. ``["pointer.stem"]`` in a reading stage, whose items have no box to point at: the
    pointer stem then costs a forward pass only (docs/results.md)."""

    def __post_init__(self) -> None:
        task_source(self.tasks)
        if self.n_pixel < 0 or self.n_text < 0 or self.n_pixel + self.n_text == 0:
            raise ValueError(f"a stage needs n_pixel, n_text >= 0 and some traces, got {self.n_pixel}, {self.n_text}")
        TraceMix(image=self.image_mix, video=self.video_mix)
        if self.steps is not None and self.steps < 1 or self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"stage steps must be >= 1 and minutes > 0 when set, got {self.steps}, {self.minutes}")
        if self.reading and self.pointing:
            raise ValueError("a stage trains reading or pointing alone, not both")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"stage batch_size must be >= 1 when set, got {self.batch_size}")


@dataclass
class SFTConfig:
    """Warm-start training of the tiny VLM (or a saved checkpoint) on synthesized traces."""

    out: str = "runs/warmstart"
    """Run directory: metrics, TensorBoard, checkpoints, the final model."""
    stages: list[SFTStage] = field(default_factory=lambda: [SFTStage()])
    """Curriculum stages, in order (the last one runs until the end of training)."""
    init_from: str | None = None
    """A saved model folder to start from; None builds a fresh tiny model."""
    model: dict[str, Any] = field(default_factory=dict)
    """`TinyVLMConfig` overrides of a fresh tiny model (``hidden_size``, ``vision_num_layers``, ...);
    with `init_from`, config values replaced in the saved model before its weights load, e.g.
    ``{"pointer_match": true}`` to add that branch (its new weights initialised as in a fresh model;
    ``{"count_head": true}`` likewise adds the count head; a new ``pointer_match_encoder`` starts
    as a copy of the saved image encoder);
    ``frame_windows`` on a saved model without them appends their tokens (`agents.vlm.tiny.with_frame_windows`)."""
    system: str | None = TINY_SYSTEM
    """System prompt of the chat format (None: the standard tool prompt)."""
    question_first: bool = True
    """Question before the image in the first user message."""
    vision_ids: bool = False
    """``Picture k: `` before each image (`agents.vlm.chat.ChatFormat.vision_ids`): the initial frames
    of a video carry the numbers ``select_frames`` takes."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """`PixelQAEnv` arguments of the trace and evaluation envs (e.g. ``{"crop_padding": 0.03}``)."""
    max_steps: int = 1000
    """Optimizer steps of the schedule (training stops earlier at `max_minutes`)."""
    max_minutes: float | None = None
    """Training-time budget in minutes (evaluation excluded); None: no limit. The cosine
    follows whichever budget runs out first (`lr_position`), so a slower machine that
    stops on the clock still ends its schedule at the low learning rate."""
    batch_size: int = 8
    """Traces per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of `max_steps` of linear warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of `lr`."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    freeze_vision: bool = False
    """Keep the vision tower fixed (the paper's recipe for a pretrained model)."""
    freeze: list[str] = field(default_factory=list)
    """Prefixes of parameter names kept fixed in the SFT (after any vision pretraining), e.g.
    ``["model.vision.stem", "model.vision.summary"]``: the SFT's pointing loss otherwise
    overwrites pretrained glyph features within a few hundred steps (docs/results.md)."""
    vision_pretrain: list[VisionPretrainConfig] = field(default_factory=list)
    """Pretrain the tiny model's image towers before the SFT, one after the other
    (`agents.vision_pretrain`; one config or a list, each a `VisionPretrainConfig` or a dict of
    its fields): a fresh model's encoder on what its crops show, an `init_from` model's for a
    family it has not read yet (``target: "dense"``), the pointer stem on the initial views
    (``target: "view", tower: "pointer"``). Each takes its crops from its own task spec or
    the first stage's; their minutes count in `max_minutes`."""
    pointer_weight: float = 1.0
    """Loss weight of box-token and frame-window-token targets (one pointing decision among ~100 trained tokens of a trace)."""
    pointer_smoothing: float = 0.0
    """Share of a box token's target mass spread evenly over the same-size boxes of the 8 neighbouring cells.
    The `warmstart` preset uses none: with 0.1 its sampled boxes held the tag half as often as its
    greedy ones in the clutter (``box_hit_mass``, docs/results.md)."""
    answer_weight: float = 1.0
    """Loss weight of the final turn's tokens (the answer, read from the crop)."""
    count_weight: float = 0.0
    """Loss weight of the count head's token targets: where a count trace first writes its answer,
    each token of the latest image (each part of one, with ``count_subcells``) should hold a counted
    thing's centre or not (`count_token_labels`; needs ``"model": {"count_head": true}``). Taught by the answers alone the head's ``E`` counted
    poorly and the answers did not follow it (docs/results.md)."""
    eval_every: int = 200
    """Steps between closed-loop evaluations (0: only at the end)."""
    eval_tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"zoom-read": {}})
    """Families and knobs of the held-out evaluation."""
    eval_samples: int = 64
    """Held-out samples per evaluated family."""
    eval_seed: int = 10_000_000
    """First sample seed of the held-out set (seeds used by training traces are skipped)."""
    eval_batch_size: int = 16
    """Episodes generated together at evaluation."""
    max_new_tokens: int = 96
    """Token limit of one generated turn at evaluation."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: none)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in ``out/checkpoints``."""
    save_at_steps: list[int] = field(default_factory=list)
    """Steps at which a loadable model folder ``out/model-step{N}`` is also written (e.g. a weaker warm start)."""
    export_dir: str | None = None
    """Where the final model is saved with ``save_pretrained`` (None: ``out/final``)."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out/checkpoints``."""
    seed: int = 0
    """Seed of the initialisation, the traces and the batch order."""
    trace_workers: int = 1
    """Processes that synthesize traces."""
    autocast: str | None = None
    """Mixed precision of the training forward passes (vision pretraining and SFT): ``"bfloat16"``,
    ``"float16"``, ``"auto"`` (bfloat16 where the device computes it natively, else float32:
    `native_bfloat16`) or None (float32). Weights and optimizer state stay float32. On a CPU with
    AVX-512 BF16 a step of the tiny model takes about 0.65-0.8 of the float32 time
    (`benchmarks/sft_step.py`); on one with AVX2 alone (no native bfloat16) the encoder's step
    took about 10 times it (docs/results.md)."""
    device: str = "cpu"
    """Where the model trains and is evaluated (``"cuda"``: the process's current GPU)."""
    dtype: str = "float32"
    """Weights (and so optimizer state) dtype of a model loaded with `init_from`: ``"bfloat16"``
    halves the memory of a large checkpoint; a fresh tiny model is always float32."""
    log_every: int = 10
    """Steps between training-metric records."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, SFTStage) else SFTStage(**s) for s in self.stages]
        pretrain = self.vision_pretrain
        pretrain = [] if pretrain is None else [pretrain] if isinstance(pretrain, (Mapping, VisionPretrainConfig)) else pretrain
        self.vision_pretrain = [p if isinstance(p, VisionPretrainConfig) else VisionPretrainConfig(**p) for p in pretrain]
        if not self.stages:
            raise ValueError("stages needs at least one SFTStage")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_samples", "eval_batch_size", "max_new_tokens",
                     "keep_checkpoints", "trace_workers", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.count_weight < 0:
            raise ValueError(f"count_weight must be >= 0, got {self.count_weight}")
        if self.pointer_weight <= 0:
            raise ValueError(f"pointer_weight must be > 0, got {self.pointer_weight}")
        if not 0.0 <= self.pointer_smoothing < 1.0:
            raise ValueError(f"pointer_smoothing must be in [0, 1), got {self.pointer_smoothing}")
        if self.lr <= 0 or self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("lr must be > 0 and max_minutes > 0 when set")
        if self.init_from is not None and BOX_VOCAB_KEYS & set(self.model):
            raise ValueError(f"a saved model keeps its box vocabulary (its processor's tokens); drop "
                             f"{sorted(BOX_VOCAB_KEYS & set(self.model))} from the model overrides of init_from")
        if self.autocast not in (None, "auto", "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'auto', 'bfloat16' or 'float16', got {self.autocast!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        task_source(self.eval_tasks)

    @property
    def chat_format(self) -> ChatFormat:
        return ChatFormat(system=self.system, question_first=self.question_first, vision_ids=self.vision_ids)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype of the training forward passes, None for float32 (``"auto"`` resolved on `device`)."""
        if self.autocast == "auto":
            return torch.bfloat16 if native_bfloat16(self.device) else None
        return None if self.autocast is None else getattr(torch, self.autocast)


def native_bfloat16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU whose
    oneDNN kernels have bfloat16 (AVX-512 or AMX). Elsewhere bfloat16 autocast is emulated: the
    image encoder's step took about 10 times its float32 time (AVX2, docs/results.md)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.device(device).type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ------------------------------------------------------------------ data

def _compact(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep ``pixel_values`` as uint8 (the tiny processor normalises uint8 pixels to ``x / 127.5 - 1``)."""
    if "pixel_values" in item:
        item = dict(item, pixel_values=((item["pixel_values"] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return item


def _expand(item: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    item = dict(item)
    if "pixel_values" in item and item["pixel_values"].dtype == torch.uint8:
        item["pixel_values"] = item["pixel_values"].float() / 127.5 - 1.0
    return item


def stage_items(config: SFTConfig, stage_index: int, processor: Any, boxes: BoxVocab | None,
                count_subcells: int = 1) -> tuple[list[dict[str, torch.Tensor]], set[str]]:
    """Synthesize and encode the traces of one stage, boxes snapped to the box tokens of `boxes`
    (None: written as numbers), count targets marked per part of a token (`count_token_labels`);
    also return the sample ids they use."""
    stage = config.stages[stage_index]
    options = trace_options(boxes, config.chat_format, config.env_kwargs)
    traces = iter_traces(task_source(stage.tasks), stage.n_pixel, stage.n_text,
                         mix=TraceMix(image=stage.image_mix, video=stage.video_mix),
                         seed=config.seed * 1000 + stage_index, options=options,
                         workers=config.trace_workers, progress=config.progress)
    digits = digit_token_ids(processor.tokenizer) if config.count_weight > 0 else None
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    items, used = [], set()
    for trace in traces:  # encoded as they come: only the items, not every trace's arrays, are held
        item = encode_segments(processor, *_stage_view(stage, trace))
        if digits is not None:  # every item, so that a mixed batch collates; -100 throughout but on count answers
            counted = trace.info.get("family") == "count"
            item["count_labels"] = (count_answer_labels(item, digits) if counted
                                    else torch.full_like(item["input_ids"], IGNORE_INDEX))
            item["count_token_labels"] = (count_token_labels(item, trace.info, image_token, count_subcells) if counted
                                          else torch.full_like(item["input_ids"], IGNORE_INDEX))
        items.append(_compact(item))
        used.add(trace.sample_id)
    return items, used


def _stage_view(stage: SFTStage, trace: Trace) -> tuple[list[tuple[str, bool]], list[np.ndarray]]:
    """The segments and images a stage trains on: the whole trace, its reading or its pointing."""
    if stage.reading:
        return trace.reading()
    if stage.pointing:
        return trace.pointing()
    return trace.segments(), trace.images


def batch_indices(n_items: int, batch_size: int, seed: int, stage_index: int, step_in_stage: int) -> list[int]:
    """The items of one micro-batch: consecutive slices of seeded per-epoch permutations (stateless, for resume)."""
    start = step_in_stage * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_items)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 10_007 + epoch)
        out.append(int(torch.randperm(n_items, generator=generator)[offset]))
    return out


# ------------------------------------------------------------------ loss

def neighbour_boxes(vocab: BoxVocab) -> torch.Tensor:
    """``(num_boxes, 8)`` box indices of the same size at the 8 neighbouring cells (-1 outside the grid)."""
    table = torch.full((len(vocab), 8), -1, dtype=torch.long)
    offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    for index in range(len(vocab)):
        cell, size = vocab.split(index)
        row, col = divmod(cell, vocab.grid)
        for k, (dr, dc) in enumerate(offsets):
            r, c = row + dr, col + dc
            if 0 <= r < vocab.grid and 0 <= c < vocab.grid:
                table[index, k] = vocab.index(r * vocab.grid + c, size)
    return table


def final_turn_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` True on each row's last run of labelled tokens: the trace's final (answer) turn."""
    labelled = labels != IGNORE_INDEX
    out = torch.zeros_like(labelled)
    for row in range(labelled.shape[0]):
        positions = labelled[row].nonzero().flatten().tolist()
        if positions:
            start = end = positions[-1]
            while start > 0 and labelled[row, start - 1]:
                start -= 1
            out[row, start:end + 1] = True
    return out


def count_answer_labels(item: Mapping[str, torch.Tensor], digit_ids: Sequence[int]) -> torch.Tensor:
    """``(T,)`` for an encoded count trace: the count where its final turn first writes it (a
    one-digit number: ``4`` of ``It shows 4.``), -100 elsewhere; where the count head is trained
    (`sft_loss_sum`'s `count_weight`). Later copies (``\\boxed{4}``) are left out: there the
    head can read the count from the text already written (trained there to give the count, its ``E``
    matched the boxed digit on every item and the first on 0.22, docs/results.md)."""
    ids, trained = item["input_ids"], item["loss_mask"].bool()
    final = final_turn_mask(torch.where(trained, ids, IGNORE_INDEX)[None])[0]
    value = torch.full_like(ids, IGNORE_INDEX)
    for digit, token in enumerate(digit_ids):
        value[ids == token] = digit
    is_digit = value >= 0
    lone = (is_digit & ~F.pad(is_digit, (1, 0))[:-1] & ~F.pad(is_digit, (0, 1))[1:] & final).nonzero().flatten()
    labels = torch.full_like(ids, IGNORE_INDEX)
    if len(lone):
        labels[lone[0]] = value[lone[0]]
    return labels


def counted_cells(info: Mapping[str, Any], rows: int, cols: int) -> torch.Tensor:
    """``(rows, cols)`` cells over a count trace's last image (its last crop, or the original
    where it has none): 1 where a counted thing's centre (`Trace.info`'s ``counted_centres``)
    falls, 0 elsewhere."""
    left, top, right, bottom = info["crop_box"] or (0, 0, *info["image_size"])
    cells = torch.zeros(rows, cols, dtype=torch.long)
    for x, y in info["counted_centres"]:
        x, y = (x - left) / (right - left), (y - top) / (bottom - top)
        if 0 <= x < 1 and 0 <= y < 1:
            cells[int(y * rows), int(x * cols)] = 1
    return cells


def count_token_labels(item: Mapping[str, torch.Tensor], info: Mapping[str, Any], image_token_id: int,
                       subcells: int = 1) -> torch.Tensor:
    """``(T,)`` for an encoded count trace: at each token of its last image (the last crop, or the
    original where the trace has none) a bitmask of which of its ``subcells x subcells`` parts
    (bit ``row * subcells + col``) hold a counted thing's centre (`Trace.info`'s
    ``counted_centres``), -100 elsewhere; the targets of the count head (`SFTConfig.count_weight`,
    `count_cell_targets`)."""
    ids, s = item["input_ids"], subcells
    _, rows, cols = (int(v) for v in item["image_grid_thw"][-1])
    positions = (ids == image_token_id).nonzero().flatten()[-rows * cols:]
    cells = counted_cells(info, rows * s, cols * s)
    parts = cells.view(rows, s, cols, s).permute(0, 2, 1, 3).reshape(rows * cols, s * s)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[positions] = (parts << torch.arange(s * s)).sum(-1)
    return labels


def count_cell_targets(labels: torch.Tensor, subcells: int) -> torch.Tensor:
    """`count_token_labels` ``(..., T)`` -> ``(..., T * subcells**2)``: 1 where a token part holds a
    counted centre, 0 where not, -1 where the token is not labelled (token-major, as the count
    head's cells)."""
    bits = (labels[..., None].clamp(min=0) >> torch.arange(subcells ** 2, device=labels.device)) & 1
    return torch.where(labels[..., None] >= 0, bits, -1).flatten(-2)


def sft_loss_sum(model: Any, batch: Mapping[str, torch.Tensor], pointer_smoothing: float = 0.0,
                 neighbours: torch.Tensor | None = None, pointer_weight: float = 1.0,
                 answer_weight: float = 1.0, count_weight: float = 0.0,
                 parts: dict[str, float] | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of a collated batch, and their count.

    Positions labelled ``-100`` (prompts, tool outputs, deliberate mistakes, padding) add
    nothing. With `pointer_smoothing` > 0 a box-token target keeps ``1 - s`` of its mass
    and gives ``s`` evenly to the same-size boxes of its neighbouring cells (`neighbours`);
    pointer targets (box and frame-window tokens) weigh `pointer_weight` and the tokens of the final turn (the answer,
    read from the last image) weigh `answer_weight` (the count stays the number of labelled tokens).
    With `count_weight` > 0 and ``count_labels`` / ``count_token_labels`` in the batch
    (`count_answer_labels`, `count_token_labels`), the count head's binary cross-entropy of each
    token of the latest image against whether it holds a counted thing, at each position that
    predicts a count answer, is added with that weight; `parts`, if given, receives its sum
    (``count_loss``) and the number of such positions (``count_answers``).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask", "count_labels", "count_token_labels")}
    labels = batch["labels"][:, 1:]
    final_turn = final_turn_mask(labels) if answer_weight != 1.0 else None
    # Logits only where some row has a label (the LM head over the whole vocabulary is a
    # large share of a small model's step); position t predicts token t + 1.
    positions = (labels != IGNORE_INDEX).any(0).nonzero().flatten()
    outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
    logits = outputs.logits.float()
    labels = labels[:, positions]
    keep = labels != IGNORE_INDEX
    logprobs = F.log_softmax(logits[keep], dim=-1)
    targets = labels[keep]
    nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
    start = getattr(model.config, "box_token_start_id", None)
    if pointer_smoothing > 0 and start is not None and neighbours is not None:
        is_box = (targets >= start) & (targets < start + model.config.num_boxes)
        if bool(is_box.any()):
            near = neighbours.to(targets.device)[targets[is_box] - start]
            valid = near >= 0
            near_lp = logprobs[is_box].gather(-1, (near.clamp(min=0) + start)) * valid
            smooth = -near_lp.sum(-1) / valid.sum(-1).clamp(min=1)
            nll = nll.clone()
            nll[is_box] = (1 - pointer_smoothing) * nll[is_box] + pointer_smoothing * smooth
    if pointer_weight != 1.0 and start is not None:
        nll = torch.where(targets >= start, pointer_weight * nll, nll)
    if final_turn is not None:
        nll = torch.where(final_turn[:, positions][keep], answer_weight * nll, nll)
    total = nll.sum()
    if count_weight > 0 and "count_token_labels" in batch:
        if getattr(outputs, "count_scores", None) is None:
            raise ValueError("count_weight needs a model with a count head (TinyVLMConfig.count_head)")
        asked = batch["count_labels"][:, 1:][:, positions] != IGNORE_INDEX
        rows = asked.nonzero()[:, 0]
        is_image = batch["input_ids"] == model.config.image_token_id
        labels = image_slots(batch["count_token_labels"][..., None], is_image,
                             outputs.count_held.shape[1])[0][..., 0][rows]  # (answers, images, T)
        targets = count_cell_targets(labels, getattr(model.config, "count_subcells", 1))
        valid = (targets >= 0) & outputs.count_held[rows]
        error = F.binary_cross_entropy_with_logits(outputs.count_scores[asked].float()[valid],
                                                   targets[valid].float(), reduction="sum")
        total = total + count_weight * error
        if parts is not None:
            parts["count_loss"] = parts.get("count_loss", 0.0) + float(error.detach())
            parts["count_answers"] = parts.get("count_answers", 0.0) + int(asked.sum())
    return total, int(keep.sum())


# ------------------------------------------------------------------ evaluation

def eval_sample_ids(tasks: TaskSpec, n_per_family: int, first_seed: int, exclude: set[str]) -> list[str]:
    """Held-out sample ids: `n_per_family` per family from `first_seed` on, skipping `exclude`."""
    ids = []
    for family in tasks:
        seed = first_seed
        for _ in range(n_per_family):
            while f"{family}/{seed}" in exclude:
                seed += 1
            ids.append(f"{family}/{seed}")
            seed += 1
    return ids


@torch.no_grad()
def oracle_op_scores(model: Any, processor: Any, traces: Sequence[Trace], source: TaskSource,
                     batch_size: int = 16, max_new_tokens: int = 32, reading: bool = False) -> list[float]:
    """Reading apart from pointing: each trace is given up to its final turn (the oracle's
    operations and what they returned), the final turn is generated greedily and scored
    against the sample's answers. One score per trace, in order. With `reading`, each is
    given as a reading stage's item instead (`Trace.reading`: the question with the last
    observation alone), the form a model fresh from a reading stage knows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    end = processor.tokenizer.convert_tokens_to_ids(IM_END)
    scores = []
    try:
        for start in range(0, len(traces), batch_size):
            chunk = traces[start:start + batch_size]
            views = [t.reading() if reading else (t.segments(), t.images) for t in chunk]
            items = [encode_segments(processor, segments[:-1], images) for segments, images in views]
            inputs = model_inputs(pad_items(processor, items, "left"), device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                 pad_token_id=processor.tokenizer.pad_token_id)
            for trace, ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
                answer = extract_answer(processor.tokenizer.decode(ids, skip_special_tokens=True))
                sample = source.get(trace.sample_id)
                scores.append(0.0 if answer is None else
                              score_answer(answer, sample.answers, sample.answer_type, sample.choices))
    finally:
        model.train(was_training)
    return scores


def evaluate(model: Any, processor: Any, chat_format: ChatFormat, tasks: TaskSpec, sample_ids: Sequence[str],
             batch_size: int = 16, max_new_tokens: int = 96, progress: bool = False,
             env_kwargs: Mapping[str, Any] | None = None, oracle_ops: bool = True,
             oracle_reading: bool = False) -> dict[str, float]:
    """Closed-loop greedy evaluation: the model plays `sample_ids` in the env; metrics per family and overall.

    Keys: ``accuracy``, ``rapr``, ``mean_ops``, ``op_error_rate``, ``crop_iou``, ``crop_hit``,
    ``answered``, ``acc_with_ops`` / ``acc_without_ops`` (accuracy of the episodes that did /
    did not run an operation), ``acc_when_hit`` (accuracy of the episodes whose last crop held
    the evidence), ``frames_hit`` (the share of the episodes that selected video frames whose
    last selection holds an evidence frame), each also as ``<family>/<key>``; per tier of a
    family (`_tier_metrics`) ``<family>/<tier>/accuracy``, ``/mean_ops``, ``/episodes``. With `oracle_ops`, also
    ``acc_oracle_ops``: the accuracy of answers given after the oracle's single operation
    and its output (an ``image/single`` or ``video/single`` trace with the model's box
    writing, `oracle_op_scores`) on the same samples where one can be played: reading apart
    from pointing, on every sample rather than on the model's hits only; with `oracle_reading`
    also ``acc_oracle_reading``, the same answers asked in a reading stage's item form. For a tiny model
    (box tokens) also ``box_hit_mass``: the probability that its first box, sampled at
    temperature 1 after the oracle's text, holds the evidence, and ``box_top_mass``, that of
    its most probable token (`agents.box_mass`): how far sampled pointing falls below greedy.
    The model is left in train mode.
    """
    was_training = model.training
    policy = TransformersPolicy(model, processor, temperature=0.0, max_new_tokens=max_new_tokens,
                                max_batch_size=batch_size, system=chat_format.system,
                                question_first=chat_format.question_first, vision_ids=chat_format.vision_ids)
    source = task_source(tasks)
    envs = [gym.make("PixelQA-v0", tasks=source, **dict(env_kwargs or {}))
            for _ in range(min(batch_size, len(sample_ids)))]
    try:
        trajectories = collect(policy, envs, samples=list(sample_ids), group_size=1, seed=0, progress=progress)
    finally:
        for env in envs:
            env.close()
        model.train(was_training)
    infos = [t.info for t in trajectories]
    out: dict[str, float] = {}
    for name, rows in [("", infos)] + [(f"{fam}/", [i for i in infos if i["family"] == fam])
                                       for fam in summarize_by(infos) if fam != "all"]:
        metrics = summarize(rows).as_dict()
        metrics["crop_hit"] = metrics.pop("crop_hit_rate")
        metrics.pop("episodes")
        with_ops = [float(i["score"]) for i in rows if int(i["n_visual_ops"]) > 0]
        without = [float(i["score"]) for i in rows if int(i["n_visual_ops"]) == 0]
        metrics["acc_with_ops"] = sum(with_ops) / len(with_ops) if with_ops else None
        metrics["acc_without_ops"] = sum(without) / len(without) if without else None
        hit = [float(i["score"]) for i in rows if i.get("crop_hit")]
        metrics["acc_when_hit"] = sum(hit) / len(hit) if hit else None
        selected = [i for i in rows if i.get("frames_hit") is not None]
        metrics["frames_hit"] = sum(bool(i["frames_hit"]) for i in selected) / len(selected) if selected else None
        out.update({f"{name}{k}": v for k, v in metrics.items() if v is not None})
    out.update(_tier_metrics(infos, source))
    if oracle_ops:
        boxes = box_vocab(model.config)
        traces = play_traces(source, sample_ids, options=trace_options(boxes, chat_format, env_kwargs))
        scores = oracle_op_scores(model, processor, traces, source, batch_size)
        out.update(_family_means("acc_oracle_ops", traces, scores))
        if oracle_reading:
            scores = oracle_op_scores(model, processor, traces, source, batch_size, reading=True)
            out.update(_family_means("acc_oracle_reading", traces, scores))
        if boxes is not None:
            padding = dict(env_kwargs or {}).get("crop_padding", ops.CROP_PADDING)
            images = [t for t in traces if t.kind == "image/single"]
            masses = first_box_hit_mass(model, processor, images, source, boxes, padding, batch_size)
            out.update(_family_means("box_hit_mass", images, [m["hit_mass"] for m in masses]))
            out.update(_family_means("box_top_mass", images, [m["top_mass"] for m in masses]))
    return out


def _tier_metrics(infos: Sequence[Mapping[str, Any]], source: TaskSource) -> dict[str, float]:
    """``<family>/<tier>/accuracy``, ``/mean_ops`` and ``/episodes`` for the episodes whose sample
    has a tier (a synthetic family's ``meta["tier"]``, e.g. count's shortcut / easy / hard)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for info in infos:
        tier = source.get(info["sample_id"]).meta.get("tier") if "sample_id" in info else None
        if tier is not None:
            groups.setdefault(f"{info['family']}/{tier}", []).append(info)
    out: dict[str, float] = {}
    for name, rows in sorted(groups.items()):
        out[f"{name}/accuracy"] = float(np.mean([float(i["score"]) for i in rows]))
        out[f"{name}/mean_ops"] = float(np.mean([int(i["n_visual_ops"]) for i in rows]))
        out[f"{name}/episodes"] = float(len(rows))
    return out


def _family_means(key: str, traces: Sequence[Trace], values: Sequence[float]) -> dict[str, float]:
    """``{key: mean, "<family>/key": mean per family}`` of one value per trace (empty when there are none)."""
    groups: dict[str, list[float]] = {"": list(values)} if values else {}
    for trace, value in zip(traces, values):
        groups.setdefault(f"{trace.info['family']}/", []).append(value)
    return {f"{name}{key}": float(np.mean(group)) for name, group in groups.items()}


def answer_only_bound(tasks: TaskSpec, sample_ids: Sequence[str]) -> dict[str, float]:
    """Mean score of the template reader without operations (an upper bound for answering from
    the initial view) and of chance, per family, on `sample_ids` (docs/tasks.md); the bound also
    per tier of a family whose samples have one (``<family>/<tier>/answer_only_bound``)."""
    from pxr_env.scoring import score_answer
    from pxr_env.tasks.synthetic import chance_score, reader_answer

    source = task_source(tasks)
    rows: dict[str, list[tuple[float, float]]] = {}
    tiers: dict[str, list[float]] = {}
    for sample_id in sample_ids:
        sample = source.get(sample_id)
        answer = reader_answer(sample, with_ops=False)
        score = score_answer(answer, sample.answers, sample.answer_type, sample.choices)
        rows.setdefault(sample.family, []).append((score, chance_score(sample)))
        if sample.meta.get("tier") is not None:
            tiers.setdefault(f"{sample.family}/{sample.meta['tier']}", []).append(score)
    out = {}
    for family, values in rows.items():
        out[f"{family}/answer_only_bound"] = float(np.mean([v[0] for v in values]))
        out[f"{family}/chance"] = float(np.mean([v[1] for v in values]))
    out.update({f"{name}/answer_only_bound": float(np.mean(scores)) for name, scores in sorted(tiers.items())})
    return out


# ------------------------------------------------------------------ training

def _build(config: SFTConfig) -> tuple[Any, Any]:
    if config.init_from is not None:
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(config.init_from)
        overrides = {k: v for k, v in config.model.items() if k not in FRAME_VOCAB_KEYS}
        if overrides.get("count_head"):  # configs saved before the head lack the digit ids
            overrides.setdefault("digit_token_ids", digit_token_ids(processor.tokenizer))
        saved = AutoConfig.from_pretrained(config.init_from)
        model = load_model(config.init_from, dtype=config.dtype, device=config.device, config_overrides=overrides)
        if overrides.get("pointer_match_encoder") and not getattr(saved, "pointer_match_encoder", False):
            # a new match encoder starts from the trained image encoder, not from random weights
            model.pointer.match_encoder.load_state_dict(model.model.vision.state_dict())
        lengths = config.model.get("frame_windows")
        if lengths and list(lengths) != list(getattr(model.config, "frame_windows", [])):
            model, processor = with_frame_windows(model, processor, lengths, config.model.get("max_frames", 16))
        return model, processor
    fresh = TinyVLMConfig(**config.model)
    boxes = box_vocab(fresh)
    processor = build_tiny_processor(boxes=None if boxes == BoxVocab() else boxes, frames=frame_windows(fresh))
    return build_tiny_model(processor, seed=config.seed, **config.model).to(config.device), processor


def save_model(model: Any, processor: Any, chat_format: ChatFormat, env_kwargs: Mapping[str, Any],
               directory: str | Path) -> Path:
    """Save model (safetensors), processor, chat format and env settings so
    `TransformersPolicy.from_pretrained` loads them."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    save_chat_format(chat_format, directory)
    save_env_settings(env_kwargs, directory)
    return directory


def lr_position(step: int, minutes: float, max_steps: int, max_minutes: float | None) -> int:
    """The step of the cosine schedule that step `step` takes, `minutes` into a budget of
    `max_minutes` (None: steps alone): the further of the two, so that the schedule ends
    with whichever budget runs out first."""
    if max_minutes is None or max_minutes <= 0:
        return step
    return max(step, min(int(max_steps * minutes / max_minutes), max_steps - 1))


def _stage_at(config: SFTConfig, step: int, minutes: float, starts: list[int]) -> int:
    """Index of the stage that step `step` belongs to, given the steps at which stages began."""
    index = len(starts) - 1
    stage = config.stages[index]
    if index + 1 < len(config.stages) and (
            stage.steps is not None and step - starts[index] >= stage.steps
            or stage.minutes is not None and minutes >= sum(s.minutes or 0 for s in config.stages[:index + 1])):
        starts.append(step)
        index += 1
    return index


def _pretrain_vision(config: SFTConfig, model: Any, processor: Any) -> tuple[float, list[str], dict[str, float]]:
    """Run `config.vision_pretrain` in order; returns their minutes, the sample ids of their images
    and their last records (keys ``pretrain/...``, then ``pretrain2/...`` and on for later ones).

    Each one's curve (loss and held-out accuracy every 50 of its steps) goes to a run folder
    of its own, ``out/pretrain`` (then ``out/pretrain2``, ...): its steps are not the SFT's.
    With the ``"pooled"`` glyph head the loss first sits at that of the class prior for several
    hundred steps, as many as the model's initialisation makes it (docs/results.md).
    """
    bounds = ops.PixelBounds.resolve(config.env_kwargs.get("pixel_bounds", "tiny"))
    minutes, ids, records = 0.0, set(), {}
    rank, _ = distributed.rank_and_world()
    for index, pretrain in enumerate(config.vision_pretrain):
        source, seed = task_source(pretrain.tasks or config.stages[0].tasks), config.seed * 1000 + 999 - index
        if pretrain.target == "dense":
            images, labels, used = evidence_crops(source, pretrain.samples, seed, bounds.crop)
        elif pretrain.target == "view":
            images, labels, used = initial_views(source, pretrain.samples, seed, bounds.image)
        elif pretrain.target == "frame-glyph":
            images, labels, used = frame_glyphs(source, pretrain.samples, seed, bounds.frame)
        elif pretrain.target == "frame-view":
            images, labels, used = initial_frames(source, pretrain.samples, seed, bounds.video)
        else:
            options = trace_options(box_vocab(model.config), config.chat_format, config.env_kwargs)
            images, labels, used = glyph_crops(source, pretrain.samples, seed, options, workers=config.trace_workers,
                                               progress=config.progress)
        tower = pretrain_tower(model, pretrain.tower)
        prefix = "pretrain/" if index == 0 else f"pretrain{index + 1}/"
        curve = (MetricLogger(Path(config.out) / prefix.rstrip("/"), resume_step=0 if config.resume else None)
                 if rank == 0 else None)
        record = pretrain_vision(tower, processor.image_processor, images, labels, pretrain, seed=config.seed,
                                 log=None if curve is None else curve.log, progress=config.progress,
                                 autocast=config.autocast_dtype)
        if curve is not None:
            curve.close()
        minutes += record["pretrain/minutes"]
        ids.update(used)
        records.update({prefix + key.removeprefix("pretrain/"): value for key, value in record.items()})
    return minutes, sorted(ids), records


def train_sft(config: SFTConfig, stop_after: int | None = None,
              on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run the warm start described by `config`; returns the last evaluation (``eval``), the step
    reached (``step``), the training minutes and the trained ``model``.

    `stop_after` ends the run after that many steps as if killed (tests of resume); `on_eval`
    is called with each evaluation's metrics.

    **Data parallel.** Under ``torchrun --nproc-per-node N`` (`agents.distributed`) every rank
    synthesizes the same traces, takes every N-th item of each batch, and the gradients are
    summed over ranks, so the update is the one-process update of the same global batch;
    the training clock is the ranks' mean, and rank 0 alone logs, evaluates and saves.
    """
    rank, world = distributed.rank_and_world()
    batch_sizes = [stage.batch_size or config.batch_size for stage in config.stages]
    batch_sizes += [pretrain.batch_size for pretrain in config.vision_pretrain]
    if min(batch_sizes) < world:
        raise ValueError(f"every batch size must be at least the number of processes ({world}), got {batch_sizes}")
    if rank > 0:
        config = replace(config, progress=False)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    checkpoints = out / "checkpoints"
    model, processor = _build(config)
    distributed.broadcast_parameters(model)
    latest = latest_checkpoint(checkpoints) if config.resume else None
    pretrain_minutes, pretrain_ids, pretrain_record = 0.0, [], None
    if config.vision_pretrain and latest is None:
        pretrain_minutes, pretrain_ids, pretrain_record = _pretrain_vision(config, model, processor)
    freeze_parameters(model, ["model.vision."] * config.freeze_vision + list(config.freeze))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trainable.values())
    stage_frozen = [matching_parameters(model, stage.freeze) for stage in config.stages]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = round(config.warmup_ratio * config.max_steps)
    step, minutes, starts = 0, pretrain_minutes, [0]
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        step, minutes, starts = state.step, float(state.extra["minutes"]), list(state.extra["stage_starts"])
        pretrain_minutes = float(state.extra.get("pretrain_minutes", 0.0))
        pretrain_ids = list(state.extra.get("pretrain_ids", []))
    logger = MetricLogger(out, resume_step=step + 1 if config.resume else None) if rank == 0 else None

    def log(at: int, record: dict[str, float]) -> None:
        if logger is not None:
            logger.log(at, record)

    if pretrain_record is not None:
        log(0, pretrain_record)
    if rank == 0:
        resolved = {"autocast_dtype": str(config.autocast_dtype).removeprefix("torch.")}
        (out / "config.json").write_text(json.dumps(asdict(config) | resolved, indent=2, default=str) + "\n")
    boxes = box_vocab(model.config)
    neighbours = neighbour_boxes(boxes) if config.pointer_smoothing > 0 and boxes is not None else None
    pad_id = processor.tokenizer.pad_token_id
    stage_cache: dict[int, list[dict[str, torch.Tensor]]] = {}
    train_ids: set[str] = set(pretrain_ids)

    def items_of(index: int) -> list[dict[str, torch.Tensor]]:
        if index not in stage_cache:
            stage_cache.clear()  # stages only move forward: the items of the one before are not needed again
            stage_cache[index], used = stage_items(config, index, processor, boxes,
                                                   getattr(model.config, "count_subcells", 1))
            train_ids.update(used)
        return stage_cache[index]

    for index in range(len(starts)):  # the stages already reached, so held-out ids avoid them
        items_of(index)
    results: dict[str, Any] = {"step": step, "eval": {}}

    def run_eval() -> None:
        if rank == 0:
            ids = eval_sample_ids(config.eval_tasks, config.eval_samples, config.eval_seed, train_ids)
            metrics = evaluate(model, processor, config.chat_format, config.eval_tasks, ids, config.eval_batch_size,
                               config.max_new_tokens, progress=False, env_kwargs=config.env_kwargs)
            log(step, {f"eval/{k}": v for k, v in metrics.items()} | {"train/minutes": minutes})
            results["eval"] = metrics
            if on_eval is not None:
                on_eval(step, metrics)
        distributed.barrier()

    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="sft", unit="step", disable=not config.progress)
    window_loss, window_tokens, window_seen, window_time, window_count = 0.0, 0, 0, 0.0, [0.0, 0.0]
    while step < config.max_steps and (config.max_minutes is None or minutes < config.max_minutes):
        if stop_after is not None and step >= stop_after:
            break
        index = _stage_at(config, step, minutes - pretrain_minutes, starts)
        if index not in stage_cache:
            items = []  # the previous stage's items go before the next stage's are made
        items = items_of(index)
        for name, param in trainable.items():
            param.requires_grad_(name not in stage_frozen[index])
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch_size = config.stages[index].batch_size or config.batch_size
        micro = [[_expand(items[i]) for i in batch_indices(len(items), batch_size, config.seed, index,
                                                           (step - starts[index]) * config.grad_accum + k)[rank::world]]
                 for k in range(config.grad_accum)]
        batches = [{k: v.to(config.device) for k, v in collate(m, pad_id).items()} for m in micro]
        n_tokens = int(distributed.all_reduce_sum(sum(int((b["labels"] != IGNORE_INDEX)[:, 1:].sum())
                                                      for b in batches)))
        total, parts = 0.0, {}
        for batch in batches:
            with torch.autocast(torch.device(config.device).type, dtype=config.autocast_dtype,
                                enabled=config.autocast_dtype is not None):
                loss_sum, _ = sft_loss_sum(model, batch, config.pointer_smoothing, neighbours, config.pointer_weight,
                                           config.answer_weight, config.count_weight, parts)
            (loss_sum * world / max(n_tokens, 1)).backward()
            total += loss_sum.item()
        if world > 1:  # a rank whose items never reach a parameter still takes part in its all-reduce
            for param in params:
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
            distributed.average_gradients(model)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        position = lr_position(step, minutes - pretrain_minutes, config.max_steps,
                               None if config.max_minutes is None else config.max_minutes - pretrain_minutes)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_factor(position, warmup_steps, config.max_steps, config.min_lr_ratio)
        optimizer.step()
        step += 1
        elapsed = distributed.all_reduce_sum(time.perf_counter() - tick) / world
        minutes += elapsed / 60
        window_loss, window_tokens = window_loss + distributed.all_reduce_sum(total), window_tokens + n_tokens
        if config.count_weight > 0:
            window_count[0] += distributed.all_reduce_sum(parts.get("count_loss", 0.0))
            window_count[1] += distributed.all_reduce_sum(parts.get("count_answers", 0.0))
        window_seen += distributed.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in batches))
        window_time += elapsed
        bar.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            loss = window_loss / max(window_tokens, 1)
            record = {"train/loss": loss, "train/lr": optimizer.param_groups[0]["lr"],
                      "train/tokens_per_s": window_seen / max(window_time, 1e-9), "train/stage": index,
                      "train/minutes": minutes}
            if window_count[1]:
                record["train/count_loss"] = window_count[0] / window_count[1]
            log(step, record)
            bar.set_postfix(loss=f"{loss:.3f}", stage=index, min=f"{minutes:.1f}")
            window_loss, window_tokens, window_seen, window_time, window_count = 0.0, 0, 0, 0.0, [0.0, 0.0]
        if step in config.save_at_steps and rank == 0:
            save_model(model, processor, config.chat_format, config.env_kwargs, out / f"model-step{step}")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and rank == 0:
            save_checkpoint(checkpoints, model, optimizer, None, step, capture_rng_states(),
                            extra={"minutes": minutes, "stage_starts": starts, "pretrain_minutes": pretrain_minutes,
                                   "pretrain_ids": pretrain_ids}, keep_last=config.keep_checkpoints)
        if config.eval_every and step % config.eval_every == 0:
            run_eval()
    bar.close()
    results["step"] = step
    finished = stop_after is None or step < stop_after
    if finished:
        if not (config.eval_every and step % config.eval_every == 0):
            run_eval()
        if rank == 0:
            save_model(model, processor, config.chat_format, config.env_kwargs, config.export_dir or out / "final")
        distributed.barrier()
    if logger is not None:
        logger.close()
    results["minutes"] = minutes
    results["model"] = model
    return results


# ------------------------------------------------------------------ presets and CLI

ZOOM_EASY = {"zoom-read": {"shortcut_share": 0.0, "hard_share": 0.0, "questions": ["read", "read-choice"],
                           "distractors": [0, 4], "backgrounds": ["plain"]}}
ZOOM_MID = {"zoom-read": {"shortcut_share": 0.0, "hard_share": 0.3, "questions": ["read", "read-choice"],
                          "distractors": [5, 15], "backgrounds": ["plain", "noise"]}}
ZOOM_ALL = {"zoom-read": {"questions": ["read", "read-choice"]}}

ZOOM_READ_WIDE = {"zoom-read": {"shortcut_share": 0.0, "hard_share": 0.3, "questions": ["read", "read-choice"],
                                "distractors": [0, 15], "backgrounds": ["plain", "noise"]}}

ZOOM_CLUTTER = {"zoom-read": {"shortcut_share": 0.0, "hard_share": 0.0, "questions": ["read", "read-choice"]}}

WARMSTART: dict[str, Any] = dict(
    model={"hidden_size": 128, "intermediate_size": 384, "vision_num_layers": 1, "token_conv": True,
           "stem_norm": True, "image_summary": True, "pointer_grid": 28, "pointer_subcells": 2,
           "pointer_stem": True, "box_sizes": [0.05, 0.12, 0.25, 0.45]},
    env_kwargs={"crop_padding": 0.02, "pixel_bounds": {"crop": [112 * 112, 112 * 112]}},
    vision_pretrain=VisionPretrainConfig(
        tasks={"zoom-read": {**ZOOM_READ_WIDE["zoom-read"], "hard_share": 0.0, "questions": ["read"]}},
        samples=9600, steps=3000, minutes=4.5, batch_size=32, lr=1e-3, held_out=200, glyph_head="pooled"),
    freeze=["model.vision"],
    stages=[
        SFTStage(tasks=ZOOM_READ_WIDE, n_pixel=6000, image_mix={"image/single": 1.0}, minutes=3.5, reading=True,
                 batch_size=32, freeze=["pointer.stem"]),
        SFTStage(tasks=ZOOM_CLUTTER, n_pixel=6000, image_mix={"image/single": 1.0}, minutes=6.0, pointing=True,
                 batch_size=32),
        SFTStage(tasks=ZOOM_EASY, n_pixel=1500, image_mix={"image/single": 1.0}, minutes=1.5),
        SFTStage(tasks=ZOOM_MID, n_pixel=1500, image_mix={"image/single": 1.0}, minutes=1.5),
        SFTStage(tasks={"zoom-read": {**ZOOM_ALL["zoom-read"], "shortcut_share": 0.2}}, n_pixel=2500, n_text=500,
                 image_mix={"image/single": 0.85, "image/recrop-once": 0.15}),
    ],
    max_steps=2400, max_minutes=20.0, batch_size=8, lr=2e-3, warmup_ratio=0.04, pointer_weight=5.0,
    eval_every=0, eval_tasks=ZOOM_ALL, eval_samples=100, checkpoint_every=100,
    autocast="auto",
)

POINTING_WITH_BIG_TAGS: dict[str, Any] = dict(
    tasks={"zoom-read": {**ZOOM_CLUTTER["zoom-read"], "shortcut_share": 0.1}}, batch_size=16)
"""The float32 preset's pointing stage: batches of 16, and a tenth of its items shortcut items,
whose big tags take the larger box sizes. Otherwise only the last stage's shortcut items show a
size other than the smallest, and a model may carry that size to small tags (docs/results.md)."""

CHART_POSTERS = {"chart": {"questions": ["poster"], "shortcut_share": 0.0}}
CHART_POINTING = {"chart": {"shortcut_share": 0.0}}
CHART_ALL = {"chart": {}}
MATCH_ENCODER_FROZEN = ["model.vision", "pointer.match_encoder"]

CHART_FROM_WARMSTART: dict[str, Any] = dict(
    init_from="checkpoints/tiny-warmstart",
    model={"pointer_match": True, "pointer_match_features": "both", "pointer_match_encoder": True,
           "box_slot_token_id": 338},  # 338: the " [" that opens a box in the shipped tokenizer
    vision_pretrain=[
        VisionPretrainConfig(target="view", tower="match", tasks=CHART_POSTERS, samples=4000, steps=100_000,
                             minutes=7.0, batch_size=32, lr=3e-3),
        VisionPretrainConfig(target="view", tower="match", tasks=CHART_POINTING, samples=4000, steps=100_000,
                             minutes=5.0, batch_size=32, lr=3e-3)],
    freeze=[],
    stages=[
        SFTStage(tasks=CHART_POINTING, n_pixel=4000, image_mix={"image/single": 1.0}, pointing=True, batch_size=32,
                 minutes=8.0, freeze=MATCH_ENCODER_FROZEN),
        SFTStage(tasks=CHART_ALL, n_pixel=4000, image_mix={"image/single": 1.0}, reading=True, batch_size=32,
                 minutes=6.0, freeze=["pointer"]),
        SFTStage(tasks=CHART_ALL, n_pixel=3000, n_text=300, image_mix={"image/single": 1.0}, minutes=7.0,
                 freeze=["pointer.match_encoder"]),
        SFTStage(tasks={**CHART_ALL, **ZOOM_READ_WIDE}, n_pixel=4000, image_mix={"image/single": 1.0}, reading=True,
                 batch_size=32, minutes=3.0, freeze=["pointer"]),
        SFTStage(tasks={"zoom-read": {**ZOOM_CLUTTER["zoom-read"], "shortcut_share": 0.1}, **CHART_POINTING},
                 n_pixel=3000, image_mix={"image/single": 1.0}, pointing=True, batch_size=16, minutes=3.0,
                 freeze=MATCH_ENCODER_FROZEN),
        SFTStage(tasks={**CHART_ALL, "zoom-read": {**ZOOM_ALL["zoom-read"], "shortcut_share": 0.2}}, n_pixel=3000,
                 n_text=300, image_mix={"image/single": 1.0}, freeze=["pointer.match_encoder"]),
    ],
    max_steps=100_000, max_minutes=44.0, batch_size=8, lr=1e-3, min_lr_ratio=0.3, warmup_ratio=0.04,
    pointer_weight=5.0, eval_every=0, eval_tasks=CHART_ALL, eval_samples=100, checkpoint_every=200,
    autocast="auto",
)
"""The chart family on top of the shipped warm start, one run of 44 minutes (docs/results.md, "The
chart family in one run"): the pointer's own image encoder (a copy of the warm start's) is taught
the words that name a page's parts on chart views, then chart pointing with both match terms
(bars by colour, panels and cells by words) with the encoders frozen, chart reading and traces,
then reading, pointing and traces of charts and zoom-read mixed, so that zoom-read is kept."""

PRESETS: dict[str, dict[str, Any]] = {
    "warmstart": WARMSTART,
    "warmstart-float32": dict(
        WARMSTART,
        vision_pretrain=replace(WARMSTART["vision_pretrain"], minutes=4.0, glyph_head="both"),
        stages=[replace(stage, minutes=minutes, **(POINTING_WITH_BIG_TAGS if stage.pointing else {}))
                for stage, minutes in zip(WARMSTART["stages"], (5.5, 7.0, 1.5, 1.0, None), strict=True)],
    ),
    "chart": CHART_FROM_WARMSTART,
}
"""Named configurations (`--preset`). ``warmstart`` is the documented warm start: 20 minutes on
two processes (``torchrun --standalone --nproc-per-node 2 -m agents.sft``), bfloat16 autocast
where the CPU computes it natively;
vision pretraining, a reading stage, six minutes of pointing in the default clutter, then
whole traces from uncluttered to the default suite (docs/results.md). ``warmstart-float32``
is its schedule for a CPU without native bfloat16, where the 20 minutes make fewer steps (872
against 2,087 on the machines measured): the minutes moved toward reading and pointing,
pointing batches of 16 with a tenth of big-tag items (`POINTING_WITH_BIG_TAGS`), and the glyph pretraining's token and pooled heads together (docs/results.md, "On a CPU without native
bfloat16"). ``chart`` continues from the shipped warm start (`CHART_FROM_WARMSTART`)."""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.sft --preset warmstart --out runs/warmstart [--export DIR] [--resume]``; with
    ``torchrun --nproc-per-node N -m agents.sft ...`` data parallel over N processes."""
    parser = argparse.ArgumentParser(prog="python -m agents.sft", description="Warm start (SFT) of the tiny VLM.")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="warmstart", help="named configuration")
    parser.add_argument("--config", help="JSON file of SFTConfig fields, applied over the preset")
    parser.add_argument("--export", help="folder of the final model (default OUT/final)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    parser.add_argument("--max-minutes", type=float, help="training-time budget")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of the schedule")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per process)")
    parser.add_argument("--autocast", choices=["auto", "bfloat16", "float16", "none"],
                        help="mixed-precision training forward passes (none: float32; auto: bfloat16 where native)")
    parser.add_argument("--device", help="where to train, e.g. cuda (default: the config's, cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype of an init_from model (default: the config's, float32)")
    parser.add_argument("--seed", type=int, help="seed of the initialisation, traces and batch order (default: the preset's)")
    parser.add_argument("--evaluate", metavar="MODEL_DIR",
                        help="only evaluate a saved model (closed loop) and the answer-only bound; results to OUT "
                             "(in the env of its saved env settings; the env_kwargs of --config apply over them)")
    parser.add_argument("--eval-tasks", help="JSON task spec of --evaluate, e.g. '{\"zoom-read\": {}}'")
    parser.add_argument("--eval-samples", type=int, default=100, help="held-out samples per family of --evaluate")
    parser.add_argument("--eval-seed", type=int, default=SFTConfig.eval_seed,
                        help="seed of the first held-out sample of --evaluate (default: %(default)s)")
    parser.add_argument("--oracle-reading", action="store_true",
                        help="--evaluate also reports acc_oracle_reading (the oracle's crop as a reading-stage item)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        from transformers import AutoProcessor

        policy = TransformersPolicy.from_pretrained(args.evaluate)
        tasks = json.loads(args.eval_tasks) if args.eval_tasks else ZOOM_ALL
        ids = eval_sample_ids(tasks, args.eval_samples, args.eval_seed, set())
        env_kwargs = {**policy.env_kwargs,
                      **(json.loads(Path(args.config).read_text()).get("env_kwargs", {}) if args.config else {})}
        metrics = evaluate(policy.model, AutoProcessor.from_pretrained(args.evaluate),
                           policy.chat_format, tasks, ids,
                           progress=not args.no_progress, env_kwargs=env_kwargs,
                           oracle_reading=args.oracle_reading) | answer_only_bound(tasks, ids)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval.json").write_text(json.dumps({"model": args.evaluate, "tasks": tasks,
                                                              "samples": args.eval_samples, **metrics}, indent=2))
        print(json.dumps(metrics, indent=2))
        return 0
    fields = dict(PRESETS[args.preset])
    if args.config:
        overrides = json.loads(Path(args.config).read_text())
        if overrides.get("init_from") is not None:  # the preset's fresh-model settings do not apply to a saved model
            for name in ("model", "vision_pretrain"):
                if name not in overrides:
                    fields.pop(name, None)
        fields.update(overrides)
    config = SFTConfig(**fields)
    config = replace(config, out=args.out, export_dir=args.export, resume=args.resume, progress=not args.no_progress,
                     max_minutes=args.max_minutes if args.max_minutes is not None else config.max_minutes,
                     max_steps=args.max_steps or config.max_steps,
                     seed=args.seed if args.seed is not None else config.seed,
                     autocast={None: config.autocast, "none": None}.get(args.autocast, args.autocast),
                     device=args.device or config.device,
                     dtype=args.dtype or config.dtype)
    distributed.init()
    results = train_sft(config)
    if distributed.rank_and_world()[0] == 0:
        print(json.dumps({"step": results["step"], "minutes": round(results["minutes"], 2), "eval": results["eval"]},
                         indent=2))
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
