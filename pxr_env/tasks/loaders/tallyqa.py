"""TallyQA: counting questions from ``train.json`` / ``test.json``.

Each file is a list of ``{"image", "question", "answer", "issimple", "question_id",
"image_id", "data_source"}``. The paper's "TallyQA-Complex" is the test split with
``issimple == false``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pxr_env.tasks.base import DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    as_record,
    collect,
    existing_dir,
    field,
    media_path,
    read_json,
    record_id,
    text_field,
)

SUBSETS = ("complex", "simple", "all")


def load_tallyqa(
    path: str | Path,
    *,
    split: str = "test",
    subset: str = "complex",
    image_root: str | Path | None = None,
    name: str = "tallyqa",
    on_error: str = "raise",
) -> DatasetSource:
    """Load ``<path>/<split>.json``; family ``"tallyqa"``, answer type ``"number"``.

    `subset`: ``"complex"`` (``issimple == false``, the paper's benchmark), ``"simple"``
    or ``"all"``. Image paths are relative to `image_root` (default: `path`). Sample ids
    are ``"<name>/<question_id>"``.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    root = existing_dir(path, "TallyQA")
    annotation = root / f"{split}.json"
    if not annotation.is_file():
        raise ValueError(f"TallyQA split file {str(annotation)!r} does not exist (split={split!r})")
    images = existing_dir(image_root, "TallyQA image") if image_root is not None else root
    records = read_json(annotation)
    if not isinstance(records, list):
        raise AnnotationError(f"{annotation} must hold a JSON list of records, got {type(records).__name__}")

    def wanted(record: Any) -> bool:
        if subset == "all" or not isinstance(record, dict) or not isinstance(record.get("issimple"), bool):
            return True  # malformed records reach `build`, which reports them
        return record["issimple"] == (subset == "simple")

    def build(record: Any) -> Sample:
        record = as_record(record)
        if subset != "all" and not isinstance(record.get("issimple"), bool):
            raise AnnotationError(f"field 'issimple' must be true or false to pick subset {subset!r}")
        count = field(record, "answer")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AnnotationError(f"field 'answer' must be a count (an integer >= 0), got {count!r}")
        return Sample(
            sample_id=f"{name}/{record_id(field(record, 'question_id'), 'question_id')}",
            family="tallyqa",
            question=text_field(record, "question"),
            answers=(str(count),),
            answer_type="number",
            image=media_path(images, field(record, "image"), "image", "image"),
            meta={
                "issimple": record.get("issimple"),
                "image_id": record.get("image_id"),
                "data_source": record.get("data_source"),
            },
        )

    pairs = ((f"{annotation}, record {i}", r) for i, r in enumerate(records) if wanted(r))
    return DatasetSource(name, collect(f"{name} ({annotation}, subset {subset!r})", pairs, build, on_error))
