"""The tiny model's frame-window vocabulary: one token per run of consecutive frames.

Choosing frames means writing numbers (``"target_frames": [6, 7]``). Written digit by
digit, a tiny model's choice stayed on one or two fixed frames on clips whose flash is
small (docs/results.md, "Choosing frames on the small flashes"), though its image
encoder showed the flash. So, as a crop box is one pointer token (`agents.vlm.tiny.boxes`),
a window of consecutive frames is one token whose surface text is the numbers as they
stand inside ``json.dumps`` of the list, e.g. ``6, 7`` or ``6, 7, 8`` (1-based frame numbers,
as ``target_frames`` takes them). Traces, the parser and the environment read plain
numbers; the token's logit comes from the frames it names (the modeling file).

No other text of the tiny model's traces holds such a string: box tokens spell fractions
(``0.32, 0.46``), whose numbers after a comma start with ``0``, and frame numbers never do.
Elsewhere a longer number after the comma (``1, 20``) tokenizes as the window ``1, 2`` and
``0``; decoding gives the text back.
Token order: by window length, then by first frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FrameWindows:
    """Tokens for the runs of `lengths` consecutive frames among frames ``1..max_frames``."""

    lengths: tuple[int, ...] = (2, 3)
    max_frames: int = 16
    frames: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    texts: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not self.lengths or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"frame window lengths must be distinct and at least one, got {self.lengths}")
        if any(not 2 <= n <= self.max_frames for n in self.lengths):
            raise ValueError(f"frame window lengths must be in [2, max_frames={self.max_frames}] (one frame "
                             f"is an ordinary number), got {self.lengths}")
        frames = tuple(tuple(range(first, first + n)) for n in self.lengths
                       for first in range(1, self.max_frames - n + 2))
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "texts", tuple(json.dumps(list(f))[1:-1] for f in frames))

    def __len__(self) -> int:
        return len(self.frames)
