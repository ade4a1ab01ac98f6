"""Drawing helpers shared by the synthetic families, and the base class they build on.

Everything is drawn from a seeded `numpy.random.Generator`, so one seed gives one picture.
Glyphs (digits and a few letters) come from a 5x7 dot-matrix font rendered as an
anti-aliased coverage mask at any size, so they stay legible when large and blur away
predictably when a view is shrunk. `read_glyph` is the matching template reader: the
benchmarks and tests use it to measure what a view makes legible.
"""

from __future__ import annotations

import abc
import math
import re
from functools import lru_cache
from typing import ClassVar, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pxr_env.ops import PixelBounds, crop_image, smart_resize, smart_resize_shape
from pxr_env.tasks.base import Sample

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]

# Well-separated colours with everyday names (the names appear in questions).
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "cyan": (20, 200, 220),
    "pink": (250, 120, 190),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "hexagon", "star")

# 5x7 dot-matrix glyphs. Letters that look like digits (B, D, G, I, O, Q, S, Z) are left out.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "F": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "J": ("00111", "00010", "00010", "00010", "00010", "10010", "01100"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "N": ("10001", "10001", "11001", "10101", "10011", "10001", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "V": ("10001", "10001", "10001", "10001", "10001", "01010", "00100"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "Y": ("10001", "10001", "01010", "00100", "00100", "00100", "00100"),
}
DIGITS: tuple[str, ...] = tuple("0123456789")
LETTERS: tuple[str, ...] = tuple(c for c in _FONT if c.isalpha())
GLYPH_ASPECT = 5 / 7  # width / height of a glyph cell

# The "tiny" pixel preset the families are designed against (see docs/tasks.md): the
# image shown within 64*28^2 pixels (about 224x224), crops magnified to about 224x224,
# video frames within 16*28^2 (about 112x112) until selected.
TINY = PixelBounds.preset("tiny")
TINY_VIEW_SIDE = 224.0  # sqrt(64) * 28: a fraction f of sqrt(width * height) is f * 224 px in view

# Photographs bundled with scikit-image (no download needed); grayscale ones are made RGB.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "page", "coins", "camera", "brick", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "retina",
)
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "photo")


# --------------------------------------------------------------------------- glyphs

def _bitmap(char: str) -> np.ndarray:
    try:
        rows = _FONT[char]
    except KeyError:
        raise ValueError(f"no glyph for {char!r}; glyphs exist for {''.join(_FONT)}") from None
    return np.array([[c == "1" for c in row] for row in rows], dtype=np.float32)


@lru_cache(maxsize=4096)
def glyph_mask(char: str, width: int, height: int) -> np.ndarray:
    """Coverage in [0, 1] of `char` drawn to fill `width` x `height` pixels (anti-aliased)."""
    if width < 1 or height < 1:
        raise ValueError(f"a glyph needs a positive size, got {width}x{height}")
    up = np.kron(_bitmap(char), np.ones((16, 16), dtype=np.float32))
    image = Image.fromarray((up * 255).astype(np.uint8), mode="L")
    mask = np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    mask.setflags(write=False)
    return mask


def glyph_size(height: float) -> tuple[int, int]:
    """(width, height) in whole pixels of a glyph `height` pixels tall."""
    h = max(1, int(round(height)))
    return max(1, int(round(h * GLYPH_ASPECT))), h


def blend(canvas: np.ndarray, mask: np.ndarray, left: int, top: int, colour: RGB) -> None:
    """Paint `colour` onto `canvas` (in place) through coverage `mask` placed at (left, top)."""
    h, w = mask.shape
    region = canvas[top:top + h, left:left + w].astype(np.float32)
    alpha = mask[: region.shape[0], : region.shape[1], None]
    region = region * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    canvas[top:top + h, left:left + w] = np.round(region).astype(np.uint8)


