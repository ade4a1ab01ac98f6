"""Helpers shared by the benchmark loaders: field checks, safe media paths, error policy.

Every loader reads records, turns each into a `Sample` with a `build` function, and
hands them to `collect`, which owns the error policy: with ``on_error="raise"`` (the
default) the first bad record stops loading with an error naming the file and the
record; with ``on_error="skip"`` bad records are left out and one warning lists them.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pxr_env.images import MediaError, resolve_inside
from pxr_env.tasks.base import CHOICE_LETTERS, Sample

ON_ERROR = ("raise", "skip")
MAX_REPORTED_PROBLEMS = 5


class AnnotationError(ValueError):
    """A malformed annotation record; the message names the file and the record."""


def check_on_error(on_error: str) -> None:
    """Refuse an unknown error policy before any file is read."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def collect(
    source: str,
    records: Iterable[tuple[str, Any]],
    build: Callable[[Any], Sample],
    on_error: str,
) -> list[Sample]:
    """Build one sample per ``(where, record)`` pair, applying the error policy.

    `where` names the record for messages (``"<file>, record 3"``). Media problems stay
    `MediaError`; every other `ValueError`/`TypeError` becomes an `AnnotationError`. A
    sample id seen twice is an error of the later record.
    """
    check_on_error(on_error)
    samples: list[Sample] = []
    first_seen: dict[str, str] = {}
    problems: list[str] = []
    total = 0
    for where, record in records:
        total += 1
        try:
            sample = build(record)
            if sample.sample_id in first_seen:
                raise AnnotationError(
                    f"sample id {sample.sample_id!r} was already given by {first_seen[sample.sample_id]}"
                )
        except MediaError as exc:
            error: ValueError = MediaError(f"{where}: {exc}")
        except (ValueError, TypeError) as exc:
            error = AnnotationError(f"{where}: {exc}")
        else:
            first_seen[sample.sample_id] = where
            samples.append(sample)
            continue
        if on_error == "raise":
            raise error
        problems.append(str(error))
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        warnings.warn(
            f"{source}: skipped {len(problems)} of {total} records (on_error='skip'):\n  {shown}{tail}",
            stacklevel=3,
        )
    if not samples:
        raise ValueError(f"{source}: no usable records were found")
    return samples


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path} is not UTF-8 text: {exc}") from None


def existing_dir(path: str | Path, what: str) -> Path:
    """`path` as a folder, or a `ValueError` saying what was expected there."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{what} folder {str(p)!r} does not exist or is not a folder")
    return p


def as_record(record: Any) -> Mapping[str, Any]:
    """The record itself if it is a JSON object."""
    if not isinstance(record, Mapping):
        raise AnnotationError(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def field(record: Mapping[str, Any], key: str) -> Any:
    """A required field."""
    if key not in record or record[key] is None:
        raise AnnotationError(f"field {key!r} is missing")
    return record[key]


def text_field(record: Mapping[str, Any], key: str) -> str:
    """A required non-empty string."""
    value = field(record, key)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def record_id(value: Any, key: str) -> str:
    """A record identifier (string or integer) as text."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise AnnotationError(f"field {key!r} must be a non-empty string or an integer, got {value!r}")
    return str(value)


def number(value: Any, what: str) -> float:
    """A finite real number (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AnnotationError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def answer_text(value: Any, what: str) -> str:
    """One gold answer as text: strings are kept, integer-valued numbers lose their ``.0``."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else str(value)
    raise AnnotationError(f"{what} must be a non-empty string or a number, got {value!r}")


def answer_list(value: Any, key: str) -> tuple[str, ...]:
    """Gold answers given as one value or a non-empty list of values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise AnnotationError(f"field {key!r} has no gold answers")
    return tuple(answer_text(v, f"field {key!r}") for v in values)


def string_list(value: Any, key: str, min_len: int = 1) -> tuple[str, ...]:
    """A list of at least `min_len` non-empty, distinct strings (options, candidates)."""
    if not isinstance(value, (list, tuple)) or len(value) < min_len:
        raise AnnotationError(f"field {key!r} must be a list of at least {min_len} strings, got {value!r}")
    items = [answer_text(v, f"an item of {key!r}") for v in value]
    if len(set(items)) != len(items):
        raise AnnotationError(f"field {key!r} repeats an entry: {items}")
    if len(items) > len(CHOICE_LETTERS):
        raise AnnotationError(f"field {key!r} has {len(items)} entries; at most {len(CHOICE_LETTERS)} are lettered")
    return tuple(items)


def xyxy_box(value: Any, key: str) -> tuple[float, float, float, float]:
    """A box ``[x1, y1, x2, y2]`` in pixels with positive width and height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise AnnotationError(f"field {key!r} must be [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (number(v, f"a coordinate of {key!r}") for v in value)
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise AnnotationError(f"field {key!r} must satisfy 0 <= x1 < x2 and 0 <= y1 < y2, got {value!r}")
    return (x1, y1, x2, y2)


def time_window(start: Any, end: Any, what: str) -> tuple[float, float]:
    """A clip ``(start, end)`` in seconds with ``0 <= start < end``."""
    s, e = number(start, f"{what} start"), number(end, f"{what} end")
    if not 0 <= s < e:
        raise AnnotationError(f"{what} must satisfy 0 <= start < end seconds, got start={start!r}, end={end!r}")
    return (s, e)


def letter(index: int) -> str:
    """The option letter of a 0-based index."""
    return CHOICE_LETTERS[index]


def media_path(root: Path, relative: Any, kind: str, key: str, *, allow_dir: bool = False) -> Path:
    """Resolve an annotation's media path inside `root` and check the file is there.

    Paths that leave `root` (``..``, absolute paths, symlinks out) are refused.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise AnnotationError(f"field {key!r} must be a relative {kind} path, got {relative!r}")
    path = resolve_inside(root, relative.strip())
    if path.is_file() or (allow_dir and path.is_dir()):
        return path
    raise MediaError(f"{kind} file {str(path)!r} (field {key!r}: {relative!r}) is missing")


def stable_seed(seed: int, key: str) -> list[int]:
    """Seed material for a per-record generator: the same for a record whatever the load order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def one_file(folder: Path, pattern: str, what: str, hint: str) -> Path:
    """The single file matching `pattern` in `folder`; several or none is an error ending in `hint`."""
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no {what} file ({pattern}) in {str(folder)!r}; {hint}")
    names = ", ".join(p.name for p in found)
    raise ValueError(f"several {what} files in {str(folder)!r} ({names}); {hint}")


def check_columns(columns: Sequence[str], required: Sequence[str], where: str) -> None:
    """Refuse a table missing required columns, naming them."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise AnnotationError(f"{where} lacks the column(s) {missing}; it has {list(columns)}")
