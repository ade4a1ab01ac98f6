"""The count stem probe: crops and cell targets, the two forms, a training run that learns."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from agents.count_stem_probe import (  # noqa: E402
    DEFAULT_MODEL, FORMS, CountCrops, attach_stem, batch_tensors, build_probe, count_crops, main,
    measure, probe_loss, train_probe,
)
from agents.sft import counted_cells  # noqa: E402


@pytest.fixture(scope="module")
def crops() -> CountCrops:
    return count_crops(list(range(9_000_000, 9_000_024)), side=112)


def test_counted_cells_by_hand():
    info = {"crop_box": (100, 200, 180, 240), "image_size": (400, 400),
            "counted_centres": [(101, 201), (179, 239), (140, 220), (90, 220), (141, 221)]}
    cells = counted_cells(info, 2, 4)  # cells of 20 x 20 px
    expected = torch.zeros(2, 4, dtype=torch.long)
    expected[0, 0] = expected[1, 3] = expected[1, 2] = 1  # (90, 220) lies left of the crop
    assert torch.equal(cells, expected)
    whole = counted_cells({**info, "crop_box": None}, 4, 4)  # no crop: the original, cells of 100 px
    assert whole.sum() == 2 and whole[2, 0] == whole[2, 1] == 1


def test_crops_hold_each_counted_centre_and_the_question(crops):
    n = len(crops.counts)
    assert n > 15 and crops.images.shape == (n, 112, 112, 3) and crops.cells.shape == (n, 14, 14)
    # two centres share an 8-px cell now and then (0.6% of the default items)
    assert (crops.cells.reshape(n, -1).sum(1) == crops.counts).mean() > 0.9
    assert crops.questions.shape == (n, 3) and crops.questions.min() >= 0
    from transformers import AutoProcessor

    import agents.vlm.tiny  # noqa: F401  (registers the tiny processor)

    tokenizer = AutoProcessor.from_pretrained(DEFAULT_MODEL).tokenizer
    for ids, (_, _, kind) in zip(crops.question_ids[:6], crops.questions[:6]):
        text = tokenizer.decode(ids[ids >= 0])
        assert text.startswith("\n<|im_start|>user\nHow many ") and text.endswith("?<|vision_start|>")
        assert ("inside the" in text) == (kind == 1)  # the region kind names a frame
    assert crops.hard.any() and (~crops.hard).any()


def test_crops_round_trip_through_npz(crops, tmp_path):
    crops.save(tmp_path / "c.npz")
    back = CountCrops.load(tmp_path / "c.npz")
    assert all(np.array_equal(getattr(back, k), getattr(crops, k)) for k in CountCrops.__dataclass_fields__)


def test_glances_are_first_views_of_shortcut_items_as_the_processor_shows_them(tmp_path):
    """A glance is the env's first view resized to the processor's square; its cells mark the
    counted centres of the whole image."""
    from transformers import AutoProcessor

    import agents.vlm.tiny  # noqa: F401  (registers the tiny processor)
    from pxr_env.tasks.synthetic.count import Count

    seeds = list(range(9_500_000, 9_500_006))
    glances = count_crops(seeds, side=224, glances=True)
    n = len(glances.counts)
    assert n == len(seeds) and glances.images.shape == (n, 224, 224, 3) and glances.cells.shape == (n, 28, 28)
    assert not glances.hard.any()
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    source = Count(shortcut_share=1.0)
    for seed, cells, count in zip(seeds, glances.cells, glances.counts):
        sample = source.get(source.sample_id(seed))
        assert sample.meta["tier"] == "shortcut" and int(sample.answers[0]) == count
        height, width = sample.load_image().shape[:2]
        expected = np.zeros((28, 28), np.uint8)
        for o in sample.meta["objects"]:
            if o["counted"]:
                x, y = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
                expected[int(y / height * 28), int(x / width * 28)] = 1
        assert np.array_equal(cells, expected)
    shown = processor.image_processor(images=[glances.images[0]], return_tensors="pt")
    assert shown["image_grid_thw"].tolist() == [[1, 14, 14]]  # the square the model sees, unchanged


def test_training_with_glances_from_a_run_counts_both(crops, tmp_path):
    """Each step adds a batch of glances; records carry their measures; `init` starts from a run."""
    glances = count_crops(list(range(9_500_000, 9_500_008)), side=224, glances=True)
    first = train_probe("film", crops, crops, tmp_path / "a", minutes=5, steps=3, batch_size=8, progress=False)
    records = train_probe("film", crops, crops, tmp_path / "b", minutes=5, steps=30, batch_size=8, lr=3e-3,
                          glances=(glances, glances), glance_batch=4, init=tmp_path / "a", progress=False)
    assert "glance/exact" in records[-1] and "glance/exact" not in first[-1]
    assert records[0]["exact"] == first[-1]["exact"]  # the same weights at step 0
    assert records[-1]["glance/mae"] < records[0]["glance/mae"]


def test_a_flip_moves_the_cells_with_the_image(crops):
    index = np.arange(8)
    images, questions, cells, counts = batch_tensors(crops, index)
    assert images.shape == (8, 3, 112, 112) and -1 <= images.min() and images.max() <= 1
    flipped_images, _, flipped_cells, _ = batch_tensors(crops, index, np.random.default_rng(3))
    for i in range(8):
        matches = [(torch.equal(flipped_images[i], images[i].flip(dims)),
                    torch.equal(flipped_cells[i], cells[i].flip(dims))) for dims in ([], [-1], [-2], [-2, -1])]
        assert (True, True) in matches  # the same flip of both
    assert torch.equal(counts, torch.from_numpy(crops.counts[:8]).float())


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_gives_one_logit_per_cell(form, crops):
    model = build_probe(form)
    images, questions, cells, counts = batch_tensors(crops, np.arange(4), reads=model.reads)
    logits = model(images, questions)
    assert logits.shape == cells.shape
    loss = probe_loss(logits, cells, counts, count_weight=0.1)
    assert loss > probe_loss(logits, cells, counts, count_weight=0.0)


def test_measure_by_hand():
    class Fixed(torch.nn.Module):
        reads = "questions"

        def forward(self, images, questions):  # cell (0, 0) sure, (0, 1) 0.6, (1, 1) 0.6 of each item
            logits = torch.full((len(images), 2, 2), -30.0)
            logits[:, 0, 0], logits[:, 0, 1], logits[:, 1, 1] = 30.0, 0.4055, 0.4055
            return logits
    cells = np.zeros((2, 2, 2), np.uint8)
    cells[0, 0, 0] = cells[0, 0, 1] = cells[1, 0, 0] = 1
    crops = CountCrops(images=np.zeros((2, 16, 16, 3), np.uint8), questions=np.zeros((2, 3), int),
                       question_ids=np.zeros((2, 4), int), cells=cells,
                       counts=np.array([2, 1]), hard=np.array([False, True]))
    out = measure(Fixed(), crops)  # each sum 2.2 -> 2: the first right, the second not
    assert out["exact"] == 0.5 and out["easy"] == 1.0 and out["hard"] == 0.0
    assert out["mae"] == pytest.approx((0.2 + 1.2) / 2, abs=1e-4)
    assert out["precision"] == pytest.approx(3 / 6) and out["recall"] == 1.0
    assert np.isnan(out["corr"])  # the sums do not vary


def test_training_learns_the_cells_past_their_base_rate(crops, tmp_path):
    records = train_probe("film", crops, crops, tmp_path, minutes=5, steps=80, batch_size=16, lr=3e-3,
                          count_weight=0.0, eval_minutes=5, progress=False)
    assert records[0]["step"] == 0 and records[0]["loss"] is None and records[-1]["step"] == 80
    rate = crops.cells.mean()  # the best constant guess's cross-entropy
    assert records[-1]["loss"] < -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(build_probe("film").state_dict())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and {"exact", "corr", "precision", "recall"} <= set(lines[-1])
    with pytest.raises(ValueError, match="form must be one of"):
        train_probe("mlp", crops, crops, tmp_path)


def test_the_command_writes_metrics_and_a_curve(crops, tmp_path, capsys):
    crops.save(tmp_path / "c.npz")
    assert main(["--form", "keys", "--out", str(tmp_path / "run"), "--steps", "3", "--train-crops",
                 str(tmp_path / "c.npz"), "--test-crops", str(tmp_path / "c.npz"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "curve.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out)["step"] == 3


def test_an_attached_stem_gives_the_vlm_the_probes_cell_logits(crops, tmp_path):
    """A film probe put into the warm start's count head: on a crop and its question shown as the
    VLM is shown them, the head's part logits are the probe's (token-major, each token's four
    parts row-major), and its bias and gate are those asked for."""
    from safetensors.torch import load_file

    from agents.vlm.chat import load_chat_format
    from agents.vlm.hf import TransformersPolicy

    train_probe("film", crops, crops, tmp_path / "run", minutes=5, steps=5, batch_size=8, progress=False)
    attach_stem(tmp_path / "run", DEFAULT_MODEL, tmp_path / "vlm", gate=3.0)
    policy = TransformersPolicy.from_pretrained(str(tmp_path / "vlm"))
    model, processor = policy.model.eval(), policy.processor
    assert model.config.count_stem and model.count.gate.bias.item() == 3.0
    assert load_chat_format(tmp_path / "vlm") == load_chat_format(DEFAULT_MODEL)
    probe = build_probe("film")
    probe.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))
    assert model.count.bias.item() == probe.bias.item()
    ids = crops.question_ids[0]
    asked = processor.tokenizer.decode(ids[ids >= 0]).split("user\n")[1].removesuffix("<|vision_start|>")
    conversation = policy.chat_format.conversation()
    conversation.add_observation({"text": asked, "images": [crops.images[0]]})
    text = processor.apply_chat_template(conversation.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[crops.images[0]], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 7, 7]]
    with torch.no_grad():
        keys = model(**inputs).count_keys[0, 0, :, 0]
        images, questions, _, _ = batch_tensors(crops, np.arange(1), reads=probe.reads)
        logits = probe(images, questions) - probe.bias  # (1, 14, 14) cells
    parts = logits.view(7, 2, 7, 2).permute(0, 2, 1, 3).reshape(-1)  # token-major, then each token's parts
    torch.testing.assert_close(keys, parts, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="holds no film probe"):
        train_probe("keys", crops, crops, tmp_path / "keys", minutes=5, steps=1, progress=False)
        attach_stem(tmp_path / "keys", DEFAULT_MODEL, tmp_path / "no")
