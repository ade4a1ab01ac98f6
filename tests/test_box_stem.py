"""The pointer's box stem: its logits in the VLM's box tokens, the views and hit sets it learns
from, a training run that learns, and the stem attached to a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents.box_stem import (  # noqa: E402
    DEFAULT_MODEL, BoxStemProbe, BoxViews, allowed_boxes, attach_box_stem, batch_tensors, box_views, hit_loss,
    main, measure, stem_config, train_box_stem,
)
from agents.vlm.chat import Conversation  # noqa: E402
from agents.vlm.tiny import build_tiny_model, build_tiny_processor  # noqa: E402
from agents.vlm.tiny.boxes import BoxVocab  # noqa: E402
from agents.vlm.tiny.modeling_tiny_vlm import images_by_grid, question_mask  # noqa: E402
from pxr_env.actions import format_tool_call  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def views() -> BoxViews:
    return box_views({"count": {}}, list(range(8_000_000, 8_000_016)))


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


CROP_OPENED = '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": ['
"""A reply up to where its box token comes (box tokens get mass only there)."""


def _inputs(processor, reply: str = CROP_OPENED):
    conv = Conversation(question_first=True)
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    conv.add_observation({"text": "How many red circles are there?", "images": [image]})
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False) + reply
    return processor(text=[text], images=[image], return_tensors="pt")


def test_box_stem_logits_add_to_each_box_token_of_its_cell_and_size(processor):
    """A new box stem adds nothing; with weights, box token (cell, size) gains the stem's logit of
    that size at the part of image 1's token under the cell's centre, and no other token moves."""
    model = build_tiny_model(processor, seed=0, pointer_box_stem=True, **SMALL).eval()
    config, inputs = model.config, _inputs(processor)
    with torch.no_grad():
        before = model(**inputs).logits[0, -1]
        torch.nn.init.normal_(model.pointer.box_stem.out.weight)
        torch.nn.init.normal_(model.pointer.box_stem.out.bias)
        after = model(**inputs).logits[0, -1]
        ids = inputs["input_ids"]
        stem = model.pointer.box_stem
        question = stem.question(ids, question_mask(ids, config.image_token_id, config.eos_token_id,
                                                    config.pad_token_id))
        (_, (_, h, w), image), = images_by_grid(inputs["pixel_values"], inputs["image_grid_thw"], config.patch_size)
        logits = stem(image, question)[0]  # (parts * sizes, h, w)
    sizes, grid, s = len(config.box_sizes), config.pointer_grid, config.pointer_subcells
    boxes = slice(config.box_token_start_id, config.box_token_start_id + config.num_boxes)
    others = torch.ones_like(after, dtype=torch.bool)
    others[boxes] = False
    assert torch.equal(before[others], after[others])
    gained = (after - before)[boxes].view(grid, grid, sizes)
    for row, col in [(0, 0), (grid // 3, grid - 3), (grid - 1, grid - 1), (grid // 2, 1)]:
        y, x = (row + 0.5) / grid * h, (col + 0.5) / grid * w
        part = int((y - int(y)) * s) * s + int((x - int(x)) * s)
        expected = logits.view(s * s, sizes, h, w)[part, :, int(y), int(x)]
        torch.testing.assert_close(gained[row, col], expected, atol=1e-4, rtol=1e-4)


def test_cached_generation_carries_the_box_stem(processor):
    model = build_tiny_model(processor, seed=0, pointer_box_stem=True, **SMALL).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.pointer.box_stem.out.weight, std=3.0)
    inputs = _inputs(processor)
    options = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_allowed_boxes_and_the_hit_loss_by_hand():
    hits = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1],     # 2 cells x 4 sizes: smallest hit is size 2, then 0
                         [1, 0, 0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    allowed = allowed_boxes(hits, sizes=4, size_steps=1)
    assert allowed.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1, 0, 0]]
    assert allowed_boxes(hits, 4, size_steps=0).int().tolist() == [[0, 0, 1, 0, 0, 0, 1, 0],
                                                                     [1, 0, 0, 0, 0, 0, 0, 0]]
    logits = torch.log(torch.tensor([[0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.2, 0.1]] * 2))
    loss = hit_loss(logits, allowed)
    assert loss.item() == pytest.approx((-np.log(0.6) - np.log(0.2)) / 2, abs=1e-5)


def test_views_show_the_question_and_their_hits_are_the_envs_crop_hits(views):
    from agents.count_stem_probe import checkpoint_parts
    from agents.sft import task_source
    from pxr_env.env import PixelQAEnv

    n = len(views.hits)
    assert n >= 8 and views.images.shape == (n, 224, 224, 3) and views.hits.shape == (n, 28 * 28 * 4)
    assert all(t.startswith("count/") for t in views.tiers)
    _, processor, _, env_kwargs = checkpoint_parts(DEFAULT_MODEL)
    for ids in views.question_ids[:4]:
        text = processor.tokenizer.decode(ids[ids >= 0])
        assert text.startswith("\n<|im_start|>user\nHow many ") and text.endswith("?<|vision_start|>")
    # the items come in seed order, shortcut items (no box holds their spread) left out:
    # replay the first ones through the env with a hitting and a missing box
    source, vocab = task_source({"count": {}}), BoxVocab(28)
    env = PixelQAEnv(tasks=source, action_mode="text", **env_kwargs)
    kept = [s for s in range(8_000_000, 8_000_016)
            if source.sample(np.random.default_rng(s)).meta["tier"] != "shortcut"]
    for row, seed in enumerate(kept[:3]):
        sample = source.sample(np.random.default_rng(seed))
        for index in (int(np.flatnonzero(views.hits[row])[0]), int(np.flatnonzero(~views.hits[row])[0])):
            env.reset(options={"sample_id": sample.sample_id})
            call = format_tool_call("crop_image", {"bbox_2d": list(vocab.boxes[index]), "target_image": 1})
            _, _, _, _, info = env.step(call)
            assert info["action_error"] is None and info["crop_hit"] == bool(views.hits[row, index])
    env.close()


def test_a_flip_moves_the_hits_with_the_view(views):
    vocab = BoxVocab(28)
    boxes = np.array(vocab.boxes).reshape(28, 28, 4, 4)
    # a mirrored box is the box of the mirrored cell (to the 0.99 its edges are clamped at)
    assert np.allclose(boxes[:, ::-1, :, 0], 1 - boxes[..., 2], atol=0.0101)
    assert np.allclose(boxes[::-1, :, :, 1], 1 - boxes[..., 3], atol=0.0101)
    index = np.arange(6)
    images, questions, hits = batch_tensors(views, index, 28, 4)
    flipped, _, flipped_hits = batch_tensors(views, index, 28, 4, np.random.default_rng(1))
    for i in range(6):
        grid = hits[i].view(28, 28, 4)
        pairs = [(torch.equal(flipped[i], images[i].flip(d_image)), torch.equal(flipped_hits[i].view(28, 28, 4),
                  grid.flip(d_hits))) for d_image, d_hits in (([], []), ([-1], [1]), ([-2], [0]), ([-2, -1], [0, 1]))]
        assert (True, True) in pairs


def test_training_puts_mass_on_the_hits_and_the_command_writes_a_curve(views, tmp_path, capsys):
    config = stem_config()
    probe = BoxStemProbe(config)
    images, questions, hits = batch_tensors(views, np.arange(4), 28, 4)
    assert probe(images, questions).shape == (4, config.num_boxes)
    records = train_box_stem(views, views, tmp_path / "run", minutes=5, steps=60, batch_size=8, lr=3e-3,
                             eval_minutes=5, progress=False)
    assert records[0]["loss"] is None and records[-1]["step"] == 60
    assert records[-1]["hit_mass"] > 2 * records[0]["hit_mass"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and {"hit", "side", "count/hard/hit"} <= set(lines[-1])
    views.save(tmp_path / "v.npz")
    assert main(["--out", str(tmp_path / "cmd"), "--steps", "2", "--train-views", str(tmp_path / "v.npz"),
                 "--test-views", str(tmp_path / "v.npz"), "--no-progress"]) == 0
    assert (tmp_path / "cmd" / "curve.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out)["step"] == 2


def test_measure_by_hand():
    class Fixed(torch.nn.Module):
        grid, sizes, box_sizes = 1, 2, (0.2, 0.6)

        def forward(self, images, question_ids):  # one cell: size 1 sure
            return torch.tensor([[0.0, 5.0]]).expand(len(images), -1)
    views = BoxViews(images=np.zeros((2, 8, 8, 3), np.uint8), question_ids=np.zeros((2, 3), int),
                     hits=np.array([[True, True], [True, False]]), tiers=np.array(["count/easy", "count/hard"]))
    out = measure(Fixed(), views)
    assert out["hit"] == 0.5 and out["count/easy/hit"] == 1.0 and out["count/hard/hit"] == 0.0
    assert out["side"] == pytest.approx(0.6)
    assert out["hit_mass"] == pytest.approx((1 + torch.sigmoid(torch.tensor(-5.0)).item()) / 2, abs=1e-5)


def test_an_attached_box_stem_gives_the_vlm_the_probes_box_logits(views, tmp_path):
    from safetensors.torch import load_file

    from agents.sft import save_model
    from agents.vlm.hf import TransformersPolicy, load_model

    train_box_stem(views, views, tmp_path / "run", minutes=5, steps=3, batch_size=4, progress=False)
    attach_box_stem(tmp_path / "run", DEFAULT_MODEL, tmp_path / "vlm")
    policy = TransformersPolicy.from_pretrained(str(tmp_path / "vlm"))
    model, processor = policy.model.eval(), policy.processor
    probe = BoxStemProbe(stem_config())
    probe.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))
    ids = views.question_ids[0]
    asked = processor.tokenizer.decode(ids[ids >= 0]).split("user\n")[1].removesuffix("<|vision_start|>")
    conversation = policy.chat_format.conversation()
    conversation.add_observation({"text": asked, "images": [views.images[0]]})
    text = processor.apply_chat_template(conversation.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[views.images[0]], return_tensors="pt")
    with torch.no_grad():
        keys = model(**inputs).pointer_keys[0, :, -4:]
        images, questions, _ = batch_tensors(views, np.arange(1), 28, 4)
        expected = probe(images, questions).view(-1, 4)
    torch.testing.assert_close(keys, expected, atol=1e-4, rtol=1e-4)
    # alone: after the box slot every box token's logit is its stem logit plus the offset
    with pytest.raises(ValueError, match="no box_slot_token_id"):  # box tokens would win in free text too
        attach_box_stem(tmp_path / "run", DEFAULT_MODEL, tmp_path / "alone", alone=True)
    slotted = load_model(DEFAULT_MODEL, config_overrides={"box_slot_token_id": 338})  # the " [" of a box
    save_model(slotted, processor, policy.chat_format, policy.env_kwargs, tmp_path / "slotted")
    attach_box_stem(tmp_path / "run", tmp_path / "slotted", tmp_path / "alone", alone=True)
    alone = TransformersPolicy.from_pretrained(str(tmp_path / "alone")).model.eval()
    slot = processor(text=[text + '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": ['],
                     images=[views.images[0]], return_tensors="pt")
    assert slot["input_ids"][0, -1] == alone.config.box_slot_token_id
    with torch.no_grad():
        logits = alone(**slot).logits[0, -1]
    boxes = logits[alone.config.box_token_start_id:alone.config.box_token_start_id + alone.pointer.num_boxes]
    torch.testing.assert_close(boxes, expected.flatten() + 30.0, atol=1e-3, rtol=1e-4)
    assert boxes.min() > logits[:alone.config.box_token_start_id].max()  # the slot takes a box
    with pytest.raises(ValueError, match="holds no box stem"):
        attach_box_stem(tmp_path / "vlm", DEFAULT_MODEL, tmp_path / "no")
