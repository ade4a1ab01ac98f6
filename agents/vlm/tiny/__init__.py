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

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig,
    PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

from agents.vlm.tiny.boxes import BoxVocab
from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig
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
                         **image_options: Any) -> TinyVLMProcessor:
    """The processor: the shipped tokenizer (or one at `tokenizer_path`) and an image processor.

    `boxes` swaps in the box tokens of another pointer grid or box sizes (the model's
    ``pointer_grid`` / ``box_sizes`` must match them). `image_options` override
    `TinyVLMImageProcessor` defaults (``size``, ``patch_size``, ...).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_path))
    if boxes is not None:
        from agents.vlm.tiny.build_tokenizer import with_box_tokens

        tokenizer = with_box_tokens(tokenizer, boxes)
    return TinyVLMProcessor(TinyVLMImageProcessor(**image_options), tokenizer, chat_template=tokenizer.chat_template)


def tiny_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> TinyVLMConfig:
    """A `TinyVLMConfig` whose token ids come from `tokenizer`; checks the box tokens match."""
    config = TinyVLMConfig(**overrides)
    boxes = BoxVocab(config.pointer_grid, tuple(config.box_sizes))
    start = len(tokenizer) - len(boxes)
    tail = tokenizer.convert_ids_to_tokens(list(range(start, len(tokenizer))))
    if tail != list(boxes.texts):
        raise ValueError(f"the tokenizer's last {len(boxes)} tokens are not the box vocabulary of grid "
                         f"{boxes.grid} and sizes {boxes.sizes}; rebuild it with agents.vlm.tiny.build_tokenizer")
    call = tokenizer(format_tool_call("crop_image", {"bbox_2d": list(boxes.boxes[0]), "target_image": 1}),
                     add_special_tokens=False).input_ids
    ids = {"vocab_size": len(tokenizer), "box_token_start_id": start, "box_slot_token_id": call[call.index(start) - 1],
           "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
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


__all__ = [
    "BoxVocab", "TOKENIZER_DIR", "TinyVLMCausalLMOutputWithPast", "TinyVLMConfig", "TinyVLMForConditionalGeneration",
    "TinyVLMImageProcessor", "TinyVLMModel", "TinyVLMPreTrainedModel", "TinyVLMProcessor", "build_tiny_model",
    "build_tiny_processor", "tiny_config",
]
