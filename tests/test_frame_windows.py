"""Frame-window tokens of the tiny model: vocabulary, tokenizer, frame pointer, saved models grown with them."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from agents.vlm.chat import Conversation  # noqa: E402
from agents.vlm.tiny import (  # noqa: E402
    TinyVLMConfig, build_tiny_model, build_tiny_processor, tiny_config, with_frame_windows,
)
from agents.vlm.tiny.build_tokenizer import with_frame_tokens  # noqa: E402
from agents.vlm.tiny.frames import FrameWindows  # noqa: E402
from pxr_env.actions import format_tool_call, parse_turn  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128)
WINDOWS = FrameWindows()


def _frames(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n))


def _inputs(processor, images, question: str = "Which digit briefly appears on the red square?", prefix: str = ""):
    conv = Conversation(question_first=True)
    conv.add_observation({"text": question, "images": images})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False) + prefix
    return processor(text=[text], images=list(images), return_tensors="pt")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(frames=WINDOWS)


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    return build_tiny_model(processor, seed=0, frame_windows=[2, 3], **SMALL).eval()


def test_windows_are_runs_of_consecutive_frames_spelled_as_json_lists():
    assert len(WINDOWS) == 15 + 14
    assert WINDOWS.texts[0] == "1, 2" and WINDOWS.frames[0] == (1, 2)
    assert WINDOWS.texts[-1] == "14, 15, 16" and WINDOWS.frames[-1] == (14, 15, 16)
    for frames, text in zip(WINDOWS.frames, WINDOWS.texts):
        assert json.loads(f"[{text}]") == list(frames)
    with pytest.raises(ValueError, match="one frame"):
        FrameWindows((1, 2))
    with pytest.raises(ValueError, match="distinct"):
        FrameWindows((2, 2))


def test_calls_tokenize_into_one_window_token_and_decode_to_the_numbers(processor):
    tok = processor.tokenizer
    start = len(tok) - len(WINDOWS)
    assert tok.convert_ids_to_tokens(list(range(start, len(tok)))) == list(WINDOWS.texts)
    call = format_tool_call("select_frames", {"target_frames": [6, 7, 8]})
    ids = tok(call, add_special_tokens=False).input_ids
    assert [i for i in ids if i >= start] == [start + WINDOWS.frames.index((6, 7, 8))]
    assert tok.decode(ids) == call
    assert parse_turn(tok.decode(ids)).tool_call.arguments == {"target_frames": [6, 7, 8]}
    # frames that are not a window, and box fractions, stay ordinary text
    for text in (format_tool_call("select_frames", {"target_frames": [3, 9]}), "[0.32, 0.46, 0.36, 0.5]"):
        assert all(i < start for i in tok(text, add_special_tokens=False).input_ids)
    # a longer number after the comma takes the window's token and the rest: the text comes back
    ids = tok("1, 20", add_special_tokens=False).input_ids
    assert ids[0] == start and tok.decode(ids) == "1, 20"
    with pytest.raises(ValueError, match="already holds"):
        with_frame_tokens(tok, WINDOWS)


def test_config_counts_the_window_tokens_after_the_boxes(processor):
    config = tiny_config(processor.tokenizer, frame_windows=[2, 3])
    assert config.num_frame_tokens == len(WINDOWS)
    assert config.frame_token_start_id == config.box_token_start_id + config.num_boxes
    assert config.vocab_size == config.frame_token_start_id + len(WINDOWS)
    with pytest.raises(Exception, match="frame-window tokens must be the last"):
        TinyVLMConfig(**{**config.to_dict(), "frame_windows": [2]})
    with pytest.raises(ValueError, match="frame windows"):
        tiny_config(build_tiny_processor().tokenizer, frame_windows=[2, 3])


def test_windows_get_mass_only_where_the_input_holds_their_frames(model, processor):
    start = model.config.frame_token_start_id
    with torch.no_grad():
        sixteen = model(**_inputs(processor, _frames(16))).logits[0, -1, start:]
        four = model(**_inputs(processor, _frames(4))).logits[0, -1, start:]
        one = model(**_inputs(processor, _frames(1))).logits[0, -1, start:]
        text = model(**processor(text=["no image here"], return_tensors="pt")).logits[0, -1, start:]
    low = torch.finfo(sixteen.dtype).min
    assert bool((sixteen > low).all())
    reachable = torch.tensor([max(f) <= 4 for f in WINDOWS.frames])
    assert torch.equal(four > low, reachable) and int(reachable.sum()) == 3 + 2
    assert bool((one == low).all()) and bool((text == low).all())


def test_a_windows_logit_is_the_mean_of_its_frames_token_scores_plus_its_length_bias(model, processor):
    """Frame f scores the log-sum-exp over its tokens of ``q . k_t / sqrt(d) + m_t``; a window the
    mean of its frames' scores plus its length's bias. The match term starts at zero and, once
    its question map is set, follows the question."""
    inputs = _inputs(processor, _frames(16, seed=3))
    names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        out = model(**inputs)
        hidden = model.model(**{k: inputs[k] for k in names}).last_hidden_state
        keys, held = model.frames.keys(hidden, inputs["input_ids"], model.config.image_token_id, model.config.pad_token_id,
                                       inputs["pixel_values"], inputs["image_grid_thw"])
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    per_frame = len(image) // 16
    assert keys.shape[:3] == (1, 16, per_frame) and bool(held.all())
    assert not keys[..., -1].any()  # the match term starts at zero
    third = image[2 * per_frame:3 * per_frame]
    torch.testing.assert_close(keys[0, 2, :, :-1], model.frames.key(hidden[0, third]))
    with torch.no_grad():
        tokens = keys[0, :, :, :-1] @ model.frames.query(hidden[0, -1]) / (keys.shape[-1] - 1) ** 0.5
    scores = tokens.logsumexp(-1)
    logits = out.logits[0, -1, model.config.frame_token_start_id:]
    for w, frames in enumerate(WINDOWS.frames):
        expected = scores[[f - 1 for f in frames]].mean() + model.frames.length_bias[WINDOWS.lengths.index(len(frames))]
        torch.testing.assert_close(logits[w], expected, atol=1e-5, rtol=1e-5)
    # with the question map set the match term reads the question
    with torch.no_grad():
        model.frames.match_question.weight.normal_(0, 0.5)
        try:
            red = model(**inputs).logits[0, -1, model.config.frame_token_start_id:]
            blue = model(**_inputs(processor, _frames(16, seed=3), "Which digit briefly appears on the blue circle?"))
        finally:
            model.frames.match_question.weight.zero_()
    assert not torch.allclose(red, logits)
    assert not torch.allclose(red, blue.logits[0, -1, model.config.frame_token_start_id:])


def test_cached_generation_carries_the_frame_keys(model, processor):
    inputs = _inputs(processor, _frames(16, seed=5), prefix="Let me see frames")
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        model.frames.query.weight.mul_(50)  # make the windows likely, so that generation writes one
        try:
            cached = model.generate(**inputs, **options)
            uncached = model.generate(**inputs, use_cache=False, **options)
        finally:
            model.frames.query.weight.div_(50)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_training_on_a_window_target_moves_the_frame_pointer_and_the_loss_falls(processor):
    model = build_tiny_model(processor, seed=1, frame_windows=[2, 3], **SMALL).train()
    frames = list(_frames(16, seed=7))
    frames[9] = frames[10] = np.zeros_like(frames[9])  # frames 10 and 11 differ from the rest
    inputs = _inputs(processor, tuple(frames), prefix="Let me see frames ")
    target = model.config.frame_token_start_id + WINDOWS.frames.index((10, 11))
    before = {n: p.detach().clone() for n, p in model.frames.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(**inputs).logits[0, -1]
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = [n for n, p in model.frames.named_parameters() if not torch.equal(before[n], p)]
    assert {"query.weight", "key.weight", "match_question.weight", "question_pool.weight"} <= set(moved)


def test_a_saved_model_grows_frame_windows_and_keeps_its_other_logits(tmp_path):
    plain_processor = build_tiny_processor()
    plain = build_tiny_model(plain_processor, seed=0, image_numbers=16, **SMALL).eval()
    grown, processor = with_frame_windows(plain, plain_processor, [2, 3])
    grown.eval()
    assert grown.config.vocab_size == plain.config.vocab_size + len(WINDOWS)
    text_rows = plain.config.vocab_size
    for images in (_frames(1), _frames(16)):
        old = _inputs(plain_processor, images)
        new = _inputs(processor, images)
        assert torch.equal(old["input_ids"], new["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(grown(**new).logits[..., :text_rows], plain(**old).logits)
    with pytest.raises(ValueError, match="already has frame windows"):
        with_frame_windows(grown, processor, [2, 3])
    # save and load through the Auto classes: same logits, frame pointer included
    grown.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    inputs = _inputs(reloaded, _frames(16, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, grown(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert len(reloaded.tokenizer) == grown.config.vocab_size
    assert loaded.config.frame_windows == [2, 3]
