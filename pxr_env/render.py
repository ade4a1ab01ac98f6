"""Pictures of an episode: the original with every crop box numbered, or the frame strip."""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np

from pxr_env.ops import resize

BOX_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def render_episode(image: np.ndarray | None, frames: np.ndarray | None,
                   crop_boxes: Sequence[tuple[float, float, float, float]] = (),
                   selected_frames: Sequence[int] = (), evidence_box: tuple[float, float, float, float] | None = None,
                   text: str = "", width: int = 640) -> np.ndarray:
    """An RGB picture: the image with crop boxes (numbered as images 2, 3, ...) or the video's
    frames with the selected ones outlined, above a strip with `text` (the latest turn)."""
    from PIL import Image, ImageDraw

    if image is not None:
        scale = width / image.shape[1]
        height = max(1, round(image.shape[0] * scale))
        canvas = Image.fromarray(resize(image, height, width))
        draw = ImageDraw.Draw(canvas)
        if evidence_box is not None:
            draw.rectangle([v * scale for v in evidence_box], outline=(255, 215, 0), width=2)
        for k, box in enumerate(crop_boxes):
            colour = BOX_COLOURS[k % len(BOX_COLOURS)]
            x1, y1, x2, y2 = (v * scale for v in box)
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
            draw.rectangle([x1, y1, x1 + 22, y1 + 18], fill=colour)
            draw.text((x1 + 5, y1 + 2), str(k + 2), fill=(255, 255, 255), font=_font(14))
    elif frames is not None:
        side = math.ceil(math.sqrt(len(frames)))
        cell = width // side
        canvas = Image.new("RGB", (width, cell * math.ceil(len(frames) / side)), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, frame in enumerate(frames):
            r, c = divmod(i, side)
            canvas.paste(Image.fromarray(resize(frame, cell, cell)), (c * cell, r * cell))
            if i + 1 in selected_frames:
                draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(230, 25, 75), width=4)
            draw.text((c * cell + 4, r * cell + 2), str(i + 1), fill=(255, 255, 255), font=_font(12))
    else:
        raise ValueError("render_episode needs an image or frames")
    lines = []
    for paragraph in text.splitlines()[:12]:
        lines.extend(textwrap.wrap(paragraph, width=width // 8) or [""])
    lines = lines[:8]
    strip = Image.new("RGB", (canvas.width, 20 + 16 * len(lines)), (250, 250, 250))
    ImageDraw.Draw(strip).multiline_text((8, 8), "\n".join(lines), fill=(20, 20, 20), font=_font(13), spacing=3)
    out = Image.new("RGB", (canvas.width, canvas.height + strip.height))
    out.paste(canvas, (0, 0))
    out.paste(strip, (0, canvas.height))
    return np.asarray(out)
