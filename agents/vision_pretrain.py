"""Pretraining of the tiny model's image encoder on the crops its warm-start traces show.

A real VLM comes with a pretrained vision tower that already reads text in images; the
paper's warm start assumes one. The tiny model starts from scratch, and through the whole
decoder it learns to read a glyph that fills a fifth of its crop very slowly
(docs/results.md), while its image encoder alone, trained to name the glyph, learns it
within a few hundred steps. This stage gives the tiny model that pretrained tower: the
encoder names the target's glyph from the crops of ``image/single`` traces (played
through the env with the run's box writer and env settings, so they are the crops the
policy will see), through a linear head on the token that holds the glyph's centre,
which is dropped afterwards.
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
from agents.vlm.tiny.modeling_tiny_vlm import run_per_image
from pxr_env.ops import smart_resize
from pxr_env.tasks import TaskSource
from pxr_env.tasks.synthetic.chart import WORDS
from pxr_env.tasks.synthetic.common import COLOUR_NAMES, DIGITS, LETTERS, SHAPES, crop_view

GLYPHS: tuple[str, ...] = (*DIGITS, *LETTERS)
"""The classes of the glyph head: every glyph the zoom-read family draws."""
OBJECTS: tuple[str, ...] = (*GLYPHS, *(f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES), *WORDS)
"""The classes of the dense head: the glyphs of charts, the coloured shapes of counts and the
words that name a chart's parts."""
REGION_LATTICE = 56
"""Points per side of the page at which a chart region marks the tokens it covers (finer than any token grid)."""

Points = list[tuple[float, float, int]]
"""Objects a crop shows: centre ``(x, y)`` as fractions of the crop's width and height, index in `OBJECTS`."""


@dataclass
class VisionPretrainConfig:
    """How long and on what the image encoder is pretrained (`SFTConfig.vision_pretrain`)."""

    tasks: dict[str, dict[str, Any]] | None = None
    """Task spec of the crops (None: the first SFT stage's)."""
    target: str = "glyph"
    """``"glyph"``: name the target glyph of zoom-read crops on the token that holds its centre
    (`glyph_crops`); ``"frame-glyph"``: the same head on the selected frames of video digit
    items, where the digit flashes (`frame_glyphs`: glyphs at frame scale, a few pixels tall);
    ``"dense"``: mark
    on every token the glyphs and coloured shapes whose centre it holds, on crops around
    the evidence of chart, count and zoom-read samples (`evidence_crops`); ``"view"``: mark
    on every token of the initial views (`initial_views`), where the policy points, the
    coloured shapes whose centre it holds (count, zoom-read) or the words that name the part
    of a chart it lies in (a table cell's row and column, a panel's heading); ``"frame-view"``:
    the same on every frame of video clips as first shown (`initial_frames`: the asked objects'
    coloured shapes, and the digit in the frames where it flashes)."""
    glyph_head: str = "token"
    """Where the glyph target's head reads: ``"token"``, the token that holds the glyph's centre
    (it leaves the loss of the class prior within 100-200 steps), or ``"pooled"``, the image's
    tokens max-pooled (it sits there for 400 to more than 1,000 steps, by the model's
    initialisation; the shipped warm start was pretrained so), or ``"both"``: the token head's
    loss plus that of a second linear head on the max-pooled tokens (the token head gets out of
    the plateau, the pooled one asks for the glyph in the image's strongest features, which the
    image-summary branch adds to every token; the logged loss is the sum of the two)."""
    tower: str = "encoder"
    """What is pretrained: ``"encoder"``, the image encoder the decoder reads, ``"pointer"``,
    the pointer head's own stem (`TinyVLMConfig.pointer_stem`), whose features are added to
    the pointer's keys, or ``"match"``, the image encoder of the pointer's match term
    (`TinyVLMConfig.pointer_match_encoder`): pointing then gets features of its own without
    moving what the decoder reads."""
    samples: int = 3000
    """Crops synthesized (``image/single`` traces of the task spec; held out of evaluation); for
    ``"frame-glyph"``, clips drawn, each giving a window per evidence frame; for ``"frame-view"``,
    clips drawn, each giving its 16 frames."""
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
        if self.target not in ("glyph", "frame-glyph", "dense", "view", "frame-view"):
            raise ValueError("vision pretraining target must be 'glyph', 'frame-glyph', 'dense', 'view' or 'frame-view', "
                             f"got {self.target!r}")
        if self.tower not in ("encoder", "pointer", "match"):
            raise ValueError(f"vision pretraining tower must be 'encoder', 'pointer' or 'match', got {self.tower!r}")
        if self.glyph_head not in ("token", "pooled", "both"):
            raise ValueError(f"vision pretraining glyph_head must be 'token', 'pooled' or 'both', got {self.glyph_head!r}")
        if self.target in ("glyph", "frame-glyph") and self.tower == "pointer":
            raise ValueError("the pointer stem is pretrained on a dense target ('dense', 'view' or 'frame-view'), "
                             f"not {self.target!r}")
        if self.lr <= 0 or self.minutes is not None and self.minutes <= 0:
            raise ValueError("vision pretraining needs lr > 0 and minutes > 0 when set")


