"""The tiny model's box vocabulary: one token per (grid cell, box size), spelled as a bbox.

A from-scratch model cannot learn to write coordinates digit by digit in minutes, but it
can learn to *point* at an image token. So a crop box is one token of the vocabulary
whose surface text is the four numbers of a standard ``bbox_2d``, e.g.
``0.32, 0.46, 0.36, 0.5``: the box of side `size` centred on the centre of `cell` of a
`grid` x `grid` partition of the image, rounded to two decimals and clipped to
``[0, 0.99]`` so that all four numbers stay below 1 (the environment reads numbers >= 1
as pixels). The numbers are spelled as ``json.dumps`` spells them, so a trace that writes
``format_tool_call("crop_image", {"bbox_2d": list(vocab.boxes[i]), ...})`` tokenizes into
the box token. The model writes::

    <tool_call>
    {"name": "crop_image", "arguments": {"bbox_2d": [<box token>], "target_image": 1}}
    </tool_call>

which is an ordinary call for the environment, the parser and the traces. The token's
logit is the sum of a *pointer* logit for its cell (computed from the image tokens, see
the modeling file) and a size logit. Token order is cell-major:
``index = cell * len(sizes) + size``, ``cell = row * grid + column``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from pxr_env.ops import box_iou

DEFAULT_GRID = 14
DEFAULT_BOX_SIZES: tuple[float, ...] = (0.04, 0.12, 0.25, 0.45)
"""Inner box sides as fractions of the image side; the crop op pads 0.1 on every side,
so the crops span about 0.24, 0.32, 0.45 and 0.65 of the image side."""

MAX_FRACTION = 0.99


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def box_text(box: Sequence[float]) -> str:
    """The four numbers as they stand inside ``json.dumps`` of the bbox list."""
    return json.dumps(list(box))[1:-1]


@dataclass(frozen=True)
class BoxVocab:
    """The (cell, size) boxes of a `grid` x `grid` partition and their token texts."""

    grid: int = DEFAULT_GRID
    sizes: tuple[float, ...] = DEFAULT_BOX_SIZES
    texts: tuple[str, ...] = field(init=False, repr=False)
    boxes: tuple[tuple[float, float, float, float], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1, got {self.grid}")
        if not self.sizes or any(not 0 < s < MAX_FRACTION for s in self.sizes):
            raise ValueError(f"box sizes must be fractions in (0, {MAX_FRACTION}), got {self.sizes}")
        boxes, texts = [], []
        for cell in range(self.grid * self.grid):
            row, col = divmod(cell, self.grid)
            cx, cy = (col + 0.5) / self.grid, (row + 0.5) / self.grid
            for size in self.sizes:
                half = size / 2
                box = tuple(float(_fmt(min(max(v, 0.0), MAX_FRACTION)))
                            for v in (cx - half, cy - half, cx + half, cy + half))
                boxes.append(box)
                texts.append(box_text(box))
        if len(set(texts)) != len(texts):
            raise ValueError(f"grid {self.grid} with sizes {self.sizes} gives two boxes the same text; pick other sizes")
        object.__setattr__(self, "boxes", tuple(boxes))
        object.__setattr__(self, "texts", tuple(texts))

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    def __len__(self) -> int:
        return len(self.texts)

    def index(self, cell: int, size: int) -> int:
        """Token index (0-based, within the box vocabulary) of `cell` and size number `size`."""
        if not (0 <= cell < self.num_cells and 0 <= size < len(self.sizes)):
            raise ValueError(f"cell {cell} / size {size} out of range ({self.num_cells} cells, {len(self.sizes)} sizes)")
        return cell * len(self.sizes) + size

    def split(self, index: int) -> tuple[int, int]:
        """(cell, size) of a token index."""
        if not 0 <= index < len(self):
            raise ValueError(f"box index {index} out of range [0, {len(self)})")
        return divmod(index, len(self.sizes))

    def cell_at(self, x: float, y: float) -> int:
        """The cell holding the point (x, y), given as fractions of the image size."""
        col = min(max(int(x * self.grid), 0), self.grid - 1)
        row = min(max(int(y * self.grid), 0), self.grid - 1)
        return row * self.grid + col

    def snap(self, bbox: Sequence[float]) -> int:
        """The token index whose box best overlaps `bbox` (fractions x1, y1, x2, y2; IoU, ties to the lower index).

        Trace synthesis writes ``vocab.texts[vocab.snap(evidence)]`` so that the tiny model
        sees boxes it can write itself.
        """
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"bbox must satisfy x1 < x2 and y1 < y2, got {list(bbox)}")
        ious = [box_iou(box, (x1, y1, x2, y2)) for box in self.boxes]
        return max(range(len(ious)), key=ious.__getitem__)
