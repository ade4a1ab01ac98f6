"""The visual operations, as pure functions: smart resize, crop an image region, select frames.

They follow the released Pixel Reasoner tools (shared REFERENCE section 2). Every failure
raises `OpError` with a message meant for the policy; the environment turns it into an
``Execution error: <why>`` observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

PATCH = 28
MAX_ASPECT_RATIO = 200.0
CROP_PADDING = 0.1
MIN_CROP_SIDE = 28
MAX_FRAMES_PER_CALL = 8


class OpError(ValueError):
    """A visual operation that cannot be executed; the message is shown to the policy."""


@dataclass(frozen=True)
class PixelBounds:
    """Pixel-count bounds for each kind of image (Qwen2.5-VL smart resize).

    `image` and `crop` are (min, max) pixel counts; `frame` bounds each selected frame;
    `video` is the budget per frame of the initial low-resolution video view.
    """

    image: tuple[int, int]
    crop: tuple[int, int]
    frame: tuple[int, int]
    video: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("image", "crop", "frame", "video"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ValueError(f"PixelBounds.{name} must satisfy 0 < min <= max, got {(lo, hi)}")

    @classmethod
    def preset(cls, name: str) -> "PixelBounds":
        """``"train"`` / ``"eval"`` (the released bounds) or ``"tiny"`` (the CPU default)."""
        try:
            return PIXEL_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown pixel preset {name!r}; choose one of {sorted(PIXEL_PRESETS)}") from None

    @classmethod
    def resolve(cls, bounds: "str | PixelBounds | Mapping[str, Any]") -> "PixelBounds":
        """A preset name, a `PixelBounds`, or a JSON-friendly mapping: ``{"preset": name}`` (default
        ``"tiny"``) plus any of ``image``, ``crop``, ``frame``, ``video`` as ``[min, max]`` pixel
        counts that replace the preset's, e.g. ``{"crop": [12544, 12544]}`` for 112-px crops."""
        if isinstance(bounds, cls):
            return bounds
        if isinstance(bounds, str):
            return cls.preset(bounds)
        if not isinstance(bounds, Mapping):
            raise ValueError(f"pixel_bounds must be a preset name, a PixelBounds or a mapping, got {bounds!r}")
        fields = ("image", "crop", "frame", "video")
        unknown = sorted(set(bounds) - {"preset", *fields})
        if unknown:
            raise ValueError(f"pixel_bounds keys {unknown} are unknown; use 'preset' and any of {list(fields)}")
        base = cls.preset(bounds.get("preset", "tiny"))
        try:
            return cls(**{name: tuple(int(v) for v in bounds.get(name, getattr(base, name))) for name in fields})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pixel_bounds {dict(bounds)} must give [min, max] pixel counts: {exc}") from None


