"""count: count objects satisfying a compound condition (like TallyQA-Complex).

Question kinds:

- ``colour-shape``: "How many red circles are there?" The counted objects sit together in
  one part of the canvas, among objects of the same colour but another shape;
- ``region``: "How many triangles are inside the black frame?" A frame outlines a region;
  objects of the asked shape also lie outside it and other shapes inside it.

Large objects of other kinds are scattered around ("small instances among large ones").
Tiers (sizes in the tiny preset's initial view, about 224 px a side):

- ``shortcut``: 1-5 big counted objects (11-18 px) spread over the canvas: countable at a
  glance, while a crop of their union box shows nothing the first view did not;
- ``easy``: 6.7-8.5 px objects, few confusers;
- ``hard``: 2.9-3.8 px objects whose shape cannot be told apart from the confusers until
  cropped (the crop of the evidence region magnifies about 3x).

The answer is a number; the evidence box is the union of the counted objects
(``colour-shape``) or the frame (``region``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import ImageDraw

from pxr_env.tasks.base import Sample
from pxr_env.tasks.synthetic.common import (
    BACKGROUNDS, COLOUR_NAMES, PALETTE, SHAPES, Box, Placer, SyntheticSource, background,
    check_choice, check_range, check_share, draw_shape, other_colours, read_shape, union_box,
)

_COUNTED_ATTEMPTS = 20
"""Placements of the counted objects tried before a sample is given up as impossible."""
QUESTION_KINDS: tuple[str, ...] = ("colour-shape", "region")
# Shapes whose plural is not "<shape>s".
_PLURAL = {"star": "stars"}


def plural(shape: str) -> str:
    """The plural of a shape name, as used in questions."""
    return _PLURAL.get(shape, shape + "s")


@dataclass
class Count(SyntheticSource):
    """The count family; the no-argument construction is the default suite.

    Sizes are fractions of the canvas scale ``sqrt(width * height)``: an object of size
    fraction f is about ``f * 224`` px wide in the tiny preset's initial view.
    """

    name: ClassVar[str] = "count"

    canvas: tuple[int, int] = (800, 1600)
    """Range of the canvas width and height in pixels."""
    count: tuple[int, int] = (1, 7)
    """Range of the answer (the number of counted objects) for easy and hard items."""
    shortcut_count: tuple[int, int] = (1, 5)
    """Range of the answer for shortcut items."""
    hard_size: tuple[float, float] = (0.013, 0.017)
    """Object size of hard items (default 2.9-3.8 px in the tiny initial view)."""
    easy_size: tuple[float, float] = (0.030, 0.038)
    """Object size of easy items (default 6.7-8.5 px in the tiny initial view)."""
    shortcut_size: tuple[float, float] = (0.05, 0.08)
    """Object size of shortcut items (default 11-18 px in the tiny initial view)."""
    confusers: tuple[int, int] = (3, 7)
    """Range of same-colour (colour-shape) or other-shape (region) objects near the counted ones."""
    large_objects: tuple[int, int] = (4, 10)
    """Range of large objects of other kinds scattered over the canvas."""
    backgrounds: tuple[str, ...] = BACKGROUNDS
    """Background kinds to draw from: plain, noise, photo."""
    questions: tuple[str, ...] = QUESTION_KINDS
    """Question kinds to draw from."""
    shortcut_share: float = 0.3
    """Share of shortcut items (answerable from the initial view)."""
    hard_share: float = 0.5
    """Share of hard items among the others."""

    def __post_init__(self) -> None:
        self.canvas = check_range("canvas", self.canvas, 256, 8192, integer=True)
        self.count = check_range("count", self.count, 1, 12, integer=True)
        self.shortcut_count = check_range("shortcut_count", self.shortcut_count, 1, 8, integer=True)
        self.hard_size = check_range("hard_size", self.hard_size, 0.004, 0.06)
        self.easy_size = check_range("easy_size", self.easy_size, 0.004, 0.06)
        self.shortcut_size = check_range("shortcut_size", self.shortcut_size, 0.01, 0.12)
        self.confusers = check_range("confusers", self.confusers, 0, 12, integer=True)
        self.large_objects = check_range("large_objects", self.large_objects, 0, 40, integer=True)
        self.backgrounds = check_choice("backgrounds", self.backgrounds, BACKGROUNDS)
        self.questions = check_choice("questions", self.questions, QUESTION_KINDS)
        self.shortcut_share = check_share("shortcut_share", self.shortcut_share)
        self.hard_share = check_share("hard_share", self.hard_share)

    def generate(self, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        width, height, scale = self.draw_canvas(rng)
        tier = self.draw_tier(rng)
        kind = self.questions[int(rng.integers(len(self.questions)))]
        bg_kind = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        lo, hi = self.shortcut_count if tier == "shortcut" else self.count
        n = int(rng.integers(lo, hi + 1))
        size_range = {"shortcut": self.shortcut_size, "easy": self.easy_size, "hard": self.hard_size}[tier]
        n_conf = int(rng.integers(self.confusers[0], self.confusers[1] + 1))
        if tier == "easy":
            n_conf = n_conf // 2

        placer = Placer(width, height, margin=0.02 * scale)
        objects: list[dict[str, Any]] = []

        def put(obj_colour: str, obj_shape: str, size: float, region: Box | None, counted: bool,
                gap: float = 0.006 * scale) -> bool:
            box = placer.place(rng, size, size, gap=gap, region=region)
            if box is not None:
                objects.append({"colour": obj_colour, "shape": obj_shape, "box": box, "counted": counted})
            return box is not None

        other_shapes = [s for s in SHAPES if s != shape]
        frame: Box | None = None
        if tier == "shortcut":
            # Spread out: over the whole canvas, or a frame of half the canvas and more.
            side = rng.uniform(0.5, 0.7) * min(width, height)
            region = None
        else:
            # Just room for the counted objects and the confusers, with gaps.
            side = max(size_range[1] * math.sqrt((n + n_conf) * 3.5), 0.08) * scale
            side = min(side, 0.45 * min(width, height))
            region = (0.0, 0.0, 0.0, 0.0)
        if region is not None or kind == "region":
            rx = rng.uniform(0.03 * width, width - side - 0.03 * width)
            ry = rng.uniform(0.03 * height, height - side - 0.03 * height)
            region = (rx, ry, rx + side, ry + side)
            if kind == "region":
                frame = region
                inner = 0.03 * side
                region = (rx + inner, ry + inner, rx + side - inner, ry + side - inner)
        def put_counted() -> bool:
            obj_colour = colour if kind == "colour-shape" else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            return put(obj_colour, shape, rng.uniform(*size_range) * scale, region, True)

        # The first objects can land where they leave no room for the rest: place them all again.
        for _ in range(_COUNTED_ATTEMPTS):
            if all(put_counted() for _ in range(n)):
                break
            objects.clear()
            placer.boxes.clear()
        else:
            raise RuntimeError(f"count seed {seed}: no room for {n} objects; lower `count` or the sizes")
        # Confusers next to the counted objects: the same colour in another shape and the
        # same shape in another colour (colour-shape); other shapes inside the frame and
        # the asked shape outside it (region).
        for k in range(n_conf):
            size = rng.uniform(*size_range) * scale
            conf_shape = other_shapes[int(rng.integers(len(other_shapes)))]
            if kind == "colour-shape":
                if k % 2 == 0:
                    put(colour, conf_shape, size, region, False)
                else:
                    put(other_colours(rng, [colour], 1)[0], shape, size, region, False)
            elif k % 2 == 0:
                put(COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], conf_shape, size, region, False)
            elif put(COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], shape, size, None, False) \
                    and _overlaps(objects[-1]["box"], frame):
                objects.pop()
                placer.boxes.pop()
        # Large objects elsewhere, never of the counted kind.
        for _ in range(int(rng.integers(self.large_objects[0], self.large_objects[1] + 1))):
            size = rng.uniform(0.08, 0.2) * scale
            big_colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            big_shape = other_shapes[int(rng.integers(len(other_shapes)))]
            box = placer.place(rng, size, size, gap=0.01 * scale, tries=30)
            if box is not None and (frame is None or not _overlaps(box, frame)):
                objects.append({"colour": big_colour, "shape": big_shape, "box": box, "counted": False})
            elif box is not None:
                placer.boxes.pop()

        image = background(bg_kind, rng, width, height)
        draw = ImageDraw.Draw(image)
        frame_colour = other_colours(rng, [], 1)[0]
        if frame is not None:
            draw.rectangle(frame, outline=PALETTE[frame_colour], width=max(2, int(0.006 * scale)))
        for obj in objects:
            draw_shape(draw, obj["shape"], obj["box"], PALETTE[obj["colour"]])
        canvas = np.array(image)

        counted = [o for o in objects if o["counted"]]
        if kind == "colour-shape":
            question = f"How many {colour} {plural(shape)} are there?"
            evidence = union_box([o["box"] for o in counted])
        else:
            question = f"How many {plural(shape)} are inside the {frame_colour} frame?"
            evidence = frame
        meta = {
            "tier": tier,
            "kind": kind,
            "background": bg_kind,
            "canvas": (width, height),
            "colour": colour if kind == "colour-shape" else None,
            "shape": shape,
            "frame": frame,
            "count_range": (lo, hi),
            "object_px_tiny_view": float(np.mean([o["box"][2] - o["box"][0] for o in counted]) * 224.0 / scale),
            "objects": objects,
        }
        return Sample(
            sample_id=self.sample_id(seed), family=self.name, question=question, answers=(str(len(counted)),),
            answer_type="number", image=canvas, evidence_box=evidence,
            answerable_without_ops=tier == "shortcut", meta=meta,
        )


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and a[2] > b[0] and a[1] < b[3] and a[3] > b[1]


def reader_answer(sample: Sample, view: np.ndarray, to_view: Callable[[Box], Box],
                  region: Box | None = None) -> str:
    """The count given by the shape reader that sees only `view` (for legibility measurements).

    The reader knows where every object is (to a pixel of the view) and classifies each
    one's colour and shape from the view; objects outside `region` (the part of the
    original the view shows) are not seen.
    """
    meta = sample.meta
    total = 0
    for obj in meta["objects"]:
        box = obj["box"]
        if region is not None and not (box[0] >= region[0] and box[1] >= region[1]
                                       and box[2] <= region[2] and box[3] <= region[3]):
            continue
        colour, shape = read_shape(view, to_view(box))
        if shape != meta["shape"]:
            continue
        if meta["kind"] == "colour-shape":
            total += colour == meta["colour"]
        else:
            frame = meta["frame"]
            total += box[0] >= frame[0] and box[1] >= frame[1] and box[2] <= frame[2] and box[3] <= frame[3]
    return str(total)
