"""Safe image decoding: size checked before decoding, every mode converted to RGB uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_MAX_PIXELS = 64_000_000


class MediaError(ValueError):
    """An image or video that cannot be used; the message names the file and the record."""


def resolve_inside(root: str | Path, relative: str | Path, context: str = "") -> Path:
    """`root / relative`, refused when it escapes `root` (``..``, absolute paths, symlinks)."""
    root_path = Path(root).resolve()
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        where = f" ({context})" if context else ""
        raise MediaError(f"path {str(relative)!r} escapes the dataset folder {str(root_path)!r}{where}")
    return candidate


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Convert grayscale, RGBA, 16-bit or float arrays to ``(H, W, 3)`` uint8."""
    a = np.asarray(array)
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.size and a.max() > 255):
        a = (a.astype(np.float64) / 257.0).round()
    elif a.dtype.kind == "f":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"cannot convert an array of shape {array.shape} to an RGB image")
    return np.ascontiguousarray(a)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, context: str = "") -> np.ndarray:
    """Decode `path` to ``(H, W, 3)`` uint8, refusing images above `max_pixels` before decoding.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted.
    Every failure is a `MediaError` naming the file and `context` (e.g. the record).
    """
    from PIL import Image

    where = f" ({context})" if context else ""
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"image file {str(p)!r} is missing{where}")
    try:
        with Image.open(p) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(
                    f"image {str(p)!r} has {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels}{where}; raise max_pixels if it is trusted"
                )
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return to_rgb_uint8(np.asarray(im))
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                return to_rgb_uint8(np.asarray(im.convert("RGBA")))
            return to_rgb_uint8(np.asarray(im.convert("RGB")))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # PIL refuses the very largest at open
        raise MediaError(f"image {str(p)!r} is far above the pixel limit of {max_pixels}{where}: {exc}") from exc
    except Exception as exc:  # PIL raises many types for corrupt files
        raise MediaError(f"image {str(p)!r} cannot be decoded{where}: {exc}") from exc
