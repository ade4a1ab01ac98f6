"""Warm-start trainer: the loss learns, masked tokens are inert, resume is exact, evaluation reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.logger import read_metrics
from agents.sft import (
    PRESETS, SFTConfig, _build, SFTStage, ZOOM_EASY, batch_indices, eval_sample_ids, lr_position, native_bfloat16, neighbour_boxes,
    oracle_op_scores,
    sft_loss_sum,
    snap_to_box_tokens, stage_items, task_source, train_sft,
)
from agents.traces import TraceMix, TraceOptions, play_traces, synthesize_traces
from agents.vlm.chat import ChatFormat, load_chat_format
from agents.vlm.encoding import collate, encode_segments
from agents.vlm.hf import TransformersPolicy
from agents.vlm.tiny import BoxVocab, build_tiny_model, build_tiny_processor

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vision_num_layers": 1,
         "stem_channels": 8, "pointer_dim": 32}
SINGLE = {"image/single": 1.0}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def config(out: Path, **overrides) -> SFTConfig:
    fields = dict(out=str(out), stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=4, image_mix=SINGLE, steps=3),
                                        SFTStage(tasks=ZOOM_EASY, n_pixel=4, n_text=0, image_mix=SINGLE)],
                  model=SMALL, max_steps=6, batch_size=2, lr=3e-3, eval_every=0, eval_samples=1,
                  max_new_tokens=4, checkpoint_every=2, progress=False, log_every=1)
    return SFTConfig(**{**fields, **overrides})


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_loss_falls_and_parameters_move(tmp_path: Path, autocast: str | None) -> None:
    cfg = config(tmp_path, stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)], max_steps=12, lr=1e-2,
                 warmup_ratio=0.0, checkpoint_every=0, autocast=autocast)
    fresh = build_tiny_model(build_tiny_processor(), seed=cfg.seed, **SMALL).state_dict()
    train_sft(cfg)
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0]
    trained = load_file(str(tmp_path / "final" / "model.safetensors"))
    moved = [k for k, v in fresh.items() if k in trained and not torch.equal(v, trained[k])]
    assert "pointer.query.weight" in moved and "model.vision.stem.0.weight" in moved
    assert all(v.dtype == torch.float32 for v in trained.values())  # autocast leaves the weights in float32
    assert load_chat_format(tmp_path / "final") == cfg.chat_format
    policy = TransformersPolicy.from_pretrained(tmp_path / "final")
    assert (policy.system, policy.question_first) == (cfg.system, True)
    prompt = ChatFormat(system="S", question_first=True).conversation().add_observation(
        {"text": "Q?", "images": (np.zeros((8, 8, 3), np.uint8),)})
    assert prompt.index("Q?") < prompt.index("<|image_pad|>")


def _small_model_and_trace() -> tuple:
    """A fresh small tiny model, its processor and one single-crop zoom-read trace."""
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL)
    trace = synthesize_traces("zoom-read", 1, 0, mix=TraceMix(image=SINGLE, video_share=0.0), seed=3,
                              options=TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat()),
                              progress=False)[0]
    return processor, model, trace

def test_masked_tool_output_has_no_effect_on_loss_or_gradient() -> None:
    processor, model, trace = _small_model_and_trace()
    segments = trace.segments()[:3]  # prompt, the trained crop turn, the tool output (crop) last
    assert [trained for _, trained in segments] == [False, True, False]
    item = encode_segments(processor, segments, trace.images[:2])
    changed = dict(item, input_ids=item["input_ids"].clone())
    tool = (item["loss_mask"] == 0).nonzero().flatten()
    tool = tool[tool > int(item["loss_mask"].nonzero().max())]
    changed["input_ids"][tool[-5:]] = processor.tokenizer.convert_tokens_to_ids("A")

    def loss_and_grad(it: dict) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss, n = sft_loss_sum(model, collate([it], processor.tokenizer.pad_token_id))
        (loss / n).backward()
        return (loss / n).item(), model.lm_head.weight.grad.clone()

    (a, grad_a), (b, grad_b) = loss_and_grad(item), loss_and_grad(changed)
    assert a == pytest.approx(b, abs=1e-6) and torch.allclose(grad_a, grad_b, atol=1e-7)
    # ...while a trained token does count, and the loss is Hugging Face's masked mean.
    batch = collate([item], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, n = sft_loss_sum(model, batch)
        weighted, _ = sft_loss_sum(model, batch, pointer_weight=3.0)
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    box = int((labels >= model.config.box_token_start_id).nonzero()[0])
    box_nll = -torch.log_softmax(logits[box], -1)[labels[box]]
    assert float(weighted - loss) == pytest.approx(2.0 * float(box_nll), rel=1e-4)
    reference = model(**{k: v for k, v in batch.items() if k != "loss_mask"}).loss
    assert float((loss / n).detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert n == int(item["loss_mask"].sum()) - (1 if int(item["loss_mask"][0]) else 0)


def test_pointer_smoothing_table_and_loss() -> None:
    vocab = BoxVocab()
    table = neighbour_boxes(vocab)
    corner = vocab.index(0, 1)
    assert sorted(int(i) for i in table[corner] if i >= 0) == sorted(
        [vocab.index(1, 1), vocab.index(vocab.grid, 1), vocab.index(vocab.grid + 1, 1)])
    assert int((table[vocab.index(vocab.grid + 1, 2)] >= 0).sum()) == 8


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    whole = train_sft(config(tmp_path / "whole"))
    killed = train_sft(config(tmp_path / "resumed"), stop_after=5)  # checkpoint at 4, step 5 lost
    assert killed["step"] == 5 and not (tmp_path / "resumed" / "final").exists()
    resumed = train_sft(config(tmp_path / "resumed", resume=True))
    assert whole["step"] == resumed["step"] == 6
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_eval_hook_reports_closed_loop_metrics(tmp_path: Path) -> None:
    seen = []
    result = train_sft(config(tmp_path, stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)], max_steps=2,
                              eval_every=1, eval_samples=2, checkpoint_every=0),
                       on_eval=lambda step, metrics: seen.append((step, metrics)))
    assert [s for s, _ in seen] == [1, 2]
    for key in ("accuracy", "rapr", "answered", "zoom-read/accuracy", "acc_oracle_ops", "zoom-read/acc_oracle_ops",
                "box_hit_mass", "zoom-read/box_top_mass"):
        assert 0.0 <= result["eval"][key] <= 1.0
    logged = [r for r in read_metrics(tmp_path) if "eval/accuracy" in r]
    assert [r["step"] for r in logged] == [1, 2]


def test_batches_are_stateless_epochs_and_held_out_seeds_are_disjoint(tmp_path: Path) -> None:
    order = [i for s in range(3) for i in batch_indices(6, 2, 0, 0, s)]
    assert sorted(order) == list(range(6))
    assert batch_indices(6, 2, 0, 0, 4) == batch_indices(6, 2, 0, 0, 4)
    cfg = config(tmp_path)
    _, used = stage_items(cfg, 0, build_tiny_processor(), BoxVocab())
    seed = int(next(iter(used)).split("/")[1])
    ids = eval_sample_ids(cfg.eval_tasks, 3, seed, used)
    assert len(ids) == 3 and not set(ids) & used


def test_final_turn_mask_marks_the_last_labelled_run() -> None:
    from agents.sft import final_turn_mask

    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9, -100], [-100, -100, 1, 2, 3, -100, -100, -100, -100]])
    expected = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(final_turn_mask(labels), expected)


def test_answer_weight_scales_only_the_final_turn() -> None:
    """Also: the loss from the logits of labelled positions only equals the one from all logits,
    on a batch whose rows are labelled at different positions (row 2 stops at the crop turn, so
    no row is labelled over row 1's tool output)."""
    processor, model, trace = _small_model_and_trace()
    rows = [encode_segments(processor, trace.segments(), trace.images),
            encode_segments(processor, trace.segments()[:2], trace.images[:1])]
    batch = collate(rows, processor.tokenizer.pad_token_id)
    from agents.sft import final_turn_mask

    with torch.no_grad():
        plain, count = sft_loss_sum(model, batch)
        heavy, _ = sft_loss_sum(model, batch, answer_weight=3.0)
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    nll = -torch.log_softmax(logits[keep], -1).gather(-1, labels[keep][:, None]).squeeze(-1)
    final = nll[final_turn_mask(labels)[keep]].sum()
    assert 0 < final < plain
    torch.testing.assert_close(heavy, plain + 2.0 * final, rtol=1e-5, atol=1e-4)


def test_evaluate_command_uses_the_saved_env_settings_and_the_config_env_kwargs(tmp_path, monkeypatch):
    """``--evaluate`` plays the saved model in the env it was trained in, with the ``env_kwargs`` of
    ``--config`` over its saved env settings."""
    import json

    import agents.sft as sft

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    sft.save_model(model, processor, ChatFormat(system=sft.TINY_SYSTEM, question_first=True),
                   {"crop_padding": 0.05, "min_crop_side": 20}, tmp_path / "model")
    (tmp_path / "config.json").write_text(json.dumps({"env_kwargs": {"crop_padding": 0.03}}))
    seen = {}

    def fake_evaluate(*args, env_kwargs=None, oracle_reading=False, **kwargs):
        seen["env_kwargs"], seen["oracle_reading"] = env_kwargs, oracle_reading
        return {"accuracy": 0.0}

    monkeypatch.setattr(sft, "evaluate", fake_evaluate)
    assert sft.main(["--out", str(tmp_path / "eval"), "--evaluate", str(tmp_path / "model"), "--config",
                     str(tmp_path / "config.json"), "--eval-samples", "2", "--no-progress"]) == 0
    assert seen["env_kwargs"] == {"crop_padding": 0.03, "min_crop_side": 20} and not seen["oracle_reading"]
    assert sft.main(["--out", str(tmp_path / "eval"), "--evaluate", str(tmp_path / "model"), "--eval-samples", "2",
                     "--no-progress", "--oracle-reading"]) == 0
    assert seen["env_kwargs"] == {"crop_padding": 0.05, "min_crop_side": 20} and seen["oracle_reading"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["accuracy"] == 0.0


def test_evaluate_separates_reading_from_pointing(monkeypatch) -> None:
    """``acc_when_hit`` is the accuracy of the episodes whose last crop held the evidence; ``frames_hit`` the
    share of the frame selections that hold an evidence frame."""
    from types import SimpleNamespace

    import agents.sft as sft

    def info(score: float, ops: int, hit: bool | None) -> dict:
        return {"family": "zoom-read", "score": score, "n_visual_ops": ops, "n_tool_calls": ops, "n_op_errors": 0,
                "answer": "7",
                "crop_iou": None if hit is None else float(hit), "crop_hit": hit}

    def video(score: float, frames_hit: bool | None) -> dict:
        return {"family": "video", "score": score, "n_visual_ops": int(frames_hit is not None),
                "n_tool_calls": int(frames_hit is not None), "n_op_errors": 0, "answer": "A", "crop_iou": None,
                "crop_hit": None, "frames_hit": frames_hit}

    infos = [info(1.0, 1, True), info(0.0, 1, True), info(1.0, 1, False), info(1.0, 0, None)]
    infos += [video(1.0, True), video(0.0, False), video(0.0, False), video(1.0, None)]
    monkeypatch.setattr(sft, "collect", lambda *a, **k: [SimpleNamespace(info=i) for i in infos])
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    metrics = sft.evaluate(model, processor, ChatFormat(), ZOOM_EASY, ["zoom-read/0"])
    assert metrics["zoom-read/acc_when_hit"] == 0.5 and "zoom-read/frames_hit" not in metrics
    assert metrics["video/frames_hit"] == pytest.approx(1 / 3)  # of the episodes that selected frames
    assert metrics["zoom-read/acc_with_ops"] == pytest.approx(2 / 3) and metrics["zoom-read/acc_without_ops"] == 1.0
    assert not any(k.count("/") == 2 for k in metrics)  # episodes without a sample id have no tier


def test_evaluate_reports_each_tier(monkeypatch) -> None:
    """Per tier of a family: the accuracy, the operations and the number of its episodes."""
    from types import SimpleNamespace

    import agents.sft as sft

    source = sft.task_source({"count": {}})
    ids = [source.sample_id(seed) for seed in range(12)]
    tiers = [source.get(i).meta["tier"] for i in ids]
    infos = [{"family": "count", "sample_id": i, "score": float(k % 2), "n_visual_ops": k % 3, "n_tool_calls": k % 3,
              "n_op_errors": 0, "answer": "3", "crop_iou": None, "crop_hit": None} for k, i in enumerate(ids)]
    monkeypatch.setattr(sft, "collect", lambda *a, **k: [SimpleNamespace(info=i) for i in infos])
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1)
    metrics = sft.evaluate(model, processor, ChatFormat(), {"count": {}}, ids, oracle_ops=False)
    for tier in set(tiers):
        mine = [k for k, t in enumerate(tiers) if t == tier]
        assert metrics[f"count/{tier}/episodes"] == len(mine)
        assert metrics[f"count/{tier}/accuracy"] == pytest.approx(np.mean([k % 2 for k in mine]))
        assert metrics[f"count/{tier}/mean_ops"] == pytest.approx(np.mean([k % 3 for k in mine]))
    bound = sft.answer_only_bound({"count": {}}, ids)
    for tier in set(tiers):  # each tier's bound is the mean of its items' scores; the family's, of all
        assert min(bound[f"count/{t}/answer_only_bound"] for t in set(tiers)) <= bound["count/answer_only_bound"]
        mine = [sft.answer_only_bound({"count": {}}, [i])["count/answer_only_bound"]
                for i, t in zip(ids, tiers) if t == tier]
        assert bound[f"count/{tier}/answer_only_bound"] == pytest.approx(np.mean(mine))


def test_vision_pretraining_names_glyphs_and_touches_only_the_encoder() -> None:
    from agents.vision_pretrain import GLYPHS, VisionPretrainConfig, glyph_crops, pretrain_vision
    from pxr_env.tasks.synthetic import ZoomRead

    source = ZoomRead(questions=("read",), shortcut_share=0.0, hard_share=0.0, distractors=(0, 2))
    options = TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat(), env_kwargs={"crop_padding": 0.03})
    images, points, ids = glyph_crops(source, 10, seed=1, options=options)
    assert len(images) == len(points) == len(ids) == 10 and all(im.shape[2] == 3 for im in images)
    for (point,), sample_id in zip(points, ids):  # the target's glyph, inside the crop the trace showed
        assert GLYPHS[point[2]] == source.get(sample_id).meta["targets"][0]["glyph"]
        assert 0.05 < point[0] < 0.95 and 0.05 < point[1] < 0.95
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL, image_summary=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    result = pretrain_vision(model.model.vision, processor.image_processor, images, points,
                             VisionPretrainConfig(samples=10, steps=60, batch_size=4, lr=1e-2, held_out=2),
                             log=lambda step, r: records.append((step, r)))
    assert [s for s, _ in records] == [50, 60] and result["pretrain/steps"] == 60
    assert records[1][1]["pretrain/loss"] < 0.5 * records[0][1]["pretrain/loss"]  # it fits its 8 crops
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("model.vision.") for k in moved)
    for glyph_head in ("pooled", "both"):  # the head on the max-pooled tokens, alone or beside the token's, fits them too
        losses = []
        pretrain_vision(build_tiny_model(processor, seed=0, **SMALL, image_summary=True).model.vision,
                        processor.image_processor, images, points,
                        VisionPretrainConfig(glyph_head=glyph_head, samples=10, steps=60, batch_size=4, lr=1e-2,
                                             held_out=2), log=lambda step, r: losses.append(r["pretrain/loss"]))
        assert losses[1] < 0.5 * losses[0], glyph_head
    with pytest.raises(ValueError, match="glyph_head"):
        VisionPretrainConfig(glyph_head="mean")
    with pytest.raises(ValueError, match="no zoom-read crop"):
        glyph_crops(ZoomRead(questions=("relative",), shortcut_share=0.0, hard_share=0.0), 2, 0, options)


