"""video: 16-frame clips whose evidence sits in a few frames (like MVBench).

Each clip is drawn frame by frame (moving clutter shapes over a plain or noise
background), encoded to an mp4 with `pxr_env.video.write_video` into a cache folder, and
read back through `pxr_env.video.read_frames` (``Sample.video`` is the file's path).
Kinds (all four-option multiple choice):

- ``digit``: a small square briefly shows a digit: "Which digit briefly appears on the red
  square?" (hard items: other squares flash other digits, which are the wrong options);
- ``appear``: a shape appears for a few frames: "Which shape briefly appears?" (the shape
  is 1.5 times the glyph size);
- ``colour-change``: an object changes colour: "What colour does the circle turn into?".

Tiers, in pixels of the frames as first shown (the tiny preset shows each frame within
16*28^2 pixels, 112x112 for the default 224x224 frames; selected frames are shown within
64*28^2, i.e. at full size, so twice as large): ``shortcut`` glyphs of 20-28 px, any kind;
``easy`` 3.2-3.8 px and ``hard`` 2.5-3 px glyphs, digit only (hard items add other
flashing squares). Colour survives any downscaling and a shape needs more pixels than a
glyph: with only twice the resolution in a selected frame, colour-change and appear
cannot be made to need the operation, so they are shortcut kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from pxr_env.tasks.base import CHOICE_LETTERS, Sample
from pxr_env.tasks.synthetic.common import (
    COLOUR_NAMES, DIGITS, PALETTE, SHAPES, Box, SyntheticSource, check_choice, check_range,
    check_share, draw_glyph, draw_shape, glyph_scores, ink_for, nearest_colour, other_colours,
    read_shape,
)

QUESTION_KINDS: tuple[str, ...] = ("digit", "appear", "colour-change")
NUM_FRAMES = 16
# Bumped whenever drawing changes, so that cached clips of an older generator are not reused.
GENERATOR_VERSION = 1


def default_cache_dir() -> Path:
    """``$PXR_CACHE_DIR/clips`` if set, else ``~/.cache/pxr/clips``."""
    root = os.environ.get("PXR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "pxr") / "clips"


@dataclass
class Clips(SyntheticSource):
    """The video family; the no-argument construction is the default suite.

    Clips are encoded once per (seed, configuration) under `cache_dir` and reused; the
    file is written under a temporary name and renamed, so concurrent workers are safe.
    """

    name: ClassVar[str] = "video"

    frame_size: tuple[int, int] = (224, 224)
    """(width, height) of the encoded frames; even numbers."""
    fps: float = 8.0
    """Frame rate of the encoded clip (16 frames: 2 s at 8 fps)."""
    hard_glyph_px: tuple[float, float] = (5.0, 6.0)
    """Glyph height of hard items in frame pixels (2.5-3 px in the tiny initial view)."""
    easy_glyph_px: tuple[float, float] = (6.5, 7.5)
    """Glyph height of easy items in frame pixels (3.2-3.8 px in the tiny initial view)."""
    shortcut_glyph_px: tuple[float, float] = (40.0, 56.0)
    """Glyph height of shortcut items in frame pixels (20-28 px in the tiny initial view)."""
    evidence_length: tuple[int, int] = (2, 3)
    """Range of the number of frames that hold the evidence."""
    clutter: tuple[int, int] = (3, 6)
    """Range of the number of moving clutter shapes."""
    questions: tuple[str, ...] = QUESTION_KINDS
    """Question kinds to draw from (easy and hard items use digit only)."""
    shortcut_share: float = 0.3
    """Share of shortcut items (answerable from the initial low-resolution frames)."""
    hard_share: float = 0.5
    """Share of hard items among the others."""
    cache_dir: str | None = None
    """Folder for the encoded clips (default: `default_cache_dir()`)."""

    def __post_init__(self) -> None:
        size = tuple(self.frame_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= 2048
                                     and v % 2 == 0 for v in size):
            raise ValueError(f"frame_size must be (width, height), even integers in [64, 2048], got {self.frame_size!r}")
        self.frame_size = size
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be a number in [1, 120], got {self.fps!r}")
        side = min(self.frame_size)
        self.hard_glyph_px = check_range("hard_glyph_px", self.hard_glyph_px, 3, side / 4)
        self.easy_glyph_px = check_range("easy_glyph_px", self.easy_glyph_px, 3, side / 4)
        self.shortcut_glyph_px = check_range("shortcut_glyph_px", self.shortcut_glyph_px, 3, side / 3)
        self.evidence_length = check_range("evidence_length", self.evidence_length, 1, 8, integer=True)
        self.clutter = check_range("clutter", self.clutter, 0, 30, integer=True)
        self.questions = check_choice("questions", self.questions, QUESTION_KINDS)
        self.shortcut_share = check_share("shortcut_share", self.shortcut_share)
        self.hard_share = check_share("hard_share", self.hard_share)
        if self.shortcut_share < 1 and "digit" not in self.questions:
            raise ValueError("hard and easy items need the 'digit' kind: add it to questions, or set shortcut_share=1")

    @property
    def config_key(self) -> str:
        """Short hash of everything that shapes a clip (the cache folder's name)."""
        config = {k: v for k, v in asdict(self).items() if k != "cache_dir"}
        config["version"] = GENERATOR_VERSION
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def generate(self, seed: int) -> Sample:
        frames, sample_fields = self.render(seed)
        folder = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        path = folder / self.config_key / f"{seed}.mp4"
        if not path.is_file():
            from pxr_env.video import write_video

            write_video(path, frames, fps=self.fps)
        return Sample(video=path, num_frames=NUM_FRAMES, **sample_fields)

    def render(self, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The clip's frames ``(16, H, W, 3)`` and every Sample field but the video."""
        rng = np.random.default_rng(seed)
        width, height = self.frame_size
        tier = self.draw_tier(rng)
        allowed = QUESTION_KINDS if tier == "shortcut" else ("digit",)
        kinds = tuple(k for k in self.questions if k in allowed)
        kind = kinds[int(rng.integers(len(kinds)))]
        size = rng.uniform(*{"shortcut": self.shortcut_glyph_px, "easy": self.easy_glyph_px,
                             "hard": self.hard_glyph_px}[tier])
        length = int(rng.integers(self.evidence_length[0], self.evidence_length[1] + 1))
        first = int(rng.integers(1, NUM_FRAMES - length))  # 0-based, never the first or last frame
        evidence = list(range(first, first + length))

        bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
        movers = []
        for _ in range(int(rng.integers(self.clutter[0], self.clutter[1] + 1))):
            s = rng.uniform(0.05, 0.18) * min(width, height)
            movers.append({"shape": SHAPES[int(rng.integers(len(SHAPES)))],
                           "colour": COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], "size": s,
                           "pos": rng.uniform([0, 0], [width - s, height - s]),
                           "vel": rng.uniform(-0.03, 0.03, size=2) * min(width, height)})
        # Static objects the question is about (placed apart, away from the edges).
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        statics: list[dict[str, Any]] = []
        if kind == "digit":
            tag_side = size / 0.7
            n_other = int(rng.integers(2, 4)) if tier == "hard" else 0
            tag_colours = [colour, *other_colours(rng, [colour], n_other)]
            digits = [DIGITS[i] for i in rng.permutation(10)[: 1 + n_other]]
            for i, (c, d) in enumerate(zip(tag_colours, digits)):
                box = self._free_box(rng, tag_side, statics)
                # Other squares flash their digit in frames that miss the evidence window.
                if i == 0:
                    shown = evidence
                else:
                    outside = [f for f in range(NUM_FRAMES) if f not in evidence]
                    start = int(rng.integers(len(outside) - length + 1))
                    shown = outside[start:start + length]
                statics.append({"shape": "square", "colour": c, "box": box, "digit": d, "frames": shown})
        elif kind == "appear":
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            box = self._free_box(rng, size * 1.5, statics)
            statics.append({"shape": shape, "colour": colour, "box": box, "frames": evidence})
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            new_colour = other_colours(rng, [colour], 1)[0]
            box = self._free_box(rng, size, statics)
            statics.append({"shape": shape, "colour": colour, "new_colour": new_colour, "box": box,
                            "frames": list(range(NUM_FRAMES)), "changes_at": first})
            evidence = [first - 1, first]  # the last frame before the change and the first after

        frames = np.empty((NUM_FRAMES, height, width, 3), dtype=np.uint8)
        for t in range(NUM_FRAMES):
            image = Image.new("RGB", (width, height), bg)
            draw = ImageDraw.Draw(image)
            for m in movers:
                x, y = _bounce(m["pos"] + m["vel"] * t, width - m["size"], height - m["size"])
                draw_shape(draw, m["shape"], (x, y, x + m["size"], y + m["size"]), PALETTE[m["colour"]])
            for obj in statics:
                if kind == "digit" or t in obj["frames"]:
                    c = obj["new_colour"] if "changes_at" in obj and t >= obj["changes_at"] else obj["colour"]
                    draw_shape(draw, obj["shape"], obj["box"], PALETTE[c])
            frame = np.array(image)
            for obj in statics:
                if "digit" in obj and t in obj["frames"]:
                    b = obj["box"]
                    obj["glyph_box"] = draw_glyph(frame, obj["digit"], ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2),
                                                  size, ink_for(PALETTE[obj["colour"]]))
            frames[t] = frame

        target = statics[0]
        question, choices, answer = self._question(rng, kind, target, statics)
        fields = {
            "sample_id": self.sample_id(seed), "family": self.name, "question": question,
            "answers": (answer,), "answer_type": "choice", "choices": choices,
            "evidence_frames": tuple(f + 1 for f in evidence),
            "answerable_without_ops": tier == "shortcut",
            "meta": {"tier": tier, "kind": kind, "frame_size": (width, height), "size_px": float(size),
                     "size_px_tiny_view": float(size * min(1.0, (16 * 784 / (width * height)) ** 0.5)),
                     "target": target, "objects": statics, "fps": self.fps},
        }
        return frames, fields

    def _free_box(self, rng: np.random.Generator, side: float, taken: list[dict[str, Any]]) -> Box:
        """A box of `side` inside the frame's central area, clear of the boxes in `taken`."""
        width, height = self.frame_size
        margin = 0.08 * min(width, height)
        for _ in range(200):
            x, y = rng.uniform(margin, width - margin - side), rng.uniform(margin, height - margin - side)
            box = (float(round(x)), float(round(y)), float(round(x + side)), float(round(y + side)))
            if all(box[0] > o["box"][2] + side or box[2] + side < o["box"][0] or box[1] > o["box"][3] + side
                   or box[3] + side < o["box"][1] for o in taken):
                return box
        raise RuntimeError(f"no room for a {side:.0f} px object in {width}x{height} frames; lower the sizes")

    def _question(self, rng: np.random.Generator, kind: str, target: dict[str, Any],
                  statics: list[dict[str, Any]]) -> tuple[str, tuple[str, ...], str]:
        """Question, four choices (the wrong ones drawn from what the clip shows) and the letter."""
        if kind == "digit":
            right = target["digit"]
            wrong = [o["digit"] for o in statics[1:]][:3]
            rest = [d for d in DIGITS if d != right and d not in wrong]
            wrong += [rest[i] for i in rng.permutation(len(rest))[: 3 - len(wrong)]]
            question = f"Which digit briefly appears on the {target['colour']} square?"
        elif kind == "appear":
            right = target["shape"]
            rest = [s for s in SHAPES if s != right]
            wrong = [rest[i] for i in rng.permutation(len(rest))[:3]]
            question = "Which shape briefly appears in the video?"
        else:
            right = target["new_colour"]
            wrong = other_colours(rng, [right, target["colour"]], 3)
            question = f"What colour does the {target['colour']} {target['shape']} turn into?"
        options = [right, *wrong]
        order = rng.permutation(4)
        choices = tuple(options[i] for i in order)
        return question, choices, CHOICE_LETTERS[int(np.where(order == 0)[0][0])]