def glyph_crops(source: TaskSource, n: int, seed: int, options: TraceOptions,
                workers: int = 1, progress: bool = False) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """Crops of `n` zoom-read ``image/single`` traces, the target's glyph in each (`Points`: its
    centre in the crop and its index in `GLYPHS`), and the sample ids used. Samples without a
    single target glyph (colour and relative questions) are skipped."""
    traces = synthesize_traces(source, n, 0, mix=TraceMix(image={"image/single": 1.0}, video_share=0.0), seed=seed,
                               options=options, workers=workers, progress=progress)
    images, points, ids = [], [], []
    for trace in traces:
        sample = source.get(trace.sample_id)
        targets = sample.meta.get("targets", ())
        if sample.family != "zoom-read" or len(targets) != 1 or len(trace.images) != 2:
            continue
        left, top, right, bottom = trace.info["crop_box"]
        gx0, gy0, gx1, gy1 = targets[0]["glyph_box"]
        x, y = ((gx0 + gx1) / 2 - left) / (right - left), ((gy0 + gy1) / 2 - top) / (bottom - top)
        images.append(trace.images[1])
        points.append([(min(max(x, 0.0), 0.999), min(max(y, 0.0), 0.999), GLYPHS.index(targets[0]["glyph"]))])
        ids.append(trace.sample_id)
    if not images:
        raise ValueError("vision pretraining found no zoom-read crop with one target glyph in its task spec")
    return images, points, ids


def drawn_apart(n: int, seed: int, salt: int, draw: Callable[[np.random.Generator], list[Any]]) -> list[Any]:
    """``draw(rng)`` for the items ``0 .. n-1``, each with a generator of its own (``[seed, salt, i]``),
    shared out over the processes (`agents.distributed`) and gathered on every one, in item order:
    the same results for any number of processes, each process drawing its share (a clip costs
    tens of milliseconds)."""
    rank, world = distributed.rank_and_world()
    mine = [(i, draw(np.random.default_rng([seed, salt, i]))) for i in range(rank, n, world)]
    return [result for _, items in sorted(distributed.gather_objects(mine), key=lambda pair: pair[0])
            for result in items]


def _video_pieces(source: TaskSource, n: int, seed: int, salt: int, target: str, items: str,
                  pieces: Callable[[Any, np.random.Generator], list[tuple[np.ndarray, Points, str]]]
                  ) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """`pieces(sample, rng)` over `n` video samples drawn apart (`drawn_apart`), as images, points and ids
    (`target` and `items` name the target and what it reads, for the errors)."""
    def draw(rng: np.random.Generator) -> list[tuple[np.ndarray, Points, str]]:
        sample = source.sample(rng)
        if sample.family != "video":
            raise ValueError(f"the {target} target reads video samples, not {sample.family!r}")
        return pieces(sample, rng)

    drawn = drawn_apart(n, seed, salt, draw)
    if not drawn:
        raise ValueError(f"vision pretraining found no {items} item in its task spec")
    images, points, ids = (list(column) for column in zip(*drawn))
    return images, points, ids


