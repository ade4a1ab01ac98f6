"""The tiny VLM through transformers: processor, batched generation, save/load, box tokens."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from agents.vlm.chat import Conversation, render_messages  # noqa: E402
from agents.vlm.tiny import (  # noqa: E402
    BoxVocab, TinyVLMForConditionalGeneration, TinyVLMProcessor, build_tiny_model, build_tiny_processor,
)
from agents.vlm.tiny.modeling_tiny_vlm import run_per_image, unique_images  # noqa: E402
from pxr_env import ops  # noqa: E402
from pxr_env.actions import format_tool_call, parse_turn  # noqa: E402

BOXES = BoxVocab()
CALL_PREFIX = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": ['


def _image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _crop_call(box_index: int) -> str:
    return format_tool_call("crop_image", {"bbox_2d": json.loads(f"[{BOXES.texts[box_index]}]"), "target_image": 1})


def _conversations() -> list[Conversation]:
    """Four different episodes: 1 image; 2 images (a crop); 16 video frames; 1 image and an error turn."""
    convs = [Conversation() for _ in range(4)]
    convs[0].add_observation({"text": "What digit is written on the red square?", "images": (_image(0, (224, 224)),)})
    convs[1].add_observation({"text": "How many blue circles are there?", "images": (_image(1, (768, 1024)),)})
    convs[1].add_assistant("Let me zoom in.\n" + _crop_call(300))
    convs[1].add_observation({"text": "Here is the cropped image (image 2, 224x196 px):",
                              "images": (_image(2, (196, 224)),)})
    frames = tuple(_image(10 + i, (112, 112)) for i in range(16))
    convs[2].add_observation({"text": "The video has 16 frames.\nWhat happens first?", "images": frames})
    convs[3].add_observation({"text": "Which bar is the tallest?", "images": (_image(3, (224, 252)),)})
    convs[3].add_assistant("<tool_call>\n{oops\n</tool_call>")
    convs[3].add_observation({"text": "Execution error: tool call is not valid JSON", "images": ()})
    return convs


@pytest.fixture(scope="module")
def processor() -> TinyVLMProcessor:
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model(processor: TinyVLMProcessor) -> TinyVLMForConditionalGeneration:
    torch.set_num_threads(1)
    return build_tiny_model(processor, seed=0).eval()


@pytest.fixture(scope="module")
def batch(processor: TinyVLMProcessor):
    convs = _conversations()
    texts = [processor.apply_chat_template(c.messages, add_generation_prompt=True, tokenize=False) for c in convs]
    images = [image for c in convs for image in c.images]
    return convs, processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_parameter_count_and_tokens_per_image(model: TinyVLMForConditionalGeneration,
                                              processor: TinyVLMProcessor):
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 20e6, n
    grids = processor.image_processor([_image(0, (224, 224)), _image(0, (112, 112)), _image(0, (2000, 1500))],
                                      return_tensors="pt")["image_grid_thw"]
    assert grids.tolist() == [[1, 14, 14], [1, 7, 7], [1, 14, 14]]


def test_processor_expands_each_image_and_pads_left(processor: TinyVLMProcessor, batch):
    convs, inputs = batch
    grids = inputs["image_grid_thw"]
    assert grids.tolist() == [[1, 14, 14], [1, 14, 14], [1, 14, 14]] + [[1, 7, 7]] * 16 + [[1, 14, 14]]
    assert inputs["pixel_values"].shape == (int(grids.prod(-1).sum()), 3 * 16 * 16)
    per_row = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert per_row == [196, 392, 16 * 49, 196]
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # left padding
    pad = processor.tokenizer.pad_token_id
    assert (inputs["input_ids"][mask == 0] == pad).all()
    values = inputs["pixel_values"]
    assert values.min() >= -1 and values.max() <= 1


def test_chat_template_and_continuation_segments_tokenize_like_the_whole(processor: TinyVLMProcessor):
    tok = processor.tokenizer
    conv = Conversation()
    question = {"text": "What digit is written on the red square?", "images": (_image(0, (224, 224)),)}
    crop = {"text": "Here is the cropped image (image 2, 224x224 px):", "images": (_image(1, (224, 224)),)}
    segments = [conv.add_observation(question)]
    turn = "I need to look closer.\n" + _crop_call(5)
    conv.add_assistant(turn)
    segments += [turn, conv.add_observation(crop)]
    assert processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False) == conv.render()
    whole = tok(conv.render())["input_ids"]
    pieces = [i for s in segments for i in tok(s)["input_ids"]]
    assert pieces == whole
    assert tok.convert_tokens_to_ids(BOXES.texts[5]) in whole


def _assert_cached_generation_matches_uncached(model, inputs):
    """Greedy generation with the KV cache gives the tokens and logits of the uncached loop; the cached output."""
    options = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **options)
    uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    return cached


def test_batched_generate_matches_single_rows_and_the_uncached_loop(model, processor, batch):
    convs, inputs = batch
    options = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = _assert_cached_generation_matches_uncached(model, inputs)
    width = inputs["input_ids"].shape[1]
    for row, conv in enumerate(convs):
        text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
        single = processor(text=[text], images=conv.images, return_tensors="pt")
        alone = model.generate(**single, **options)
        assert torch.equal(alone.sequences[0, single["input_ids"].shape[1]:], cached.sequences[row, width:])
        for a, b in zip(alone.logits, cached.logits):
            torch.testing.assert_close(a[0], b[row], atol=2e-4, rtol=1e-4)


def test_forward_log_probs_equal_the_rollout_scores(model, batch):
    _, inputs = batch
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    width = inputs["input_ids"].shape[1]
    sequences = generated.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, width:])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], logits_to_keep=sequences.shape[1] - width + 1).logits
    new = sequences[:, width:]
    forward_lp = logits[:, :-1].log_softmax(-1).gather(-1, new[..., None])[..., 0]
    rollout_lp = torch.stack(generated.logits, 1).log_softmax(-1).gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(forward_lp, rollout_lp, atol=2e-4, rtol=1e-4)


def test_sampling_with_stop_string_and_top_k_top_p(model, processor, batch):
    _, inputs = batch
    out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=6,
                         stop_strings=["</tool_call>"], tokenizer=processor.tokenizer)
    assert out.shape[0] == 4 and out.shape[1] <= inputs["input_ids"].shape[1] + 6
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2)


def test_save_and_load_through_the_auto_classes(model, processor, batch, tmp_path):
    _, inputs = batch
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded_processor, TinyVLMProcessor) and isinstance(loaded, TinyVLMForConditionalGeneration)
    convs, _ = batch
    texts = [loaded_processor.apply_chat_template(c.messages, add_generation_prompt=True, tokenize=False)
             for c in convs]
    again = loaded_processor(text=texts, images=[i for c in convs for i in c.images], return_tensors="pt",
                             padding=True)
    assert all(torch.equal(again[k], inputs[k]) for k in inputs)
    with torch.no_grad():
        before = model(**inputs).logits.log_softmax(-1)
        after = loaded(**again).logits.log_softmax(-1)
    assert torch.equal(before, after)
    assert loaded.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def test_box_tokens_come_from_the_pointer_and_decode_to_a_crop_call(model, processor):
    tok = processor.tokenizer
    start = model.config.box_token_start_id
    conv = Conversation()
    image = _image(4, (700, 1000))
    conv.add_observation({"text": "What digit is written on the red square?", "images": (image,)})
    prompt = conv.render() + CALL_PREFIX
    inputs = processor(text=[prompt, "<|im_start|>user\nno image here<|im_end|>\n" + CALL_PREFIX],
                       images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    probs = out.logits[:, -1].softmax(-1)
    assert out.pointer_valid.tolist() == [True, False]
    assert probs[0, start:].sum() > 0 and probs[1, start:].sum() == 0
    box = int(out.logits[0, -1, start:].argmax())
    turn = CALL_PREFIX + tok.decode([start + box], skip_special_tokens=True) + '], "target_image": 1}}\n</tool_call>'
    assert turn == _crop_call(box)
    parsed = parse_turn(turn)
    assert parsed.tool_call is not None and parsed.tool_call.name == "crop_image"
    bbox = parsed.tool_call.arguments["bbox_2d"]
    assert tuple(bbox) == BOXES.boxes[box] and all(0 <= v < 1 for v in bbox)
    crop, view, _ = ops.crop_image([image], [(224, 224)], bbox, 1, (64 * 784, 64 * 784))
    assert view.shape[2] == 3 and crop.size > 0
    assert tok(BOXES.texts[box])["input_ids"] == [start + box]


def test_pointer_cells_map_onto_coarser_image_grids(model):
    index, parts = model.pointer.cell_index(7, 7, torch.device("cpu"))
    rows, cols = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    assert torch.equal(index.view(14, 14), (rows // 2) * 7 + cols // 2)
    assert not parts.any()  # one key per image token by default
    index, _ = model.pointer.cell_index(14, 14, torch.device("cpu"))
    assert torch.equal(index, torch.arange(196))


def test_pointer_subcells_tell_the_cells_within_one_image_token_apart(processor):
    """``pointer_grid`` 28 over 14 x 14 image tokens with ``pointer_subcells`` 2: the four cells over
    one token take its four keys, so their logits differ; the swapped-in box tokens round-trip."""
    boxes = BoxVocab(28)
    fine = build_tiny_processor(boxes=boxes)
    assert fine.tokenizer("What digit?")["input_ids"] == processor.tokenizer("What digit?")["input_ids"]
    model = build_tiny_model(fine, seed=0, hidden_size=64, intermediate_size=128, pointer_grid=28,
                             pointer_subcells=2).eval()
    index, parts = model.pointer.cell_index(14, 14, torch.device("cpu"))
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    assert torch.equal(index.view(28, 28), (rows // 2) * 14 + cols // 2)
    assert torch.equal(parts.view(28, 28), (rows % 2) * 2 + cols % 2)
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    prompt = render_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}])
    inputs = fine(text=[prompt + CALL_PREFIX], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1, model.config.box_token_start_id:]
    per_cell = logits.view(28, 28, 4)[..., 0]
    assert len(logits) == len(boxes) and not torch.equal(per_cell[0::2, 0::2], per_cell[0::2, 1::2])
    call = '{"bbox_2d": [' + boxes.texts[100] + "]}"
    ids = fine.tokenizer(call)["input_ids"]
    assert model.config.box_token_start_id + 100 in ids and fine.tokenizer.decode(ids) == call
    with pytest.raises(Exception, match="pointer_subcells must be at least 1"):
        build_tiny_model(fine, pointer_grid=28, pointer_subcells=0)


def test_labels_give_the_shifted_cross_entropy(model, batch):
    _, inputs = batch
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    logits = out.logits[:, :-1].flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.pointer.key.weight.grad is not None and model.model.vision.stem[0].weight.grad is not None
    model.zero_grad()


def test_box_vocab_texts_are_distinct_valid_fractions():
    assert len(BOXES) == 14 * 14 * 4 and len(set(BOXES.texts)) == len(BOXES)
    for text, box in zip(BOXES.texts, BOXES.boxes):
        assert ops.normalize_bbox(json.loads(f"[{text}]"), (224, 224)) == box
    cell, size = BOXES.split(BOXES.snap((0.50, 0.30, 0.54, 0.34)))
    assert (cell, size) == (BOXES.cell_at(0.52, 0.32), 0)
    with pytest.raises(ValueError, match="x1 < x2"):
        BOXES.snap((0.5, 0.5, 0.4, 0.6))


def test_a_shared_prefix_cache_gives_the_whole_sequence_logits(model, processor, batch):
    convs, inputs = batch
    shared = convs[0].render().split("<|vision_start|>")[0]  # system message and "<|im_start|>user\n"
    assert all(c.render().startswith(shared) for c in convs)
    prefix = processor.tokenizer(shared, return_tensors="pt")["input_ids"][0]
    texts = [c.render()[len(shared):] for c in convs]
    rest = processor(text=texts, images=[i for c in convs for i in c.images], return_tensors="pt", padding=True)
    mask = torch.cat([torch.ones(4, len(prefix), dtype=torch.long), rest["attention_mask"]], 1)
    with torch.no_grad():
        cache = model.prefix_cache(prefix, batch_size=4)
        split = model(input_ids=rest["input_ids"], attention_mask=mask, pixel_values=rest["pixel_values"],
                      image_grid_thw=rest["image_grid_thw"], cache=cache, logits_to_keep=1).logits
        whole = model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(split, whole, atol=2e-4, rtol=1e-4)


def _assert_round_trips(model, batch, tmp_path) -> None:
    """`save_pretrained` + `from_pretrained` give identical logits on `batch`."""
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    _, batch_inputs = batch
    with torch.no_grad():
        assert torch.equal(model(**batch_inputs).logits, loaded(**batch_inputs).logits)


def test_token_conv_mixes_neighbouring_patches_and_round_trips(processor, batch, tmp_path):
    """With ``token_conv`` an image token depends on the neighbouring patches; save/load keeps it."""
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, token_conv=True).eval()
    plain = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + 64 * 64 * 9 + 64
    inputs = processor.image_processor([_image(0, (224, 224))], return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    changed = pixels.clone()
    changed[15] += 1.0  # the patch right of token 14 (row 1, column 0 of the 14 x 14 grid)
    with torch.no_grad():
        for m, mixes in ((model, True), (plain, False)):
            a = m.model.vision.stem(pixels.view(1, 14, 14, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 224, 224))
            b = m.model.vision.stem(changed.view(1, 14, 14, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 224, 224))
            assert bool((a[0, :, 1, 0] != b[0, :, 1, 0]).any()) == mixes
    _assert_round_trips(model, batch, tmp_path)


def test_stem_norm_centres_each_image_and_round_trips(processor, batch, tmp_path):
    """With ``stem_norm`` every stem conv but the last is followed by a GroupNorm; save/load keeps it."""
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, stem_norm=True).eval()
    norms = [m for m in model.model.vision.stem if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_channels for n in norms] == [32, 64, 128]
    inputs = processor.image_processor([_image(0, (224, 224))], return_tensors="pt")
    image = inputs["pixel_values"].view(1, 14, 14, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 224, 224)
    with torch.no_grad():
        first = model.model.vision.stem[1](model.model.vision.stem[0](image + 0.5))  # a brighter image
    assert first.view(1, 8, -1).mean(-1).abs().max() < 1e-4  # centred per group whatever the brightness
    _assert_round_trips(model, batch, tmp_path)
    with pytest.raises(Exception, match="stem_norm needs stem_channels and hidden_size divisible by 8"):
        build_tiny_model(processor, hidden_size=60, num_attention_heads=2, stem_norm=True)


def test_image_summary_reaches_every_token_and_round_trips(processor, batch, tmp_path):
    """With ``image_summary`` a change in one corner reaches the far corner's token; save/load keeps it."""
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, image_summary=True).eval()
    plain = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128).eval()
    vision, plain_vision = model.model.vision, plain.model.vision
    inputs = processor.image_processor([_image(0, (224, 224))], return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    changed = pixels.clone()
    changed[0] += 1.0  # the top-left patch
    with torch.no_grad():
        for v, reaches in ((vision, True), (plain_vision, False)):
            layers, v.layers = v.layers, torch.nn.ModuleList()  # attention mixes all tokens: test the stem path
            a, b = v(pixels, grid), v(changed, grid)
            assert bool((a[-1] != b[-1]).any()) == reaches  # the bottom-right token
            v.layers = layers
    _assert_round_trips(model, batch, tmp_path)
    with pytest.raises(Exception, match="image_summary needs hidden_size divisible by 8"):
        build_tiny_model(processor, hidden_size=60, num_attention_heads=2, image_summary=True)


def test_pointer_stem_starts_at_zero_learns_with_a_frozen_encoder_and_round_trips(processor, batch, tmp_path):
    """``pointer_stem``: the keys start as without it, its gradient flows with the encoder frozen."""
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, pointer_stem=True)
    plain = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128)
    assert not model.pointer.stem_out.weight.any() and plain.pointer.stem is None
    plain.load_state_dict(model.state_dict(), strict=False)
    _, inputs = batch
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain.eval()(**inputs).logits)
    model.train()
    for p in model.model.vision.parameters():
        p.requires_grad_(False)
    start = model.config.box_token_start_id
    convs, _ = batch
    texts = [processor.apply_chat_template(c.messages, add_generation_prompt=True, tokenize=False) + CALL_PREFIX
             for c in convs]
    calls = processor(text=texts, images=[image for c in convs for image in c.images], return_tensors="pt", padding=True)
    for _ in range(2):  # stem_out moves first, then the stem behind it gets a gradient
        model.zero_grad()
        logits = model(**calls).logits[:, -1, start:]
        torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)).backward()
        with torch.no_grad():
            for p in model.pointer.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    assert model.pointer.stem_out.weight.any() and model.pointer.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision.parameters())
    _assert_round_trips(model.eval(), batch, tmp_path)
    with pytest.raises(ValueError, match="pointer.s stems or match term need the pixel_values"):
        model.image_one_keys(torch.zeros(1, 3, 64), torch.tensor([[model.config.image_token_id] * 3]),
                             torch.tensor([[1, 1, 3]]), None)