def _pretraining_loss_halves(images: list, points: list, target: str, batch_size: int, held_out: int) -> None:
    """60 steps of `target` pretraining of a fresh small encoder halve its loss (first 50 steps against the rest)."""
    from agents.vision_pretrain import VisionPretrainConfig, pretrain_vision

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL)
    losses = []
    pretrain_vision(model.model.vision, processor.image_processor, images, points,
                    VisionPretrainConfig(target=target, samples=len(images), steps=60, batch_size=batch_size, lr=1e-2,
                                         held_out=held_out), log=lambda step, r: losses.append(r["pretrain/loss"]))
    assert losses[1] < 0.5 * losses[0], target


def test_frame_glyphs_cut_the_flashing_digit_at_frame_scale_and_pretraining_names_it(tmp_path: Path) -> None:
    from agents.vision_pretrain import GLYPHS, VisionPretrainConfig, frame_glyphs
    from pxr_env.ops import smart_resize
    from pxr_env.tasks.synthetic import Clips, Count

    clips = Clips(cache_dir=str(tmp_path), shortcut_share=0.5)  # the shortcut kinds are drawn and skipped
    images, points, ids = frame_glyphs(clips, 8, seed=0, frame_bounds=(224 * 224, 224 * 224))
    digit_ids = sorted({i for i in ids})
    assert 0 < len(digit_ids) < 8 and len(images) == len(points) == len(ids)
    windows = {sample_id: [] for sample_id in digit_ids}
    for image, (point,), sample_id in zip(images, points, ids):
        windows[sample_id].append((image, point))
    for sample_id, shown in windows.items():
        sample = clips.get(sample_id)
        assert sample.meta["kind"] == "digit" and len(shown) == len(sample.evidence_frames)
        frames = sample.load_frames()
        gx0, gy0, gx1, gy1 = sample.meta["target"]["glyph_box"]
        for (image, (x, y, glyph)), number in zip(shown, sample.evidence_frames):
            assert GLYPHS[glyph] == sample.meta["target"]["digit"] and image.shape == (112, 112, 3)
            frame = smart_resize(frames[number - 1], (224 * 224, 224 * 224))  # 224 px: shown at full size
            left, top = round((gx0 + gx1) / 2 - x * 112), round((gy0 + gy1) / 2 - y * 112)
            assert np.array_equal(image, frame[top:top + 112, left:left + 112])  # the frame at its own scale
            assert 0 <= x < 1 and 0 <= y < 1
    _pretraining_loss_halves(images, points, "frame-glyph", batch_size=4, held_out=2)
    with pytest.raises(ValueError, match="video samples"):
        frame_glyphs(Count(), 2, 0, (224 * 224, 224 * 224))
    with pytest.raises(ValueError, match="no video digit"):
        frame_glyphs(Clips(cache_dir=str(tmp_path), shortcut_share=1.0, questions=("appear",)), 2, 0, (50176, 50176))
    with pytest.raises(ValueError, match="dense target"):
        VisionPretrainConfig(target="frame-glyph", tower="pointer")


