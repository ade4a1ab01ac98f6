"""The Pixel Reasoner evaluation parquet files (one per benchmark).

Columns: ``question``, ``image`` (a list of relative paths: one image, or the frames of
a video when ``is_video`` is true), ``answer`` (a string or a list of strings), ``qid``
(``"<benchmark>-<n>"``) and optionally ``is_video``. Options of a choice question are
written inside the question text as ``(A) ...``; such questions have letter answers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from pxr_env.tasks.base import CHOICE_LETTERS, DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    answer_list,
    as_record,
    check_columns,
    collect,
    existing_dir,
    field,
    media_path,
    one_file,
    record_id,
    text_field,
)
from pxr_env.tasks.loaders.frames import FrameFilesSample

REQUIRED_COLUMNS = ("question", "image", "answer", "qid")
ANLS_FAMILIES = ("infovqa", "infographicsvqa", "infographicvqa")
_OPTION = re.compile(r"\(([A-Z])\)")
_OPTIONS_LABEL = re.compile(r"(?:options|choices)\s*:?\s*$", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?\d+")


def split_options(question: str) -> tuple[str, tuple[str, ...]] | None:
    """Split ``"stem (A) x (B) y ... tail"`` into the question without options and the options.

    Options are the markers ``(A)``, ``(B)``, ... in order; each runs to the next marker,
    the last one to the end of its line. A trailing ``Options:`` label is dropped from the
    stem; text after the options (an instruction) is kept after the stem. None when the
    question has no ``(A)`` ... ``(B)`` options.
    """
    markers: list[re.Match[str]] = []
    for match in _OPTION.finditer(question):
        if match.group(1) == CHOICE_LETTERS[len(markers)]:
            markers.append(match)
            if len(markers) == len(CHOICE_LETTERS):
                break
    if len(markers) < 2:
        return None
    options = [question[m.end():n.start()] for m, n in zip(markers, markers[1:])]
    last_line_end = question.find("\n", markers[-1].end())
    last_line_end = len(question) if last_line_end < 0 else last_line_end
    options.append(question[markers[-1].end():last_line_end])
    cleaned = tuple(o.strip().rstrip(",;").strip() for o in options)
    if not all(cleaned):
        return None
    stem = _OPTIONS_LABEL.sub("", question[: markers[0].start()].rstrip()).strip()
    tail = question[last_line_end:].strip()
    return "\n".join(part for part in (stem, tail) if part), cleaned


def _answer_kind(answers: tuple[str, ...], family: str, anls_families: Sequence[str]) -> str:
    if family.lower() in anls_families:
        return "anls"
    if all(_INTEGER.fullmatch(a) for a in answers):
        return "number"
    return "text"


def _read_rows(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError('reading parquet files needs pyarrow: pip install "pxr[data]" (or pyarrow)') from None
    file = one_file(path, "*.parquet", "parquet", "pass the parquet file itself") if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"parquet file {str(file)!r} does not exist")
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise AnnotationError(f"{file} cannot be read as parquet: {exc}") from exc
    check_columns(table.column_names, REQUIRED_COLUMNS, str(file))
    return file, table.to_pylist()


def load_pixel_reasoner_parquet(
    path: str | Path,
    *,
    root: str | Path | None = None,
    num_frames: int = 16,
    anls_families: Sequence[str] = ANLS_FAMILIES,
    name: str = "pixel-reasoner-parquet",
    on_error: str = "raise",
) -> DatasetSource:
    """Load a Pixel Reasoner evaluation parquet (a file, or a folder holding one).

    Media paths are relative to `root` (default: the parquet's folder). The family is the
    benchmark in ``qid`` (before the first ``-``). Answer types: ``"choice"`` when every
    gold answer is one letter and the question lists ``(A)`` options (parsed into
    `choices`), ``"anls"`` for the families in `anls_families`, ``"number"`` when every
    gold answer is an integer, else ``"text"``. A video row keeps at most `num_frames`
    of its listed frames. Sample ids are ``"<name>/<qid>"``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    file, rows = _read_rows(Path(path).expanduser())
    media_root = existing_dir(root, "parquet media") if root is not None else file.parent
    anls = tuple(f.lower() for f in anls_families)

    def build(row: Any) -> Sample:
        row = as_record(row)
        qid = record_id(field(row, "qid"), "qid")
        family = qid.split("-", 1)[0]
        question = text_field(row, "question")
        answers = answer_list(field(row, "answer"), "answer")
        images = field(row, "image")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not images:
            raise AnnotationError(f"field 'image' must be a non-empty list of relative paths, got {images!r}")
        paths = tuple(media_path(media_root, p, "image", "image") for p in images)
        parsed = split_options(question) if all(len(a) == 1 and a in CHOICE_LETTERS for a in answers) else None
        if parsed is not None:
            question, choices = parsed
            answer_type = "choice"
        else:
            choices, answer_type = (), _answer_kind(answers, family, anls)
        common = dict(sample_id=f"{name}/{qid}", family=family, question=question, answers=answers,
                      answer_type=answer_type, choices=choices, meta={"qid": qid})
        if bool(row.get("is_video")):
            return FrameFilesSample(**common, video=paths[0].parent, num_frames=min(num_frames, len(paths)),
                                    frame_files=paths)
        if len(paths) != 1:
            raise AnnotationError(f"an image question needs exactly one image, got {len(paths)}")
        return Sample(**common, image=paths[0])

    pairs = ((f"{file}, row {i}", row) for i, row in enumerate(rows))
    return DatasetSource(name, collect(f"{name} ({file})", pairs, build, on_error))