def test_bidirectional_images_let_image_tokens_see_later_ones_only_within_their_image(processor, batch, tmp_path):
    """With ``bidirectional_images`` the tokens of one image attend to each other both ways;
    text, other images and cached generation keep the causal order; save/load keeps it."""
    from agents.vlm.tiny.modeling_tiny_vlm import _decoder_mask

    image = torch.tensor([[False, True, True, False, True, True, False]])
    mask = _decoder_mask(None, 7, 0, image.device, image)[0, 0]
    assert mask[1, 2] and mask[4, 5] and mask[2, 1]  # within an image: both ways
    assert not mask[1, 4] and not mask[0, 1] and not mask[3, 4] and mask[6, 5]  # otherwise causal
    assert torch.equal(mask & ~mask.tril(), torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0],
                                                          [0] * 7, [0] * 7, [0, 0, 0, 0, 0, 1, 0], [0] * 7,
                                                          [0] * 7], dtype=torch.bool))

    small = dict(hidden_size=64, intermediate_size=128)
    model = build_tiny_model(processor, seed=0, bidirectional_images=True, **small).eval()
    causal = build_tiny_model(processor, seed=0, **small).eval()
    _, inputs = batch
    ids = inputs["input_ids"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0, 0])
    with torch.no_grad():
        a = model.model(**inputs).last_hidden_state
        b = causal.model(**inputs).last_hidden_state
    assert torch.equal(a[0, :first], b[0, :first])  # the text before the image is unchanged
    assert not torch.allclose(a[0, first], b[0, first])  # the first image token now sees the rest of it
    _assert_cached_generation_matches_uncached(model, inputs)
    _assert_round_trips(model, batch, tmp_path)


