"""Warm-start trace synthesis: the mix, the masks, replay through the env, boxes, storage, seeds."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from agents.traces import (
    IMAGE_KINDS, TEXT_KIND, VIDEO_KINDS, Trace, TraceMix, TraceOptions, load_traces, main, save_traces, summarize,
    iter_traces, play_traces, synthesize_traces,
)
from agents.vlm.tiny.boxes import BoxVocab
from pxr_env import ops
from pxr_env.env import PixelQAEnv
from pxr_env.tasks import make_task_source

N_PIXEL, N_TEXT, SEED = 200, 40, 7
BOXES = BoxVocab()
BBOX = re.compile(r'"bbox_2d": \[([^\]]*)\], "target_image": (\d+)')


def snap_to_box_tokens(box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """The tiny model's grid snapping, as a module-level (picklable) box writer."""
    return BOXES.boxes[BOXES.snap(box)]


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    return synthesize_traces("synthetic", N_PIXEL, N_TEXT, seed=SEED, progress=False)


def _by_kind(traces: list[Trace]) -> dict[str, list[Trace]]:
    out: dict[str, list[Trace]] = {}
    for trace in traces:
        out.setdefault(trace.kind, []).append(trace)
    return out


def _same(a: list[Trace], b: list[Trace]) -> bool:
    return len(a) == len(b) and all(
        x.sample_id == y.sample_id and x.kind == y.kind and x.segments() == y.segments()
        and len(x.images) == len(y.images) and all(np.array_equal(i, j) for i, j in zip(x.images, y.images))
        for x, y in zip(a, b))


def test_mix_shares_follow_the_source_within_tolerance(traces):
    summary = summarize(traces)
    assert summary["n"] == N_PIXEL + N_TEXT and summary["correct"] == N_PIXEL + N_TEXT
    assert summary["kinds"][TEXT_KIND] == N_TEXT
    shares = TraceMix()
    for modality, tolerance in (("image", 0.06), ("video", 0.1)):
        for kind, share in shares.shares(modality).items():
            assert abs(summary["shares"].get(kind, 0.0) - share) <= tolerance, (kind, summary["shares"])
    n_video = sum(summary["kinds"].get(k, 0) for k in VIDEO_KINDS)
    assert 0.15 <= n_video / N_PIXEL <= 0.35  # "synthetic" draws its 4 families equally: 1 in 4 is a video
    # only reasons that belong to the geometry or the sample were met: never a wrong answer or an env surprise
    allowed = {"needs operations", "not image", "not video", "no room to zoom out around the evidence",
               "no room for a box that misses the evidence", "no correct box holds the evidence as written"}
    assert set(summary["rejected"]) <= allowed, summary["rejected"]


def test_explicit_video_share_gives_exact_counts():
    mix = TraceMix(video_share=0.0)
    traces = synthesize_traces("chart", 20, 3, mix=mix, seed=1, progress=False)
    kinds = Counter(t.kind for t in traces)
    assert kinds == {"image/single": 6, "image/recrop-once": 4, "image/recrop-twice": 4, "image/zoom-in": 6, TEXT_KIND: 3}


def test_trained_flags_skip_exactly_the_deliberate_mistakes(traces):
    expected = {"image/single": [True, True], "image/recrop-once": [False, True, True],
                "image/recrop-twice": [False, False, True, True], "image/zoom-in": [True, True, True],
                "video/single": [True, True], "video/reselect": [False, True, True], TEXT_KIND: [True]}
    for trace in traces:
        assert trace.trained == expected[trace.kind], trace.kind
        segments = trace.segments()
        assert "".join(text for text, _ in segments) + "\n" == trace.conversation.render(add_generation_prompt=False)
        for text, trained in segments:
            if trained:
                assert text.endswith("<|im_end|>") and "<|im_start|>" not in text
                assert "Here is the cropped image" not in text and "Here are frames" not in text
            else:
                assert text.endswith("<|im_start|>assistant\n") or "<|im_start|>" not in text
        if trace.kind == TEXT_KIND:
            assert len(segments) == 2 and "<tool_call>" not in segments[1][0]


