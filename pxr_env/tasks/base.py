"""The `Sample` record every task source yields, and the `TaskSource` protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

AnswerType = Literal["choice", "number", "text", "anls"]
ANSWER_TYPES: tuple[str, ...] = ("choice", "number", "text", "anls")
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Sample:
    """One question about one image or one video.

    Visual input is either decoded (`image` as an ``(H, W, 3)`` uint8 array, `video` as a
    ``(T, H, W, 3)`` uint8 array of already-sampled frames) or a path read lazily through
    `pxr_env.images.load_image` / `pxr_env.video.read_frames`, so that big datasets are
    not decoded up front. Exactly one of `image` and `video` is set.

    `answers` holds every accepted gold answer (as text); for ``answer_type == "choice"``
    each answer is a letter (``"A"``, ``"B"``, ...) indexing `choices`. The evidence is
    where the answer lives: `evidence_box` in pixels ``(x1, y1, x2, y2)`` of the original
    image, `evidence_frames` as 1-based indices into the sampled frames.
    """

    sample_id: str
    family: str
    question: str
    answers: tuple[str, ...]
    answer_type: AnswerType
    choices: tuple[str, ...] = ()
    image: np.ndarray | Path | None = None
    video: np.ndarray | Path | None = None
    num_frames: int = 16
    video_window: tuple[float, float] | None = None
    evidence_box: tuple[float, float, float, float] | None = None
    evidence_frames: tuple[int, ...] = ()
    answerable_without_ops: bool | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.image is None) == (self.video is None):
            raise ValueError(f"sample {self.sample_id!r}: set exactly one of image and video")
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"sample {self.sample_id!r}: answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}"
            )
        if not self.answers:
            raise ValueError(f"sample {self.sample_id!r}: needs at least one gold answer")
        if self.answer_type == "choice":
            if not self.choices:
                raise ValueError(f"sample {self.sample_id!r}: a choice question needs choices")
            letters = CHOICE_LETTERS[: len(self.choices)]
            bad = [a for a in self.answers if a not in letters]
            if bad:
                raise ValueError(
                    f"sample {self.sample_id!r}: choice answers must be letters in {letters!r}, got {bad}"
                )

    @property
    def is_video(self) -> bool:
        return self.video is not None

    def load_image(self) -> np.ndarray:
        """The original image as ``(H, W, 3)`` uint8, decoded safely if it is a path."""
        if self.image is None:
            raise ValueError(f"sample {self.sample_id!r} is a video, not an image")
        if isinstance(self.image, np.ndarray):
            return self.image
        from pxr_env.images import load_image

        return load_image(self.image, context=f"sample {self.sample_id!r}")

    def load_frames(self) -> np.ndarray:
        """The `num_frames` sampled video frames as ``(T, H, W, 3)`` uint8."""
        if self.video is None:
            raise ValueError(f"sample {self.sample_id!r} is an image, not a video")
        if isinstance(self.video, np.ndarray):
            return self.video
        from pxr_env.video import read_frames

        start, end = self.video_window if self.video_window else (None, None)
        return read_frames(
            self.video, num_frames=self.num_frames, start=start, end=end,
            context=f"sample {self.sample_id!r}",
        )

    def question_with_choices(self) -> str:
        """The question followed by lettered options when it has choices."""
        if not self.choices:
            return self.question
        options = "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\nOptions:\n{options}"


@runtime_checkable
class TaskSource(Protocol):
    """Anything that yields samples: synthetic generators and dataset loaders alike.

    `sample` draws one sample with the environment's generator (so seeding the env
    seeds the task); `get` rebuilds one sample from its id (for replay and evaluation).
    """

    name: str

    def sample(self, rng: np.random.Generator) -> Sample: ...

    def get(self, sample_id: str) -> Sample: ...


class DatasetSource:
    """A finite list of samples (real benchmarks, JSONL files): draws uniformly."""

    def __init__(self, name: str, samples: Sequence[Sample]) -> None:
        if not samples:
            raise ValueError(f"task source {name!r} has no samples")
        self.name = name
        self.samples = list(samples)
        self._by_id = {s.sample_id: s for s in self.samples}
        if len(self._by_id) != len(self.samples):
            raise ValueError(f"task source {name!r} has duplicate sample ids")

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.samples[int(rng.integers(len(self.samples)))]

    def get(self, sample_id: str) -> Sample:
        try:
            return self._by_id[sample_id]
        except KeyError:
            raise KeyError(f"task source {self.name!r} has no sample {sample_id!r}") from None