def test_image_numbers_mark_each_images_tokens_start_at_zero_and_round_trip(processor, batch, tmp_path):
    """With ``image_numbers`` n the tokens of the k-th image of a row (k <= n) get row k of a
    table that starts at zero (outputs unchanged); text and later images get nothing."""
    from agents.vlm.tiny.modeling_tiny_vlm import ImageNumbers

    ids = torch.tensor([[5, 9, 9, 5, 9, 5, 9, 9, 9]])
    table = ImageNumbers(2, 4)
    with torch.no_grad():
        table.weight.copy_(torch.arange(3, dtype=torch.float)[:, None].expand(3, 4))
    assert table(ids, 9)[0, :, 0].tolist() == [0, 1, 1, 0, 2, 0, 0, 0, 0]

    small = dict(hidden_size=64, intermediate_size=128)
    model = build_tiny_model(processor, seed=0, image_numbers=16, **small).eval()
    plain = build_tiny_model(processor, seed=0, **small).eval()
    assert model.model.image_numbers.weight.abs().sum() == 0
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["model.image_numbers.weight"]
    _, inputs = batch
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)
        model.model.image_numbers.weight[1:].normal_()
        numbered = model(**inputs).logits
    video = 2  # the row with 16 frames: its answer now depends on the frames' numbers
    assert not torch.allclose(numbered[video, -1], plain(**inputs).logits[video, -1])
    ids = inputs["input_ids"]
    first = int((ids[video] == model.config.image_token_id).nonzero()[0, 0])
    text = model.config.box_token_start_id  # box logits read the image tokens at every position
    torch.testing.assert_close(numbered[video, :first, :text], plain(**inputs).logits[video, :first, :text])
    _assert_cached_generation_matches_uncached(model, inputs)
    _assert_round_trips(model, batch, tmp_path)
    with pytest.raises(Exception, match="image_numbers must be 0"):
        build_tiny_model(processor, seed=0, image_numbers=-1, **small)


