"""Task sources and `make_task_source`, which turns the env's ``tasks=`` argument into one.

``tasks`` may be:
- a name: a synthetic family (``"zoom-read"``, ``"count"``, ``"chart"``, ``"video"``) or
  ``"synthetic"`` for all four in equal shares;
- a list of names, or of ``(name, weight)`` pairs, or a dict ``{name: weight}``;
- a dict naming local benchmark folders, e.g. ``{"vstar": "/data/vstar_bench"}`` or
  ``{"jsonl": "/data/mine/questions.jsonl"}`` (values may also be dicts of loader
  keyword arguments with a ``"path"`` key);
- any object with ``name``, ``sample(rng)`` and ``get(sample_id)`` (a `TaskSource`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pxr_env.tasks.base import ANSWER_TYPES, CHOICE_LETTERS, DatasetSource, Sample, TaskSource

__all__ = [
    "ANSWER_TYPES", "CHOICE_LETTERS", "DatasetSource", "MixtureSource", "Sample", "TaskSource",
    "SYNTHETIC_FAMILIES", "DATASET_LOADERS", "make_task_source",
]


def _synthetic_builders() -> dict[str, Callable[..., TaskSource]]:
    from pxr_env.tasks.synthetic import FAMILIES

    return dict(FAMILIES)


def _dataset_loaders() -> dict[str, Callable[..., TaskSource]]:
    from pxr_env.tasks.loaders import LOADERS

    return dict(LOADERS)


SYNTHETIC_FAMILIES = ("zoom-read", "count", "chart", "video")
DATASET_LOADERS = ("vstar", "tallyqa", "infovqa", "mvbench", "pixel-reasoner-parquet", "jsonl")


class MixtureSource:
    """Draws from several sources with fixed weights; `get` asks each source in turn
    (every source prefixes its sample ids with its own name, so ids do not collide)."""

    def __init__(self, sources: Sequence[TaskSource], weights: Sequence[float] | None = None) -> None:
        if not sources:
            raise ValueError("a task mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"task sources in a mixture need distinct names, got {names}")
        w = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(sources),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights must be {len(sources)} non-negative numbers with a positive sum, got {weights}")
        self.sources = list(sources)
        self.weights = w / w.sum()
        self.name = "+".join(names)
        self._by_name = {s.name: s for s in sources}

    def sample(self, rng: np.random.Generator) -> Sample:
        source = self.sources[int(rng.choice(len(self.sources), p=self.weights))]
        return source.sample(rng)

    def get(self, sample_id: str) -> Sample:
        for source in self.sources:
            try:
                return source.get(sample_id)
            except (KeyError, ValueError):
                continue
        raise KeyError(f"no source in {self.name!r} has sample {sample_id!r}")


def _named_source(name: str, options: Any = None) -> TaskSource:
    synthetic, loaders = _synthetic_builders(), _dataset_loaders()
    if name in synthetic:
        kwargs = dict(options) if isinstance(options, Mapping) else {}
        return synthetic[name](**kwargs)
    if name in loaders:
        if isinstance(options, (str, Path)):
            return loaders[name](options)
        if isinstance(options, Mapping) and "path" in options:
            kwargs = dict(options)
            return loaders[name](kwargs.pop("path"), **kwargs)
        raise ValueError(f"task source {name!r} reads a local folder or file: pass {{{name!r}: '/path/to/it'}}")
    raise ValueError(
        f"unknown task source {name!r}; synthetic families: {sorted(synthetic)} (or 'synthetic'), "
        f"dataset loaders: {sorted(loaders)}"
    )


def make_task_source(tasks: Any = "zoom-read") -> TaskSource:
    """Build the task source described by `tasks` (see the module docstring)."""
    if isinstance(tasks, str):
        if tasks == "synthetic":
            return MixtureSource([_named_source(n) for n in SYNTHETIC_FAMILIES])
        return _named_source(tasks)
    if isinstance(tasks, Mapping):
        loaders = _dataset_loaders()
        sources, weights = [], []
        for name, value in tasks.items():
            if name not in loaders and isinstance(value, (int, float)) and not isinstance(value, bool):
                sources.append(_named_source(name))
                weights.append(float(value))
            else:
                sources.append(_named_source(name, value))
                weights.append(1.0)
        return sources[0] if len(sources) == 1 else MixtureSource(sources, weights)
    if isinstance(tasks, (list, tuple)):
        sources, weights = [], []
        for item in tasks:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                sources.append(make_task_source(item[0]))
                weights.append(float(item[1]))
            else:
                sources.append(make_task_source(item))
                weights.append(1.0)
        return sources[0] if len(sources) == 1 else MixtureSource(sources, weights)
    if isinstance(tasks, TaskSource):
        return tasks
    raise ValueError(f"cannot make a task source from {tasks!r}; see pxr_env.tasks.make_task_source")