def draw_glyph(canvas: np.ndarray, char: str, centre: tuple[float, float], height: float,
               colour: RGB) -> Box:
    """Draw `char` centred at `centre`, `height` px tall; returns its (x1, y1, x2, y2) box."""
    w, h = glyph_size(height)
    left, top = int(round(centre[0] - w / 2)), int(round(centre[1] - h / 2))
    blend(canvas, glyph_mask(char, w, h), left, top, colour)
    return (float(left), float(top), float(left + w), float(top + h))


def text_width(text: str, height: float, spacing: float = 0.35) -> float:
    """Width in pixels of `text` in the glyph font, `height` px tall (see `draw_text`)."""
    w, _ = glyph_size(height)
    return len(text) * w + (len(text) - 1) * spacing * w


def draw_text(canvas: np.ndarray, text: str, left: float, top: float, height: float, colour: RGB,
              spacing: float = 0.35) -> list[Box]:
    """Draw `text` in the glyph font from (left, top); returns each glyph's box."""
    w, h = glyph_size(height)
    boxes = []
    for i, char in enumerate(text):
        x = left + i * w * (1 + spacing)
        boxes.append(draw_glyph(canvas, char, (x + w / 2, top + h / 2), h, colour))
    return boxes


@lru_cache(maxsize=64)
def label_font(size: int) -> "ImageFont.FreeTypeFont | ImageFont.ImageFont":
    """PIL's default font at `size` px (scalable when PIL has FreeType), for labels and titles."""
    from PIL import ImageFont

    return ImageFont.load_default(size=max(1, int(size)))


def ink_for(colour: RGB) -> RGB:
    """Black or white, whichever contrasts more with `colour` (for glyphs on a tag)."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


@lru_cache(maxsize=8)
def _templates(alphabet: tuple[str, ...]) -> np.ndarray:
    """Zero-mean, unit-norm templates (N, 21, 15) of `alphabet` for `read_glyph`."""
    stack = np.stack([glyph_mask(c, 15, 21) for c in alphabet]).astype(np.float64)
    stack -= stack.mean(axis=(1, 2), keepdims=True)
    stack /= np.linalg.norm(stack, axis=(1, 2), keepdims=True)
    return stack


def resample(view: np.ndarray, box: Box, size: tuple[int, int], gray: bool = False) -> np.ndarray:
    """The region `box` (x1, y1, x2, y2, fractional, may leave the view) of `view`, resampled
    bilinearly to `size` = (width, height); the view's edges extend outwards."""
    x1, y1, x2, y2 = box
    left, top = int(math.floor(min(x1, 0.0))), int(math.floor(min(y1, 0.0)))
    right = int(math.ceil(max(x2 - view.shape[1], 0.0)))
    bottom = int(math.ceil(max(y2 - view.shape[0], 0.0)))
    array = np.asarray(view, dtype=np.uint8)
    if left or top or right or bottom:
        array = np.pad(array, ((-top, bottom), (-left, right), (0, 0)), mode="edge")
    image = Image.fromarray(array)
    if gray:
        image = image.convert("L")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR,
                                   box=(x1 - left, y1 - top, x2 - left, y2 - top)), dtype=np.float64)


def glyph_scores(view: np.ndarray, box: Box, alphabet: Sequence[str]) -> np.ndarray:
    """Template-match scores (|normalized correlation|) of the glyph at `box` of `view`.

    `box` is (x1, y1, x2, y2) in the view's pixels. The reader localises only to whole
    pixels of the view it sees (the box is rounded to the pixel grid, as any observer of
    that view would), then resamples the patch. Ink polarity does not matter. A patch of
    almost uniform colour scores 0 for every glyph.
    """
    x1, y1, x2, y2 = (float(round(v)) for v in box)
    pad_x, pad_y = (x2 - x1) / 15, (y2 - y1) / 21
    # Resample a slightly larger window, then try shifts of up to one template pixel.
    patch = resample(view, (x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y), (17, 23), gray=True)
    templates = _templates(tuple(alphabet))
    best = np.zeros(len(alphabet))
    for dy in range(3):
        for dx in range(3):
            p = patch[dy:dy + 21, dx:dx + 15]
            p = p - p.mean()
            norm = np.linalg.norm(p)
            if norm < 1e-6:
                continue
            best = np.maximum(best, np.abs(np.tensordot(templates, p / norm, axes=([1, 2], [0, 1]))))
    return best


