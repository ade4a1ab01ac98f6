"""Loaders that read local benchmark folders into `DatasetSource`s (nothing is downloaded).

`LOADERS` maps the names accepted by `make_task_source` to the loader functions; each
takes the path first, then keyword options (docs/datasets.md lists them). Every loader
checks at load time that each record is well formed and its media file exists inside
the dataset folder; images and videos are decoded only at reset. With
``on_error="raise"`` (the default) the first bad record raises `AnnotationError` (or
`MediaError` for a missing or escaping file) naming the file and the record; with
``on_error="skip"`` bad records are left out and one warning lists them.
"""

from __future__ import annotations

from typing import Callable

from pxr_env.tasks.base import TaskSource
from pxr_env.tasks.loaders.common import AnnotationError
from pxr_env.tasks.loaders.frames import FrameFilesSample
from pxr_env.tasks.loaders.infovqa import load_infovqa
from pxr_env.tasks.loaders.jsonl import JSONL_FIELDS, load_jsonl
from pxr_env.tasks.loaders.mvbench import MVBENCH_VIDEO_DIRS, load_mvbench
from pxr_env.tasks.loaders.parquet import load_pixel_reasoner_parquet, split_options
from pxr_env.tasks.loaders.tallyqa import load_tallyqa
from pxr_env.tasks.loaders.vstar import load_vstar

__all__ = [
    "AnnotationError", "FrameFilesSample", "JSONL_FIELDS", "LOADERS", "MVBENCH_VIDEO_DIRS",
    "load_infovqa", "load_jsonl", "load_mvbench", "load_pixel_reasoner_parquet", "load_tallyqa",
    "load_vstar", "split_options",
]

LOADERS: dict[str, Callable[..., TaskSource]] = {
    "vstar": load_vstar,
    "tallyqa": load_tallyqa,
    "infovqa": load_infovqa,
    "mvbench": load_mvbench,
    "pixel-reasoner-parquet": load_pixel_reasoner_parquet,
    "jsonl": load_jsonl,
}