@pytest.mark.parametrize("options, branch", [({"pointer_question": True}, "question"),
                                             ({"pointer_match": True}, "match_question"),
                                             ({"pointer_match": True, "pointer_match_features": "encoder"},
                                              "match_token_question"),
                                             ({"pointer_match": True, "pointer_match_features": "both"},
                                              "match_question"),
                                             ({"pointer_match": True, "pointer_match_features": "both"},
                                              "match_token_question")])
def test_question_branches_of_the_pointer_start_at_zero_and_read_the_question(processor, tmp_path, options, branch):
    """With ``pointer_question`` (a gate on the keys) or ``pointer_match`` (a question-match
    term per cell, from pixel or encoder features) the box logits depend on the text before
    image 1 through a map that starts at zero (a new branch leaves a model's outputs as they
    were, also when it is added to a saved checkpoint); cached generation and save/load keep it."""
    small = dict(hidden_size=64, intermediate_size=128)
    model = build_tiny_model(processor, seed=0, **options, **small).eval()
    question_map = getattr(model.pointer, branch)
    assert question_map.weight.abs().sum() == 0

    def inputs_for(question: str):
        conv = Conversation(question_first=True)
        conv.add_observation({"text": question, "images": (_image(0, (224, 224)),)})
        text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
        return processor(text=[text + CALL_PREFIX], images=conv.images, return_tensors="pt")

    red, blue = inputs_for("What digit is written on the red square?"), inputs_for("What digit is written on the blue circle?")
    start = model.config.box_token_start_id

    def box_logits(m, inputs):
        with torch.no_grad():
            return m(**inputs).logits[0, -1, start:]

    plain = build_tiny_model(processor, seed=0, **small).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("pointer.question", "pointer.match"))})
    torch.testing.assert_close(box_logits(model, red), box_logits(plain, red))  # the zero branch changes nothing

    with torch.no_grad():
        question_map.weight.normal_(0, 0.5)
    # The same image and the same text after it: only the question differs, and now the pointer sees it.
    shift = (box_logits(model, red) - box_logits(plain, red)).abs().max()
    assert shift > 1e-3
    difference = box_logits(model, red) - box_logits(model, blue)
    plain_difference = box_logits(plain, red) - box_logits(plain, blue)
    assert (difference - plain_difference).abs().max() > 1e-3
    _assert_cached_generation_matches_uncached(model, red)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(box_logits(loaded, red), box_logits(model, red))

    checkpoint = tmp_path / "without"
    plain.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **options}))
    added = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()  # the branch is new to this checkpoint
    assert getattr(added.pointer, branch).weight.abs().sum() == 0
    torch.testing.assert_close(box_logits(added, red), box_logits(plain, red))