def test_drawn_apart_gives_each_process_its_share_and_every_process_the_same_items(monkeypatch) -> None:
    from agents import distributed
    from agents.vision_pretrain import drawn_apart

    def draw(rng: np.random.Generator) -> list[int]:
        return [int(rng.integers(1000))] * int(rng.integers(3))  # zero to two results an item

    alone = drawn_apart(7, 5, 1, draw)
    assert alone == [x for i in range(7) for x in draw(np.random.default_rng([5, 1, i]))]
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(distributed, "gather_objects", lambda items: shares.append(items) or items)
        drawn_apart(7, 5, 1, draw)
    assert [i for i, _ in shares[0]] == [0, 2, 4, 6] and [i for i, _ in shares[1]] == [1, 3, 5]
    monkeypatch.setattr(distributed, "gather_objects", lambda items: shares[0] + shares[1])
    assert drawn_apart(7, 5, 1, draw) == alone


def test_initial_frames_mark_the_flash_in_the_frames_that_show_it(tmp_path: Path) -> None:
    from agents.vision_pretrain import OBJECTS, initial_frames, token_targets
    from pxr_env.ops import smart_resize
    from pxr_env.tasks.synthetic import Clips, Count

    clips = Clips(cache_dir=str(tmp_path), shortcut_share=0.3)
    images, points, ids = initial_frames(clips, 6, seed=0, video_bounds=(112 * 112, 112 * 112))
    assert len(images) == len(points) == len(ids) == 6 * 16
    kinds = set()
    for start in range(0, len(images), 16):
        sample = clips.get(ids[start])
        frames, meta = sample.load_frames(), sample.meta
        kinds.add(meta["kind"])
        for t in range(16):
            assert np.array_equal(images[start + t], smart_resize(frames[t], (112 * 112, 112 * 112)))
            marked = {OBJECTS[index] for _, _, index in points[start + t]}
            if meta["kind"] == "digit":
                flashing = t + 1 in sample.evidence_frames
                assert (meta["target"]["digit"] in marked) == flashing
                assert f"{meta['target']['colour']} square" in marked
            elif meta["kind"] == "colour-change":
                turned = t >= meta["target"]["changes_at"]
                colour = meta["target"]["new_colour"] if turned else meta["target"]["colour"]
                assert marked == {f"{colour} {meta['target']['shape']}"}
            else:
                assert bool(marked) == (t + 1 in sample.evidence_frames)
    assert "digit" in kinds and len(kinds) > 1
    target = token_targets(points[0], 4, 4)
    assert target.shape == (16, len(OBJECTS)) and target.sum() == len(points[0])
    _pretraining_loss_halves(images, points, "frame-view", batch_size=8, held_out=16)
    with pytest.raises(ValueError, match="video samples"):
        initial_frames(Count(), 2, 0, (112 * 112, 112 * 112))