def test_every_trace_replays_to_a_correct_answer_with_identical_tool_outputs(traces):
    """Replay one of each kind plus a spread of others through a fresh env: same observations,
    misses really miss (env crop_hit / frames_hit False), corrections and zoom-ins really hold the evidence."""
    source = make_task_source("synthetic")
    env = PixelQAEnv(tasks=source)
    chosen = [group[0] for group in _by_kind(traces).values()] + traces[::12]
    assert {t.kind for t in chosen} == set(IMAGE_KINDS + VIDEO_KINDS + (TEXT_KIND,))
    for trace in chosen:
        obs, info = env.reset(options={"sample_id": trace.sample_id})
        images = list(obs["images"])
        turns = [m for m in trace.conversation.messages if m["role"] == "assistant"]
        for k, (message, trained) in enumerate(zip(turns, trace.trained)):
            obs, reward, terminated, truncated, info = env.step(message["content"][0]["text"])
            assert info["action_error"] is None
            if terminated:
                assert k == len(turns) - 1 and info["correct"] and reward == 1.0 and trace.correct
                break
            images.extend(obs["images"])
            hit = info["frames_hit"] if info["is_video"] else info["crop_hit"]
            assert bool(hit) == trained, (trace.kind, k)  # an untrained operation is a miss, a trained one holds the evidence
            recorded = trace.conversation.messages[2 * k + 3]["content"][0]["text"]
            assert recorded == obs["text"]
        assert len(images) == len(trace.images)
        assert all(np.array_equal(a, b) for a, b in zip(images, trace.images))


def _padded(box: list[float], p: float = ops.CROP_PADDING) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return max(0.0, x1 - p), max(0.0, y1 - p), min(1.0, x2 + p), min(1.0, y2 + p)


def test_missed_boxes_miss_the_evidence_centre_and_zoom_in_boxes_contain_it(traces):
    groups = _by_kind(traces)
    for trace in groups["image/recrop-once"] + groups["image/recrop-twice"]:
        ex1, ey1, ex2, ey2 = trace.info["evidence"]
        cx, cy = (ex1 + ex2) / 2, (ey1 + ey2) / 2
        *misses, correct = trace.info["boxes"]
        for miss in misses:
            x1, y1, x2, y2 = _padded(miss)
            assert not (x1 <= cx <= x2 and y1 <= cy <= y2)
        x1, y1, x2, y2 = _padded(correct)
        assert x1 <= ex1 + 2e-3 and y1 <= ey1 + 2e-3 and x2 >= ex2 - 2e-3 and y2 >= ey2 - 2e-3
        assert len(misses) == (1 if trace.kind == "image/recrop-once" else 2)
    for trace in groups["image/zoom-in"]:
        ex1, ey1, ex2, ey2 = trace.info["evidence"]
        big, tight = trace.info["boxes"]
        x1, y1, x2, y2 = _padded(big)
        assert x1 <= ex1 + 2e-3 and y1 <= ey1 + 2e-3 and x2 >= ex2 - 2e-3 and y2 >= ey2 - 2e-3
        # the second crop is taken from the first (image 2) and is a real zoom: under half its area
        tx1, ty1, tx2, ty2 = _padded(tight)
        assert trace.info["targets"] == [1, 2] and (tx2 - tx1) * (ty2 - ty1) <= 0.5 + 1e-2
    for trace in groups["video/reselect"]:
        missed, frames = trace.info["frames"]
        assert not set(missed) & set(trace.info["evidence_frames"]) and set(frames) <= set(trace.info["evidence_frames"])


def test_text_traces_use_samples_answerable_without_operations(traces):
    source = make_task_source("synthetic")
    for trace in _by_kind(traces)[TEXT_KIND][:10]:
        assert source.get(trace.sample_id).answerable_without_ops is not False