def test_pointer_match_gets_a_gradient_at_its_zero_start(processor):
    """The match term's cell features are random from the start, so the first pointing loss
    already moves the question map (no saddle at zero), and the cell features of image 1
    follow its pixels: a red blob raises the features of the cells it falls in."""
    model = build_tiny_model(processor, seed=0, pointer_match=True, hidden_size=64, intermediate_size=128).train()
    conv = Conversation(question_first=True)
    conv.add_observation({"text": "What digit is written on the red square?", "images": (_image(0, (224, 224)),)})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + CALL_PREFIX], images=conv.images, return_tensors="pt")
    logits = model(**inputs).logits[0, -1]
    torch.nn.functional.cross_entropy(logits[None], torch.tensor([model.config.box_token_start_id + 5])).backward()
    assert model.pointer.match_question.weight.grad.abs().sum() > 0

    grid = model.config.pointer_grid
    image = np.full((224, 224, 3), 200, dtype=np.uint8)
    blob = image.copy()
    blob[8:16, 8:16] = (230, 20, 20)  # an 8-px red square in the top-left cell
    features = []
    for picture in (image, blob):
        pixels = processor.image_processor(images=[picture], return_tensors="pt")
        with torch.no_grad():
            features.append(run_per_image(pixels["pixel_values"], pixels["image_grid_thw"], [0],
                                          model.config.patch_size, model.pointer.match_features)[0])
    change = (features[1] - features[0]).abs().sum(-1).view(grid, grid)
    assert change[1, 1] > 0 and change[grid - 1, grid - 1] == 0  # the blob's cell and its neighbours, not far away