def test_evidence_crops_mark_the_objects_they_show_and_dense_pretraining_learns_them() -> None:
    from agents.vision_pretrain import (
        OBJECTS, VisionPretrainConfig, _shown_objects, evidence_crops, pretrain_vision, token_targets,
    )
    from pxr_env.tasks.synthetic import Chart, Count, ZoomRead
    from pxr_env.tasks.synthetic.common import SHAPES

    chart = Chart(questions=("table",), shortcut_share=0.0)
    images, points, ids = evidence_crops(chart, 12, seed=0, crop_bounds=(12544, 12544))
    assert len(images) == len(points) == len(ids) == 12
    assert all(0 <= x < 1 and 0 <= y < 1 for p in points for x, y, _ in p)
    _, centred, centred_ids = evidence_crops(chart, 6, seed=1, crop_bounds=(12544, 12544), jitter=0.0)
    for p, sample_id in zip(centred, centred_ids):  # an unmoved crop holds every glyph of the asked value
        text = chart.get(sample_id).meta["target"]["text"]
        assert set(text) <= {OBJECTS[i] for *_, i in p}
    _, count_points, _ = evidence_crops(Count(), 4, seed=0, crop_bounds=(12544, 12544))
    assert {OBJECTS[i].split()[-1] for p in count_points for *_, i in p} <= set(SHAPES)
    marked = token_targets([(0.1, 0.1, 3), (0.9, 0.55, 40), (0.12, 0.05, 5)], 4, 4)
    assert marked.shape == (16, len(OBJECTS)) and marked.sum() == 3
    assert marked[0, 3] == marked[0, 5] == marked[2 * 4 + 3, 40] == 1
    zoom = ZoomRead(shortcut_share=0.0)
    _, tag_points, tag_ids = evidence_crops(zoom, 4, seed=0, crop_bounds=(12544, 12544), jitter=0.0)
    for p, sample_id in zip(tag_points, tag_ids):  # a tag's crop marks its glyph and its coloured shape
        shown = {OBJECTS[i] for *_, i in p}
        for tag in (t for t in zoom.get(sample_id).meta["tags"] if t["target"]):
            assert {tag["glyph"], f"{tag['colour']} {tag['shape']}"} <= shown
    with pytest.raises(ValueError, match="chart, count and zoom-read"):
        _shown_objects(SimpleNamespace(family="video"))

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL, image_summary=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    pretrain_vision(model.model.vision, processor.image_processor, images, points,
                    VisionPretrainConfig(target="dense", samples=12, steps=60, batch_size=4, lr=1e-2, held_out=2),
                    log=lambda step, r: records.append(r))
    assert records[1]["pretrain/loss"] < 0.5 * records[0]["pretrain/loss"]
    assert 0.0 <= records[1]["pretrain/held_out_accuracy"] <= 1.0
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("model.vision.") for k in moved)