def _bounce(position: np.ndarray, max_x: float, max_y: float) -> tuple[float, float]:
    """Position reflected back into [0, max] on each axis (a shape bouncing off the edges)."""
    out = []
    for value, limit in zip(position, (max_x, max_y)):
        period = 2 * max(limit, 1e-6)
        v = value % period
        out.append(float(period - v if v > limit else v))
    return out[0], out[1]


def reader_answer(sample: Sample, frames: np.ndarray, frame_numbers: list[int]) -> str:
    """The answer of the template reader that sees `frames` (1-based `frame_numbers` of the clip).

    The frames may be downscaled; the reader knows where the asked object is (to a pixel
    of the frames it sees) and reads it in every shown frame, pooling the scores.
    """
    meta = sample.meta
    target = meta["target"]
    sx = frames.shape[2] / meta["frame_size"][0]
    sy = frames.shape[1] / meta["frame_size"][1]

    def to_view(box: Box) -> Box:
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    seen = [i for i, f in enumerate(frame_numbers) if f - 1 in target["frames"]]
    if meta["kind"] == "digit":
        if not seen or "glyph_box" not in target:
            return "A"
        scores = sum(glyph_scores(frames[i], to_view(target["glyph_box"]), sample.choices) for i in seen)
        return CHOICE_LETTERS[int(np.argmax(scores))]
    if meta["kind"] == "appear":
        if not seen:
            return "A"
        votes = [read_shape(frames[i], to_view(target["box"]))[1] for i in seen]
        shape = max(sample.choices, key=votes.count)
        return CHOICE_LETTERS[sample.choices.index(shape)]
    after = [i for i, f in enumerate(frame_numbers) if f - 1 >= target["changes_at"]]
    if not after:
        return "A"
    x1, y1, x2, y2 = (int(round(v)) for v in to_view(target["box"]))
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    colour = nearest_colour(frames[after[-1]][cy, cx], sample.choices)
    return CHOICE_LETTERS[sample.choices.index(colour)]