def test_encoder_match_features_follow_the_encoders_token_under_each_cell(processor):
    """With ``pointer_match_features="encoder"`` the match term of a cell is the question map
    dotted with a linear map of the encoder's token under the cell: scaling the encoder's
    output of one token changes the match column of that token's cells alone."""
    model = build_tiny_model(processor, seed=0, pointer_match=True, pointer_match_features="encoder",
                             hidden_size=64, intermediate_size=128).eval()
    assert model.pointer.match_pixels is None and model.pointer.match_tokens is not None
    with torch.no_grad():
        model.pointer.match_token_question.weight.normal_(0, 0.5)
    inputs = _question_inputs(processor, "What is the code printed in the Budget panel?")
    grid = model.config.pointer_grid

    def match_column() -> torch.Tensor:
        return _match_column(model, inputs).view(grid, grid)

    before = match_column()
    frame_tokens = model.model.vision.frame_tokens

    def boosted(frames: torch.Tensor) -> torch.Tensor:
        tokens = frame_tokens(frames).clone()
        tokens[:, 0] *= 3.0  # the top-left token of image 1
        return tokens

    model.model.vision.frame_tokens = boosted
    change = (match_column() - before).abs()
    cells_per_token = grid // 14
    assert change[:cells_per_token, :cells_per_token].min() > 0
    assert change[cells_per_token:, :].max() == 0 and change[:, cells_per_token:].max() == 0