def test_initial_views_mark_tag_colours_and_train_the_pointer_stem_alone() -> None:
    from agents.vision_pretrain import OBJECTS, PointerStemTower, VisionPretrainConfig, initial_views, pretrain_vision
    from pxr_env.tasks.synthetic import ZoomRead

    zoom = ZoomRead(questions=("read",), shortcut_share=0.0, hard_share=0.0, easy_tags=(2, 3))
    images, points, ids = initial_views(zoom, 8, seed=0, image_bounds=(50176, 50176))
    assert len(images) == len(points) == len(ids) == 8
    for image, p, sample_id in zip(images, points, ids):
        sample = zoom.get(sample_id)
        height, width = sample.load_image().shape[:2]
        assert image.shape[0] * image.shape[1] <= 50176  # the view at the bounds, sides in steps of 28 px
        assert abs(image.shape[1] / image.shape[0] - width / height) < 0.15
        tags = sample.meta["tags"]
        assert sorted(OBJECTS[i] for *_, i in p) == sorted(f"{t['colour']} {t['shape']}" for t in tags)  # no glyphs
        for (x, y, _), tag in zip(p, tags):
            assert x == pytest.approx((tag["box"][0] + tag["box"][2]) / 2 / width)
            assert y == pytest.approx((tag["box"][1] + tag["box"][3]) / 2 / height)

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL, pointer_stem=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    pretrain_vision(PointerStemTower(model.pointer, model.config.hidden_size), processor.image_processor, images,
                    points, VisionPretrainConfig(target="view", tower="pointer", samples=8, steps=60, batch_size=4,
                                                 lr=1e-2, held_out=2), log=lambda step, r: records.append(r))
    assert records[1]["pretrain/loss"] < 0.5 * records[0]["pretrain/loss"]
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("pointer.stem") for k in moved)  # what the decoder reads is unchanged
    with pytest.raises(ValueError, match="no pointer stem"):
        PointerStemTower(build_tiny_model(processor, seed=0, **SMALL).pointer, 64)
    with pytest.raises(ValueError, match="dense target"):
        VisionPretrainConfig(target="glyph", tower="pointer")


def test_chart_views_mark_every_token_of_a_region_with_the_words_naming_it() -> None:
    from agents.vision_pretrain import (OBJECTS, VisionPretrainConfig, initial_views, pretrain_tower, pretrain_vision,
                                        token_targets)
    from pxr_env.tasks.synthetic import Chart

    chart = Chart(questions=("poster", "table"), shortcut_share=0.0)
    images, points, ids = initial_views(chart, 8, seed=0, image_bounds=(50176, 50176))
    for image, p, sample_id in zip(images, points, ids):
        sample = chart.get(sample_id)
        poster = sample.meta["kind"] == "poster"
        values = sample.meta["values"]
        assert {OBJECTS[i] for *_, i in p} == ({v["heading"] for v in values} if poster else
                                               {v["row"] for v in values} | {v["column"] for v in values})
        grid_h, grid_w = image.shape[0] // 16, image.shape[1] // 16
        marked = token_targets(p, grid_h, grid_w)
        height, width = sample.load_image().shape[:2]
        for value in values:  # the token under every value names it as a question would
            left, top, right, bottom = value["box"]
            token = int((top + bottom) / 2 / height * grid_h) * grid_w + int((left + right) / 2 / width * grid_w)
            named = {value["heading"]} if poster else {value["row"], value["column"]}
            assert named <= {OBJECTS[i] for i in marked[token].nonzero().flatten().tolist()}  # a token of 16 px
            # can also cover a neighbouring table row (rows are about 10 px apart in the view)

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL)
    records = []
    pretrain_vision(model.model.vision, processor.image_processor, images, points,
                    VisionPretrainConfig(target="view", samples=8, steps=60, batch_size=4, lr=1e-2, held_out=2),
                    log=lambda step, r: records.append(r))
    assert records[1]["pretrain/loss"] < 0.5 * records[0]["pretrain/loss"]

    # The same target on the pointer's own match encoder leaves the decoder's encoder as it was.
    with pytest.raises(ValueError, match="no match encoder"):
        pretrain_tower(model, "match")
    model = build_tiny_model(processor, seed=0, **SMALL, pointer_match=True, pointer_match_features="both",
                             pointer_match_encoder=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_vision(pretrain_tower(model, "match"), processor.image_processor, images, points,
                    VisionPretrainConfig(target="view", tower="match", samples=8, steps=3, batch_size=4, held_out=2))
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("pointer.match_encoder.") for k in moved)


def test_a_match_encoder_added_to_a_saved_model_starts_as_its_image_encoder(tmp_path: Path) -> None:
    """``"model": {"pointer_match_encoder": true}`` with `init_from`: the new encoder is a copy of the
    saved image encoder; a saved model that has one keeps its own."""
    import agents.sft as sft

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, **SMALL, pointer_match=True, pointer_match_features="encoder")
    sft.save_model(model, processor, ChatFormat(system=sft.TINY_SYSTEM, question_first=True), {}, tmp_path / "saved")
    grown, _ = _build(config(tmp_path / "run", init_from=str(tmp_path / "saved"), model={"pointer_match_encoder": True}))
    vision = grown.model.vision.state_dict()
    match = {k: v.clone() for k, v in grown.pointer.match_encoder.state_dict().items()}
    assert vision.keys() == match.keys() and all(torch.equal(vision[k], match[k]) for k in vision)
    with torch.no_grad():
        for param in grown.pointer.match_encoder.parameters():
            param.add_(1.0)
    sft.save_model(grown, processor, ChatFormat(system=sft.TINY_SYSTEM, question_first=True), {}, tmp_path / "grown")
    again, _ = _build(config(tmp_path / "run", init_from=str(tmp_path / "grown"), model={"pointer_match_encoder": True}))
    kept = again.pointer.match_encoder.state_dict()
    assert all(torch.equal(kept[k], match[k] + 1.0) for k in match if match[k].is_floating_point())


