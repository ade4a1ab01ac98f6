"""Spaces for language-model turns and variable-size images.

Gymnasium's `Text` space admits only alphanumerics by default, and `Box` needs one fixed
shape, while model turns hold any Unicode and images come in many sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "\n\téàüß°µ→✓中文"


class UnicodeText(spaces.Text):
    """Any Python string of at most `max_length` characters (model output is free text).

    `sample()` draws from a printable charset that includes spaces, punctuation, JSON
    characters and a few non-ASCII letters; `contains` accepts every character.
    """

    def __init__(self, max_length: int, min_length: int = 0, seed: int | np.random.Generator | None = None) -> None:
        super().__init__(max_length=max_length, min_length=min_length, charset=PRINTABLE, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, UnicodeText) and (self.min_length, self.max_length) == (other.min_length, other.max_length)


class ImageList(spaces.Space[tuple]):
    """A tuple of 0..`max_images` RGB uint8 images, each ``(H, W, 3)`` with sides in [`min_side`, `max_side`]."""

    def __init__(self, max_images: int, max_side: int, min_side: int = 1,
                 seed: int | np.random.Generator | None = None) -> None:
        if max_images < 1 or not 1 <= min_side <= max_side:
            raise ValueError("ImageList needs max_images >= 1 and 1 <= min_side <= max_side")
        self.max_images, self.max_side, self.min_side = max_images, max_side, min_side
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> tuple:
        count = int(self.np_random.integers(0, self.max_images + 1))
        images = []
        for _ in range(count):
            h, w = self.np_random.integers(self.min_side, self.max_side + 1, size=2)
            images.append(self.np_random.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        return tuple(images)

    def contains(self, x: Any) -> bool:
        if not isinstance(x, tuple) or len(x) > self.max_images:
            return False
        return all(
            isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
            and self.min_side <= im.shape[0] <= self.max_side and self.min_side <= im.shape[1] <= self.max_side
            for im in x
        )

    def to_jsonable(self, sample_n: Any) -> list:
        return [[im.tolist() for im in images] for images in sample_n]

    def from_jsonable(self, sample_n: list) -> list:
        return [tuple(np.asarray(im, dtype=np.uint8) for im in images) for images in sample_n]

    def __repr__(self) -> str:
        return f"ImageList(max_images={self.max_images}, sides=[{self.min_side}, {self.max_side}])"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ImageList) and (self.max_images, self.max_side, self.min_side) == (
            other.max_images, other.max_side, other.min_side)
