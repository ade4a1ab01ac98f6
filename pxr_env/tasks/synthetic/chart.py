"""chart: read a small number or code off a rendered chart, table or poster (like InfographicsVQA).

Pages are drawn with PIL: titles and labels in PIL's default font (large enough to find
one's way), the values asked about in the glyph font (small). Kinds:

- ``bar``: a bar chart with the value printed above each bar: "What value is printed
  above the green bar?";
- ``table``: a table of numbers with row and column headers: "In the table, what is the
  value for plums in 2021?";
- ``poster``: coloured panels, each with a heading and a small code: "What is the code
  printed in the Budget panel?".

Answers are open strings scored with ANLS; the evidence box is the value's box. The meta's
``regions`` name the page's parts: each is a box with the words a question uses for what lies
in it (a bar's slot: its category; a table cell: its row and column; a panel: its heading). Tiers
(glyph heights in the tiny preset's initial view, about 224 px a side): ``shortcut``
11-16 px (fewer, bigger values: readable at once), ``easy`` 3.6-4.5 px, ``hard`` 2.4-3.2 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from pxr_env.tasks.base import Sample
from pxr_env.tasks.synthetic.common import (
    COLOUR_NAMES, DIGITS, LETTERS, PALETTE, Box, SyntheticSource, check_choice, check_range,
    check_share, draw_text, label_font, read_glyph, text_width, union_box,
)

QUESTION_KINDS: tuple[str, ...] = ("bar", "table", "poster")
CATEGORIES: tuple[str, ...] = ("apples", "pears", "plums", "grapes", "melons", "lemons", "cherries", "figs")
HEADINGS: tuple[str, ...] = ("Sales", "Visitors", "Budget", "Staff", "Orders", "Returns", "Energy", "Traffic")
YEARS: tuple[str, ...] = tuple(str(year) for year in range(2018, 2023))
WORDS: tuple[str, ...] = (*CATEGORIES, *HEADINGS, *YEARS)
"""Every word a page uses to name its parts (bar labels, table rows and columns, panel headings)."""
TITLES: tuple[str, ...] = ("Annual report", "Harvest survey", "Quarterly figures", "Market overview",
                           "Regional summary", "Fact sheet")
Region = dict[str, Any]
"""A part of a page: ``{"box": (left, top, right, bottom), "words": [...]}``, the words from `WORDS`."""
_BAR_COLOURS = tuple(c for c in COLOUR_NAMES if c not in ("white", "gray"))


@dataclass
class Chart(SyntheticSource):
    """The chart family; the no-argument construction is the default suite.

    Glyph heights are fractions of the page scale ``sqrt(width * height)`` (about
    ``f * 224`` px in the tiny preset's initial view).
    """

    name: ClassVar[str] = "chart"

    canvas: tuple[int, int] = (1000, 1600)
    """Range of the page width and height in pixels."""
    hard_glyph_frac: tuple[float, float] = (0.0108, 0.0143)
    """Value glyph height of hard items (default 2.4-3.2 px in the tiny initial view)."""
    easy_glyph_frac: tuple[float, float] = (0.016, 0.020)
    """Value glyph height of easy items (default 3.6-4.5 px)."""
    shortcut_glyph_frac: tuple[float, float] = (0.05, 0.07)
    """Value glyph height of shortcut items (default 11-16 px)."""
    questions: tuple[str, ...] = QUESTION_KINDS
    """Page kinds to draw from."""
    shortcut_share: float = 0.3
    """Share of shortcut items (answerable from the initial view)."""
    hard_share: float = 0.5
    """Share of hard items among the others."""

    def __post_init__(self) -> None:
        self.canvas = check_range("canvas", self.canvas, 512, 8192, integer=True)
        self.hard_glyph_frac = check_range("hard_glyph_frac", self.hard_glyph_frac, 0.003, 0.03)
        self.easy_glyph_frac = check_range("easy_glyph_frac", self.easy_glyph_frac, 0.003, 0.03)
        self.shortcut_glyph_frac = check_range("shortcut_glyph_frac", self.shortcut_glyph_frac, 0.02, 0.08)
        self.questions = check_choice("questions", self.questions, QUESTION_KINDS)
        self.shortcut_share = check_share("shortcut_share", self.shortcut_share)
        self.hard_share = check_share("hard_share", self.hard_share)

    def generate(self, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        width, height, scale = self.draw_canvas(rng)
        tier = self.draw_tier(rng)
        kind = self.questions[int(rng.integers(len(self.questions)))]
        frac = {"shortcut": self.shortcut_glyph_frac, "easy": self.easy_glyph_frac, "hard": self.hard_glyph_frac}[tier]
        glyph_h = rng.uniform(*frac) * scale
        paper = tuple(int(v) for v in rng.integers(235, 256, size=3))
        image = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(image)
        title = TITLES[int(rng.integers(len(TITLES)))]
        draw.text((0.05 * width, 0.03 * height), title, fill=(20, 20, 20), font=label_font(int(0.05 * scale)))
        body = (0.05 * width, 0.03 * height + 0.09 * scale, 0.95 * width, 0.95 * height)
        page = {"bar": self._bar, "table": self._table, "poster": self._poster}[kind]
        question, answer, values, regions = page(rng, draw, body, glyph_h, scale, tier)
        canvas = np.array(image)
        for value in values:  # the glyph-font strings, drawn after the PIL layer
            value["glyph_boxes"] = draw_text(canvas, value["text"], value["left"], value["top"], value["height"],
                                             value["ink"])
            value["box"] = union_box(value["glyph_boxes"])
        target = next(v for v in values if v["target"])
        meta = {
            "tier": tier,
            "kind": kind,
            "canvas": (width, height),
            "title": title,
            "glyph_px": float(target["glyph_boxes"][0][3] - target["glyph_boxes"][0][1]),
            "glyph_px_tiny_view": float(target["height"] * 224.0 / scale),
            "target": target,
            "values": values,
            "regions": regions,
        }
        return Sample(
            sample_id=self.sample_id(seed), family=self.name, question=question, answers=(answer,),
            answer_type="anls", image=canvas, evidence_box=target["box"],
            answerable_without_ops=tier == "shortcut", meta=meta,
        )

    # ------------------------------------------------------------------ pages
    def _bar(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, body: Box,
             glyph_h: float, scale: float, tier: str) -> tuple[str, str, list[dict[str, Any]], list[Region]]:
        x1, y1, x2, y2 = body
        label_h = int(0.035 * scale)
        digits = 3
        value_w = text_width("0" * digits, glyph_h)
        max_bars = int((x2 - x1) // (value_w * 1.4))
        k = int(rng.integers(3, 5)) if tier == "shortcut" else int(rng.integers(4, 8))
        k = max(2, min(k, max_bars, len(CATEGORIES)))
        categories = [CATEGORIES[i] for i in rng.permutation(len(CATEGORIES))[:k]]
        colours = [_BAR_COLOURS[i] for i in rng.permutation(len(_BAR_COLOURS))[:k]]
        numbers = rng.integers(10 ** (digits - 1), 10 ** digits, size=k)
        base = y2 - label_h * 1.6
        top_limit = y1 + glyph_h * 2
        slot = (x2 - x1) / k
        bar_w = max(slot * 0.6, value_w * 1.1)
        draw.line([(x1, base), (x2, base)], fill=(40, 40, 40), width=max(2, int(0.003 * scale)))
        values, regions = [], []
        for i in range(k):
            cx = x1 + slot * (i + 0.5)
            regions.append({"box": (cx - slot / 2, y1, cx + slot / 2, y2), "words": [categories[i]]})
            bar_top = base - (base - top_limit) * numbers[i] / numbers.max()
            draw.rectangle((cx - bar_w / 2, bar_top, cx + bar_w / 2, base), fill=PALETTE[colours[i]])
            font = label_font(label_h)
            draw.text((cx, base + label_h * 0.3), categories[i], fill=(30, 30, 30), font=font, anchor="mt")
            text = str(int(numbers[i]))
            values.append({"text": text, "left": cx - text_width(text, glyph_h) / 2,
                           "top": bar_top - glyph_h * 1.5, "ink": (20, 20, 20), "target": False,
                           "height": glyph_h, "colour": colours[i], "category": categories[i]})
        t = int(rng.integers(k))
        values[t]["target"] = True
        return f"What value is printed above the {colours[t]} bar?", values[t]["text"], values, regions

    def _table(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, body: Box,
               glyph_h: float, scale: float, tier: str) -> tuple[str, str, list[dict[str, Any]], list[Region]]:
        x1, y1, x2, y2 = body
        label_h = int(0.03 * scale)
        font = label_font(label_h)
        first_col = max(draw.textlength(c, font=font) for c in CATEGORIES) + label_h
        digits = 4 if tier != "shortcut" else 3
        cell_w = max(text_width("0" * digits, glyph_h) * 1.5, label_h * 3.2)
        cell_h = max(glyph_h * 2.2, label_h * 1.5)
        max_cols = int((x2 - x1 - first_col) // cell_w)
        max_rows = int((y2 - y1) // cell_h) - 1
        cols = max(1, min(int(rng.integers(3, 6)), max_cols))
        rows = max(1, min(int(rng.integers(4, 8)), max_rows, len(CATEGORIES)))
        if tier == "shortcut":
            cols, rows = min(cols, 3), min(rows, 4)
        years = list(YEARS[:cols])
        row_names = [CATEGORIES[i] for i in rng.permutation(len(CATEGORIES))[:rows]]
        stripe = tuple(int(v) for v in rng.integers(200, 236, size=3))
        values, regions = [], []
        draw.rectangle((x1, y1, x1 + first_col + cols * cell_w, y1 + cell_h), fill=stripe)
        for c, year in enumerate(years):
            left = x1 + first_col + c * cell_w
            regions.append({"box": (left, y1, left + cell_w, y1 + cell_h), "words": [year]})
            draw.text((x1 + first_col + (c + 0.5) * cell_w, y1 + cell_h / 2), year, fill=(20, 20, 20),
                      font=font, anchor="mm")
        for r, row_name in enumerate(row_names):
            top = y1 + (r + 1) * cell_h
            draw.line([(x1, top), (x1 + first_col + cols * cell_w, top)], fill=(120, 120, 120), width=1)
            draw.text((x1 + label_h * 0.3, top + cell_h / 2), row_name, fill=(20, 20, 20), font=font, anchor="lm")
            regions.append({"box": (x1, top, x1 + first_col, top + cell_h), "words": [row_name]})
            for c, year in enumerate(years):
                text = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
                cx = x1 + first_col + (c + 0.5) * cell_w
                regions.append({"box": (cx - cell_w / 2, top, cx + cell_w / 2, top + cell_h), "words": [row_name, year]})
                values.append({"text": text, "left": cx - text_width(text, glyph_h) / 2,
                               "top": top + (cell_h - glyph_h) / 2, "ink": (20, 20, 20), "target": False,
                               "height": glyph_h, "row": row_name, "column": year})
        t = int(rng.integers(len(values)))
        values[t]["target"] = True
        target = values[t]
        return (f"In the table, what is the value for {target['row']} in {target['column']}?",
                target["text"], values, regions)

    def _poster(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, body: Box,
                glyph_h: float, scale: float, tier: str) -> tuple[str, str, list[dict[str, Any]], list[Region]]:
        x1, y1, x2, y2 = body
        n = int(rng.integers(2, 5)) if tier == "shortcut" else int(rng.integers(3, 7))
        cols = 2 if n <= 4 else 3
        rows = math.ceil(n / cols)
        gap = 0.02 * scale
        pw, ph = (x2 - x1 - gap * (cols - 1)) / cols, (y2 - y1 - gap * (rows - 1)) / rows
        headings = [HEADINGS[i] for i in rng.permutation(len(HEADINGS))[:n]]
        colours = [_BAR_COLOURS[i] for i in rng.permutation(len(_BAR_COLOURS))[:n]]
        alphabet = DIGITS + LETTERS
        length = 4
        glyph_h = min(glyph_h, pw * 0.8 / (length * 1.35 * 5 / 7))
        values, regions = [], []
        for i in range(n):
            left, top = x1 + (i % cols) * (pw + gap), y1 + (i // cols) * (ph + gap)
            regions.append({"box": (left, top, left + pw, top + ph), "words": [headings[i]]})
            colour = PALETTE[colours[i]]
            draw.rectangle((left, top, left + pw, top + ph), fill=colour)
            head_h = int(min(0.045 * scale, ph * 0.25))
            ink = (0, 0, 0) if sum(colour) > 420 else (255, 255, 255)
            draw.text((left + pw / 2, top + ph * 0.08), headings[i], fill=ink, font=label_font(head_h), anchor="mt")
            text = "".join(alphabet[j] for j in rng.integers(len(alphabet), size=length))
            tx = left + pw / 2 - text_width(text, glyph_h) / 2
            ty = top + ph * 0.08 + head_h * 1.4 + rng.uniform(0, max(0.0, ph * 0.85 - head_h * 1.4 - glyph_h * 1.5))
            values.append({"text": text, "left": tx, "top": ty, "ink": ink, "target": False,
                           "height": glyph_h, "heading": headings[i], "colour": colours[i]})
        t = int(rng.integers(n))
        values[t]["target"] = True
        return f"What is the code printed in the {headings[t]} panel?", values[t]["text"], values, regions


def reader_answer(sample: Sample, view: np.ndarray, to_view: Callable[[Box], Box],
                  region: Box | None = None) -> str:
    """The value read glyph by glyph by the template reader that sees only `view`.

    The reader knows where the asked value's glyphs are (to a pixel of the view); `region`
    is unused (the evidence value always lies in a crop of its own box).
    """
    target = sample.meta["target"]
    alphabet = DIGITS + LETTERS if sample.meta["kind"] == "poster" else DIGITS
    return "".join(read_glyph(view, to_view(box), alphabet) for box in target["glyph_boxes"])