def frame_glyphs(source: TaskSource, n: int, seed: int, frame_bounds: tuple[int, int]
                 ) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """Windows of the evidence frames of `n` video digit samples, the flashing digit in each
    (`Points`: its centre and its index in `GLYPHS`), and the sample id of each window.

    Every evidence frame is resized as `select_frames` shows it (within `frame_bounds`), then
    a window of half its width and height, at a random place that holds the digit, is cut at
    that scale: the encoder sees the glyph as the policy will, for a quarter of a frame's
    tokens, and each clip gives two or three windows. Samples of the other video kinds are
    drawn and skipped. The clips are drawn apart over the processes (`drawn_apart`).
    """
    def windows(sample: Any, rng: np.random.Generator) -> list[tuple[np.ndarray, Points, str]]:
        target = sample.meta["target"]
        if sample.meta["kind"] != "digit":
            return []
        frames, out = sample.load_frames(), []
        gx0, gy0, gx1, gy1 = target["glyph_box"]
        for number in sample.evidence_frames:
            shown = smart_resize(frames[number - 1], frame_bounds)
            (height, width), (shown_h, shown_w) = frames.shape[1:3], shown.shape[:2]
            x, y = (gx0 + gx1) / 2 / width * shown_w, (gy0 + gy1) / 2 / height * shown_h
            win_w, win_h = shown_w // 2, shown_h // 2
            left = int(rng.integers(max(0, int(x) - win_w + 1), min(int(x), shown_w - win_w) + 1))
            top = int(rng.integers(max(0, int(y) - win_h + 1), min(int(y), shown_h - win_h) + 1))
            out.append((np.ascontiguousarray(shown[top:top + win_h, left:left + win_w]),
                        [((x - left) / win_w, (y - top) / win_h, GLYPHS.index(target["digit"]))], sample.sample_id))
        return out

    return _video_pieces(source, n, seed, 17, "frame-glyph", "video digit", windows)


def _shown_objects(sample: Any, glyphs: bool = True) -> list[tuple[tuple[float, float, float, float], int]]:
    """Boxes (pixels of the original) and `OBJECTS` indices of what a chart, count or zoom-read
    sample draws (zoom-read: each tag's shape and its glyph; the untagged clutter is not recorded).
    Without `glyphs` the coloured shapes alone (glyphs are illegible in an initial view)."""
    if sample.family == "zoom-read":
        return [item for tag in sample.meta["tags"] for item in
                ((tag["box"], OBJECTS.index(f"{tag['colour']} {tag['shape']}")),
                 (tag["glyph_box"], OBJECTS.index(tag["glyph"])))[:2 if glyphs else 1]]
    if sample.family == "chart":
        if not glyphs:
            raise ValueError("a chart's view target is its regions' words (`region_points`), not shapes")
        return [(box, OBJECTS.index(char)) for value in sample.meta["values"]
                for char, box in zip(value["text"], value["glyph_boxes"]) if char in GLYPHS]
    if sample.family == "count":
        return [(obj["box"], OBJECTS.index(f"{obj['colour']} {obj['shape']}")) for obj in sample.meta["objects"]]
    raise ValueError(f"dense pretraining reads chart, count and zoom-read samples, not {sample.family!r}")


def evidence_crops(source: TaskSource, n: int, seed: int, crop_bounds: tuple[int, int],
                   jitter: float = 0.15) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """Crops around the evidence of `n` chart, count or zoom-read samples, as the env shows them, with the
    objects each one shows (`Points`) and its sample id.

    Each crop is a square (in fractions of the image, as the tiny model's box tokens are)
    of 1 to 1.4 times the evidence's larger side, its centre moved by up to `jitter` of the
    side, so that objects are seen at the scales and offsets the policy's crops give.
    """
    rng = np.random.default_rng([seed, 11])
    images, points, ids = [], [], []
    for _ in range(n):
        sample = source.sample(rng)
        image = sample.load_image()
        height, width = image.shape[:2]
        left, top, right, bottom = sample.evidence_box
        side = min(1.0, max((right - left) / width, (bottom - top) / height) * rng.uniform(1.0, 1.4))
        cx = (left + right) / 2 / width + rng.uniform(-jitter, jitter) * side
        cy = (top + bottom) / 2 / height + rng.uniform(-jitter, jitter) * side
        x0, y0 = float(np.clip(cx - side / 2, 0, 1 - side)), float(np.clip(cy - side / 2, 0, 1 - side))
        shown, (px0, py0, px1, py1) = crop_view(image, (x0 * width, y0 * height, (x0 + side) * width,
                                                       (y0 + side) * height), crop_bounds=crop_bounds)
        seen = [(((b[0] + b[2]) / 2 - px0) / (px1 - px0), ((b[1] + b[3]) / 2 - py0) / (py1 - py0), index)
                for b, index in _shown_objects(sample)]
        images.append(shown)
        points.append([(x, y, index) for x, y, index in seen if 0 <= x < 1 and 0 <= y < 1])
        ids.append(sample.sample_id)
    return images, points, ids


def region_points(sample: Any, width: int, height: int) -> Points:
    """`Points` of a chart's ``regions`` on a lattice of `REGION_LATTICE` a side: every token a
    region covers is marked with the words that name it, so that a token in a poster panel
    says the panel's heading however far the heading is drawn from it."""
    lattice = (np.arange(REGION_LATTICE) + 0.5) / REGION_LATTICE
    points = []
    for region in sample.meta["regions"]:
        left, top, right, bottom = region["box"]
        xs = lattice[(lattice * width >= left) & (lattice * width < right)]
        ys = lattice[(lattice * height >= top) & (lattice * height < bottom)]
        points += [(float(x), float(y), OBJECTS.index(word)) for word in region["words"] for y in ys for x in xs]
    return points


