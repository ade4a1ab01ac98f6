"""Episode metrics as pure functions over end-of-episode infos (evaluation and trainers alike).

Every function takes the final ``info`` dicts of finished episodes (`agents.rollout.Trajectory.info`,
or what a training loop collects) and returns plain numbers:

- ``accuracy``: mean task score: the share of correct answers, or mean ANLS for
  ``anls`` questions (the env's ``score``); episodes that end without an answer score 0.
- ``rapr``: rate of pixel-space reasoning, the share of episodes with at least one
  executed visual operation.
- ``mean_ops``: mean number of executed visual operations.
- ``op_error_rate``: errored calls / requested calls, over all episodes (None without calls).
- ``crop_iou``: mean IoU of the last requested crop with the evidence box, over episodes
  that have both (None when none does); ``crop_hit_rate``: share of those whose last crop
  contains the whole evidence box.
- ``crop_area``: mean share of the image covered by the last requested crop, over episodes
  with a crop (None when none has one): a rising hit rate with a falling IoU shows up here
  as larger boxes.
- ``answered``: share of episodes that ended with an answer (not cut by a limit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

TOTAL = "all"
"""The row name of the all-episodes summary in `summarize_by`."""

COLUMNS = ("episodes", "accuracy", "rapr", "mean_ops", "op_error_rate", "crop_iou", "crop_hit_rate", "crop_area",
           "answered")


@dataclass(frozen=True)
class Metrics:
    """Summary of a set of episodes (the module doc defines each field)."""

    episodes: int
    accuracy: float
    rapr: float
    mean_ops: float
    op_error_rate: float | None
    crop_iou: float | None
    crop_hit_rate: float | None
    crop_area: float | None
    answered: float

    def as_dict(self, prefix: str = "") -> dict[str, float | int | None]:
        """The fields under namespaced keys, e.g. ``as_dict("eval/")["eval/accuracy"]``."""
        return {f"{prefix}{key}": value for key, value in asdict(self).items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(infos: Iterable[Mapping]) -> Metrics:
    """The `Metrics` of the episodes whose final infos are `infos` (at least one)."""
    infos = list(infos)
    if not infos:
        raise ValueError("summarize needs at least one episode")
    calls = sum(int(i["n_tool_calls"]) for i in infos)
    errors = sum(int(i["n_op_errors"]) for i in infos)
    # crop_hit is defined exactly when crop_iou is (vector envs turn a missing bool into False).
    with_crop = [i for i in infos if i.get("crop_iou") is not None]
    return Metrics(
        episodes=len(infos),
        accuracy=_mean([float(i["score"]) for i in infos]),
        rapr=_mean([float(int(i["n_visual_ops"]) > 0) for i in infos]),
        mean_ops=_mean([float(i["n_visual_ops"]) for i in infos]),
        op_error_rate=errors / calls if calls else None,
        crop_iou=_mean([float(i["crop_iou"]) for i in with_crop]),
        crop_hit_rate=_mean([float(bool(i["crop_hit"])) for i in with_crop]),
        crop_area=_mean([float(i["crop_area"]) for i in infos if i.get("crop_area") is not None]),
        answered=_mean([float(i.get("answer") is not None) for i in infos]),
    )


def summarize_by(infos: Iterable[Mapping], key: str = "family") -> dict[str, Metrics]:
    """`summarize` per value of ``info[key]`` (sorted), plus the `TOTAL` row over all episodes."""
    infos = list(infos)
    groups: dict[str, list[Mapping]] = {}
    for info in infos:
        groups.setdefault(str(info[key]), []).append(info)
    rows = {name: summarize(groups[name]) for name in sorted(groups)}
    rows[TOTAL] = summarize(infos)
    return rows


def format_table(rows: Mapping[str, Metrics]) -> str:
    """A fixed-width text table of `rows` (one line per row, ``-`` for undefined values)."""
    headers = ("family",) + COLUMNS
    cells = []
    for name, metrics in rows.items():
        values = asdict(metrics)
        line = [name]
        for column in COLUMNS:
            value = values[column]
            line.append("-" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}")
        cells.append(line)
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))
              for line in cells]
    return "\n".join(lines)
