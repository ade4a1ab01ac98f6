"""Checkpoint evaluation: each saved step of a GRPO run, on the same held-out items, appended once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor

from agents.box_mass import text_position_stats
import agents.grpo as grpo
from agents.checkpoint_eval import EVALS_FILE, evaluate_run, main, markdown_table
from agents.grpo import GRPOConfig, GRPOTrainer
from agents.sft import ZOOM_EASY, SFTConfig, box_vocab, eval_sample_ids, task_source, trace_options
from agents.traces import play_traces
from agents.vlm.chat import ChatFormat
from agents.vlm.hf import load_model

sys.path.insert(0, str(Path(__file__).parent))
from _grpo_worker import varied_rewards  # noqa: E402


def test_each_checkpoint_is_evaluated_once_with_the_weights_it_saved(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grpo, "shape_rewards", varied_rewards)  # an untrained model scores 0: no advantage
    run = tmp_path / "run"
    GRPOTrainer(GRPOConfig(model=str(tiny_checkpoint), out=str(run), tasks=ZOOM_EASY, steps=4, queries_per_step=2,
                           group_size=2, max_new_tokens=6, max_turns=2, eval_queries=2, eval_every=4, save_every=2,
                           lr=1e-2, threads=1, progress=False, filter_zero_variance=False)).train()
    records = evaluate_run(run, ZOOM_EASY, samples=3, text_stats=True, progress=False)
    assert [r["step"] for r in records] == [0, 2, 4]
    for key in ("heldout/accuracy", "heldout/rapr", "heldout/box_hit_mass", "heldout/zoom-read/answer_only_bound",
                "heldout/text_nll"):
        assert all(key in r for r in records), key

    ids = eval_sample_ids(ZOOM_EASY, 3, SFTConfig.eval_seed, set())
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)

    def text_nll(folder) -> float:
        model = load_model(folder)
        options = trace_options(box_vocab(model.config), ChatFormat(), {})
        traces = [t for t in play_traces(task_source(ZOOM_EASY), ids, options=options) if t.kind == "image/single"]
        return text_position_stats(model, processor, traces)["text_nll"]

    assert records[0]["heldout/text_nll"] == pytest.approx(text_nll(tiny_checkpoint))
    assert records[2]["heldout/text_nll"] == pytest.approx(text_nll(run / "final"))  # the last checkpoint's weights
    assert records[2]["heldout/text_nll"] != pytest.approx(records[0]["heldout/text_nll"])  # the update moved them

    assert main([str(run), "--tasks", json.dumps(ZOOM_EASY), "--samples", "3", "--no-progress"]) == 0
    assert len((run / EVALS_FILE).read_text().splitlines()) == 3  # nothing evaluated twice
    assert capsys.readouterr().out.strip() == markdown_table(records)
    with pytest.raises(ValueError, match="other items"):
        evaluate_run(run, ZOOM_EASY, samples=5, progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate_run(tmp_path, ZOOM_EASY, samples=3, progress=False)