def initial_views(source: TaskSource, n: int, seed: int, image_bounds: tuple[int, int]
                  ) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """The initial views (as the env shows them at reset) of `n` count, zoom-read or chart samples,
    with what each token shows (`Points`) and the sample ids: what a token of the view the
    pointer chooses among holds. Count and zoom-read: the coloured shapes at their centres (which
    tag of which colour; glyphs left out, they are illegible there); chart: the words naming the
    region each token lies in (`region_points`), which questions name the asked value by."""
    rng = np.random.default_rng([seed, 13])
    images, points, ids = [], [], []
    for _ in range(n):
        sample = source.sample(rng)
        image = sample.load_image()
        height, width = image.shape[:2]
        images.append(smart_resize(image, image_bounds))
        points.append(region_points(sample, width, height) if sample.family == "chart" else
                      [(((b[0] + b[2]) / 2) / width, ((b[1] + b[3]) / 2) / height, index)
                       for b, index in _shown_objects(sample, glyphs=False)])
        ids.append(sample.sample_id)
    return images, points, ids


def initial_frames(source: TaskSource, n: int, seed: int, video_bounds: tuple[int, int]
                   ) -> tuple[list[np.ndarray], list[Points], list[str]]:
    """Every frame of `n` video samples as the env first shows it (within `video_bounds`), with
    what each token holds (`Points`): the coloured shape of each object the question is about,
    where and while it is drawn, and a flashing digit in the frames that show it, and the
    sample id of each frame. Where the policy chooses frames, in the small initial frames, a
    digit is 2.5-3.75 px on a square of 4-5 px: this target marks which frames hold it. The
    moving clutter is not marked. The clips are drawn apart over the processes (`drawn_apart`).
    """
    def frames_of(sample: Any, rng: np.random.Generator) -> list[tuple[np.ndarray, Points, str]]:
        frames, out = sample.load_frames(), []
        height, width = frames.shape[1:3]
        for t, frame in enumerate(frames):
            marks: Points = []
            for obj in sample.meta["objects"]:
                if "digit" not in obj and t not in obj["frames"]:
                    continue
                left, top, right, bottom = obj["box"]
                colour = obj["new_colour"] if "changes_at" in obj and t >= obj["changes_at"] else obj["colour"]
                centre = ((left + right) / 2 / width, (top + bottom) / 2 / height)
                marks.append((*centre, OBJECTS.index(f"{colour} {obj['shape']}")))
                if "digit" in obj and t in obj["frames"]:
                    marks.append((*centre, OBJECTS.index(obj["digit"])))
            out.append((smart_resize(frame, video_bounds), marks, sample.sample_id))
        return out

    return _video_pieces(source, n, seed, 19, "frame-view", "video", frames_of)


