"""Token ids, loss mask and image tensors of one conversation, for SFT and for RL updates.

A conversation is a list of consecutive rendered text segments, each flagged "generated
by the policy" (trained on) or not: the prompt, each assistant turn (with its
``<|im_end|>``), each tool output as a continuation. `agents.traces.Trace.segments`
gives them for warm-start traces; a rollout gives the same pieces for trajectories.

`encode_segments` tokenizes each segment on its own and concatenates the ids, so every
boundary between trained and untrained tokens is exact; each segment goes through the
processor with the images its ``<|image_pad|>`` placeholders stand for, so the image
tokens are expanded exactly as the processor expands them. For a tokenizer whose
pre-tokenizer never merges across a segment boundary (Qwen2's pattern splits newlines,
and the chat markers are special tokens, so every boundary here, ``...assistant\\n`` |
``text``, ``...<|im_end|>`` | ``\\n<|im_start|>...``, is a split point) the ids equal the
processor's ids on the whole text; the tests check this. A boundary inside a word would
tokenize differently from the whole text: segments must start and end at such splits.
Only the first segment gets the tokenizer's added special tokens (a BOS, if it adds one);
a tokenizer that appends tokens after the text would differ from the whole-text ids.

`collate` pads a batch and adds ``labels`` (the ids where the loss mask is 1, -100
elsewhere, unshifted: Hugging Face causal language models shift them internally).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_IMAGE_TOKEN = "<|image_pad|>"
IGNORE_INDEX = -100


def _image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or DEFAULT_IMAGE_TOKEN


def _image_keys(processor: Any) -> tuple[str, ...]:
    """The processor's image tensor names (``pixel_values``, ``image_grid_thw`` for Qwen2-VL)."""
    image_processor = getattr(processor, "image_processor", None)
    names = getattr(image_processor, "model_input_names", None)
    if not names:
        raise ValueError(f"{type(processor).__name__} has no image_processor.model_input_names; "
                         "encode_segments needs a vision-language processor")
    return tuple(names)


def encode_segments(processor: Any, segments: Sequence[tuple[str, bool]],
                    images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Encode a conversation given as (text, trained) segments and its images in order.

    Returns torch tensors: ``input_ids`` [T], ``attention_mask`` [T], ``loss_mask`` [T]
    (1 on the tokens of trained segments, their ``<|im_end|>`` included; 0 on everything
    else), any other per-token tensor the processor returns (``mm_token_type_ids``) as [T],
    and the image tensors concatenated over segments (``pixel_values`` [patches, dim],
    ``image_grid_thw`` [images, 3]). `images` are ``(H, W, 3)`` uint8 arrays, one per
    ``<|image_pad|>`` placeholder of the segments.
    """
    import torch

    if not segments:
        raise ValueError("encode_segments needs at least one segment")
    token = _image_token(processor)
    image_keys = _image_keys(processor)
    wanted = sum(text.count(token) for text, _ in segments)
    if wanted != len(images):
        raise ValueError(f"the segments hold {wanted} {token} placeholders but {len(images)} images were given")
    per_token: dict[str, list[Any]] = {}
    per_image: dict[str, list[Any]] = {}
    masks = []
    used = 0
    for i, (text, trained) in enumerate(segments):
        if not text:
            raise ValueError(f"segment {i} is empty")
        n = text.count(token)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if n:
            kwargs["images"] = list(images[used:used + n])
        if i:
            kwargs["add_special_tokens"] = False
        out = processor(**kwargs)
        used += n
        length = out["input_ids"].shape[-1]
        for key, value in out.items():
            if key in image_keys:
                per_image.setdefault(key, []).append(value)
            else:
                if value.shape != (1, length):
                    raise ValueError(f"processor output {key!r} has shape {tuple(value.shape)}, expected "
                                     f"(1, {length}); is it an image tensor missing from "
                                     "image_processor.model_input_names?")
                per_token.setdefault(key, []).append(value[0])
        masks.append(torch.full((length,), int(bool(trained)), dtype=torch.long))
    encoded = {key: torch.cat(parts).long() for key, parts in per_token.items()}
    encoded["loss_mask"] = torch.cat(masks)
    encoded.update({key: torch.cat(parts, dim=0) for key, parts in per_image.items()})
    return encoded


def collate(batch: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad encoded conversations into batch tensors.

    1-D tensors (``input_ids``, ``attention_mask``, ``loss_mask``, ``mm_token_type_ids``) are
    padded to the longest sequence on `padding_side`: ids with `pad_id`, per-token ``*labels``
    (``count_labels``, ``count_token_labels``) with -100, the rest with 0.
    ``labels`` [B, T] are the ids where ``loss_mask`` is 1 and -100 elsewhere. Image tensors
    are concatenated along dim 0 in batch order, as Qwen2-VL models expect.
    """
    import torch

    if not batch:
        raise ValueError("collate needs at least one item")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for i, item in enumerate(batch):
        if "input_ids" not in item or "loss_mask" not in item:
            raise ValueError(f"batch item {i} lacks input_ids or loss_mask: encode it with encode_segments")
    longest = max(int(item["input_ids"].shape[0]) for item in batch)
    keys = list(dict.fromkeys(key for item in batch for key in item))
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch if key in item]
        if all(v.dim() == 1 for v in values):
            if len(values) != len(batch):
                raise ValueError(f"per-token tensor {key!r} is missing from some batch items")
            fill = pad_id if key == "input_ids" else IGNORE_INDEX if key.endswith("labels") else 0
            padded = torch.full((len(batch), longest), fill, dtype=values[0].dtype)
            for row, value in enumerate(values):
                n = value.shape[0]
                if padding_side == "right":
                    padded[row, :n] = value
                else:
                    padded[row, longest - n:] = value
            out[key] = padded
        else:
            out[key] = torch.cat(values, dim=0)
    ignore = torch.full_like(out["input_ids"], IGNORE_INDEX)
    out["labels"] = torch.where(out["loss_mask"].bool(), out["input_ids"], ignore)
    return out