def test_train_sft_pretrains_the_vision_once_and_resumes_past_it(tmp_path: Path) -> None:
    pretrain = {"samples": 6, "steps": 2, "batch_size": 2, "held_out": 2}
    cfg = config(tmp_path, vision_pretrain=pretrain, checkpoint_every=1)
    train_sft(cfg, stop_after=2)
    train_sft(config(tmp_path, vision_pretrain=pretrain, checkpoint_every=1, resume=True))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "pretrain/minutes" in r] == [0]
    curve = read_metrics(tmp_path / "pretrain")  # its own steps, in a folder of its own
    assert [r["step"] for r in curve] == [2] and "pretrain/held_out_accuracy" in curve[0]
    assert (tmp_path / "final" / "model.safetensors").exists()
    dense = {"tasks": {"chart": {}}, "target": "dense", "samples": 6, "steps": 2, "batch_size": 2, "held_out": 2}
    train_sft(config(tmp_path / "dense", vision_pretrain=dense, init_from=str(tmp_path / "final"), model={},
                     max_steps=1, checkpoint_every=0))  # a trained model's encoder learns a new family's objects
    assert [r["step"] for r in read_metrics(tmp_path / "dense") if "pretrain/held_out_accuracy" in r] == [0]
    with pytest.raises(ValueError, match="'glyph', 'frame-glyph', 'dense', 'view' or 'frame-view'"):
        config(tmp_path, vision_pretrain={**pretrain, "target": "pooled"})
    view = {"tasks": {"zoom-read": {"easy_tags": [1, 2], "hard_share": 0.0}}, "target": "view", "tower": "pointer",
            "samples": 6, "steps": 2, "batch_size": 2, "held_out": 2}
    both = config(tmp_path / "both", vision_pretrain=[pretrain, view], model={**SMALL, "pointer_stem": True},
                  max_steps=1, checkpoint_every=0)
    assert [p.tower for p in both.vision_pretrain] == ["encoder", "pointer"]
    train_sft(both)  # the encoder, then the pointer stem: both records are logged at step 0
    first = next(r for r in read_metrics(tmp_path / "both") if r["step"] == 0)
    assert {"pretrain/held_out_accuracy", "pretrain2/held_out_accuracy"} <= set(first)
    assert read_metrics(tmp_path / "both" / "pretrain2")[-1]["step"] == 2


def test_frozen_prefixes_stay_fixed_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)], max_steps=2,
                 checkpoint_every=0, freeze=["model.vision.stem", "pointer.key"])
    fresh = build_tiny_model(build_tiny_processor(), seed=cfg.seed, **SMALL).state_dict()
    train_sft(cfg)
    trained = load_file(str(tmp_path / "final" / "model.safetensors"))
    moved = {k for k, v in fresh.items() if k in trained and not torch.equal(v, trained[k])}
    assert moved and not any(k.startswith(("model.vision.stem", "pointer.key")) for k in moved)
    with pytest.raises(ValueError, match="match no parameter"):
        train_sft(config(tmp_path / "bad", freeze=["model.visoin"], max_steps=1))


def test_a_stage_freeze_holds_its_prefixes_during_that_stage_only(tmp_path: Path) -> None:
    fresh = build_tiny_model(build_tiny_processor(), seed=0, **SMALL).state_dict()
    stages = [SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE, steps=2, freeze=["pointer.key"]),
              SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)]

    def moved_after(steps: int, out: Path) -> set[str]:
        train_sft(config(out, stages=stages, max_steps=steps, checkpoint_every=0))
        trained = load_file(str(out / "final" / "model.safetensors"))
        return {k for k, v in fresh.items() if k in trained and not torch.equal(v, trained[k])}

    first = moved_after(2, tmp_path / "first")
    assert "pointer.query.weight" in first and "pointer.key.weight" not in first
    assert "pointer.key.weight" in moved_after(4, tmp_path / "both")
    bad = [SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE, freeze=["pointer.kee"])]
    with pytest.raises(ValueError, match="match no parameter"):
        train_sft(config(tmp_path / "bad", stages=bad, max_steps=1))


@pytest.mark.parametrize("part, labelled_end", [("reading", "}<|im_end|>"), ("pointing", "</tool_call><|im_end|>")])
def test_one_turn_stage_trains_its_piece_with_its_own_batch(tmp_path: Path, part: str, labelled_end: str) -> None:
    """A ``reading`` stage encodes `Trace.reading` items (the final crop, the answer labelled), a
    ``pointing`` stage `Trace.pointing` items (the original image, the first crop call labelled):
    one image, one labelled run, shorter than a trace; each stage uses its own batch size."""
    stage = SFTStage(tasks=ZOOM_EASY, n_pixel=3, image_mix=SINGLE, steps=2, batch_size=3, **{part: True})
    cfg = config(tmp_path, stages=[stage, SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)], max_steps=3,
                 checkpoint_every=0)
    processor = build_tiny_processor()
    items, _ = stage_items(cfg, 0, processor, BoxVocab())
    traces, _ = stage_items(cfg, 1, processor, BoxVocab())
    for item in items:
        assert int(item["image_grid_thw"].shape[0]) == 1
        labelled = item["loss_mask"].nonzero().flatten()
        assert len(labelled) and labelled.max() - labelled.min() + 1 == len(labelled)
        assert processor.tokenizer.decode(item["input_ids"][labelled]).endswith(labelled_end)
    assert max(len(i["input_ids"]) for i in items) < min(len(t["input_ids"]) for t in traces)
    train_sft(cfg)
    rows = [r for r in read_metrics(tmp_path) if "train/tokens_per_s" in r]
    assert [r["train/stage"] for r in rows] == [0, 0, 1]


