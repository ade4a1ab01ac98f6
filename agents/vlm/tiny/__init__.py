"""The tiny from-scratch VLM, driven through transformers exactly like a Qwen2.5-VL checkpoint.

Importing this package registers the classes with the transformers Auto classes
(``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoModel``, ``AutoImageProcessor``,
``AutoProcessor``), so a saved tiny model loads with::

    import agents.vlm.tiny  # registers model_type "pxr_tiny_vlm"
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

with no remote code. A fresh one comes from `build_tiny_processor` and
`build_tiny_model`; the tokenizer files ship in ``agents/vlm/tiny/tokenizer/`` and are
rebuilt by ``python -m agents.vlm.tiny.build_tokenizer``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig,
    PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

from agents.vlm.tiny.boxes import BoxVocab
from agents.vlm.tiny.build_tokenizer import with_box_tokens, with_frame_tokens
from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig
from agents.vlm.tiny.frames import FrameWindows
from agents.vlm.tiny.modeling_tiny_vlm import (
    TinyVLMCausalLMOutputWithPast, TinyVLMForConditionalGeneration, TinyVLMModel, TinyVLMPreTrainedModel,
)
from agents.vlm.tiny.processing_tiny_vlm import TinyVLMImageProcessor, TinyVLMProcessor
from pxr_env.actions import format_tool_call

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")

AutoConfig.register(TinyVLMConfig.model_type, TinyVLMConfig, exist_ok=True)
AutoModel.register(TinyVLMConfig, TinyVLMModel, exist_ok=True)
AutoModelForImageTextToText.register(TinyVLMConfig, TinyVLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(TinyVLMConfig, image_processor_classes={"pil": TinyVLMImageProcessor}, exist_ok=True)
AutoProcessor.register(TinyVLMConfig, TinyVLMProcessor, exist_ok=True)


def build_tiny_processor(tokenizer_path: str | Path = TOKENIZER_DIR, boxes: BoxVocab | None = None,
                         frames: FrameWindows | None = None, **image_options: Any) -> TinyVLMProcessor:
    """The processor: the shipped tokenizer (or one at `tokenizer_path`) and an image processor.

    `boxes` swaps in the box tokens of another pointer grid or box sizes (the model's
    ``pointer_grid`` / ``box_sizes`` must match them); `frames` appends frame-window tokens
    (the model's ``frame_windows`` / ``max_frames`` must match them). `image_options` override
    `TinyVLMImageProcessor` defaults (``size``, ``patch_size``, ...).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_path))
    if boxes is not None:
        tokenizer = with_box_tokens(tokenizer, boxes)
    if frames is not None:
        tokenizer = with_frame_tokens(tokenizer, frames)
    return TinyVLMProcessor(TinyVLMImageProcessor(**image_options), tokenizer, chat_template=tokenizer.chat_template)


def frame_windows(config: TinyVLMConfig) -> FrameWindows | None:
    """The frame-window vocabulary a config asks for (None without ``frame_windows``)."""
    return FrameWindows(tuple(config.frame_windows), config.max_frames) if config.frame_windows else None


def digit_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens ``0`` .. ``9`` (the count head's digits); every number is written with them."""
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("the tokenizer has no single token for each digit 0-9")
    return ids


def tiny_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> TinyVLMConfig:
    """A `TinyVLMConfig` whose token ids come from `tokenizer`; checks the box tokens (then the
    frame-window tokens, with ``frame_windows``) are its last ones."""
    config = TinyVLMConfig(**overrides)
    boxes = BoxVocab(config.pointer_grid, tuple(config.box_sizes))
    windows = frame_windows(config)
    expected = list(boxes.texts) + list(windows.texts if windows else ())
    start = len(tokenizer) - len(expected)
    tail = tokenizer.convert_ids_to_tokens(list(range(start, len(tokenizer))))
    if tail != expected:
        raise ValueError(f"the tokenizer's last {len(expected)} tokens are not the box vocabulary of grid "
                         f"{boxes.grid} and sizes {boxes.sizes}" + (f" followed by the frame windows {windows}"
                                                                    if windows else "")
                         + "; rebuild it with agents.vlm.tiny.build_tokenizer (or build_tiny_processor)")
    call = tokenizer(format_tool_call("crop_image", {"bbox_2d": list(boxes.boxes[0]), "target_image": 1}),
                     add_special_tokens=False).input_ids
    ids = {"vocab_size": len(tokenizer), "box_token_start_id": start, "box_slot_token_id": call[call.index(start) - 1],
           "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
           "digit_token_ids": digit_token_ids(tokenizer),
           "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return TinyVLMConfig(**{**overrides, **ids})


def build_tiny_model(processor: TinyVLMProcessor | None = None, seed: int | None = None,
                     **overrides: Any) -> TinyVLMForConditionalGeneration:
    """A freshly initialised tiny VLM for `processor`'s tokenizer (the shipped one by default).

    `overrides` are `TinyVLMConfig` fields (``hidden_size``, ``num_hidden_layers``, ...);
    `seed` makes the initialisation reproducible.
    """
    tokenizer = (processor or build_tiny_processor()).tokenizer
    config = tiny_config(tokenizer, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = TinyVLMForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=64,
    )
    return model


def with_frame_windows(model: TinyVLMForConditionalGeneration, processor: TinyVLMProcessor,
                       lengths: Sequence[int], max_frames: int = 16,
                       ) -> tuple[TinyVLMForConditionalGeneration, TinyVLMProcessor]:
    """A saved tiny model and its processor with frame-window tokens added (`agents.vlm.tiny.frames`).

    The tokens are appended to the vocabulary, their embeddings and the frame pointer
    initialised as in a fresh model; every other weight is the model's, so its logits over
    the old vocabulary are unchanged (the new tokens take their share of the softmax).
    """
    if model.config.frame_windows:
        raise ValueError(f"the model already has frame windows {model.config.frame_windows}")
    windows = FrameWindows(tuple(lengths), max_frames)
    tokenizer = with_frame_tokens(processor.tokenizer, windows)
    config = TinyVLMConfig.from_dict({**model.config.to_dict(), "vocab_size": len(tokenizer),
                                      "frame_windows": list(windows.lengths), "max_frames": max_frames})
    grown = TinyVLMForConditionalGeneration(config).to(device=model.device, dtype=model.dtype)
    state = grown.state_dict()
    for name, value in model.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name][:value.shape[0]] = value
        else:
            state[name] = value
    grown.load_state_dict(state)
    grown.generation_config = copy.deepcopy(model.generation_config)
    return grown, TinyVLMProcessor(processor.image_processor, tokenizer, chat_template=processor.chat_template)


__all__ = [
    "BoxVocab", "TOKENIZER_DIR", "TinyVLMCausalLMOutputWithPast", "TinyVLMConfig", "TinyVLMForConditionalGeneration",
    "TinyVLMImageProcessor", "TinyVLMModel", "TinyVLMPreTrainedModel", "TinyVLMProcessor", "build_tiny_model",
    "build_tiny_processor", "digit_token_ids", "frame_windows", "tiny_config", "with_frame_windows",
]
