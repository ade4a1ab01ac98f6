"""Training encoding: segment-wise ids equal the processor's, the loss mask, collation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents.traces import Trace, TraceMix, synthesize_traces  # noqa: E402
from agents.vlm.encoding import IGNORE_INDEX, collate, encode_segments  # noqa: E402
from agents.vlm.tiny import build_tiny_processor  # noqa: E402

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    """Two single-pass, one recrop-once, one recrop-twice, two zoom-in and one textual trace."""
    return synthesize_traces("chart", 6, 1, mix=TraceMix(video_share=0.0), seed=5, progress=False)


def _qwen_style_processor(corpus: list[str]):
    """A Qwen2-VL processor (image tokens merged 2x2, ``mm_token_type_ids``) on a small BPE
    trained here with Qwen2's split pattern; no video processor (torchvision is absent)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    images = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="module", params=["tiny", "qwen2-vl", "qwen2-vl-with-bos"])
def processor(request, traces):
    """The tiny model's processor; a Qwen2-VL one; the same with a tokenizer that prepends a
    BOS token (which must open the sequence once, not every segment)."""
    if request.param == "tiny":
        return build_tiny_processor()
    processor = _qwen_style_processor([t.conversation.render() for t in traces])
    if request.param == "qwen2-vl-with-bos":
        from tokenizers.processors import TemplateProcessing

        bos = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        processor.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
        assert processor.tokenizer("a")["input_ids"][0] == bos
    return processor


def test_segment_ids_equal_the_processor_on_the_whole_text(processor, traces):
    for trace in traces:
        segments = trace.segments()
        encoded = encode_segments(processor, segments, trace.images)
        whole = processor(text=["".join(text for text, _ in segments)], images=trace.images, return_tensors="pt")
        assert set(encoded) == set(whole) | {"loss_mask"}
        image_keys = processor.image_processor.model_input_names
        for key, value in whole.items():
            expected = value if key in image_keys else value[0]
            assert torch.equal(encoded[key], expected.to(encoded[key].dtype)), key
        n_tokens = int(encoded["image_grid_thw"].prod(dim=1).sum())
        assert len(trace.images) == encoded["image_grid_thw"].shape[0]
        assert encoded["pixel_values"].shape[0] == n_tokens


def test_loss_mask_covers_the_trained_turns_and_their_end_of_turn(processor, traces):
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for trace in traces:
        segments = trace.segments()
        encoded = encode_segments(processor, segments, trace.images)
        ids, mask = encoded["input_ids"], encoded["loss_mask"].bool()
        trained_text = "".join(text for text, trained in segments if trained)
        assert tokenizer.decode(ids[mask], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False) == trained_text
        # one masked span per trained turn, each closed by <|im_end|>
        starts = torch.nonzero(mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).flatten()
        ends = torch.nonzero(mask & ~torch.cat([mask[1:], torch.tensor([False])])).flatten()
        assert len(starts) == sum(trace.trained)
        assert all(int(ids[e]) == end_of_turn for e in ends)
        assert not torch.any(ids[mask] == processor.image_token_id)
        untrained = tokenizer.decode(ids[~mask], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trace.kind != "text":
            assert "Here is the cropped image" in untrained and "Here is the cropped image" not in trained_text
        if trace.kind.startswith("image/recrop"):
            missed = trace.conversation.messages[2]["content"][0]["text"]
            assert missed in untrained and missed not in trained_text


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_masks_labels(side, traces):
    processor = build_tiny_processor()
    items = [encode_segments(processor, t.segments(), t.images) for t in traces[:3]]
    pad = processor.tokenizer.pad_token_id
    batch = collate(items, pad_id=pad, padding_side=side)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert torch.equal(batch["pixel_values"], torch.cat([item["pixel_values"] for item in items]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([item["image_grid_thw"] for item in items]))
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        span = slice(0, n) if side == "right" else slice(longest - n, longest)
        pad_span = slice(n, longest) if side == "right" else slice(0, longest - n)
        assert torch.equal(batch["input_ids"][row, span], item["input_ids"])
        assert torch.all(batch["input_ids"][row, pad_span] == pad)
        assert torch.all(batch["attention_mask"][row, pad_span] == 0) and torch.all(batch["attention_mask"][row, span] == 1)
        labels = batch["labels"][row, span]
        assert torch.equal(labels[item["loss_mask"].bool()], item["input_ids"][item["loss_mask"].bool()])
        assert torch.all(labels[~item["loss_mask"].bool()] == IGNORE_INDEX)
        assert torch.all(batch["labels"][row, pad_span] == IGNORE_INDEX)


def test_errors_say_what_is_wrong(traces):
    processor = build_tiny_processor()
    trace = traces[0]
    with pytest.raises(ValueError, match="placeholders"):
        encode_segments(processor, trace.segments(), trace.images[:-1])
    with pytest.raises(ValueError, match="at least one segment"):
        encode_segments(processor, [], [])
    item = encode_segments(processor, [("Hello", False), ("world<|im_end|>", True)], [])
    assert item["loss_mask"].tolist()[-1] == 1 and "pixel_values" not in item
    with pytest.raises(ValueError, match="padding_side"):
        collate([item], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="missing from some"):
        collate([item, {k: v for k, v in item.items() if k != "attention_mask"}], pad_id=0)
