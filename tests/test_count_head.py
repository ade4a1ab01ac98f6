"""The tiny model's count head: digit logits from a sum over the latest image's tokens."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText  # noqa: E402

from agents.vlm.chat import Conversation  # noqa: E402
from agents.vlm.hf import load_model  # noqa: E402
from agents.vlm.tiny import build_tiny_model, build_tiny_processor, tiny_config  # noqa: E402
from agents.vlm.tiny.modeling_tiny_vlm import COUNT_GATE  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128)


@contextmanager
def _gate(model, value: float):
    """The count head's gate held at `value` (its weights are zero at the start)."""
    with torch.no_grad():
        model.count.gate.bias.fill_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            model.count.gate.bias.fill_(COUNT_GATE)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def _inputs(processor, reply: str = "It shows", crop: bool = True):
    """A question on image 1, a crop call, the crop as image 2 (with `crop`), then `reply`."""
    conv = Conversation(question_first=True)
    conv.add_observation({"text": "How many red circles are there?", "images": [_image(0)]})
    images = [_image(0)]
    if crop:
        conv.add_assistant('<tool_call>{"name": "crop_image"}</tool_call>')
        conv.add_observation({"text": "", "images": [_image(1)]})
        images.append(_image(1))
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False) + reply
    return processor(text=[text], images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    return build_tiny_model(processor, seed=0, count_head=True, **SMALL).eval()


def test_the_config_knows_the_digit_tokens_and_the_head_is_off_by_default(processor):
    config = tiny_config(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(config.digit_token_ids) == [str(d) for d in range(10)]
    assert build_tiny_model(processor, seed=0, **SMALL).count is None
    # every number is written with the digit tokens
    ids = processor.tokenizer("\\boxed{12}", add_special_tokens=False).input_ids
    assert [i for i in ids if i in config.digit_token_ids] == [config.digit_token_ids[1], config.digit_token_ids[2]]


def test_digit_logits_get_the_count_of_the_latest_image(model, processor):
    """``-g (d - E)^2 / 2`` on digit d, E the sum of the token probabilities of the latest image
    before the position; nothing before the first image."""
    inputs = _inputs(processor)
    ids = inputs["input_ids"][0]
    digits = torch.tensor(model.config.digit_token_ids)
    with torch.no_grad(), _gate(model, 0.0):
        silent = model(**inputs).logits[0]
    with torch.no_grad(), _gate(model, 1.5):
        out = model(**inputs)
    with torch.no_grad():
        hidden = model.model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                       "image_grid_thw")}).last_hidden_state[0]
    diff = out.logits[0] - silent
    others = torch.ones(diff.shape[-1], dtype=torch.bool)
    others[digits] = False
    assert not diff[:, others].any()  # only the digits move
    image = (ids == model.config.image_token_id).nonzero().flatten()
    first, second = image[:len(image) // 2], image[len(image) // 2:]
    assert bool((first.diff() == 1).all()) and bool((second.diff() == 1).all())
    assert not diff[:int(first[0])].any()  # before image 1: no count

    def expected(position: int, tokens: torch.Tensor) -> torch.Tensor:
        q = model.count.query(hidden[position])
        k = model.count.key(hidden[tokens])
        count = torch.sigmoid(k @ q / q.shape[-1] ** 0.5 + model.count.bias).sum()
        return -0.75 * (torch.arange(10.0) - count) ** 2

    between = int(second[0]) - 3  # after image 1, before image 2
    with torch.no_grad():
        torch.testing.assert_close(diff[between, digits], expected(between, first), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(diff[-1, digits], expected(len(ids) - 1, second), atol=1e-4, rtol=1e-4)
    assert out.count_keys.shape[:3] == (1, 2, len(second)) and bool(out.count_held.all())


@pytest.mark.parametrize("stem", [False, True], ids=["keys", "stem"])
def test_cached_generation_carries_the_count_keys(model, processor, stem):
    if stem:
        model = build_tiny_model(processor, seed=0, count_head=True, count_subcells=2, count_stem=True, **SMALL).eval()
    inputs = _inputs(processor, reply="It shows ")
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), _gate(model, 1.0):
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
        full = {**inputs, "input_ids": cached.sequences, "attention_mask": torch.ones_like(cached.sequences)}
        counted = model(**full).logits[0, -5:-1]
    with torch.no_grad(), _gate(model, 0.0):
        silent = model(**full).logits[0, -5:-1]
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    # the generated positions' digits carry a count (so the cached steps read the carried keys)
    digits = model.config.digit_token_ids
    assert bool((counted[:, digits] != silent[:, digits]).all(-1).all())
    torch.testing.assert_close(torch.stack(cached.logits)[:, 0], counted, atol=2e-4, rtol=1e-4)


def test_training_on_count_answers_moves_the_head_and_the_loss_falls(processor):
    """Two crops that differ only in how many bright squares they hold, answered 2 and 5."""
    model = build_tiny_model(processor, seed=1, count_head=True, **SMALL).train()
    batch = []
    for n in (2, 5):
        crop = np.zeros((112, 112, 3), dtype=np.uint8)
        for k in range(n):
            crop[8 + 32 * (k // 3):24 + 32 * (k // 3), 8 + 32 * (k % 3):24 + 32 * (k % 3)] = 255
        conv = Conversation(question_first=True)
        conv.add_observation({"text": "How many white squares are there?", "images": [crop]})
        text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
        batch.append((processor(text=[text + "\\boxed{"], images=[crop], return_tensors="pt"),
                      model.config.digit_token_ids[n]))
    before = {n: p.detach().clone() for n, p in model.count.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = sum(torch.nn.functional.cross_entropy(model(**inputs).logits[0, -1][None], torch.tensor([target]))
                   for inputs, target in batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    moved = {n for n, p in model.count.named_parameters() if not torch.equal(before[n], p)}
    assert {"query.weight", "key.weight", "gate.weight", "gate.bias", "bias"} <= moved


def test_a_saved_model_given_the_head_keeps_its_other_logits_and_round_trips(processor, tmp_path):
    """The gate starts small, not at zero (at zero the head never starts): the digits move a
    little, every other logit stays."""
    plain = build_tiny_model(processor, seed=0, **SMALL).eval()
    plain.save_pretrained(tmp_path / "plain")
    grown = load_model(str(tmp_path / "plain"), config_overrides={"count_head": True}).eval()
    assert grown.count is not None and grown.count.gate.bias.item() == pytest.approx(COUNT_GATE)
    inputs = _inputs(processor)
    digits = grown.config.digit_token_ids
    others = [i for i in range(grown.config.vocab_size) if i not in digits]
    with torch.no_grad():
        new, old = grown(**inputs).logits, plain(**inputs).logits
        torch.testing.assert_close(new[..., others], old[..., others])
        assert not torch.allclose(new[0, -1, digits], old[0, -1, digits])
        with _gate(grown, 0.0):
            torch.testing.assert_close(grown(**inputs).logits, old)
    grown.save_pretrained(tmp_path / "grown")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "grown").eval()
    assert loaded.config.count_head and loaded.config.digit_token_ids == digits
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, new)


def test_count_answers_label_the_final_turns_one_digit_numbers(processor):
    """A count trace's reading item: the answer's first digit (``It shows N.``) carries N, its copy
    (``\\boxed{N}``), a number of two digits and digits of earlier turns carry nothing; the crop's
    tokens hold the N counted centres between them."""
    from agents.sft import count_answer_labels, count_token_labels
    from agents.traces import TraceMix, synthesize_traces
    from agents.vlm.encoding import encode_segments

    digits = tiny_config(processor.tokenizer).digit_token_ids
    trace = synthesize_traces({"count": {"shortcut_share": 0.0}}, 1, 0, mix=TraceMix(image={"image/single": 1.0}),
                              seed=2, progress=False)[0]
    item = encode_segments(processor, *trace.reading())
    labels = count_answer_labels(item, digits)
    answer = int(trace.conversation.messages[-1]["content"][0]["text"].split("\\boxed{")[1][0])
    marked = (labels != -100).nonzero().flatten()
    answer_ids = (item["input_ids"] == digits[answer]).nonzero().flatten()
    assert marked.tolist() == [int(answer_ids[answer_ids > int(item["loss_mask"].nonzero()[0])][0])]
    assert int(labels[marked]) == answer
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = count_token_labels(item, trace.info, image_token)
    assert torch.equal(tokens >= 0, item["input_ids"] == image_token) and trace.info["crop_box"] is not None
    assert set(tokens[tokens >= 0].tolist()) <= {0, 1} and 1 <= int(tokens[tokens >= 0].sum()) <= answer
    parts = count_token_labels(item, trace.info, image_token, subcells=4)  # 4-px cells: one centre each
    assert sum(bin(int(v)).count("1") for v in parts[parts >= 0]) == answer
    ids = processor.tokenizer("a 3 b <|im_end|> c 12 d 5 e 6", add_special_tokens=False).input_ids
    made = {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor([1, 1, 1, 1, 0] + [1] * (len(ids) - 5))}
    got = count_answer_labels(made, digits)
    assert [int(v) for v in got if v != -100] == [5]  # "3": an earlier turn; "12": two digits; "6": a later one


def test_the_count_loss_trains_the_latest_images_tokens_where_the_count_is_written(processor):
    """``sft_loss_sum`` with `count_weight` adds ``w`` times the binary cross-entropy of each token
    of the latest image (held or not: ``count_token_labels``) at the position that predicts the
    count digit; a few steps on it bring ``E`` there to the counts."""
    from agents.sft import sft_loss_sum
    from agents.vlm.encoding import collate, encode_segments

    model = build_tiny_model(processor, seed=3, count_head=True, **SMALL).train()
    digits, image_token = model.config.digit_token_ids, model.config.image_token_id
    rows, marked = [], []
    for n, seed in ((2, 4), (6, 5)):
        conv = Conversation(question_first=True)
        conv.add_observation({"text": "How many red circles are there?", "images": [_image(seed)]})
        prompt = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
        item = encode_segments(processor, [(prompt, False), (f"It shows {n}.<|im_end|>", True)], [_image(seed)])
        counts = torch.full_like(item["input_ids"], -100)
        counts[(item["input_ids"] == digits[n]) & item["loss_mask"].bool()] = n
        tokens = torch.full_like(item["input_ids"], -100)
        image = (item["input_ids"] == image_token).nonzero().flatten()
        tokens[image] = 0
        tokens[image[seed::7][:n]] = 1  # n tokens hold a counted thing
        marked.append(tokens[image])
        rows.append(item | {"count_labels": counts, "count_token_labels": tokens})
    rows[1] = {k: v[:-1] if v.dim() == 1 else v for k, v in rows[1].items()}  # rows of unequal length
    batch = collate(rows, processor.tokenizer.pad_token_id)
    assert int((batch["count_token_labels"] >= 0).sum()) == sum(len(m) for m in marked)  # padding: -100

    answers = (batch["count_labels"][:, 1:] != -100).nonzero()[:, 1]  # one position a row
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask", "count_labels", "count_token_labels")}
    with torch.no_grad():
        plain, n_tokens = sft_loss_sum(model, batch)
        parts: dict[str, float] = {}
        counted, same = sft_loss_sum(model, batch, count_weight=0.5, parts=parts)
        out = model(**inputs)
        error = sum(torch.nn.functional.binary_cross_entropy_with_logits(
            out.count_scores[row, int(position), 0], marked[row].float(), reduction="sum")
            for row, position in enumerate(answers))
    assert same == n_tokens and parts["count_answers"] == 2
    torch.testing.assert_close(counted, plain + 0.5 * error, rtol=1e-5, atol=1e-4)
    assert parts["count_loss"] == pytest.approx(float(error), rel=1e-5)
    optimizer = torch.optim.Adam(model.count.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        sft_loss_sum(model, batch, count_weight=1.0)[0].backward()
        optimizer.step()
    with torch.no_grad():
        out = model(**inputs)
        expected = torch.stack([out.count_expected[row, int(p)] for row, p in enumerate(answers)])
    torch.testing.assert_close(expected, torch.tensor([2.0, 6.0]), atol=0.4, rtol=0)  # rounds to them


def test_token_parts_mark_each_centre_once_and_the_head_sums_over_them(processor):
    """Two centres in one token: one mark per token, both with its 2 x 2 parts (bit row * 2 + col),
    and with ``count_subcells`` 2 the head's ``E`` sums a probability per part."""
    from agents.sft import count_cell_targets, count_token_labels

    ids = torch.tensor([7, 1043, 1043, 1043, 1043, 9])  # a 2 x 2 token image
    item = {"input_ids": ids, "image_grid_thw": torch.tensor([[1, 2, 2]])}
    info = {"crop_box": None, "image_size": [40, 40], "counted_centres": [[2, 2], [18, 18], [30, 5]]}
    whole = count_token_labels(item, info, 1043)
    assert whole.tolist() == [-100, 1, 1, 0, 0, -100]  # token 0 holds two centres, token 1 one
    parts = count_token_labels(item, info, 1043, subcells=2)
    assert parts.tolist() == [-100, 1 | 8, 2, 0, 0, -100]  # token 0: parts 0 and 3; token 1: part 1
    cells = count_cell_targets(parts, 2)
    assert cells.shape == (24,) and int(cells.clamp(min=0).sum()) == 3
    assert cells[4:8].tolist() == [1, 0, 0, 1] and cells[8:12].tolist() == [0, 1, 0, 0]
    assert cells[:4].tolist() == [-1] * 4

    model = build_tiny_model(processor, seed=0, count_head=True, count_subcells=2, **SMALL).eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        out = model(**inputs)
        hidden = model.model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                       "image_grid_thw")}).last_hidden_state[0]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    second = image[len(image) // 2:]
    assert out.count_keys.shape[:3] == (1, 2, 4 * len(second)) and out.count_held.shape == out.count_keys.shape[:3]
    with torch.no_grad():
        q = model.count.query(hidden[-1])
        k = model.count.key(hidden[second]).view(len(second), 4, -1)  # token-major parts
        count = torch.sigmoid(k @ q / q.shape[-1] ** 0.5 + model.count.bias).sum()
    torch.testing.assert_close(out.count_expected[0, -1], count, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="count_subcells must be at least 1"):
        tiny_config(processor.tokenizer, count_subcells=0)


def test_the_question_is_the_text_before_the_first_image_after_the_last_turn_end(processor):
    from agents.vlm.tiny.modeling_tiny_vlm import question_mask

    config = tiny_config(processor.tokenizer)
    inputs = _inputs(processor)
    ids = inputs["input_ids"]
    padded = torch.cat([torch.full((1, 3), config.pad_token_id), ids], dim=1)  # left padding
    for row, ends in ((ids, config.eos_token_id), (padded, config.eos_token_id), (ids, [config.eos_token_id])):
        mask = question_mask(row, config.image_token_id, ends, config.pad_token_id)
        text = processor.tokenizer.decode(row[mask])
        assert text == "\n<|im_start|>user\nHow many red circles are there?<|vision_start|>"
    no_end = ids[:, int((ids[0] == config.eos_token_id).nonzero()[0]) + 1:]  # the system turn cached apart
    mask = question_mask(no_end, config.image_token_id, config.eos_token_id, config.pad_token_id)
    assert processor.tokenizer.decode(no_end[mask]).endswith("How many red circles are there?<|vision_start|>")


def test_a_count_stem_counts_what_the_question_names_in_the_latest_image(processor):
    """With ``count_stem`` ``E`` is the sum of ``sigmoid(c_t + b)`` over the latest image's token
    parts, ``c`` the stem's logits of that image under the question's tokens; another colour in
    the question gives another count; training moves the stem."""
    from agents.vlm.tiny.modeling_tiny_vlm import question_mask

    model = build_tiny_model(processor, seed=0, count_head=True, count_subcells=2, count_stem=True, **SMALL).eval()
    assert model.count.query is None and model.count.key is None
    with torch.no_grad():  # FiLM starts at zero: give the question a say
        for film in model.count.stem.film:
            film.weight.normal_(std=0.1)
    inputs = _inputs(processor)
    config = model.config
    with torch.no_grad(), _gate(model, 1.5):
        out = model(**inputs)
        mask = question_mask(inputs["input_ids"], config.image_token_id, config.eos_token_id, config.pad_token_id)
        question = model.count.stem.question(inputs["input_ids"], mask)
        crop = torch.from_numpy(_image(1)).permute(2, 0, 1)[None].float() / 127.5 - 1  # the processor's scale
        logits = model.count.stem(crop, question)  # (1, 4, 7, 7): parts, token rows, token columns
        count = torch.sigmoid(logits + model.count.bias).sum()
    assert out.count_keys.shape == (1, 2, 49 * 4, 1)
    torch.testing.assert_close(out.count_expected[0, -1], count, atol=1e-4, rtol=1e-4)
    # token-major keys: token t's four parts (row-major) follow each other
    torch.testing.assert_close(out.count_keys[0, 1, :4, 0], logits[0, :, 0, 0], atol=1e-5, rtol=1e-5)
    other = inputs["input_ids"].clone()
    red_id = processor.tokenizer(" red", add_special_tokens=False).input_ids
    blue_id = processor.tokenizer(" blue", add_special_tokens=False).input_ids
    assert len(red_id) == len(blue_id) == 1
    other[other == red_id[0]] = blue_id[0]
    with torch.no_grad():
        recoloured = model(**{**inputs, "input_ids": other}).count_expected[0, -1]
    assert abs(float(recoloured - out.count_expected[0, -1])) > 1e-3

    before = {n: p.detach().clone() for n, p in model.count.named_parameters()}
    model.train()
    optimizer = torch.optim.Adam(model.count.parameters(), lr=1e-2)
    target = torch.tensor(3.0)
    losses = []
    for _ in range(20):
        loss = (model(**inputs).count_expected[0, -1] - target) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    moved = {n for n, p in model.count.named_parameters() if not torch.equal(before[n], p)}
    assert {"stem.words.weight", "stem.film.0.weight", "stem.convs.0.0.weight", "stem.out.weight", "bias"} <= moved


def test_a_count_stem_needs_the_head_and_the_pixels(processor):
    with pytest.raises(Exception, match="count_stem is a part of the count head"):  # hub's validation error
        tiny_config(processor.tokenizer, count_stem=True)
    model = build_tiny_model(processor, seed=0, count_head=True, count_stem=True, **SMALL).eval()
    inputs = _inputs(processor, crop=False)
    with pytest.raises(ValueError, match="count_stem needs the pixel_values"):
        model.count.keys(torch.zeros(1, inputs["input_ids"].shape[1], 64), inputs["input_ids"], model.config)