_P2 = PATCH * PATCH
PIXEL_PRESETS: dict[str, PixelBounds] = {
    # The released selected-frame bound is 400*28^2 (training) and "not resized" at
    # evaluation; the initial video view spreads 512*28^2 over the 16 frames.
    "train": PixelBounds(image=(4 * _P2, 2000 * _P2), crop=(4 * _P2, 1000 * _P2),
                         frame=(4 * _P2, 400 * _P2), video=(4 * _P2, 512 * _P2 // 16)),
    "eval": PixelBounds(image=(256 * _P2, 8000 * _P2), crop=(256 * _P2, 5120 * _P2),
                        frame=(4 * _P2, 16384 * _P2), video=(4 * _P2, 512 * _P2 // 16)),
    # The embedded default for small models on a CPU: the whole image in about 224x224,
    # every crop magnified to about 224x224, video frames at about 112x112 until selected.
    "tiny": PixelBounds(image=(4 * _P2, 64 * _P2), crop=(64 * _P2, 64 * _P2),
                        frame=(4 * _P2, 64 * _P2), video=(4 * _P2, 16 * _P2)),
}


def smart_resize_shape(height: int, width: int, min_pixels: int, max_pixels: int,
                       factor: int = PATCH) -> tuple[int, int]:
    """Qwen2.5-VL smart resize: sides multiples of `factor`, pixel count within bounds."""
    if height < 1 or width < 1:
        raise OpError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise OpError(
            f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_ASPECT_RATIO:.0f}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 image (bicubic; area-averaging when shrinking)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((width, height), method))


def smart_resize(image: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    """Resize `image` to its smart-resize shape within ``(min_pixels, max_pixels)``."""
    h, w = smart_resize_shape(image.shape[0], image.shape[1], *bounds)
    return resize(image, h, w)


def _as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpError(f"{what} must be a number, got {type(value).__name__} {value!r:.40}")
    number = float(value)
    if not math.isfinite(number):
        raise OpError(f"{what} must be a finite number, got {value!r}")
    return number


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpError(f"{what} must be an integer, got {type(value).__name__} {value!r:.40}")
    return value


def normalize_bbox(bbox_2d: Any, shown_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Fractions (x1, y1, x2, y2) of a box given as fractions (all four < 1) or pixels.

    Pixels refer to the image as the policy saw it, `shown_size` = (width, height).
    """
    if not isinstance(bbox_2d, (list, tuple)) or len(bbox_2d) != 4:
        raise OpError(f"bbox_2d must be a list of four numbers [x1, y1, x2, y2], got {bbox_2d!r:.80}")
    x1, y1, x2, y2 = (_as_number(v, f"bbox_2d[{i}]") for i, v in enumerate(bbox_2d))
    if min(x1, y1, x2, y2) < 0:
        raise OpError(f"bbox_2d has a negative coordinate: {[x1, y1, x2, y2]}")
    if not all(v < 1 for v in (x1, y1, x2, y2)):
        width, height = shown_size
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    if x2 <= x1 or y2 <= y1:
        raise OpError(f"bbox_2d is inverted or empty: need x1 < x2 and y1 < y2, got {list(bbox_2d)}")
    if x1 >= 1 or y1 >= 1:
        raise OpError(f"bbox_2d starts outside the image: {list(bbox_2d)}")
    return x1, y1, x2, y2


def crop_box_pixels(fractions: tuple[float, float, float, float], size: tuple[int, int],
                    padding: float = CROP_PADDING) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) in an image of `size` = (width, height): pad, clip."""
    x1, y1, x2, y2 = fractions
    x1, y1 = max(0.0, x1 - padding), max(0.0, y1 - padding)
    x2, y2 = min(1.0, x2 + padding), min(1.0, y2 + padding)
    width, height = size
    return (int(math.floor(x1 * width)), int(math.floor(y1 * height)),
            int(math.ceil(x2 * width)), int(math.ceil(y2 * height)))


def crop_image(images: Sequence[np.ndarray], shown_sizes: Sequence[tuple[int, int]], bbox_2d: Any,
               target_image: Any, bounds: tuple[int, int], padding: float = CROP_PADDING,
               min_side: int = MIN_CROP_SIDE) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Crop a region of one image of the episode.

    `images` are the full-resolution sources [original, crop 1, ...]; `shown_sizes` are the
    (width, height) the policy saw them at; `target_image` is 1-based. Returns the
    full-resolution crop (kept for crops of crops), the crop smart-resized to `bounds`
    (what the policy sees) and the pixel box in the target's source.
    """
    index = _as_index(target_image, "target_image")
    if not 1 <= index <= len(images):
        raise OpError(f"target_image {index} is out of range: there are {len(images)} image(s), numbered from 1")
    source = images[index - 1]
    fractions = normalize_bbox(bbox_2d, shown_sizes[index - 1])
    height, width = source.shape[:2]
    left, top, right, bottom = crop_box_pixels(fractions, (width, height), padding)
    if right - left <= min_side or bottom - top <= min_side:
        raise OpError(
            f"cropped image is too small: {right - left}x{bottom - top} px; it must be more than "
            f"{min_side} px on each side"
        )
    crop = np.ascontiguousarray(source[top:bottom, left:right])
    return crop, smart_resize(crop, bounds), (left, top, right, bottom)


def select_frames(frames: np.ndarray | None, target_frames: Any, bounds: tuple[int, int],
                  max_frames: int = MAX_FRAMES_PER_CALL) -> tuple[list[int], list[np.ndarray]]:
    """Frames (1-based `target_frames`) of the episode's video, resized within `bounds`."""
    if frames is None:
        raise OpError("select_frames works only on a video; this question is about an image (use crop_image)")
    if not isinstance(target_frames, (list, tuple)) or not target_frames:
        raise OpError(f"target_frames must be a non-empty list of frame numbers, got {target_frames!r:.80}")
    if len(target_frames) > max_frames:
        raise OpError(f"too many frames: {len(target_frames)} requested, at most {max_frames} per call")
    indices = [_as_index(v, f"target_frames[{i}]") for i, v in enumerate(target_frames)]
    bad = [i for i in indices if not 1 <= i <= len(frames)]
    if bad:
        raise OpError(f"frame number(s) {bad} out of range: the video has {len(frames)} frames, numbered from 1")
    return indices, [smart_resize(frames[i - 1], bounds) for i in indices]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