def read_glyph(view: np.ndarray, box: Box, alphabet: Sequence[str]) -> str:
    """The glyph of `alphabet` that best matches the patch at `box` of `view`."""
    return alphabet[int(np.argmax(glyph_scores(view, box, alphabet)))]


@lru_cache(maxsize=8)
def _shape_templates(shapes: tuple[str, ...]) -> np.ndarray:
    """Zero-mean, unit-norm coverage templates (N, 21, 21) of `shapes` for `read_shape`."""
    stack = []
    for shape in shapes:
        image = Image.new("L", (84, 84), 0)
        draw_shape(ImageDraw.Draw(image), shape, (8, 8, 76, 76), 255)
        stack.append(np.asarray(image.resize((21, 21), Image.Resampling.BOX), dtype=np.float64))
    a = np.stack(stack)
    a -= a.mean(axis=(1, 2), keepdims=True)
    a /= np.linalg.norm(a, axis=(1, 2), keepdims=True)
    return a


def read_shape(view: np.ndarray, box: Box, shapes: Sequence[str] = SHAPES) -> tuple[str, str]:
    """(colour name, shape) of the object filling `box` of `view`, by template matching.

    Like `read_glyph`, the reader localises to whole pixels of the view. The colour is the
    palette colour nearest the patch centre; the shape is the template that best matches
    the patch's similarity to that colour.
    """
    x1, y1, x2, y2 = (float(round(v)) for v in box)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    mx, my = (x2 - x1) * 8 / 68, (y2 - y1) * 8 / 68  # the templates' margin around the shape
    patch = resample(view, (x1 - mx, y1 - my, x2 + mx, y2 + my), (21, 21))
    centre = patch[8:13, 8:13].reshape(-1, 3).mean(axis=0)
    colour = nearest_colour(centre)
    similarity = -np.sqrt(((patch - np.asarray(PALETTE[colour], dtype=np.float64)) ** 2).sum(axis=2))
    similarity -= similarity.mean()
    norm = np.linalg.norm(similarity)
    if norm < 1e-6:
        return colour, shapes[0]
    scores = np.tensordot(_shape_templates(tuple(shapes)), similarity / norm, axes=([1, 2], [0, 1]))
    return colour, shapes[int(np.argmax(scores))]


# --------------------------------------------------------------------------- views

def initial_view(image: np.ndarray, bounds: tuple[int, int] = TINY.image) -> tuple[np.ndarray, float, float]:
    """The image as first shown (smart-resized to `bounds`) and its x and y scale factors."""
    view = smart_resize(image, bounds)
    return view, view.shape[1] / image.shape[1], view.shape[0] / image.shape[0]


def crop_view(image: np.ndarray, box: Box, image_bounds: tuple[int, int] = TINY.image,
              crop_bounds: tuple[int, int] = TINY.crop) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """What `crop_image` shows for a crop of `box` (pixels of `image`) asked on the initial view.

    Returns the shown crop and its pixel box (left, top, right, bottom) in `image`.
    """
    height, width = image.shape[:2]
    shown_h, shown_w = smart_resize_shape(height, width, *image_bounds)
    fractions = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    fractions = [min(f, 0.9999) for f in fractions]
    _, shown, pixel_box = crop_image([image], [(shown_w, shown_h)], fractions, 1, crop_bounds)
    return shown, pixel_box


def map_box(box: Box, pixel_box: tuple[int, int, int, int], shown: np.ndarray) -> Box:
    """Map `box` (pixels of the original) into a crop view of `pixel_box` shown as `shown`."""
    left, top, right, bottom = pixel_box
    sx, sy = shown.shape[1] / (right - left), shown.shape[0] / (bottom - top)
    return ((box[0] - left) * sx, (box[1] - top) * sy, (box[2] - left) * sx, (box[3] - top) * sy)


