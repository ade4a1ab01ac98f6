"""The box mass of a tiny model: which boxes hold the evidence, and how much of the first box's probability does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agents.box_mass import (exploration_report, first_box_hit_mass, hitting_boxes, tempered_hit_mass,
                              text_position_stats)
from agents.sft import ZOOM_EASY, box_vocab, snap_to_box_tokens, task_source
from agents.traces import TraceOptions, play_traces
from agents.vlm.chat import ChatFormat
from agents.vlm.tiny import BoxVocab, build_tiny_model, build_tiny_processor


def test_hitting_boxes_are_those_whose_padded_crop_holds_the_evidence() -> None:
    vocab = BoxVocab(grid=10, sizes=(0.1, 0.5))
    hits = hitting_boxes(vocab, (100, 100), (40, 40, 50, 50), padding=0.0)
    small = [vocab.split(i) for i in hits.nonzero()[0] if vocab.split(i)[1] == 0]
    assert small == [(44, 0)]  # the one cell (row 4, column 4) whose 0.1 box is the evidence
    assert hits.sum() == 1 + 25  # a 0.5 box holds it from the centres 0.25 ... 0.65 on both axes
    # padding 0.1 of the side: small boxes one cell off (rows and columns 3-5), large ones from 0.15 to 0.75
    assert hitting_boxes(vocab, (100, 100), (40, 40, 50, 50), padding=0.1).sum() == 9 + 49


class _Pointer(torch.nn.Module):
    """Puts all next-token probability on one token: the next input token (`teacher`) or a fixed one."""

    def __init__(self, config, fixed: int | None = None) -> None:
        super().__init__()
        self.config, self.fixed, self.weight = config, fixed, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -30.0)
        if self.fixed is None:
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
            logits.scatter_(-1, nxt[..., None], 30.0)
        else:
            logits[..., self.fixed] = 30.0
        return SimpleNamespace(logits=logits)


def test_first_box_hit_mass_reads_the_distribution_at_the_first_box() -> None:
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    vocab, source = box_vocab(model.config), task_source(ZOOM_EASY)
    traces = play_traces(source, [f"zoom-read/{i}" for i in range(30, 34)],
                         options=TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat()))
    teacher = first_box_hit_mass(_Pointer(model.config), processor, traces, source, vocab, 0.1, batch_size=3)
    assert [r["greedy_hit"] for r in teacher] == [1.0] * 4  # the oracle's own box holds the evidence
    assert all(r["hit_mass"] == pytest.approx(1.0) and r["top_mass"] == pytest.approx(1.0) for r in teacher)
    corner = model.config.box_token_start_id  # the smallest box in the top-left cell
    away = first_box_hit_mass(_Pointer(model.config, corner), processor, traces, source, vocab, 0.1)
    for trace, row in zip(traces, away):
        sample = source.get(trace.sample_id)
        height, width = sample.load_image().shape[:2]
        holds = hitting_boxes(vocab, (width, height), sample.evidence_box, 0.1)[0]
        assert row["hit_mass"] == pytest.approx(float(holds)) and row["greedy_hit"] == float(holds)
    assert first_box_hit_mass(model, processor, traces[:2], source, vocab, 0.1)[0]["hit_mass"] < 0.5  # untrained


def test_first_box_hit_mass_refuses_traces_without_one_evidence_crop() -> None:
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    source = task_source(ZOOM_EASY)
    traces = play_traces(source, ["zoom-read/30"], image_kind="image/zoom-in",
                         options=TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat()))
    with pytest.raises(ValueError, match="image/single"):
        first_box_hit_mass(model, processor, traces, source, box_vocab(model.config), 0.1)


def test_tempered_hit_mass_flattens_the_box_distribution() -> None:
    probs, hits = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([False, True, True])
    assert tempered_hit_mass(probs, hits, 1.0) == pytest.approx(0.5)
    root = torch.tensor([0.5, 0.3, 0.2]).sqrt()  # temperature 2: p ** (1 / 2), renormalised
    assert tempered_hit_mass(probs, hits, 2.0) == pytest.approx(float(root[1:].sum() / root.sum()))
    assert tempered_hit_mass(probs, hits, 0.01) == pytest.approx(0.0, abs=1e-6)  # near greedy: the top box misses
    with pytest.raises(ValueError, match="temperature"):
        tempered_hit_mass(probs, hits, 0.0)


def test_exploration_report_splits_items_by_their_greedy_box() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0]])
    hits = [torch.tensor([False, True, True]), torch.tensor([False, True, False])]
    report = exploration_report(probs, hits, [1.0], group_size=2)
    assert report["greedy miss"]["items"] == 1 and report["greedy hit"]["items"] == 1
    assert report["greedy miss"]["hit_mass@1"] == pytest.approx(0.5)
    assert report["greedy miss"]["group_hit@1"] == pytest.approx(1 - 0.5 ** 2)  # one of 2 samples hits
    assert report["greedy hit"]["group_hit@1"] == pytest.approx(1 - 0.1 ** 2)
    assert report["all"]["hit_mass@1"] == pytest.approx((0.5 + 0.9) / 2)


def test_text_position_stats_read_box_mass_and_nll_at_the_trained_text_positions() -> None:
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    traces = play_traces(task_source(ZOOM_EASY), [f"zoom-read/{i}" for i in range(30, 33)],
                         options=TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat()))
    teacher = text_position_stats(_Pointer(model.config), processor, traces, batch_size=2)
    assert teacher["text_box_mass"] == pytest.approx(0.0, abs=1e-12)  # all mass on the oracle's next text token
    assert teacher["text_nll"] == pytest.approx(0.0, abs=1e-12)
    corner = model.config.box_token_start_id
    leaking = text_position_stats(_Pointer(model.config, corner), processor, traces)
    assert leaking["text_box_mass"] == pytest.approx(1.0) and leaking["text_nll"] == pytest.approx(60.0, rel=1e-3)
    assert leaking["text_tokens"] == teacher["text_tokens"] > 3 * 4  # a preamble and an answer per trace
    untrained = text_position_stats(model, processor, traces)
    assert untrained["text_box_mass"] == 0.0 and untrained["text_nll"] > 1.0  # box tokens masked outside the slot
    model.config.box_slot_token_id = None
    assert 0.0 < text_position_stats(model, processor, traces)["text_box_mass"] < 1.0
