"""What the stems pretrained apart from the decoder share: their data on disk and their timed loop.

`agents.count_stem_probe` (the count head's stem, on oracle crops) and `agents.box_stem` (the box
pointer's stem, on initial views) each train a small module on arrays made once, for so many
minutes, measuring it on held-out arrays every few minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

Arrays = TypeVar("Arrays", bound="NpzArrays")


class NpzArrays:
    """A dataclass of numpy arrays kept in one ``.npz`` file."""

    __dataclass_fields__: dict[str, Any]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls: type[Arrays], path: str | Path) -> Arrays:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @classmethod
    def cached(cls: type[Arrays], path: str | Path | None, make: Callable[[], Arrays]) -> Arrays:
        """Read from `path` when it exists, else `make` them (and save them there if given)."""
        if path and Path(path).exists():
            return cls.load(path)
        arrays = make()
        if path:
            arrays.save(path)
        return arrays


def timed_training(module: torch.nn.Module, loss: Callable[[], torch.Tensor], measure: Callable[[], dict[str, float]],
                   out: Path, lr: float, minutes: float, steps: int, eval_minutes: float, desc: str, shown: str,
                   progress: bool = True) -> list[dict[str, Any]]:
    """AdamW on `module` over batches of `loss` until `minutes` or `steps`; `measure` every
    `eval_minutes` and at the end, each record (step, minutes, last loss, measures) appended to
    ``out/metrics.jsonl``, the measure `shown` on the progress bar. Returns the records."""
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    records: list[dict[str, Any]] = []
    start, next_eval, step = time.monotonic(), 0.0, 0
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    with open(out / "metrics.jsonl", "w") as log:
        def record(last: float | None) -> None:
            row = {"step": step, "minutes": (time.monotonic() - start) / 60, "loss": last, **measure()}
            records.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix({shown: f"{row[shown]:.3f}"})

        last: float | None = None  # none before the first step
        while step < steps and time.monotonic() - start < minutes * 60:
            if time.monotonic() - start >= next_eval * 60:
                record(last)
                next_eval += eval_minutes
            value = loss()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            last, step = value.item(), step + 1
            bar.update()
        record(last)
    bar.close()
    return records
