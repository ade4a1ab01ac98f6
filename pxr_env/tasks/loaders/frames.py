"""`FrameFilesSample`: a video question whose video is a list of frame images on disk.

Some benchmark releases store a video as extracted frames (the Pixel Reasoner parquet
lists frame files; MVBench's episodic-reasoning task stores a folder of JPEGs). The
frames stay paths until reset, like every other dataset sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pxr_env.images import MediaError, load_image
from pxr_env.tasks.base import Sample


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` indices spread over `total` items (the centre of each equal segment)."""
    if total <= count:
        return list(range(total))
    return [int((k + 0.5) * total / count) for k in range(count)]


@dataclass(frozen=True)
class FrameFilesSample(Sample):
    """A `Sample` whose frames are image files; `video` is the folder of the first frame.

    `frame_files` are the candidate frames in time order (already restricted to
    `video_window` when the record has one); `load_frames` decodes `num_frames` of them
    spread uniformly, or all of them when there are fewer.
    """

    frame_files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.frame_files:
            raise ValueError(f"sample {self.sample_id!r}: a frame-file video needs at least one frame file")

    def load_frames(self) -> np.ndarray:
        """The sampled frames as ``(T, H, W, 3)`` uint8; every frame must have the same size."""
        context = f"sample {self.sample_id!r}"
        picked = [self.frame_files[i] for i in uniform_indices(len(self.frame_files), self.num_frames)]
        frames = [load_image(p, context=context) for p in picked]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise MediaError(f"frames of {context} differ in size: {sorted(shapes)} (first file {str(picked[0])!r})")
        return np.stack(frames)
