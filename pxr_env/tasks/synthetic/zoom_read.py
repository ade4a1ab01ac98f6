"""zoom-read: read a small glyph-bearing tag on a big cluttered canvas (like V* Bench).

A canvas of about 1000-2000 px a side (plain, noise or a photograph) holds clutter
shapes and one or two small *tags*: a square, circle or hexagon of a named colour with a
digit or letter on it. Question kinds:

- ``read``: "What digit is written on the red square?" (open answer);
- ``read-choice``: the same with four lettered options (its letter glyphs are never A-D,
  so that no option's text reads as another option's letter);
- ``colour``: "What colour is the shape marked with the digit 7?" (four options; the
  other options are colours of other tags, so the tag must be found by its glyph);
- ``relative``: "Is the shape marked with 3 to the left or to the right of the shape
  marked with 8?" (two options, like V*'s relative_position).

Tiers (``meta["tier"]``), sizes given for the tiny preset's initial view (about 224 px a
side):

- ``shortcut``: a big glyph (27-36 px), readable without any operation; the tag is larger
  than the 0.2-of-the-side window a crop of a small box gives, so zooming cannot help;
- ``easy``: a 3.6-4.5 px glyph (blurred but not erased), the target the only object of its
  colour and the only tag (but for the other tags a colour question needs, and those of
  other colours that ``easy_tags`` adds);
- ``hard``: a 2.4-3.2 px glyph (illegible), among same-colour shapes and 4-8 other tags
  with their own glyphs.

A crop of the evidence box magnifies about 4.5x (the crop op pads 0.1 of the side), so
easy and hard glyphs are 11-20 px tall in the crop view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import ImageDraw

from pxr_env.tasks.base import CHOICE_LETTERS, Sample
from pxr_env.tasks.synthetic.common import (
    BACKGROUNDS, COLOUR_NAMES, DIGITS, LETTERS, PALETTE, SHAPES, TINY_VIEW_SIDE, Box, Placer,
    SyntheticSource, background, check_choice, check_range, check_share, draw_glyph, draw_shape,
    glyph_centre, glyph_height_for, glyph_scores, ink_for, nearest_colour, other_colours, read_glyph,
    union_box,
)

QUESTION_KINDS: tuple[str, ...] = ("read", "read-choice", "colour", "relative")
TAG_SHAPES: tuple[str, ...] = ("square", "circle", "hexagon")


@dataclass
class ZoomRead(SyntheticSource):
    """The zoom-read family; the no-argument construction is the default suite.

    Sizes given as fractions are fractions of the canvas scale ``sqrt(width * height)``,
    so they translate directly into pixels of any smart-resized view: a glyph of
    fraction f is about ``f * 224`` px tall in the tiny preset's initial view.
    """

    name: ClassVar[str] = "zoom-read"

    canvas: tuple[int, int] = (1000, 2000)
    """Range of the canvas width and height in pixels (each drawn independently)."""
    easy_glyph_frac: tuple[float, float] = (0.016, 0.020)
    """Glyph height of easy items (default: 3.6-4.5 px in the tiny initial view)."""
    hard_glyph_frac: tuple[float, float] = (0.0108, 0.0143)
    """Glyph height of hard items (default: 2.4-3.2 px in the tiny initial view)."""
    shortcut_glyph_frac: tuple[float, float] = (0.12, 0.16)
    """Glyph height of shortcut items (default: 27-36 px in the tiny initial view)."""
    distractors: tuple[int, int] = (15, 30)
    """Range of the number of plain clutter shapes."""
    distractor_tags: tuple[int, int] = (4, 8)
    """Range of the number of other glyph-bearing tags in hard items."""
    easy_tags: tuple[int, int] = (0, 0)
    """Range of the number of other glyph-bearing tags in easy ``read`` / ``read-choice`` items,
    each of another colour than the target's, so that the colour the question names tells the
    target apart: a pointing curriculum between one tag and hard items."""
    backgrounds: tuple[str, ...] = BACKGROUNDS
    """Background kinds to draw from: plain, noise, photo."""
    questions: tuple[str, ...] = QUESTION_KINDS
    """Question kinds to draw from (uniformly)."""
    shortcut_share: float = 0.3
    """Share of shortcut items (answerable from the initial view)."""
    hard_share: float = 0.5
    """Share of hard items among the others (the rest are easy)."""
    glyph_sets: tuple[str, ...] = field(default=("digits", "letters"))
    """Glyph alphabets to draw from: digits, letters."""

    def __post_init__(self) -> None:
        self.canvas = check_range("canvas", self.canvas, 256, 8192, integer=True)
        self.easy_glyph_frac = check_range("easy_glyph_frac", self.easy_glyph_frac, 0.002, 0.13)
        self.hard_glyph_frac = check_range("hard_glyph_frac", self.hard_glyph_frac, 0.002, 0.13)
        self.shortcut_glyph_frac = check_range("shortcut_glyph_frac", self.shortcut_glyph_frac, 0.002, 0.16)
        self.distractors = check_range("distractors", self.distractors, 0, 200, integer=True)
        self.distractor_tags = check_range("distractor_tags", self.distractor_tags, 3, 12, integer=True)
        self.easy_tags = check_range("easy_tags", self.easy_tags, 0, 8, integer=True)
        self.backgrounds = check_choice("backgrounds", self.backgrounds, BACKGROUNDS)
        self.questions = check_choice("questions", self.questions, QUESTION_KINDS)
        self.glyph_sets = check_choice("glyph_sets", self.glyph_sets, ("digits", "letters"))
        self.shortcut_share = check_share("shortcut_share", self.shortcut_share)
        self.hard_share = check_share("hard_share", self.hard_share)

    # ------------------------------------------------------------------ generation
    def generate(self, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        width, height, scale = self.draw_canvas(rng)
        tier = self.draw_tier(rng)
        kind = self.questions[int(rng.integers(len(self.questions)))]
        alphabet = DIGITS if self.glyph_sets[int(rng.integers(len(self.glyph_sets)))] == "digits" else LETTERS
        if kind == "read-choice" and alphabet is LETTERS:  # no option text reads as another option's letter
            alphabet = tuple(g for g in LETTERS if g not in CHOICE_LETTERS[:4])
        bg_kind = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        frac = {"shortcut": self.shortcut_glyph_frac, "easy": self.easy_glyph_frac, "hard": self.hard_glyph_frac}[tier]

        n_targets = 2 if kind == "relative" else 1
        if kind == "colour":
            n_other_tags = int(rng.integers(self.distractor_tags[0], self.distractor_tags[1] + 1)) if tier == "hard" else 3
        elif tier == "hard":
            n_other_tags = int(rng.integers(self.distractor_tags[0], self.distractor_tags[1] + 1))
        elif tier == "easy" and kind in ("read", "read-choice") and self.easy_tags[1] > 0:
            n_other_tags = int(rng.integers(self.easy_tags[0], self.easy_tags[1] + 1))
        else:
            n_other_tags = 0
        glyphs = [alphabet[i] for i in rng.permutation(len(alphabet))[: n_targets + n_other_tags]]
        if len(glyphs) < n_targets + n_other_tags:
            raise ValueError(f"distractor_tags {self.distractor_tags} needs more glyphs than the alphabet has")

        placer = Placer(width, height, margin=0.02 * scale)
        tags: list[dict[str, Any]] = []
        target_colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        target_shape = TAG_SHAPES[int(rng.integers(len(TAG_SHAPES)))]
        # Targets: one, or two side by side for the relative question.
        glyph_h = rng.uniform(*frac) * scale
        side = glyph_h / glyph_height_for(target_shape, 1.0)
        if n_targets == 1:
            box = placer.place(rng, side, side, gap=0.01 * scale)
            target_boxes = [box]
            colours, shapes = [target_colour], [target_shape]
        else:
            target_boxes, colours, shapes = self._relative_pair(rng, placer, glyph_h, scale, target_colour, tier)
        if any(b is None for b in target_boxes):
            raise RuntimeError(f"zoom-read seed {seed}: no room for the target on a {width}x{height} canvas")
        for i, box in enumerate(target_boxes):
            tags.append({"glyph": glyphs[i], "colour": colours[i], "shape": shapes[i], "box": box, "target": True})

        # Other tags: distinct glyphs; never the target's (colour, shape); distinct colours
        # for a colour question (they are its wrong options).
        other_tag_colours = other_colours(rng, [target_colour], min(n_other_tags, len(COLOUR_NAMES) - 1))
        for j in range(n_other_tags):
            colour = other_tag_colours[j % len(other_tag_colours)] if kind == "colour" or tier == "easy" \
                else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            shape = TAG_SHAPES[int(rng.integers(len(TAG_SHAPES)))]
            if colour == target_colour and shape == target_shape:
                shape = TAG_SHAPES[(TAG_SHAPES.index(shape) + 1) % len(TAG_SHAPES)]
            # Other tags are as small as the target (big ones only among shortcut items' mixed sizes).
            gh = rng.uniform(*frac) * scale * (rng.uniform(0.1, 1.0) if tier == "shortcut" else 1.0)
            tag_side = gh / glyph_height_for(shape, 1.0)
            box = placer.place(rng, tag_side, tag_side, gap=0.01 * scale)
            if box is not None:
                tags.append({"glyph": glyphs[n_targets + j], "colour": colour, "shape": shape, "box": box, "target": False})

        # Clutter: many colours and sizes; never the target's (colour, shape); hard items
        # get several shapes of the target's colour, easy items none.
        image = background(bg_kind, rng, width, height)
        draw = ImageDraw.Draw(image)
        n_clutter = int(rng.integers(self.distractors[0], self.distractors[1] + 1))
        same_colour = int(rng.integers(2, 5)) if tier == "hard" else 0
        clutter: list[dict[str, Any]] = []
        for k in range(n_clutter):
            size = (rng.uniform(0.01, 0.05) if rng.random() < 0.7 else rng.uniform(0.05, 0.15)) * scale
            if k < same_colour:
                colour = target_colour
                shape = [s for s in SHAPES if s != target_shape][int(rng.integers(len(SHAPES) - 1))]
            else:
                colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                if tier != "hard" and colour == target_colour:
                    colour = other_colours(rng, [target_colour], 1)[0]
                if colour == target_colour and shape == target_shape:
                    shape = "triangle"
            aspect = rng.uniform(0.7, 1.4)
            w, h = size * aspect, size / aspect
            for _ in range(50):
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                box = (x, y, x + w, y + h)
                if placer.free(box, gap=0.005 * scale):
                    draw_shape(draw, shape, box, PALETTE[colour])
                    clutter.append({"colour": colour, "shape": shape, "box": tuple(round(v, 1) for v in box)})
                    break
        for tag in tags:
            draw_shape(draw, tag["shape"], tag["box"], PALETTE[tag["colour"]])
        canvas = np.array(image)
        for tag in tags:
            gh = glyph_height_for(tag["shape"], tag["box"][2] - tag["box"][0])
            tag["glyph_box"] = draw_glyph(canvas, tag["glyph"], glyph_centre(tag["shape"], tag["box"]), gh,
                                          ink_for(PALETTE[tag["colour"]]))

        targets = [t for t in tags if t["target"]]
        others = [t for t in tags if not t["target"]]
        question, answers, answer_type, choices = self._question(rng, kind, targets, others, alphabet)
        evidence = union_box([t["box"] for t in targets])
        target_glyph_h = targets[0]["glyph_box"][3] - targets[0]["glyph_box"][1]
        meta = {
            "tier": tier,
            "kind": kind,
            "background": bg_kind,
            "canvas": (width, height),
            "alphabet": "digits" if alphabet is DIGITS else "letters",
            "glyph_px": float(target_glyph_h),
            "glyph_px_tiny_view": float(target_glyph_h * TINY_VIEW_SIDE / scale),
            "targets": targets,
            "tags": tags,
            "n_clutter": len(clutter),
        }
        return Sample(
            sample_id=self.sample_id(seed), family=self.name, question=question, answers=answers,
            answer_type=answer_type, choices=choices, image=canvas, evidence_box=evidence,
            answerable_without_ops=tier == "shortcut", meta=meta,
        )

    def _relative_pair(self, rng: np.random.Generator, placer: Placer, glyph_h: float, scale: float,
                       target_colour: str, tier: str) -> tuple[list[Box | None], list[str], list[str]]:
        """Two tags side by side, clearly left/right of each other, close enough to crop together."""
        colours = [target_colour, other_colours(rng, [target_colour], 1)[0]]
        shapes = [TAG_SHAPES[int(rng.integers(len(TAG_SHAPES)))] for _ in range(2)]
        sides = [glyph_h / glyph_height_for(s, 1.0) for s in shapes]
        side = max(sides)
        for _ in range(200):
            dx = rng.uniform(1.6, 4.0) * side if tier != "shortcut" else rng.uniform(1.2, 1.8) * side
            dy = rng.uniform(-0.5, 0.5) * side
            x1, y1 = rng.uniform(placer.margin, placer.width - placer.margin - dx - side), \
                rng.uniform(placer.margin + max(0.0, -dy), placer.height - placer.margin - side - max(0.0, dy))
            a = (float(round(x1)), float(round(y1)), float(round(x1 + sides[0])), float(round(y1 + sides[0])))
            b = (float(round(x1 + dx)), float(round(y1 + dy)), float(round(x1 + dx + sides[1])), float(round(y1 + dy + sides[1])))
            if placer.free(a, 0.01 * scale) and placer.free(b, 0.01 * scale) and b[0] > a[2]:
                placer.boxes.extend([a, b])
                order = rng.permutation(2)
                return [(a, b)[i] for i in order], [colours[i] for i in order], [shapes[i] for i in order]
        return [None, None], colours, shapes

    def _question(self, rng: np.random.Generator, kind: str, targets: list[dict[str, Any]],
                  others: list[dict[str, Any]], alphabet: tuple[str, ...]) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
        """Question text, gold answers, answer type and choices for `kind`."""
        what = "digit" if alphabet is DIGITS else "letter"
        t = targets[0]
        if kind == "read":
            return (f"What {what} is written on the {t['colour']} {t['shape']}?", (t["glyph"],),
                    "number" if what == "digit" else "text", ())
        if kind == "read-choice":
            seen = [o["glyph"] for o in others][:3]
            rest = [g for g in alphabet if g != t["glyph"] and g not in seen]
            wrong = seen + [rest[i] for i in rng.permutation(len(rest))[: 3 - len(seen)]]
            options = [t["glyph"], *wrong]
            order = rng.permutation(4)
            choices = tuple(options[i] for i in order)
            answer = CHOICE_LETTERS[int(np.where(order == 0)[0][0])]
            return f"Which {what} is written on the {t['colour']} {t['shape']}?", (answer,), "choice", choices
        if kind == "colour":
            wrong = list(dict.fromkeys(o["colour"] for o in others if o["colour"] != t["colour"]))[:3]
            wrong += other_colours(rng, [t["colour"], *wrong], 3 - len(wrong))
            options = [t["colour"], *wrong]
            order = rng.permutation(4)
            choices = tuple(options[i] for i in order)
            answer = CHOICE_LETTERS[int(np.where(order == 0)[0][0])]
            return f"What colour is the shape marked with the {what} {t['glyph']}?", (answer,), "choice", choices
        a, b = targets
        left = (a["box"][0] + a["box"][2]) < (b["box"][0] + b["box"][2])
        question = (f"Is the shape marked with the {what} {a['glyph']} to the left or to the right of "
                    f"the shape marked with the {what} {b['glyph']}?")
        return question, ("A" if left else "B",), "choice", ("left", "right")


def reader_answer(sample: Sample, view: np.ndarray, to_view: Callable[[Box], Box],
                  region: Box | None = None) -> str:
    """The answer of the template reader that sees only `view` (for legibility measurements).

    `to_view` maps a box of the original image into `view`; `region` is the part of the
    original the view shows (None: all of it). The reader knows where every tag is
    (to a pixel of the view) but must read glyphs to tell the tags apart, as a policy must.
    """
    meta = sample.meta
    alphabet = DIGITS if meta["alphabet"] == "digits" else LETTERS
    kind, target = meta["kind"], meta["targets"][0]
    if kind in ("read", "read-choice"):
        options = sample.choices if kind == "read-choice" else alphabet
        glyph = read_glyph(view, to_view(target["glyph_box"]), options)
        return CHOICE_LETTERS[sample.choices.index(glyph)] if kind == "read-choice" else glyph

    def inside(box: Box) -> bool:
        return region is None or (box[0] >= region[0] and box[1] >= region[1]
                                  and box[2] <= region[2] and box[3] <= region[3])

    tags = [t for t in meta["tags"] if inside(t["box"])]
    scores = np.array([glyph_scores(view, to_view(t["glyph_box"]), alphabet) for t in tags])
    if kind == "colour":
        glyph = meta["targets"][0]["glyph"]
        tag = tags[int(np.argmax(scores[:, alphabet.index(glyph)]))]
        x1, y1, x2, y2 = (int(round(v)) for v in to_view(tag["box"]))
        patch = view[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)].reshape(-1, 3)
        colour = nearest_colour(np.median(patch, axis=0), sample.choices)
        return CHOICE_LETTERS[sample.choices.index(colour)]
    a, b = (alphabet.index(t["glyph"]) for t in meta["targets"])
    if len(tags) < 2:
        return "A"
    ia = int(np.argmax(scores[:, a]))
    rest = [i for i in range(len(tags)) if i != ia]
    ib = rest[int(np.argmax(scores[rest, b]))]
    centre = [tags[i]["box"][0] + tags[i]["box"][2] for i in (ia, ib)]
    return "A" if centre[0] < centre[1] else "B"
