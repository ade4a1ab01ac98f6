"""Training metrics to TensorBoard event files and to ``metrics.jsonl``, one object per step.

Each line of ``RUN_DIR/metrics.jsonl`` is ``{"step": int, "time": float, "train/rapr": ...}``
with namespaced keys (``train/``, ``eval/``, ``reward/``, ...); non-finite values are written
as ``null`` there (TensorBoard gets them as they are). ``python -m agents.plots`` draws
the curves from these files.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("step", "time")


def metrics_path(run: str | os.PathLike[str]) -> Path:
    """``run/metrics.jsonl`` for a run directory; `run` itself when it is a file."""
    path = Path(run)
    return path if path.is_file() else path / METRICS_FILE


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run directory's (or a file's) metrics, in file order.

    A last line cut short by a crash is skipped; any other unreadable line raises.
    """
    path = metrics_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}: is this a run directory MetricLogger wrote?")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON object: {error}") from error
    return records


def _scalar(key: str, value: Any) -> float:
    """`value` as a float: Python and numpy numbers, one-element arrays and tensors."""
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item"):
        try:
            return float(value.item())
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"metric {key!r} must be a scalar, got {value!r}") from error
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")


def _wait_past_event_files(run_dir: Path) -> None:
    """Wait until the clock's second is past that of every event file in `run_dir`.

    TensorBoard reads a folder's event files in name order; a name starts with the second
    the file was made and ends with a per-process counter, so a resumed writer made in the
    same second as the earlier one (counter 10 after 9) could be read first, and its purge
    would then hide nothing.
    """
    stamps = [int(parts[3]) for parts in (path.name.split(".") for path in run_dir.glob("events.out.tfevents.*"))
              if len(parts) > 3 and parts[3].isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


class MetricLogger:
    """Writes metrics of each training step to TensorBoard and to ``metrics.jsonl``.

    Several `log` calls with the same step merge into one JSON line (the later value of a
    key wins); steps may not decrease. Every line is flushed when written, so a crash
    loses nothing already logged.

    Args:
        run_dir: the run's directory (created if missing).
        resume_step: None for a new run (an existing non-empty ``metrics.jsonl`` is then an
            error rather than silently overwritten); otherwise the first step the resumed
            run will log: records at and after it are removed from ``metrics.jsonl`` and
            hidden in TensorBoard, so nothing appears twice. ``0`` starts over.
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        kept: list[dict[str, Any]] = []
        if resume_step is None:
            if self.path.is_file() and self.path.stat().st_size > 0:
                raise ValueError(
                    f"{self.path} already holds metrics: pass resume_step (the first step to log again) "
                    "to continue that run, resume_step=0 to start it over, or use a new run_dir"
                )
        else:
            if resume_step < 0:
                raise ValueError(f"resume_step must be >= 0, got {resume_step}")
            if self.path.is_file():
                kept = [r for r in read_metrics(self.path) if r["step"] < resume_step]
        self._writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "TensorBoard logging needs the tensorboard package (pip install 'pxr[train]'); "
                    "or pass tensorboard=False"
                ) from error
            if resume_step is not None:
                _wait_past_event_files(self.run_dir)
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=resume_step)
        self._rewrite(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        # the last line written, its start in the file and its step, for merging same-step calls
        self._last: dict[str, Any] | None = kept[-1] if kept else None
        self._last_offset = self._file.tell() - (len(json.dumps(kept[-1])) + 1 if kept else 0)
        self._last_step: int | None = kept[-1]["step"] if kept else None

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by `records`, atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (``{"namespace/name": number}``) at `step`."""
        if self._file.closed:
            raise ValueError("this MetricLogger is closed")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"steps may not decrease: got {step} after {self._last_step}")
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or "/" not in key or key.startswith("/") or key.endswith("/"):
                raise ValueError(f"metric keys are namespaced like 'train/rapr' or 'eval/accuracy', got {key!r}")
            values[key] = _scalar(key, value)
        if self._last is not None and step == self._last_step:
            record = dict(self._last)
            self._file.truncate(self._last_offset)
        else:
            record = {"step": step}
            self._last_offset = self._file.tell()
        record["time"] = time.time()
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last, self._last_step = record, step
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close both outputs; further `log` calls raise."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
