"""Synthetic task families: generated questions whose evidence is small and known.

`FAMILIES` maps each family name to its class; constructing one with no arguments gives
the default suite, and keyword arguments are its difficulty knobs. See docs/tasks.md.

`reader_answer` and `chance_score` are the measuring stick of docs/tasks.md: a template
reader that answers from exactly what a policy would see, either the initial observation
or the observation an oracle operation returns (a crop of the evidence box, the evidence
frames). `benchmarks/legibility.py` and the tests use them.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

from pxr_env.ops import PixelBounds, smart_resize
from pxr_env.scoring import anls
from pxr_env.tasks.base import Sample, TaskSource
from pxr_env.tasks.synthetic import chart, clips, count, zoom_read
from pxr_env.tasks.synthetic.chart import Chart
from pxr_env.tasks.synthetic.clips import Clips
from pxr_env.tasks.synthetic.common import DIGITS, LETTERS, TINY, crop_view, initial_view, map_box, scale_box
from pxr_env.tasks.synthetic.count import Count
from pxr_env.tasks.synthetic.zoom_read import ZoomRead

FAMILIES: dict[str, Callable[..., TaskSource]] = {
    "zoom-read": ZoomRead,
    "count": Count,
    "chart": Chart,
    "video": Clips,
}

_IMAGE_READERS = {"zoom-read": zoom_read.reader_answer, "count": count.reader_answer,
                  "chart": chart.reader_answer}


def reader_answer(sample: Sample, with_ops: bool, bounds: PixelBounds = TINY) -> str:
    """The template reader's answer to a synthetic `sample`.

    Without operations it sees the initial observation (the image smart-resized to
    ``bounds.image``, or the 16 frames within ``bounds.video``); with operations it sees
    what one well-aimed operation returns: `crop_image` of the evidence box (asked on the
    initial view, shown within ``bounds.crop``) or `select_frames` of the evidence frames
    (within ``bounds.frame``).
    """
    if sample.family == "video":
        frames = sample.load_frames()
        if with_ops:
            numbers = list(sample.evidence_frames)
            shown = np.stack([smart_resize(frames[i - 1], bounds.frame) for i in numbers])
        else:
            numbers = list(range(1, len(frames) + 1))
            shown = np.stack([smart_resize(f, bounds.video) for f in frames])
        return clips.reader_answer(sample, shown, numbers)
    try:
        reader = _IMAGE_READERS[sample.family]
    except KeyError:
        raise ValueError(f"no reader for family {sample.family!r}; synthetic families: {sorted(FAMILIES)}") from None
    image = sample.load_image()
    if with_ops:
        shown, pixel_box = crop_view(image, sample.evidence_box, bounds.image, bounds.crop)
        return reader(sample, shown, lambda box: map_box(box, pixel_box, shown), pixel_box)
    view, sx, sy = initial_view(image, bounds.image)
    return reader(sample, view, lambda box: scale_box(box, sx, sy))


def chance_score(sample: Sample) -> float:
    """Expected score of a uniform guess over the sample's answer space.

    Choices: one over their number; zoom-read open reads: one over the alphabet; counts:
    one over the tier's count range; chart values: the mean ANLS of 200 random strings of
    the answer's length over its alphabet (seeded by the sample id).
    """
    if sample.choices:
        return 1.0 / len(sample.choices)
    meta = sample.meta
    if sample.family == "zoom-read":
        return 1.0 / len(DIGITS if meta["alphabet"] == "digits" else LETTERS)
    if sample.family == "count":
        lo, hi = meta["count_range"]
        return 1.0 / (hi - lo + 1)
    if sample.family == "chart":
        alphabet = np.array(list(DIGITS + LETTERS if meta["kind"] == "poster" else DIGITS))
        rng = np.random.default_rng(zlib.crc32(sample.sample_id.encode()))
        gold = sample.answers[0]
        guesses = ["".join(rng.choice(alphabet, size=len(gold))) for _ in range(200)]
        return float(np.mean([anls(g, sample.answers) for g in guesses]))
    raise ValueError(f"no chance score for family {sample.family!r}")


__all__ = ["FAMILIES", "Chart", "Clips", "Count", "ZoomRead", "chance_score", "reader_answer"]
