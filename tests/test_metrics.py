"""Metric aggregation checked against hand-computed numbers."""

from __future__ import annotations

import pytest

from agents.metrics import TOTAL, format_table, summarize, summarize_by


def info(family: str, score: float, ops: int, calls: int, errors: int, iou: float | None = None,
         hit: bool | None = None, answer: str | None = "x", area: float | None = None) -> dict:
    return {"family": family, "score": score, "n_visual_ops": ops, "n_tool_calls": calls, "n_op_errors": errors,
            "crop_iou": iou, "crop_hit": hit, "crop_area": area, "answer": answer}


INFOS = [
    info("a", 1.0, 1, 1, 0, iou=0.5, hit=True, area=0.1),
    info("a", 0.0, 0, 2, 2, answer=None),
    info("b", 0.75, 2, 3, 1, iou=0.25, hit=False, area=0.3),
    info("b", 0.0, 0, 0, 0, hit=False),  # a vector env turns a missing crop_hit into False
]


def test_summarize_by_family_and_total():
    rows = summarize_by(INFOS)
    assert list(rows) == ["a", "b", TOTAL]
    a, b, total = rows["a"], rows["b"], rows[TOTAL]
    assert (a.episodes, a.accuracy, a.rapr, a.mean_ops, a.op_error_rate) == (2, 0.5, 0.5, 0.5, pytest.approx(2 / 3))
    assert (a.crop_iou, a.crop_hit_rate, a.answered) == (0.5, 1.0, 0.5)
    assert (b.accuracy, b.rapr, b.mean_ops, b.op_error_rate) == (0.375, 0.5, 1.0, pytest.approx(1 / 3))
    assert (b.crop_iou, b.crop_hit_rate) == (0.25, 0.0)
    assert total.accuracy == pytest.approx(1.75 / 4) and total.op_error_rate == pytest.approx(3 / 6)
    assert total.crop_iou == pytest.approx(0.375) and total.crop_hit_rate == 0.5 and total.answered == 0.75
    assert (a.crop_area, b.crop_area, total.crop_area) == (0.1, 0.3, pytest.approx(0.2))


def test_undefined_rates_are_none_and_namespaced_keys():
    metrics = summarize([info("c", 1.0, 0, 0, 0)])
    assert metrics.op_error_rate is None and metrics.crop_iou is None and metrics.crop_hit_rate is None
    assert metrics.crop_area is None
    assert metrics.as_dict("eval/")["eval/accuracy"] == 1.0
    table = format_table({"c": metrics}).splitlines()
    assert table[0].split()[:3] == ["family", "episodes", "accuracy"]
    assert table[1].split() == ["c", "1", "1.000", "0.000", "0.000", "-", "-", "-", "-", "1.000"]
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