def test_stage_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SFTStage(batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        SFTStage(reading=True, pointing=True)
    with pytest.raises(ValueError, match="autocast"):
        SFTConfig(autocast="int8")


def test_auto_autocast_takes_bfloat16_only_where_the_device_computes_it(monkeypatch) -> None:
    """``autocast: "auto"`` (the preset's) is bfloat16 on a CPU with native bfloat16 and float32
    on one without, where emulated bfloat16 runs about 10 times slower; an explicit dtype stays."""
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert native_bfloat16("cpu") is native
        assert SFTConfig(autocast="auto").autocast_dtype is expected
        assert SFTConfig(autocast="bfloat16").autocast_dtype is torch.bfloat16
    assert SFTConfig().autocast_dtype is None and PRESETS["warmstart"]["autocast"] == "auto"


def test_a_finer_pointer_grid_trains_on_its_own_box_tokens_and_reloads(tmp_path: Path) -> None:
    """``pointer_grid`` 28 in the model overrides: the processor carries its box tokens, the traces are
    snapped to them, and the saved model and processor reload together."""
    from transformers import AutoProcessor

    cfg = config(tmp_path, stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix=SINGLE)], max_steps=1,
                 checkpoint_every=0, model={**SMALL, "pointer_grid": 28, "pointer_subcells": 2})
    train_sft(cfg)
    processor = AutoProcessor.from_pretrained(tmp_path / "final")
    model = TransformersPolicy.from_pretrained(tmp_path / "final").model
    boxes = BoxVocab(28)
    assert model.config.num_boxes == len(boxes) and len(processor.tokenizer) == model.config.vocab_size
    items, _ = stage_items(cfg, 0, processor, boxes)
    start = model.config.box_token_start_id
    assert all(int((item["input_ids"] >= start).sum()) == 1 for item in items)
    written = processor.tokenizer.convert_ids_to_tokens([int(i) for i in items[0]["input_ids"] if i >= start])
    assert written[0] in boxes.texts and written[0] not in BoxVocab().texts


def test_a_config_with_init_from_drops_the_presets_fresh_model_overrides(tmp_path: Path, monkeypatch) -> None:
    import json

    import agents.sft as sft

    seen = {}

    def fake_train(cfg: SFTConfig) -> dict:
        seen["config"] = cfg
        return {"step": 0, "minutes": 0.0, "eval": {}}

    monkeypatch.setattr(sft, "train_sft", fake_train)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"init_from": str(tmp_path / "model")}))
    assert sft.main(["--out", str(tmp_path / "run"), "--config", str(path)]) == 0
    assert seen["config"].init_from == str(tmp_path / "model") and seen["config"].model == {}
    assert seen["config"].vision_pretrain == []


def test_init_from_with_model_overrides_adds_a_branch_to_the_saved_model(tmp_path: Path) -> None:
    """``model`` with `init_from` replaces saved config values before the weights load: the
    pointer's question-match branch joins a trained model, its question map starting at zero."""
    train_sft(config(tmp_path / "base", max_steps=1, checkpoint_every=0))
    saved = load_file(str(tmp_path / "base" / "final" / "model.safetensors"))
    model, _ = _build(config(tmp_path / "match", init_from=str(tmp_path / "base" / "final"),
                             model={"pointer_match": True}))
    assert model.config.pointer_match and not torch.any(model.pointer.match_question.weight)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # the trained weights are kept
    with pytest.raises(ValueError, match="keeps its box vocabulary"):
        config(tmp_path / "bad", init_from=str(tmp_path / "base" / "final"), model={"pointer_grid": 14})


def test_frame_windows_join_a_saved_model_and_its_video_pointing_trains_them(tmp_path: Path) -> None:
    """``frame_windows`` with `init_from` appends the window tokens to the saved model and its
    processor; a video pointing stage then labels the window token of its frame call, which
    weighs `pointer_weight` (box smoothing leaves it alone), and the grown model trains and reloads."""
    from transformers import AutoProcessor

    train_sft(config(tmp_path / "base", max_steps=1, checkpoint_every=0))
    video = {"video": {"questions": ["digit"], "shortcut_share": 1.0}}
    stage = SFTStage(tasks=video, n_pixel=2, video_mix={"video/single": 1.0}, pointing=True, batch_size=2)
    cfg = config(tmp_path / "frames", init_from=str(tmp_path / "base" / "final"), model={"frame_windows": [2, 3]},
                 stages=[stage], max_steps=2, checkpoint_every=0, vision_ids=True, pointer_weight=5.0,
                 pointer_smoothing=0.1)
    model, processor = _build(cfg)
    start = model.config.frame_token_start_id
    assert len(processor.tokenizer) == model.config.vocab_size == start + 29
    items, _ = stage_items(cfg, 0, processor, BoxVocab())
    for item in items:
        labelled = item["input_ids"][item["loss_mask"].bool()]
        assert int((labelled >= start).sum()) == 2  # the frames named in the text, then in the call
    batch = collate(items, processor.tokenizer.pad_token_id)
    weighted, count = sft_loss_sum(model, batch, 0.1, neighbour_boxes(BoxVocab()), pointer_weight=5.0)
    plain, _ = sft_loss_sum(model, batch, 0.1, neighbour_boxes(BoxVocab()))
    assert torch.isfinite(weighted) and weighted > plain and count == int(batch["loss_mask"].sum())
    train_sft(cfg)
    reloaded = TransformersPolicy.from_pretrained(tmp_path / "frames" / "final").model
    assert reloaded.config.frame_windows == [2, 3]
    assert len(AutoProcessor.from_pretrained(tmp_path / "frames" / "final").tokenizer) == reloaded.config.vocab_size


