"""MetricLogger: JSONL content, TensorBoard events, resume truncation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.logger import MetricLogger, read_metrics


def _tensorboard_scalars(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(key)]


def test_every_step_goes_to_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricLogger(tmp_path) as logger:
        for step in range(3):
            logger.log(step, {"train/rapr": 0.5 - 0.1 * step, "reward/curiosity": np.float32(0.25)})
        logger.log(2, {"eval/accuracy": torch.tensor(0.75)})  # same step: merged into one line
        logger.log(3, {"train/loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["train/rapr"] == 0.5 and records[0]["reward/curiosity"] == 0.25
    assert records[2] == {**records[2], "train/rapr": pytest.approx(0.3), "eval/accuracy": 0.75}
    assert records[3]["train/loss"] is None  # non-finite values are null in JSON
    assert all(isinstance(r["time"], float) for r in records)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert _tensorboard_scalars(tmp_path, "eval/accuracy") == [(2, 0.75)]
    assert [s for s, _ in _tensorboard_scalars(tmp_path, "train/rapr")] == [0, 1, 2]


def test_resume_truncates_and_appends_without_duplicates(tmp_path: Path) -> None:
    with MetricLogger(tmp_path) as logger:
        for step in range(10):
            logger.log(step, {"train/rapr": float(step)})
    # the run crashed after step 9; its last checkpoint resumes at step 5
    with MetricLogger(tmp_path, resume_step=5) as logger:
        logger.log(5, {"train/rapr": 50.0})
        logger.log(5, {"eval/accuracy": 0.5})
        logger.log(6, {"train/rapr": 60.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["train/rapr"] for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, 60.0]
    assert records[5]["eval/accuracy"] == 0.5
    assert _tensorboard_scalars(tmp_path, "train/rapr") == [(s, r["train/rapr"]) for s, r in enumerate(records)]


def test_resume_merges_into_the_last_kept_step_and_zero_starts_over(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"train/a": 1.0})
        logger.log(4, {"train/a": 2.0})
    with MetricLogger(tmp_path, resume_step=7, tensorboard=False) as logger:
        logger.log(4, {"eval/b": 3.0})
    assert [(r["step"], r.get("eval/b")) for r in read_metrics(tmp_path)] == [(0, None), (4, 3.0)]
    MetricLogger(tmp_path, resume_step=0, tensorboard=False).close()
    assert read_metrics(tmp_path) == []


def test_a_crash_cut_last_line_is_dropped_on_resume(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"train/a": 1.0})
        logger.log(1, {"train/a": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/a"')
    with MetricLogger(tmp_path, resume_step=2, tensorboard=False) as logger:
        logger.log(2, {"train/a": 3.0})
    assert [r["train/a"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 3.0]


def test_misuse_is_refused(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"train/a": 1.0})
        with pytest.raises(ValueError, match="namespaced"):
            logger.log(4, {"rapr": 1.0})
        with pytest.raises(ValueError, match="may not decrease"):
            logger.log(2, {"train/a": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            logger.log(4, {"train/a": torch.zeros(2)})
        with pytest.raises(TypeError, match="number"):
            logger.log(4, {"train/a": "high"})
    with pytest.raises(ValueError, match="closed"):
        logger.log(5, {"train/a": 1.0})
    with pytest.raises(ValueError, match="already holds metrics"):
        MetricLogger(tmp_path, tensorboard=False)