def test_unique_images_finds_copies_in_any_order_and_reconstructs_the_batch():
    a, b, c = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    images = torch.stack([a, b, a, c, b, a])
    unique, inverse = unique_images(images)
    assert len(unique) == 3 and inverse.tolist() == [0, 1, 0, 2, 1, 0]
    torch.testing.assert_close(unique[inverse], images, rtol=0, atol=0)
    near = a.clone()
    near[0, 0, 0] += 1e-3  # one pixel apart: another image
    distinct = torch.stack([a, near, b])
    unique, inverse = unique_images(distinct)
    assert unique is distinct and inverse.tolist() == [0, 1, 2]


def test_shared_first_images_give_the_logits_and_gradients_of_rows_run_alone(processor):
    """A batch that holds one image in several rows (a GRPO group) encodes it once, with the
    logits and parameter gradients of running each row by itself."""
    model = build_tiny_model(processor, seed=0, pointer_match=True, pointer_stem=True, token_conv=True,
                             image_summary=True, hidden_size=64, intermediate_size=128).train()
    with torch.no_grad():
        model.pointer.match_question.weight.normal_(0, 0.1)
        model.pointer.stem_out.weight.normal_(0, 0.1)
    texts, images = [], []
    for question, seed in (("red", 0), ("blue", 0), ("red", 1), ("green", 0)):
        conv = Conversation(question_first=True)
        conv.add_observation({"text": f"What digit is on the {question} square?", "images": (_image(seed, (224, 224)),)})
        texts.append(processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False) + CALL_PREFIX)
        images += conv.images
    start = model.config.box_token_start_id

    def loss_and_grads(rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        inputs = processor(text=[texts[r] for r in rows], images=[images[r] for r in rows], return_tensors="pt",
                           padding=True)
        logits = model(**inputs).logits[:, -1, start:]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([5 + r for r in rows]), reduction="sum")
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    encoded = []
    frame_tokens = model.model.vision.frame_tokens
    model.model.vision.frame_tokens = lambda frames: encoded.append(len(frames)) or frame_tokens(frames)
    together, grads = loss_and_grads([0, 1, 2, 3])
    assert encoded == [2]  # rows 0, 1 and 3 share their image
    alone = [loss_and_grads([r]) for r in range(4)]
    torch.testing.assert_close(together, torch.cat([logits for logits, _ in alone]), rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sum(g[name] for _, g in alone), rtol=1e-3, atol=1e-5, msg=name)


def test_box_tokens_get_mass_only_after_the_token_that_opens_a_box(processor):
    """With ``box_slot_token_id`` (set by `tiny_config`) the box tokens' logits are masked after
    every other input token, so a raised term that is the same at every position (here the
    size bias; in a GRPO run the question-match term) cannot leak boxes into free text;
    without the mask it does."""
    model = build_tiny_model(processor, seed=0, pointer_match=True, hidden_size=64, intermediate_size=128).eval()
    slot = model.config.box_slot_token_id
    assert processor.tokenizer.decode([slot]) == " ["
    with torch.no_grad():
        model.pointer.size_bias.fill_(20.0)
    conv = Conversation(question_first=True)
    conv.add_observation({"text": "What digit is written on the red square?", "images": (_image(0, (224, 224)),)})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + "Let me zoom in.\n" + CALL_PREFIX], images=conv.images, return_tensors="pt")
    start = model.config.box_token_start_id
    is_slot = inputs["input_ids"][0] == slot
    assert is_slot[-1]

    def box_mass() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits[0].softmax(-1)[:, start:].sum(-1)

    masked = box_mass()
    assert masked[-1] > 0.5 and masked[~is_slot].max() == 0
    model.config.box_slot_token_id = None
    assert box_mass()[~is_slot].min() > 0.5


