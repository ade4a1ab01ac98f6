"""``pxr eval``: baselines on the default suite and on a fixture folder of each real format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import fixtures
from agents.cli import main

TABLE_ROW = re.compile(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([\d.]+)$")


def run_eval(capsys: pytest.CaptureFixture, out: Path, *args: str) -> dict[str, tuple[str, ...]]:
    """Run ``pxr eval`` and return its printed table as {row name: cells}."""
    assert main(["eval", "--out", str(out), "--no-progress", *args]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            rows[match.group(1)] = match.groups()[1:]
    return rows


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]


def test_oracle_scores_everything_on_the_default_suite_and_writes_a_browsable_report(tmp_path, capsys):
    rows = run_eval(capsys, tmp_path / "oracle", "--policy", "oracle", "--episodes", "12", "--seed", "3")
    assert {"zoom-read", "count", "chart", "video"} >= set(rows) - {"all"} and len(rows) >= 3
    assert all(cells[1] == "1.000" and cells[2] == "1.000" for cells in rows.values())  # accuracy, RaPR
    assert rows["all"][0] == "12" and rows["all"][4] == "0.000"  # episodes, operation error rate
    recs = records(tmp_path / "oracle")
    assert len(recs) == 12 and all(r["info"]["correct"] for r in recs)
    page = (tmp_path / "oracle" / "index.html").read_text()
    for rec in recs:
        assert (tmp_path / "oracle" / rec["render"]).is_file() and rec["render"] in page
        for turn in rec["turns"]:
            assert all((tmp_path / "oracle" / p).is_file() and p in page for p in turn["images"])
    assert recs[0]["turns"][0]["observation"] in page.replace("&#x27;", "'").replace("&quot;", '"')
    metrics = json.loads((tmp_path / "oracle" / "metrics.json").read_text())
    assert metrics["rows"]["all"]["accuracy"] == 1.0 and metrics["config"]["policy"] == "oracle"


def test_same_seed_same_samples_table_and_trajectories(tmp_path, capsys):
    args = ("--policy", "random", "--episodes", "10", "--batch-size", "3")
    first = run_eval(capsys, tmp_path / "a", *args, "--seed", "7")
    second = run_eval(capsys, tmp_path / "b", *args, "--seed", "7")
    other = run_eval(capsys, tmp_path / "c", *args, "--seed", "8")
    assert first == second
    assert (tmp_path / "a" / "trajectories.jsonl").read_bytes() == (tmp_path / "b" / "trajectories.jsonl").read_bytes()
    assert [r["sample_id"] for r in records(tmp_path / "a")] != [r["sample_id"] for r in records(tmp_path / "c")]
    assert first != other


def test_answer_only_and_no_ops_oracle_never_operate(tmp_path, capsys):
    answer_only = run_eval(capsys, tmp_path / "a", "--policy", "answer-only", "--episodes", "8")
    no_ops = run_eval(capsys, tmp_path / "b", "--policy", "oracle-no-ops", "--episodes", "8")
    assert answer_only["all"][2] == "0.000" and answer_only["all"][4] == "-"  # RaPR, no calls
    assert float(answer_only["all"][1]) < 1.0
    assert no_ops["all"][1] == "1.000" and no_ops["all"][2] == "0.000"


BUILDERS = {
    "vstar": fixtures.make_vstar_folder, "tallyqa": fixtures.make_tallyqa_folder,
    "infovqa": fixtures.make_infovqa_folder, "mvbench": fixtures.make_mvbench_folder,
    "pixel-reasoner-parquet": fixtures.make_parquet_file, "jsonl": fixtures.make_jsonl_file,
}


@pytest.mark.parametrize("loader", sorted(BUILDERS))
def test_oracle_on_a_fixture_folder_of_each_format(loader, tmp_path, capsys):
    path = BUILDERS[loader](tmp_path / "data")
    tasks = json.dumps({loader: str(path)})
    rows = run_eval(capsys, tmp_path / "out", "--policy", "oracle", "--tasks", tasks, "--episodes", "4")
    assert rows["all"][0] == "4" and rows["all"][1] == "1.000"
    assert all(r["info"]["correct"] for r in records(tmp_path / "out"))


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="does not parse"):
        main(["eval", "--policy", "oracle", "--tasks", "{oops", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot build the tasks"):
        main(["eval", "--policy", "oracle", "--tasks", "no-such-family", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=">= 1"):
        main(["eval", "--policy", "oracle", "--episodes", "0", "--out", str(tmp_path)])


def test_a_model_folder_is_evaluated_with_the_transformers_backend(tmp_path, capsys):
    from agents.vlm.hf import TransformersPolicy
    from agents.vlm.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    TransformersPolicy(model, processor).save_pretrained(tmp_path / "model")
    rows = run_eval(capsys, tmp_path / "out", "--policy", str(tmp_path / "model"), "--tasks", "zoom-read",
                    "--episodes", "2", "--batch-size", "2", "--max-new-tokens", "3", "--max-turns", "2")
    assert rows["all"][0] == "2"
    for rec in records(tmp_path / "out"):
        assert len(rec["turns"]) <= 2
        tokens = rec["tokens"]
        assert len(tokens["token_ids"]) == len(tokens["generated_mask"]) == len(tokens["logprobs"])
        assert 1 <= sum(tokens["generated_mask"]) <= 3 * len(rec["turns"])


def test_reader_without_operations_shows_the_no_zoom_bound(tmp_path, capsys):
    """The template reader through the real env: near-perfect with a crop of the evidence,
    clearly worse from the initial view alone (docs/tasks.md)."""
    common = ("--tasks", '{"zoom-read": {"shortcut_share": 0.0, "hard_share": 1.0}}', "--episodes", "30", "--seed", "5")
    looked = run_eval(capsys, tmp_path / "reader", "--policy", "reader", *common)
    blind = run_eval(capsys, tmp_path / "blind", "--policy", "reader-no-ops", *common)
    assert float(looked["all"][1]) >= 0.9 and float(looked["all"][2]) == 1.0
    assert float(blind["all"][1]) <= 0.6 and float(blind["all"][2]) == 0.0
