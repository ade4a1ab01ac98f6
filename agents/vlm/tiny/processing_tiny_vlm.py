"""Image processor and processor of the tiny VLM (PIL and numpy only; no torchvision).

The image processor resizes each image to a square of ``g * patch_size`` pixels, with
``g = round(longest side / patch_size)`` clamped so that the square's side lies within
``size["shortest_edge"]`` and ``size["longest_edge"]`` (32 and 224 by default: the tiny
preset's 224-px views and crops become 14 x 14 = 196 tokens and its 112-px video frames
7 x 7 = 49), normalises to [-1, 1] and returns the patches flattened like Qwen2-VL's
(``pixel_values`` ``(total_patches, 3 * p * p)``, ``image_grid_thw`` ``(n_images, 3)``).
Squashing to a square keeps fractions of the width and height where they are, which is
what the box tokens speak in.

The processor is a standard `ProcessorMixin`: ``apply_chat_template`` renders the
Qwen2-VL template, ``__call__`` expands each ``<|image_pad|>`` into one token per patch
and tokenizes (left padding by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

IMAGE_TOKEN = "<|image_pad|>"


class TinyVLMImageProcessorKwargs(ImagesKwargs, total=False):
    """Options of `TinyVLMImageProcessor` beyond the standard image options.

    patch_size: pixels per image token side (``size`` bounds the side of the square).
    """

    patch_size: int


class TinyVLMImageProcessor(PilBackend):
    """Resize to a square token grid, normalise, and flatten into patches."""

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 16
    size = {"shortest_edge": 32, "longest_edge": 224}
    valid_kwargs = TinyVLMImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]

    def grid_side(self, height: int, width: int, patch_size: int | None = None,
                  size: SizeDict | dict | None = None) -> int:
        """Image tokens per side for an image of `height` x `width` pixels."""
        patch_size = patch_size or self.patch_size
        size = size if size is not None else self.size
        lo = max(1, -(-size["shortest_edge"] // patch_size))
        hi = size["longest_edge"] // patch_size
        if hi < lo:
            raise ValueError(f"size {dict(size)} leaves no whole number of {patch_size}-px patches per side")
        return int(min(max(round(max(height, width) / patch_size), lo), hi))

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Image tokens for an image of this size (used to plan prompts without images)."""
        options = images_kwargs or {}
        return self.grid_side(height, width, options.get("patch_size"), options.get("size")) ** 2

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size: SizeDict, resample: Any,
                    do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean: Any, image_std: Any,
                    patch_size: int, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        patches, grids = [], []
        for image in images:
            channels, height, width = image.shape
            side = self.grid_side(height, width, patch_size, size)
            if not do_resize and (height, width) != (side * patch_size,) * 2:
                raise ValueError(f"do_resize=False needs {side * patch_size}x{side * patch_size} images, got {width}x{height}")
            if do_resize:
                image = self.resize(image, SizeDict(height=side * patch_size, width=side * patch_size), resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            image = np.asarray(image, dtype=np.float32).reshape(channels, side, patch_size, side, patch_size)
            patches.append(image.transpose(1, 3, 0, 2, 4).reshape(side * side, channels * patch_size * patch_size))
            grids.append([1, side, side])
        return BatchFeature(
            data={"pixel_values": np.concatenate(patches), "image_grid_thw": np.asarray(grids, dtype=np.int64)},
            tensor_type=return_tensors,
        )


class TinyVLMProcessor(ProcessorMixin):
    """Image processor + tokenizer + the Qwen2-VL chat template, Qwen2.5-VL's interface."""

    def __init__(self, image_processor: TinyVLMImageProcessor | None = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        if tokenizer is None:
            raise ValueError("TinyVLMProcessor needs a tokenizer")
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """One ``<|image_pad|>`` per patch of image `image_idx`."""
        t, h, w = (int(v) for v in image_inputs["image_grid_thw"][image_idx])
        return self.image_token * (t * h * w)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        **kwargs: Any) -> list[str]:
        """Decode generated ids (box tokens decode to their bbox text)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