def test_box_logits_at_slots_alone_match_the_full_computation(processor):
    """The slot-only box logits and gradients equal those computed at every position and then
    masked; a forward without a cache whose kept positions hold no slot skips the pointer keys
    (nothing of the pointer runs, the text logits are unchanged)."""
    model = build_tiny_model(processor, seed=0, pointer_match=True, pointer_stem=True, hidden_size=64,
                             intermediate_size=128)
    with torch.no_grad():
        model.pointer.match_question.weight.normal_(0, 0.1)
        model.pointer.stem_out.weight.normal_(0, 0.1)
    conv = Conversation(question_first=True)
    conv.add_observation({"text": "What digit is written on the red square?", "images": (_image(0, (224, 224)),)})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + "Let me zoom in.\n" + CALL_PREFIX, text + "Zoom.\n" + CALL_PREFIX],
                       images=conv.images * 2, return_tensors="pt", padding=True)
    slot = model.config.box_slot_token_id

    def logits_and_grads(slot_id: int | None, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        model.config.box_slot_token_id = slot_id
        logits = model(**inputs, **kwargs).logits
        if slot_id is None:  # the mask applied after computing every position's box logits
            start = model.config.box_token_start_id
            logits = torch.cat([logits[..., :start], logits[..., start:].masked_fill(
                (inputs["input_ids"] != slot)[..., None], torch.finfo(logits.dtype).min)], -1)
        logits.log_softmax(-1)[..., -1, :].max(-1).values.sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = logits_and_grads(None)
    at_slots, slot_grads = logits_and_grads(slot, use_cache=False)
    torch.testing.assert_close(at_slots, full)
    assert full_grads.keys() == slot_grads.keys() and any(n.startswith("pointer.stem") for n in slot_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(slot_grads[name], grad, msg=name)

    calls = []
    keys = model.image_one_keys
    model.image_one_keys = lambda *args: calls.append(1) or keys(*args)
    text_only = (inputs["input_ids"] != slot).all(0).nonzero().flatten()  # every position but the slots
    out = model(**inputs, logits_to_keep=text_only, use_cache=False)
    assert calls == [] and not out.pointer_valid.any()
    torch.testing.assert_close(out.logits, at_slots[:, text_only])
    model(**inputs, logits_to_keep=text_only, use_cache=True)  # a cache carries the keys on: computed
    assert calls == [1]


def test_both_match_sources_add_their_terms(processor):
    """With ``pointer_match_features="both"`` a cell's match term is the pixel term plus the
    encoder term, each with its own question map: the same weights in a pixels-only and an
    encoder-only model give the two parts."""
    small = dict(hidden_size=64, intermediate_size=128)
    both = build_tiny_model(processor, seed=0, pointer_match=True, pointer_match_features="both", **small).eval()
    with torch.no_grad():
        both.pointer.match_question.weight.normal_(0, 0.5)
        both.pointer.match_token_question.weight.normal_(0, 0.5)
    inputs = _question_inputs(processor, "What is the value of the red bar?")
    parts = []
    for source in ("pixels", "encoder"):
        single = build_tiny_model(processor, seed=1, pointer_match=True, pointer_match_features=source, **small).eval()
        missing, unexpected = single.load_state_dict(both.state_dict(), strict=False)
        assert not missing and unexpected  # the other source's weights are left out
        parts.append(_match_column(single, inputs))
    assert parts[0].abs().max() > 0 and parts[1].abs().max() > 0
    torch.testing.assert_close(_match_column(both, inputs), parts[0] + parts[1])


def test_match_encoder_of_its_own_feeds_the_encoder_term_alone(processor):
    """With ``pointer_match_encoder`` the encoder term reads the pointer's own encoder: changing
    it changes the match column, changing the model's encoder (what the decoder reads) does not."""
    with pytest.raises(Exception, match="pointer_match_encoder needs"):
        build_tiny_model(processor, seed=0, pointer_match=True, pointer_match_encoder=True)
    model = build_tiny_model(processor, seed=0, pointer_match=True, pointer_match_features="encoder",
                             pointer_match_encoder=True, hidden_size=64, intermediate_size=128).eval()
    with torch.no_grad():
        model.pointer.match_token_question.weight.normal_(0, 0.5)
    inputs = _question_inputs(processor, "What is the code printed in the Budget panel?")

    def match_column() -> torch.Tensor:
        return _match_column(model, inputs)

    before = match_column()
    with torch.no_grad():
        for param in model.model.vision.parameters():
            param.mul_(1.5)
    torch.testing.assert_close(match_column(), before)
    with torch.no_grad():
        for param in model.pointer.match_encoder.parameters():
            param.mul_(1.5)
    assert (match_column() - before).abs().max() > 1e-4


def _question_inputs(processor, question: str):
    """The processor's inputs for `question` about one 224-px image, up to the box of a crop call."""
    conv = Conversation(question_first=True)
    conv.add_observation({"text": question, "images": (_image(0, (224, 224)),)})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text + CALL_PREFIX], images=conv.images, return_tensors="pt")


def _match_column(model, inputs) -> torch.Tensor:
    """The question-match column of the pointer's keys of image 1, per cell."""
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        keys, _ = model.image_one_keys(hidden, inputs["input_ids"], inputs["image_grid_thw"], inputs["pixel_values"])
    return keys[0, :, -1]
