"""V* Bench: ``direct_attributes/`` (4 options) and ``relative_position/`` (2 options).

Each image ``<name>.jpg`` sits beside ``<name>.json`` holding ``question``, ``options``
(the FIRST option is the correct one), ``target_object`` and ``bbox`` (``[x, y, w, h]``
per target). Options are shown in a seeded order that depends only on the seed and the
record, so the correct answer is not always (A) and reloading gives the same order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pxr_env.images import MediaError, resolve_inside
from pxr_env.tasks.base import DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    as_record,
    collect,
    existing_dir,
    field,
    letter,
    number,
    read_json,
    stable_seed,
    string_list,
    text_field,
)

VSTAR_TASKS = ("direct_attributes", "relative_position")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _union_box(value: object) -> tuple[float, float, float, float]:
    """Union of ``[x, y, w, h]`` boxes as ``(x1, y1, x2, y2)`` pixels."""
    if not isinstance(value, list) or not value:
        raise AnnotationError(f"field 'bbox' must be a non-empty list of [x, y, w, h], got {value!r}")
    corners = []
    for box in value:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise AnnotationError(f"field 'bbox' entries must be [x, y, w, h], got {box!r}")
        x, y, w, h = (number(v, "a 'bbox' value") for v in box)
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise AnnotationError(f"field 'bbox' entry {box!r} needs x, y >= 0 and w, h > 0")
        corners.append((x, y, x + w, y + h))
    xs1, ys1, xs2, ys2 = zip(*corners)
    return (min(xs1), min(ys1), max(xs2), max(ys2))


def _image_beside(root: Path, task: str, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = resolve_inside(root, f"{task}/{stem}{suffix}")
        if path.is_file():
            return path
    tried = ", ".join(f"{stem}{s}" for s in IMAGE_SUFFIXES)
    raise MediaError(f"image file for {task}/{stem}.json is missing (looked for {tried} in {str(root / task)!r})")


def load_vstar(path: str | Path, *, seed: int = 0, name: str = "vstar", on_error: str = "raise") -> DatasetSource:
    """Load V* Bench from its folder; family ``"vstar"``, the sub-task in ``meta["task"]``.

    `seed` picks the option order (per record, independent of load order); sample ids
    are ``"<name>/<task>/<image name>"``.
    """
    root = existing_dir(path, "V* Bench")
    tasks = [t for t in VSTAR_TASKS if (root / t).is_dir()]
    if not tasks:
        raise ValueError(
            f"{str(root)!r} has neither {VSTAR_TASKS[0]}/ nor {VSTAR_TASKS[1]}/; point at the V* Bench folder"
        )
    annotations = [(task, ann) for task in tasks for ann in sorted((root / task).glob("*.json"))]

    def build(item: tuple[str, Path]) -> Sample:
        task, ann = item
        record = as_record(read_json(ann))
        question = text_field(record, "question")
        options = string_list(field(record, "options"), "options", min_len=2)
        key = f"{task}/{ann.stem}"
        order = np.random.default_rng(stable_seed(seed, key)).permutation(len(options))
        targets = record.get("target_object", [])
        return Sample(
            sample_id=f"{name}/{key}",
            family="vstar",
            question=question,
            answers=(letter(int(np.flatnonzero(order == 0)[0])),),
            answer_type="choice",
            choices=tuple(options[i] for i in order),
            image=_image_beside(root, task, ann.stem),
            evidence_box=_union_box(field(record, "bbox")),
            meta={"task": task, "target_object": list(targets) if isinstance(targets, list) else [targets]},
        )

    records = ((str(ann), (task, ann)) for task, ann in annotations)
    return DatasetSource(name, collect(f"{name} ({root})", records, build, on_error))
