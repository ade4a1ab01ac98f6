"""The count probe: reading the oracle's crop, the count head's sum and its tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents.count_probe import CountReading, count_readings, main, plot_readings, summarize_readings  # noqa: E402
from agents.sft import box_vocab, eval_sample_ids, task_source, trace_options  # noqa: E402
from agents.traces import play_traces  # noqa: E402
from agents.vlm.chat import ChatFormat  # noqa: E402
from agents.vlm.tiny import build_tiny_model, build_tiny_processor  # noqa: E402

TASKS = {"count": {"shortcut_share": 0.0}}
SMALL = dict(hidden_size=64, intermediate_size=128)


def _row(tier: str, count: int, expected: float, correct: float, marks: list[float], held: list[int]) -> CountReading:
    return CountReading(sample_id=f"count/{count}", tier=tier, count=count, correct=correct, expected=expected,
                        probabilities=np.array([marks]), targets=np.array([held]), crop=np.zeros((8, 8, 3), np.uint8))


def test_summary_matches_hand_counts():
    rows = [_row("easy", 2, 2.3, 1.0, [0.9, 0.2, 0.7], [1, 0, 1]),
            _row("easy", 4, 2.6, 0.0, [0.6, 0.4, 0.1], [0, 1, 1]),
            _row("hard", 6, 6.4, 1.0, [0.8, 0.9, 0.3], [1, 1, 1])]
    out = summarize_readings(rows)
    assert out["reading"] == pytest.approx(2 / 3) and out["items"] == 3
    assert out["expected_exact"] == pytest.approx(2 / 3)  # round(2.6) = 3 is not 4
    assert out["expected_mae"] == pytest.approx((0.3 + 1.4 + 0.4) / 3)
    assert out["expected_corr"] == pytest.approx(float(np.corrcoef([2.3, 2.6, 6.4], [2, 4, 6])[0, 1]))
    # marked (p > 0.5): 0.9, 0.7, 0.6, 0.8, 0.9 -> 4 of 5 on held tokens; 4 of the 7 held tokens marked
    assert out["cell_precision"] == pytest.approx(4 / 5) and out["cell_recall"] == pytest.approx(4 / 7)
    assert out["easy/items"] == 2 and out["easy/reading"] == 0.5 and out["easy/expected_exact"] == 0.5
    assert out["hard/expected_exact"] == 1.0
    with pytest.raises(ValueError, match="no count readings"):
        summarize_readings([])


def test_readings_of_a_tiny_model_hold_its_sum_and_the_targets(tmp_path):
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, count_head=True, **SMALL)
    source = task_source(TASKS)
    traces = play_traces(source, eval_sample_ids(TASKS, 3, 10_000_000, set()),
                         options=trace_options(box_vocab(model.config), ChatFormat(), {}))
    assert traces
    rows = count_readings(model, processor, traces, source)
    assert model.training  # left as it was
    for row, trace in zip(rows, traces):
        sample = source.get(trace.sample_id)
        assert row.count == int(sample.answers[0]) and row.tier == sample.meta["tier"]
        assert row.targets.sum() == row.count  # the oracle's crop holds every counted centre
        assert row.expected == pytest.approx(float(row.probabilities.sum()), rel=1e-4)  # E is the tokens' sum
        assert np.array_equal(row.crop, trace.reading()[1][-1])  # the crop the item showed
        assert row.correct in (0.0, 1.0)
    plot_readings(rows, str(tmp_path / "heads.png"))
    assert (tmp_path / "heads.png").stat().st_size > 0
    with pytest.raises(ValueError, match="count head"):
        count_readings(build_tiny_model(processor, seed=0, **SMALL), processor, traces, source)


def test_the_command_reads_a_saved_model(tmp_path, capsys):
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, count_head=True, **SMALL)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--samples", "2", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] >= 1 and 0.0 <= report["reading"] <= 1.0
    with pytest.raises(SystemExit, match="count family alone"):
        main(["--model", str(tmp_path / "m"), "--tasks", json.dumps({"video": {}})])