def test_the_seed_flag_overrides_the_presets_seed(tmp_path: Path, monkeypatch) -> None:
    import agents.sft as sft

    seen = []
    monkeypatch.setattr(sft, "train_sft", lambda cfg: seen.append(cfg.seed) or {"step": 0, "minutes": 0.0, "eval": {}})
    assert sft.main(["--out", str(tmp_path / "a")]) == 0
    assert sft.main(["--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert seen == [0, 1]


class _Answers(torch.nn.Module):
    """Wraps a model; `generate` appends the given turns (one per row, in call order) to the prompts."""

    def __init__(self, model, processor, turns: list[str]) -> None:
        super().__init__()
        self.model, self.config, self.processor, self.turns = model, model.config, processor, list(turns)

    def generate(self, input_ids, **kwargs):
        self.images = getattr(self, "images", 0) + len(kwargs["image_grid_thw"])
        rows = [self.processor.tokenizer.encode(self.turns.pop(0), add_special_tokens=False) for _ in input_ids]
        width = max(map(len, rows))
        pad = self.processor.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_oracle_op_scores_score_each_rows_generated_final_turn() -> None:
    processor, model, _ = _small_model_and_trace()
    source = task_source(ZOOM_EASY)
    ids = [f"zoom-read/{i}" for i in range(20, 25)]
    traces = play_traces(source, ids, options=TraceOptions(box_writer=snap_to_box_tokens, chat_format=ChatFormat()))
    assert [t.sample_id for t in traces] == ids and all(t.kind == "image/single" for t in traces)
    finals = [t.segments()[-1][0] for t in traces]
    assert oracle_op_scores(_Answers(model, processor, finals), processor, traces, source, batch_size=2) == [1.0] * 5
    wrong = ["The answer is \\boxed{%%}.<|im_end|>", "no answer<|im_end|>"] + finals[2:]
    assert oracle_op_scores(_Answers(model, processor, wrong), processor, traces, source, batch_size=3) == [0, 0, 1, 1, 1]
    whole, reading = _Answers(model, processor, finals), _Answers(model, processor, finals)
    assert oracle_op_scores(whole, processor, traces, source, batch_size=2) == [1.0] * 5
    assert oracle_op_scores(reading, processor, traces, source, batch_size=2, reading=True) == [1.0] * 5
    assert (whole.images, reading.images) == (10, 5)  # the reading item shows the crop alone
    with pytest.raises(ValueError, match="image_kind must be one of"):
        play_traces(source, ids, image_kind="image/none")


def test_lr_position_follows_the_budget_that_runs_out_first() -> None:
    """The cosine position is the step, or the share of the minutes spent if that is further on:
    a run that stops on the clock still reaches the end of its schedule."""
    assert lr_position(10, 1.0, 100, None) == 10
    assert lr_position(10, 1.0, 100, 20.0) == 10  # the steps lead: 5% of the minutes, 10% of the steps
    assert lr_position(10, 5.0, 100, 20.0) == 25  # the clock leads
    assert lr_position(10, 19.99, 100, 20.0) == 99 and lr_position(10, 25.0, 100, 20.0) == 99  # the last step, not past it
    assert lr_position(150, 1.0, 100, 20.0) == 150


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(tmp_path: Path, name: str) -> None:
    """Each `--preset` builds an `SFTConfig` whose stage minutes fit in its budget."""
    cfg = SFTConfig(**{**PRESETS[name], "out": str(tmp_path)})
    timed = sum(s.minutes or 0 for s in cfg.stages) + sum(p.minutes or 0 for p in cfg.vision_pretrain)
    assert timed < cfg.max_minutes and cfg.stages[-1].minutes is None


def test_two_processes_train_like_one(tmp_path: Path) -> None:
    """Data parallel (torchrun, gloo): both ranks end with the same weights, equal to one process on the
    same global batches, through vision pretraining and SFT; rank 0 alone writes the run."""
    worker = Path(__file__).with_name("_sft_dist_worker.py")
    env = {**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "PXR_DIST_BACKEND": "gloo",
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(worker), str(tmp_path / "two")], env=env, check=True, timeout=300)
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    rank0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    fresh = build_tiny_model(build_tiny_processor(), seed=0, **SMALL).state_dict()
    assert rank0.keys() == single.keys()
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-4)
    assert not torch.equal(rank0["model.vision.stem.0.weight"], fresh["model.vision.stem.0.weight"])
    assert not torch.equal(rank0["pointer.query.weight"], fresh["pointer.query.weight"])
    rows = read_metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert (tmp_path / "two" / "run" / "final" / "model.safetensors").exists()


def test_count_weight_trains_the_count_heads_tokens_in_a_mixed_stage(tmp_path: Path) -> None:
    """Count and zoom-read traces in one batch: only the count items carry count targets, the
    head's token loss is logged per answer and falls, and the head's query and keys move."""
    tasks = {"count": {"shortcut_share": 0.0}, **ZOOM_EASY}
    cfg = config(tmp_path, stages=[SFTStage(tasks=tasks, n_pixel=6, image_mix=SINGLE, reading=True)],
                 model={**SMALL, "count_head": True}, count_weight=1.0, max_steps=10, batch_size=6, lr=1e-2,
                 warmup_ratio=0.0, checkpoint_every=0)
    processor = build_tiny_processor()
    model, _ = _build(cfg)
    items, _ = stage_items(cfg, 0, processor, None)
    counted = [item for item in items if (item["count_labels"] >= 0).any()]
    assert 0 < len(counted) < len(items)
    assert all(int((item["count_labels"] >= 0).sum()) == 1 for item in counted)
    before = {n: p.detach().clone() for n, p in model.count.named_parameters()}
    result = train_sft(cfg)
    losses = [r["train/count_loss"] for r in read_metrics(tmp_path) if "train/count_loss" in r]
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]
    after = dict(result["model"].count.named_parameters())
    assert not torch.equal(before["query.weight"], after["query.weight"])
    assert not torch.equal(before["key.weight"], after["key.weight"])
    with pytest.raises(ValueError, match="count_weight must be >= 0"):
        config(tmp_path, count_weight=-1.0)
