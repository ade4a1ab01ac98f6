"""InfographicsVQA: a JSON file whose top-level ``data`` list holds ``{"questionId",
"question", "image_local_name", "answers", "answer_type", ...}``; scored with ANLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pxr_env.images import resolve_inside
from pxr_env.tasks.base import DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    answer_list,
    as_record,
    collect,
    existing_dir,
    field,
    media_path,
    one_file,
    read_json,
    record_id,
    text_field,
)


def _annotation_file(path: Path, annotation: str | None) -> Path:
    if path.is_file():
        if annotation is not None:
            raise ValueError("pass either an InfographicsVQA JSON file or a folder with annotation=, not both")
        return path
    folder = existing_dir(path, "InfographicsVQA")
    if annotation is None:
        return one_file(folder, "*.json", "InfographicsVQA annotation",
                        "pass the JSON file itself or name it with annotation=")
    chosen = resolve_inside(folder, annotation)
    if not chosen.is_file():
        raise ValueError(f"InfographicsVQA annotation {str(chosen)!r} does not exist")
    return chosen


def load_infovqa(
    path: str | Path,
    *,
    annotation: str | None = None,
    image_root: str | Path | None = None,
    name: str = "infovqa",
    on_error: str = "raise",
) -> DatasetSource:
    """Load InfographicsVQA; family ``"infovqa"``, answer type ``"anls"``.

    `path` is the annotation JSON, or a folder holding one JSON (or name it with
    `annotation`, e.g. ``"infographicsVQA_val_v1.0_withQT.json"``). Images
    (``image_local_name``) are looked up in `image_root`, by default the ``images/``
    folder beside the JSON if there is one, else the JSON's folder. Sample ids are
    ``"<name>/<questionId>"``.
    """
    ann = _annotation_file(Path(path).expanduser(), annotation)
    if image_root is not None:
        images = existing_dir(image_root, "InfographicsVQA image")
    else:
        images = ann.parent / "images" if (ann.parent / "images").is_dir() else ann.parent
    content = read_json(ann)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise AnnotationError(f"{ann} must be a JSON object with a 'data' list of records")

    def build(record: Any) -> Sample:
        record = as_record(record)
        if not record.get("answers"):
            raise AnnotationError("field 'answers' is missing or empty (the test split has no answers; use val)")
        return Sample(
            sample_id=f"{name}/{record_id(field(record, 'questionId'), 'questionId')}",
            family="infovqa",
            question=text_field(record, "question"),
            answers=answer_list(record["answers"], "answers"),
            answer_type="anls",
            image=media_path(images, field(record, "image_local_name"), "image", "image_local_name"),
            meta={key: record[key] for key in ("answer_type", "question_type") if key in record},
        )

    pairs = ((f"{ann}, record {i}", r) for i, r in enumerate(content["data"]))
    return DatasetSource(name, collect(f"{name} ({ann})", pairs, build, on_error))