def test_save_load_round_trip(traces, tmp_path):
    subset = [group[0] for group in _by_kind(traces).values()]
    path = save_traces(subset, tmp_path)
    assert path.name == "traces.jsonl" and not list(tmp_path.glob("*.pkl"))
    loaded = load_traces(tmp_path)
    assert _same(subset, loaded)
    for a, b in zip(subset, loaded):
        assert a.trained == b.trained and a.correct == b.correct
        assert json.dumps(a.info, sort_keys=True) == json.dumps(b.info, sort_keys=True)
        assert a.conversation.messages == b.conversation.messages
    with pytest.raises(FileExistsError):
        save_traces(subset, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_traces(tmp_path / "missing")


def test_same_seed_same_traces_whatever_the_chunking_or_workers():
    args = ("chart", 10, 2)
    first = synthesize_traces(*args, seed=3, chunk_size=5, progress=False)
    assert _same(first, synthesize_traces(*args, seed=3, chunk_size=32, progress=False))
    assert _same(first, synthesize_traces(*args, seed=3, chunk_size=2, workers=2, progress=False))
    assert not _same(first, synthesize_traces(*args, seed=4, progress=False))


def test_iter_traces_yields_the_same_traces_a_chunk_at_a_time():
    args = ("chart", 10, 2)
    first = synthesize_traces(*args, seed=3, progress=False)
    lazy = iter_traces(*args, seed=3, chunk_size=1, progress=False)
    assert _same(first[:1], [next(lazy)])
    lazy.close()
    assert _same(first, list(iter_traces(*args, seed=3, chunk_size=1, workers=2, progress=False)))


def test_box_writer_and_decimals_shape_every_written_box():
    options = TraceOptions(box_writer=snap_to_box_tokens)
    traces = synthesize_traces("zoom-read", 12, 0, mix=TraceMix(video_share=0.0), seed=2, options=options,
                               progress=False)
    written = [m for t in traces for m in BBOX.findall(t.conversation.render())]
    assert len(written) >= 20 and all(box in BOXES.texts for box, _ in written)
    assert all(t.correct for t in traces)
    traces = synthesize_traces("chart", 6, 0, mix=TraceMix(video_share=0.0), seed=2,
                               options=TraceOptions(box_decimals=3), progress=False)
    numbers = [n for t in traces for box, _ in BBOX.findall(t.conversation.render()) for n in box.split(", ")]
    assert all(re.fullmatch(r"0\.\d{1,3}", n) for n in numbers)  # json.dumps spelling: 0.5, 0.125
    assert sum(len(n) == 5 for n in numbers) > len(numbers) // 2



def test_scripts_plan_crops_with_the_env_crop_padding():
    """With a smaller padding the planned crops are the env's crops: no step disagrees, zoom-ins still zoom."""
    padding = 0.03
    options = TraceOptions(env_kwargs={"crop_padding": padding})
    traces = synthesize_traces("zoom-read", 40, 0, mix=TraceMix(image={"image/recrop-once": 0.5, "image/zoom-in": 0.5}),
                               seed=3, options=options, progress=False)
    reasons = Counter(reason for t in traces for reason in t.info["rejected"])
    assert not any(reason.startswith("env disagrees") for reason in reasons), reasons
    zoom_ins = [t for t in traces if t.kind == "image/zoom-in"]
    assert len(zoom_ins) >= 10
    for trace in zoom_ins:
        big, tight = trace.info["boxes"]
        tx1, ty1, tx2, ty2 = _padded(tight, padding)
        assert (tx2 - tx1) * (ty2 - ty1) <= 0.5 + 1e-2  # the second crop is a real zoom into the first

def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="unknown kinds"):
        TraceMix(image={"image/sideways": 1.0})
    with pytest.raises(ValueError, match="box_decimals"):
        TraceOptions(box_decimals=4)
    with pytest.raises(ValueError, match="env_kwargs"):
        TraceOptions(env_kwargs={"tasks": "count"})
    with pytest.raises(ValueError, match="fractions"):
        synthesize_traces("chart", 2, 0, mix=TraceMix(video_share=0.0), progress=False,
                          options=TraceOptions(box_writer=lambda box: [10, 10, 50, 50]))
    with pytest.raises(RuntimeError, match="no usable sample"):
        synthesize_traces("chart", 2, 0, mix=TraceMix(video_share=1.0), progress=False,
                          options=TraceOptions(max_draws=5))