class PointerStemTower(torch.nn.Module):
    """The tiny model's pointer stem as an image tower: ``(tokens, hidden_size)`` features of
    every image in `pixel_values`, in order, as they are added to the pointer's keys."""

    def __init__(self, pointer: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        if pointer.stem is None:
            raise ValueError("the model has no pointer stem to pretrain (TinyVLMConfig.pointer_stem is off)")
        self.pointer, self.hidden_size = pointer, hidden_size

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        every = list(range(len(image_grid_thw)))
        return torch.cat(run_per_image(pixel_values, image_grid_thw, every, self.pointer.patch_size,
                                       self.pointer.stem_features))


def pretrain_tower(model: torch.nn.Module, tower: str) -> torch.nn.Module:
    """The part of a tiny model that `VisionPretrainConfig.tower` names, as an image tower."""
    if tower == "encoder":
        return model.model.vision
    if tower == "pointer":
        return PointerStemTower(model.pointer, model.config.hidden_size)
    if model.pointer.match_encoder is None:
        raise ValueError("the model has no match encoder to pretrain (TinyVLMConfig.pointer_match_encoder is off)")
    return model.pointer.match_encoder


def token_targets(points: Points, grid_h: int, grid_w: int, glyphs_only: bool = False) -> torch.Tensor:
    """Multi-hot ``(grid_h * grid_w, classes)``: each token marks the objects whose centre it holds
    (classes: `OBJECTS`, or its prefix `GLYPHS` with `glyphs_only`)."""
    target = torch.zeros(grid_h * grid_w, len(GLYPHS) if glyphs_only else len(OBJECTS))
    for x, y, index in points:
        target[int(y * grid_h) * grid_w + int(x * grid_w), index] = 1.0
    return target


def pretrain_vision(vision: torch.nn.Module, image_processor: Any, images: Sequence[np.ndarray],
                    points: Sequence[Points], config: VisionPretrainConfig, seed: int = 0,
                    log: Callable[[int, dict[str, float]], None] | None = None,
                    progress: bool = False, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Train `vision` (the tiny model's image encoder) to name what each crop shows.

    With the glyph target (`glyph_crops`: one glyph per crop), a linear head on the token
    that holds the glyph's centre names it (cross-entropy over `GLYPHS`): the gradient goes
    to the tokens the decoder will read the glyph from. (The ``"pooled"`` `glyph_head`, a
    head on the max-pooled tokens, sits at the loss of the class prior for 400 to more
    than 1,000 steps before it falls; ``"both"`` adds its loss to the token head's, and the
    decoder then learns to read the encoder far sooner; docs/results.md.) With the dense target (`evidence_crops`,
    `initial_views`) a linear head on every token marks which `OBJECTS` have their centre
    in that token (a multi-label loss), so that a token says which glyph of a value, or
    which coloured shapes of a count, it holds. Accuracy is the share of marked tokens
    whose top class is one they hold. The head is dropped at the end. `log` gets ``(step, {"pretrain/loss", "pretrain/held_out_accuracy"})``
    every 50 steps and at the end. Returns the last record plus ``pretrain/minutes``.
    `autocast` runs the forward passes in that dtype (mixed precision, e.g. ``torch.bfloat16``).
    In a process group (`agents.distributed`) each rank takes its share of every batch and
    the gradients are averaged, so the ranks stay identical and the minutes are their mean.
    """
    rank, world = distributed.rank_and_world()
    held = config.held_out
    glyph = config.target in ("glyph", "frame-glyph")
    width = vision.hidden_size
    device = next(vision.parameters()).device
    head = torch.nn.Linear(width, len(GLYPHS) if glyph else len(OBJECTS), device=device)
    pooled_head = torch.nn.Linear(width, len(GLYPHS), device=device) if glyph and config.glyph_head == "both" else None
    trained = torch.nn.ModuleList(m for m in (vision, head, pooled_head) if m is not None)
    distributed.broadcast_parameters(trained[1:])
    params = list(trained.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 7])
    was_training = vision.training
    vision.train()

    def loss_and_hits(indices: Sequence[int]) -> tuple[torch.Tensor, int, int]:
        """The loss on `images[indices]`, and how many of its predictions are right, of how many."""
        encoded = {k: v.to(device) for k, v in image_processor([images[i] for i in indices], return_tensors="pt").items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            tokens = vision(encoded["pixel_values"], encoded["image_grid_thw"]).float()
        grids = encoded["image_grid_thw"].tolist()
        target = torch.cat([token_targets(points[i], h, w, glyph) for i, (_, h, w) in zip(indices, grids)]).to(device)
        marked = target.any(-1)
        if glyph:
            pooled = (torch.stack([t.amax(0) for t in tokens.split([t * h * w for t, h, w in grids])])
                      if config.glyph_head != "token" else None)
            logits = head(pooled if config.glyph_head == "pooled" else tokens[marked])
            truth = target[marked].argmax(-1)
            loss = F.cross_entropy(logits, truth)
            if pooled_head is not None:
                loss = loss + F.cross_entropy(pooled_head(pooled), truth)
            return loss, int((logits.argmax(-1) == truth).sum()), len(truth)
        logits = head(tokens)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(tokens)
        right = target[marked].gather(-1, logits[marked].argmax(-1, keepdim=True))
        return loss, int(right.sum()), int(marked.sum())

    def held_out_accuracy() -> float:
        if not held:
            return float("nan")
        vision.eval()
        with torch.no_grad():
            counts = [loss_and_hits(range(i, min(i + 50, held)))[1:] for i in range(0, held, 50)]
        vision.train()
        return sum(c[0] for c in counts) / max(sum(c[1] for c in counts), 1)

    record: dict[str, float] = {}
    minutes, losses = 0.0, []
    bar = tqdm(total=config.steps, desc="vision pretraining", unit="step", disable=not progress or rank > 0)
    for step in range(1, config.steps + 1):
        tick = time.perf_counter()
        pick = rng.integers(held, len(images), config.batch_size)[rank::world]
        loss = loss_and_hits(pick.tolist())[0]
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