def scale_box(box: Box, sx: float, sy: float) -> Box:
    """`box` scaled by (sx, sy)."""
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box containing every box of `boxes`."""
    if not boxes:
        raise ValueError("the union of no boxes is undefined")
    a = np.asarray(boxes, dtype=np.float64)
    return (float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 2].max()), float(a[:, 3].max()))


def nearest_colour(rgb: Sequence[float], names: Sequence[str] = COLOUR_NAMES) -> str:
    """The palette colour among `names` nearest to `rgb`."""
    ref = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


# --------------------------------------------------------------------------- shapes

def shape_points(shape: str, box: Box) -> list[tuple[float, float]]:
    """Polygon of `shape` inscribed in `box` (not used for circles)."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60.0)
        return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: RGB,
               outline: RGB | None = None) -> None:
    """Draw a filled `shape` inscribed in `box`."""
    if shape == "circle":
        draw.ellipse(box, fill=colour, outline=outline)
    else:
        draw.polygon(shape_points(shape, box), fill=colour, outline=outline)


def glyph_height_for(shape: str, side: float) -> float:
    """Height of a glyph that fits inside a `shape` whose box side is `side`."""
    return side * {"square": 0.7, "circle": 0.6, "hexagon": 0.6, "diamond": 0.45,
                   "triangle": 0.4, "star": 0.3}[shape]


def glyph_centre(shape: str, box: Box) -> tuple[float, float]:
    """Where a glyph sits inside `shape` drawn in `box` (lower for triangles)."""
    x1, y1, x2, y2 = box
    dy = 0.15 * (y2 - y1) if shape == "triangle" else 0.0
    return (x1 + x2) / 2, (y1 + y2) / 2 + dy


# --------------------------------------------------------------------------- backgrounds

@lru_cache(maxsize=len(PHOTO_NAMES))
def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as (H, W, 3) uint8 (cached, read-only)."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose one of {PHOTO_NAMES}")
    import skimage.data

    from pxr_env.images import to_rgb_uint8

    image = to_rgb_uint8(getattr(skimage.data, name)())
    image.setflags(write=False)
    return image