def test_command_line_writes_a_loadable_folder(tmp_path, capsys):
    main(["--out", str(tmp_path), "--tasks", "chart", "--n-pixel", "3", "--n-text", "1", "--box-decimals", "3"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 4 and summary["correct"] == 4
    assert len(load_traces(tmp_path)) == 4


def test_reading_keeps_the_question_the_last_observation_and_the_answer(traces):
    """`Trace.reading`: what the trace last looked at (the final crop, the selected frames, or the
    original of a textual trace), the question, and only the final turn trained."""
    by_kind = _by_kind(traces)
    video_text = [t for t in by_kind[TEXT_KIND] if t.sample_id.startswith("video")]
    image_text = [t for t in by_kind[TEXT_KIND] if not t.sample_id.startswith("video")]
    cases = [(by_kind["image/recrop-once"][0], 1), (image_text[0], 1), (by_kind["video/single"][0], None),
             (by_kind["video/reselect"][0], None), (video_text[0], len(video_text[0].images))]
    for trace, n_shown in cases:
        last_output = next(m for m in reversed(trace.conversation.messages) if m["role"] == "user")
        n_shown = n_shown or sum(item.get("type") == "image" for item in last_output["content"])
        segments, images = trace.reading()
        assert len(images) == n_shown and all(a is b for a, b in zip(images, trace.images[-n_shown:]))
        text = "".join(piece for piece, _ in segments)
        assert text.count("<|image_pad|>") == n_shown and text.count("<|im_start|>assistant") == 1
        assert trace.conversation.messages[-1]["content"][0]["text"] in text
        assert [flag for _, flag in segments] == [False, trace.trained[-1]]
        question = next(m for m in trace.conversation.messages if m["role"] == "user")["content"]
        assert all(item["text"] in text for item in question if item.get("type") == "text")
    reselect = by_kind["video/reselect"][0]
    question = next(m for m in reselect.conversation.messages if m["role"] == "user")["content"]
    n_original = sum(item.get("type") == "image" for item in question)
    missed = reselect.images[n_original:len(reselect.images) - len(reselect.reading()[1])]
    assert missed and not any(a is b for a in reselect.reading()[1] for b in missed)


def test_pointing_keeps_the_question_the_original_and_the_first_turn(traces):
    """`Trace.pointing`: the original image (or frames), the question, and only the first turn trained."""
    by_kind = _by_kind(traces)
    for kind in ("image/single", "image/zoom-in", "video/single", TEXT_KIND):
        trace = by_kind[kind][0]
        segments, images = trace.pointing()
        first_user = next(m for m in trace.conversation.messages if m["role"] == "user")
        n_images = sum(item.get("type") == "image" for item in first_user["content"])
        assert len(images) == n_images and all(a is b for a, b in zip(images, trace.images))
        text = "".join(piece for piece, _ in segments)
        assert text.count("<|image_pad|>") == n_images and text.count("<|im_start|>assistant") == 1
        first_turn = next(m for m in trace.conversation.messages if m["role"] == "assistant")
        assert first_turn["content"][0]["text"] in text
        assert [flag for _, flag in segments] == [False, True]
    with pytest.raises(ValueError, match="deliberate mistake"):
        by_kind["image/recrop-once"][0].pointing()


def test_choice_questions_are_answered_with_the_option_text(traces):
    """A choice answer names the option (``\\boxed{left}``), never only its letter, where the
    scorer reads the text back as that option; the env scored every such trace correct."""
    source = make_task_source("synthetic")
    checked = 0
    for trace in traces:
        sample = source.get(trace.sample_id)
        if sample.answer_type != "choice":
            continue
        final = trace.conversation.messages[-1]["content"][0]["text"]
        boxed = re.search(r"\\boxed\{(.*)\}", final).group(1)
        assert boxed == sample.choices["ABCD".index(sample.answers[0])], final
        assert trace.correct
        checked += 1
    assert checked >= 20


def test_vision_ids_label_the_frames_in_traces_and_their_stage_items(tmp_path):
    from agents.vlm.chat import ChatFormat

    options = TraceOptions(chat_format=ChatFormat(question_first=True, vision_ids=True))
    video = [t for t in synthesize_traces({"video": {"shortcut_share": 0.0}}, 4, 0, seed=2, options=options,
                                          progress=False) if t.kind == "video/single"]
    assert video
    trace = video[0]
    text = "".join(piece for piece, _ in trace.segments())
    assert [text.count(f"Picture {k}: <|vision_start|>") for k in (1, 16, 17)] == [1, 1, 1]
    pointing = "".join(piece for piece, _ in trace.pointing()[0])
    assert "Picture 16: <|vision_start|>" in pointing and "Picture 17" not in pointing
    reading, images = trace.reading()
    assert "".join(piece for piece, _ in reading).count("Picture ") == len(images)  # the selected frames, from 1
    save_traces(video[:1], tmp_path)
    assert load_traces(tmp_path)[0].segments() == trace.segments()


def test_play_traces_plays_the_textual_kind_on_chosen_samples() -> None:
    """The textual kind answers at once on each chosen sample: one turn, the first view alone."""
    ids = ["count/10000000", "count/10000001", "count/10000002"]
    traces = play_traces({"count": {}}, ids, image_kind=TEXT_KIND)
    assert [t.sample_id for t in traces] == ids and all(t.kind == TEXT_KIND for t in traces)
    assert all(len(t.trained) == 1 and len(t.images) == 1 and t.correct for t in traces)
    assert all(t.info["crop_box"] is None and t.info["n_visual_ops"] == 0 for t in traces)
    with pytest.raises(ValueError, match="image_kind must be one of"):
        play_traces({"count": {}}, ids, image_kind="video/single")
