"""Our own JSON Lines format: one question per line, every `Sample` field expressible.

The format is specified in docs/datasets.md; `JSONL_FIELDS` lists the keys a line may
carry. Unknown keys are refused so that a misspelt field is not silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pxr_env.tasks.base import ANSWER_TYPES, DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    answer_list,
    as_record,
    collect,
    existing_dir,
    field,
    media_path,
    record_id,
    string_list,
    text_field,
    time_window,
    xyxy_box,
)

JSONL_FIELDS = (
    "id", "question", "image", "video", "answers", "answer_type", "choices", "evidence_box",
    "evidence_frames", "video_window", "num_frames", "family", "answerable_without_ops", "meta",
)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnnotationError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _lines(file: Path) -> Any:
    """``(where, parsed object)`` for every non-blank line; a syntax error is the line's problem."""
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}, line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, AnnotationError(f"not valid JSON: {exc}")


def load_jsonl(path: str | Path, *, root: str | Path | None = None, name: str = "jsonl",
               on_error: str = "raise") -> DatasetSource:
    """Load a JSONL file of questions (format: docs/datasets.md).

    Media paths are relative to `root` (default: the file's folder). The family defaults
    to `name`; sample ids are ``"<name>/<id>"``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"JSONL file {str(file)!r} does not exist")
    media_root = existing_dir(root, "JSONL media") if root is not None else file.parent

    def build(line: Any) -> Sample:
        if isinstance(line, AnnotationError):
            raise line
        record = as_record(line)
        unknown = sorted(set(record) - set(JSONL_FIELDS))
        if unknown:
            raise AnnotationError(f"unknown field(s) {unknown}; allowed: {list(JSONL_FIELDS)} (put extras in 'meta')")
        if ("image" in record) == ("video" in record):
            raise AnnotationError("give exactly one of 'image' and 'video'")
        answer_type = text_field(record, "answer_type")
        if answer_type not in ANSWER_TYPES:
            raise AnnotationError(f"field 'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
        num_frames = _positive_int(record.get("num_frames", 16), "field 'num_frames'")
        frames = record.get("evidence_frames", [])
        if not isinstance(frames, list):
            raise AnnotationError(f"field 'evidence_frames' must be a list of 1-based frame numbers, got {frames!r}")
        evidence_frames = tuple(_positive_int(f, "an entry of 'evidence_frames'") for f in frames)
        if any(f > num_frames for f in evidence_frames):
            raise AnnotationError(f"field 'evidence_frames' {frames} exceeds num_frames = {num_frames}")
        window = record.get("video_window")
        if window is not None and (not isinstance(window, list) or len(window) != 2):
            raise AnnotationError(f"field 'video_window' must be [start, end] in seconds, got {window!r}")
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise AnnotationError(f"field 'meta' must be a JSON object, got {meta!r}")
        answerable = record.get("answerable_without_ops")
        if answerable is not None and not isinstance(answerable, bool):
            raise AnnotationError(f"field 'answerable_without_ops' must be true or false, got {answerable!r}")
        image = media_path(media_root, record["image"], "image", "image") if "image" in record else None
        video = media_path(media_root, record["video"], "video", "video") if "video" in record else None
        return Sample(
            sample_id=f"{name}/{record_id(field(record, 'id'), 'id')}",
            family=text_field(record, "family") if "family" in record else name,
            question=text_field(record, "question"),
            answers=answer_list(field(record, "answers"), "answers"),
            answer_type=answer_type,
            choices=string_list(record["choices"], "choices", min_len=2) if "choices" in record else (),
            image=image,
            video=video,
            num_frames=num_frames,
            video_window=time_window(window[0], window[1], "field 'video_window'") if window is not None else None,
            evidence_box=xyxy_box(record["evidence_box"], "evidence_box") if "evidence_box" in record else None,
            evidence_frames=evidence_frames,
            answerable_without_ops=answerable,
            meta=meta,
        )

    return DatasetSource(name, collect(f"{name} ({file})", _lines(file), build, on_error))