def background(kind: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A `width` x `height` RGB background: ``plain``, ``noise`` or ``photo``.

    Drawn at half or quarter resolution and upscaled, which keeps a 2000 px canvas to a few
    milliseconds; the texture is coarser than the glyphs that matter, so nothing is lost.
    """
    if kind == "plain":
        return Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, size=3)))
    if kind == "noise":
        qw, qh = max(2, width // 4), max(2, height // 4)
        coarse = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((qw, qh), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-40, 41, size=(qh, qw, 1), dtype=np.int16)
        quarter = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        return quarter.resize((width, height), Image.Resampling.NEAREST)
    if kind == "photo":
        source = photo(PHOTO_NAMES[int(rng.integers(len(PHOTO_NAMES)))])
        sh, sw = source.shape[:2]
        # A random window of at least 60% of each side, stretched to the canvas.
        ch, cw = int(sh * rng.uniform(0.6, 1.0)), int(sw * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
        window = Image.fromarray(np.ascontiguousarray(source[top:top + ch, left:left + cw]))
        half = window.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
        return half.resize((width, height), Image.Resampling.NEAREST)
    raise ValueError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")


# --------------------------------------------------------------------------- placement

class Placer:
    """Rejection sampling of boxes that keep clear of the boxes already placed."""

    def __init__(self, width: int, height: int, margin: float = 0.0) -> None:
        self.width, self.height, self.margin = width, height, margin
        self.boxes: list[Box] = []

    def free(self, box: Box, gap: float = 0.0) -> bool:
        """Whether `box` (grown by `gap`) lies inside the canvas and overlaps no placed box."""
        x1, y1, x2, y2 = box
        if x1 < self.margin or y1 < self.margin or x2 > self.width - self.margin or y2 > self.height - self.margin:
            return False
        if not self.boxes:
            return True
        a = np.asarray(self.boxes)
        overlap = ((a[:, 0] < x2 + gap) & (a[:, 2] > x1 - gap) & (a[:, 1] < y2 + gap) & (a[:, 3] > y1 - gap))
        return not bool(overlap.any())

    def place(self, rng: np.random.Generator, w: float, h: float, gap: float = 0.0,
              region: Box | None = None, tries: int = 200) -> Box | None:
        """A free box of size w x h (inside `region` if given), recorded; None if none found."""
        rx1, ry1, rx2, ry2 = region if region is not None else (0.0, 0.0, float(self.width), float(self.height))
        rx1, ry1 = max(rx1, self.margin), max(ry1, self.margin)
        rx2, ry2 = min(rx2, self.width - self.margin), min(ry2, self.height - self.margin)
        if rx2 - rx1 < w or ry2 - ry1 < h:
            return None
        for _ in range(tries):
            x, y = rng.uniform(rx1, rx2 - w), rng.uniform(ry1, ry2 - h)
            box = (float(round(x)), float(round(y)), float(round(x + w)), float(round(y + h)))
            if self.free(box, gap):
                self.boxes.append(box)
                return box
        return None


def other_colours(rng: np.random.Generator, exclude: Sequence[str], k: int,
                  names: Sequence[str] = COLOUR_NAMES) -> list[str]:
    """`k` distinct palette colours not in `exclude`, in random order."""
    pool = [c for c in names if c not in exclude]
    if k > len(pool):
        raise ValueError(f"asked for {k} colours outside {list(exclude)}, only {len(pool)} exist")
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


# --------------------------------------------------------------------------- sources

def check_range(name: str, value: Sequence[float], lo: float, hi: float, integer: bool = False) -> tuple:
    """Validate a (min, max) knob within [lo, hi]; the error says how to fix it."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
    if integer and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (a, b)):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {value!r}")
    return (a, b)


def check_share(name: str, value: float) -> float:
    """Validate a probability knob."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """Validate a non-empty subset of `allowed`."""
    values = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"{name} must be a non-empty list drawn from {tuple(allowed)}, got {values!r}")
    return values


_ID = re.compile(r"^(?P<family>[a-z-]+)/(?P<seed>\d+)$")


class SyntheticSource(abc.ABC):
    """Base of the synthetic families: ids are ``"<family>/<seed>"``, samples regenerate from the seed."""

    name: ClassVar[str]

    @abc.abstractmethod
    def generate(self, seed: int) -> Sample:
        """The sample of `seed` under this source's configuration."""

    def sample(self, rng: np.random.Generator) -> Sample:
        """Draw a seed from `rng` and generate its sample."""
        return self.generate(int(rng.integers(0, 2**31 - 1)))

    def get(self, sample_id: str) -> Sample:
        """Regenerate the sample `sample_id`; KeyError when the id is not this family's."""
        match = _ID.match(sample_id) if isinstance(sample_id, str) else None
        if match is None or match["family"] != self.name:
            raise KeyError(f"{sample_id!r} is not a {self.name!r} sample id (expected '{self.name}/<seed>')")
        return self.generate(int(match["seed"]))

    def sample_id(self, seed: int) -> str:
        return f"{self.name}/{seed}"

    def draw_tier(self, rng: np.random.Generator) -> str:
        """``"shortcut"`` with probability `shortcut_share`, else ``"hard"`` with probability
        `hard_share`, else ``"easy"`` (the families define both shares)."""
        if rng.random() < self.shortcut_share:  # type: ignore[attr-defined]
            return "shortcut"
        return "hard" if rng.random() < self.hard_share else "easy"  # type: ignore[attr-defined]

    def draw_canvas(self, rng: np.random.Generator) -> tuple[int, int, float]:
        """Width and height drawn from the `canvas` range, and the scale ``sqrt(width * height)``."""
        low, high = self.canvas  # type: ignore[attr-defined]
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        return width, height, math.sqrt(width * height)
