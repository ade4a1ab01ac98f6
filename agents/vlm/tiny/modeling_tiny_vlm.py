"""The tiny from-scratch VLM: image tokens + causal decoder + a pointer head for crop boxes.

Input layout is Qwen2-VL's: the processor expands each ``<|image_pad|>`` into one token
per image patch, ``pixel_values`` holds every image's patches flattened in order
(``(total_patches, 3 * patch * patch)``) and ``image_grid_thw`` each image's
``(1, grid_h, grid_w)``.

- **Vision.** The patches of each image are put back together and go through a conv
  stem (three stride-2 3x3 convs, then a patch-sized stride conv: one token per patch;
  with ``token_conv``, a 3x3 conv over the token grid after it; with ``stem_norm``, a
  GroupNorm after each conv but the last; with ``image_summary``, a conv branch over
  the token grid, max-pooled, adds one vector per image to all its tokens);
  fixed 2D sin/cos positions are added (rotary positions alone carry no absolute
  location, and pointing needs it); a few bidirectional layers mix the tokens of each
  image. The results replace the ``<|image_pad|>`` embeddings; with ``image_numbers``, a
  learned vector of each image's number in the input is added to its tokens.
- **Decoder.** Pre-norm causal transformer (RMSNorm, rotary positions, SwiGLU), KV cache
  through `transformers.DynamicCache`, LM head tied to the embeddings.
- **Pointer head.** The logits of the box tokens (the last ids of the vocabulary, see
  `agents.vlm.tiny.boxes`) are not rows of the LM head: for box (cell, size) the logit
  is ``q(h) . k(s_cell) / sqrt(d) + size_logit(h)[size] + size_bias[size]``, where ``h`` is
  the decoder state and ``s_cell`` the decoder's final state of the image token under the
  cell's centre, in the first image of the sequence (image 1: the tiny model crops only
  the original image). The location is copied from the image tokens, not memorised. The
  box logits join the ordinary logits in one softmax, so a box token's log-prob is read
  like any other token's. Rows without an image give the box tokens no mass, nor do
  positions whose input token is not the one a box follows (``box_slot_token_id``). Options add
  a pointer stem of its own, a gate of the keys by the question (``pointer_question``) or
  a question-match term per cell (``pointer_match``).
- **Frame pointer** (``frame_windows``). The frame-window tokens (after the box tokens, see
  `agents.vlm.tiny.frames`) get their logits from each frame's tokens: a key and a
  question-match term per token, log-sum-exp over the frame (`TinyVLMFramePointer`), at every
  position of a row whose input holds the frames they name.
- **Count head** (``count_head``). The digit tokens' logits get a term that counts what the
  decoder state asks for in the latest image before it: ``-g(h) (d - E)^2 / 2`` for digit
  ``d``, ``E`` the sum over that image's tokens of ``sigmoid(q(h) . k_t / sqrt(d) + b)``, the
  gate ``g`` starting small (`TinyVLMCountHead`). With ``count_stem`` the token logits come
  from a conv stem of the head's own over each image's pixels, shaped by the question's tokens
  (`TinyVLMQuestionStem`), instead of ``q(h) . k_t``.

The keys of image 1 are computed where its tokens are in the input and returned as
``pointer_keys`` / ``pointer_valid``; `generate` carries them to the decoding steps. A
forward whose input does not hold image 1 (a continuation on a cache) must be given them.
With ``box_slot_token_id`` set, box logits are computed at the box slots alone, and a
forward without a cache (``use_cache=False``) whose kept positions hold no slot skips the
keys (returned as zeros, invalid): a training step on text answers spends nothing on the
pointer (about 0.3 of a reading step's time).
Beam search is not supported (the carried keys are not reordered).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, can_return_tuple

from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig
from agents.vlm.tiny.frames import FrameWindows


@dataclass
class TinyVLMCausalLMOutputWithPast(ModelOutput):
    """Logits over the whole vocabulary (box and frame tokens included), the cache and the pointers' keys.

    `pointer_keys` is ``(batch, pointer_grid**2, key_width)`` (``pointer_dim``, then a match
    column and box-stem columns when the head has them); `pointer_valid` is
    ``(batch,)``, False for rows that have no image. With ``frame_windows``, `frame_keys` is
    ``(batch, max_frames, tokens, pointer_dim + 1)`` and `frame_valid` ``(batch, max_frames, tokens)``.
    With ``count_head``, `count_keys` is ``(batch, images, cells, pointer_dim)`` and `count_held`
    ``(batch, images, cells)`` (cells: tokens times ``count_subcells**2``, token-major);
    `count_expected` is ``(batch, kept positions)``, the head's ``E``, and `count_scores`
    ``(batch, kept positions, images, cells)`` the logits it sums.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    pointer_keys: torch.Tensor | None = None
    pointer_valid: torch.Tensor | None = None
    frame_keys: torch.Tensor | None = None
    frame_valid: torch.Tensor | None = None
    count_keys: torch.Tensor | None = None
    count_held: torch.Tensor | None = None
    count_expected: torch.Tensor | None = None
    count_scores: torch.Tensor | None = None


def sincos_2d(grid_h: int, grid_w: int, dim: int, ref_grid: int, device: torch.device) -> torch.Tensor:
    """Fixed 2D sin/cos positions ``(grid_h * grid_w, dim)`` of cell centres.

    Positions are measured in cells of a `ref_grid` x `ref_grid` partition, so images of
    any grid size get the same code at the same place of the image.
    """
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(grid_h, device=device, dtype=torch.float32) + 0.5) * (ref_grid / grid_h)
    xs = (torch.arange(grid_w, device=device, dtype=torch.float32) + 0.5) * (ref_grid / grid_w)
    y = (ys[:, None] * omega)[:, None, :].expand(grid_h, grid_w, quarter)
    x = (xs[:, None] * omega)[None, :, :].expand(grid_h, grid_w, quarter)
    emb = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1).reshape(grid_h * grid_w, 4 * quarter)
    return F.pad(emb, (0, dim - 4 * quarter))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TinyVLMRMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class TinyVLMAttention(nn.Module):
    """Multi-head attention (SDPA); rotary positions and a KV cache when given."""

    def __init__(self, config: TinyVLMConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: Cache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, width))


class TinyVLMMLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyVLMLayer(nn.Module):
    """Pre-norm transformer layer, used by both the image encoder and the decoder."""

    def __init__(self, config: TinyVLMConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = TinyVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyVLMAttention(config, layer_idx)
        self.post_attention_layernorm = TinyVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TinyVLMMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, rotary, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def conv_stem(config: TinyVLMConfig) -> nn.Sequential:
    """Whole images -> token grid ``(n, hidden, h, w)``: three stride-2 3x3 convs, a patch-sized
    stride conv (one token per patch), optionally a 3x3 conv over the token grid, GELUs between
    and, with ``stem_norm``, a GroupNorm after each conv but the last."""
    c = config.stem_channels
    convs = [nn.Conv2d(3, c, 3, stride=2, padding=1), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
             nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
             nn.Conv2d(4 * c, config.hidden_size, config.patch_size // 8, stride=config.patch_size // 8)]
    if config.token_conv:
        convs.append(nn.Conv2d(config.hidden_size, config.hidden_size, 3, padding=1))
    layers: list[nn.Module] = []
    for conv in convs[:-1]:
        layers += [conv, *((nn.GroupNorm(8, conv.out_channels),) if config.stem_norm else ()), nn.GELU()]
    return nn.Sequential(*layers, convs[-1])


def images_by_grid(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, patch_size: int
                   ) -> list[tuple[list[int], tuple[int, int, int], torch.Tensor]]:
    """Qwen-layout patches put back into whole images, batched by grid size.

    Returns ``(image indices, (t, h, w), images (n * t, 3, h * p, w * p))`` per distinct grid.
    """
    p = patch_size
    grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    counts = [t * h * w for t, h, w in grids]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {sum(counts)} patches but pixel_values has {pixel_values.shape[0]}")
    pieces = pixel_values.split(counts)
    by_grid: dict[tuple[int, int, int], list[int]] = {}
    for i, grid in enumerate(grids):
        by_grid.setdefault(grid, []).append(i)
    batches = []
    for (t, h, w), indices in by_grid.items():
        images = torch.stack([pieces[i] for i in indices]).view(len(indices) * t, h, w, 3, p, p)
        batches.append((indices, (t, h, w), images.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, h * p, w * p)))
    return batches


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PRIME = 65521  # keeps each term of the fingerprint below 2**32 and the sum far from overflow
_SAMPLE_STRIDE = 61  # the fingerprint reads every 61st element: cheap, and confirmed by a full comparison


def unique_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, ...)`` images -> ``(unique, inverse)`` with ``unique[inverse]`` equal to `images`.

    The G rollouts of one query share their first image, and a batch of them holds it G
    times; a branch run over `unique` and indexed by `inverse` computes it once (gradients
    flow back through the indexing to each copy's share). Copies are found by a
    fingerprint and confirmed equal element by element. The fingerprint is an integer sum
    over the pixels' bits, exact in any order of summation (a float projection is not: the
    same row gave other sums at other places in the batch).
    """
    flat = images.flatten(1)
    sampled = flat.detach()[:, ::_SAMPLE_STRIDE].contiguous()  # copies agree on every element, so on these too
    bits = sampled.view(_INT_OF_SIZE[flat.element_size()]).long() % _PRIME
    weights = torch.arange(1, sampled.shape[1] + 1, device=flat.device) % _PRIME
    fingerprints = (bits * weights).sum(1).tolist()
    kept: list[int] = []
    inverse: list[int] = []
    by_fingerprint: dict[int, list[int]] = {}
    for i, fingerprint in enumerate(fingerprints):
        same = by_fingerprint.setdefault(fingerprint, [])
        match = next((u for u in same if torch.equal(flat[kept[u]], flat[i])), None)
        if match is None:
            match = len(kept)
            same.append(match)
            kept.append(i)
        inverse.append(match)
    if len(kept) == len(fingerprints):
        return images, torch.arange(len(kept), device=images.device)
    return images[kept], torch.tensor(inverse, device=images.device)


def per_unique_image(branch: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """`branch` over a batch of images, each distinct image computed once (`unique_images`)."""
    unique, inverse = unique_images(images)
    out = branch(unique)
    return out if unique is images else out[inverse]


def run_per_image(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, which: list[int], patch_size: int,
                  branch: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """`branch` run over the images numbered ``which`` (batched by size, each distinct image
    once): one output per image, in the order of `which`."""
    pieces = pixel_values.split([int(t * h * w) for t, h, w in image_grid_thw.tolist()])
    chosen = torch.cat([pieces[i] for i in which])
    outputs: list[torch.Tensor] = [chosen[:0]] * len(which)
    for indices, _, images in images_by_grid(chosen, image_grid_thw[which], patch_size):
        result = per_unique_image(branch, images)
        for j, i in enumerate(indices):
            outputs[i] = result[j]
    return outputs


class TinyVLMImageSummary(nn.Module):
    """One vector per image from its token grid: two stride-2 3x3 convs (GroupNorm, GELU), max-pooled.

    Its receptive field spans the whole 14 x 14 grid, so a glyph covering many patches is
    seen whole, as a small CNN classifier sees it.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.GroupNorm(8, hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.GroupNorm(8, hidden), nn.GELU())
        self.out = nn.Linear(hidden, hidden)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """``(n, hidden, h, w)`` token grid -> ``(n, hidden)``."""
        return self.out(self.convs(grid).amax(dim=(2, 3)))


class TinyVLMVisionEncoder(nn.Module):
    """Patches -> image tokens: conv stem over each whole image, 2D sin/cos positions, bidirectional layers.

    The patches are put back together into images first, so the stem sees across patch
    borders (a 6-px object often straddles two or four patches). Its output is
    RMS-normalised before the fixed positions are added, so that content and position
    start at the same scale.
    """

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size
        self.ref_grid = config.pointer_grid
        self.stem = conv_stem(config)
        self.summary = TinyVLMImageSummary(config.hidden_size) if config.image_summary else None
        self.patch_norm = TinyVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(TinyVLMLayer(config) for _ in range(config.vision_num_layers))
        self.norm = TinyVLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``(total_patches, 3 * p * p)`` patches -> ``(total_patches, hidden)`` image tokens, in order."""
        pieces: list[torch.Tensor] = [pixel_values[:0]] * image_grid_thw.shape[0]
        for indices, (t, h, w), images in images_by_grid(pixel_values, image_grid_thw, self.patch_size):
            tokens = per_unique_image(self.frame_tokens, images).reshape(len(indices), t * h * w, -1)
            for j, i in enumerate(indices):
                pieces[i] = tokens[j]
        return torch.cat(pieces)

    def frame_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` frames of one grid size -> ``(n, tokens, hidden)`` image tokens."""
        grid = self.stem(images)
        if self.summary is not None:
            grid = grid + self.summary(grid)[:, :, None, None]
        tokens = self.patch_norm(grid.flatten(2).transpose(1, 2))
        h, w = grid.shape[-2:]
        tokens = tokens + sincos_2d(h, w, tokens.shape[-1], self.ref_grid, tokens.device).to(tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, mask=None)
        return self.norm(tokens)


class ZeroInitLinear(nn.Linear):
    """A linear map that starts at zero: a branch added to a model leaves its outputs as they were
    (also when the branch is new to a saved checkpoint and initialised at load)."""


class TinyVLMPointerHead(nn.Module):
    """Box-token logits: pointer (query . key over image 1's cells) plus a size logit.

    With ``pointer_stem`` the head has its own conv stem over image 1's pixels; its token
    grid, through ``stem_out`` (zero at the start), is added to the decoder states the keys
    are made from. Pointing then has features of its own to shape while the image encoder
    (and so what the decoder reads) stays as it is, e.g. frozen after vision pretraining.

    With ``pointer_match`` each cell's logit gets a question-match term ``(A u) . f_cell``:
    ``f_cell`` comes from per-pixel features of image 1, max-pooled over the cell (a small
    object's colour survives the pooling) and mixed with the neighbouring cells by two 3x3
    convs, or (``pointer_match_features="encoder"``) from the image encoder's token under the
    cell through a linear map; ``u`` is the end of the question and ``A`` starts at zero.
    With ``"both"`` the cell gets both terms, each with its own ``A`` (``match_question`` for
    the pixels, ``match_token_question`` for the encoder's tokens), so that a colour (a bar)
    and a word the encoder names (a panel's heading) can each find their cells. With
    ``pointer_match_encoder`` the encoder term reads ``match_encoder``, an image encoder of the
    head's own, and the model's encoder (what the decoder reads) is left to reading.
    The term is kept as one more key column, so cached keys carry it through generation.

    With ``pointer_box_stem`` each box (cell and size) also gets a logit of `box_stem`, a
    `TinyVLMQuestionStem` over image 1's pixels and the question's tokens: one logit per part of
    a token (a cell) and box size. It reads the question while its features are made, and its
    inputs are the image and the question alone, so it can be pretrained apart from the decoder
    (`agents.box_stem`). Its logits are the last ``len(box_sizes)`` key columns.
    """

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.stem = conv_stem(config) if config.pointer_stem else None
        self.stem_out = ZeroInitLinear(config.hidden_size, config.hidden_size, bias=False) if config.pointer_stem else None
        self.grid = config.pointer_grid
        self.subcells = config.pointer_subcells
        self.num_sizes = len(config.box_sizes)
        self.query = nn.Linear(config.hidden_size, config.pointer_dim, bias=False)
        self.key = nn.Linear(config.hidden_size, config.pointer_dim * self.subcells ** 2, bias=False)
        self.size = nn.Linear(config.hidden_size, self.num_sizes, bias=False)
        self.size_bias = nn.Parameter(torch.zeros(self.num_sizes))
        self.question = ZeroInitLinear(config.hidden_size, config.pointer_dim, bias=False) if config.pointer_question else None
        self.match_pixels = self.match_cells = self.match_question = None
        self.match_tokens = self.match_token_question = None
        sources = {"pixels": ("pixels",), "encoder": ("encoder",), "both": ("pixels", "encoder")}
        self.match_sources = sources[config.pointer_match_features] if config.pointer_match else ()
        if "pixels" in self.match_sources:
            c = config.stem_channels
            self.match_pixels = nn.Sequential(nn.Conv2d(3, c, 1), nn.GELU(), nn.Conv2d(c, c, 1))
            self.match_cells = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                                             nn.Conv2d(c, config.pointer_dim, 3, padding=1))
            self.match_question = ZeroInitLinear(config.hidden_size, config.pointer_dim, bias=False)
        if "encoder" in self.match_sources:
            self.match_tokens = nn.Linear(config.hidden_size, config.pointer_dim, bias=False)
            self.match_token_question = ZeroInitLinear(config.hidden_size, config.pointer_dim, bias=False)
        self.match_encoder = TinyVLMVisionEncoder(config) if config.pointer_match_encoder else None
        self.box_stem = (TinyVLMQuestionStem(config, self.subcells ** 2 * self.num_sizes)
                         if config.pointer_box_stem else None)
        self.key_width = (config.pointer_dim + (1 if config.pointer_match else 0)
                          + (self.num_sizes if config.pointer_box_stem else 0))
        self.num_boxes = config.pointer_grid ** 2 * self.num_sizes

    def cell_index(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For each pointer cell (row-major), the index of the image token under its centre and
        which of that token's ``subcells x subcells`` parts the centre falls in (row-major)."""
        centres = (torch.arange(self.grid, device=device, dtype=torch.float32) + 0.5) / self.grid

        def split(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            position = centres * size
            whole = position.long().clamp(max=size - 1)
            return whole, ((position - whole) * self.subcells).long().clamp(0, self.subcells - 1)

        (rows, sub_rows), (cols, sub_cols) = split(grid_h), split(grid_w)
        tokens = (rows[:, None] * grid_w + cols[None, :]).reshape(-1)
        parts = (sub_rows[:, None] * self.subcells + sub_cols[None, :]).reshape(-1)
        return tokens, parts

    def stem_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` images -> the stem's ``(n, tokens, hidden)`` features, as added to the keys' states."""
        return self.stem_out(self.stem(images).flatten(2).transpose(1, 2))

    def match_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` images -> ``(n, cells, dim)`` features of the match term: per-pixel features
        max-pooled over each pointer cell, then mixed with the neighbouring cells."""
        pooled = F.adaptive_max_pool2d(self.match_pixels(images), self.grid)
        return self.match_cells(pooled).flatten(2).transpose(1, 2)

    def box_stem_cells(self, logits: torch.Tensor, tokens: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """``(T, parts * sizes)`` `box_stem` logits of one image's tokens, and each cell's token and
        part (`cell_index`) -> ``(cells, sizes)`` the cells' box logits."""
        return logits.view(logits.shape[0], self.subcells ** 2, self.num_sizes)[tokens, parts]

    def keys(self, states: torch.Tensor, parts: torch.Tensor, asked: torch.Tensor,
             match_cells: Mapping[str, torch.Tensor] | None = None,
             box_cells: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, cells, hidden)`` image-token states, ``(B, cells)`` part numbers, ``(B, hidden)``
        states before image 1 and, with ``pointer_match``, ``(B, cells, dim)`` match features
        per source (``"pixels"``: `match_features`; ``"encoder"``: `match_tokens` of the
        encoder's token under each cell) -> ``(B, cells, key_width)`` keys.

        With ``pointer_subcells`` s > 1 an image token gives s*s keys, one per part, so that
        the cells of a pointer grid finer than the token grid are told apart by content.
        With ``pointer_question`` the keys are gated by `asked` (the end of the question).
        With ``pointer_match`` the next column is each cell's question-match term; with
        ``pointer_box_stem`` the last ``sizes`` columns are `box_cells`, ``(B, cells, sizes)``.
        """
        keys = self.key(states).unflatten(-1, (self.subcells ** 2, -1))
        keys = keys.gather(2, parts[..., None, None].expand(-1, -1, 1, keys.shape[-1])).squeeze(2)
        if self.question is not None:
            keys = keys * (1 + self.question(asked))[:, None, :]
        columns = [keys]
        if self.match_sources:
            missing = [source for source in self.match_sources if source not in (match_cells or {})]
            if missing:
                raise ValueError(f"pointer_match needs the {missing} match features of image 1's cells")
            maps = {"pixels": self.match_question, "encoder": self.match_token_question}
            match = sum(torch.einsum("bd,bcd->bc", maps[source](asked), match_cells[source])
                        for source in self.match_sources) / math.sqrt(self.query.out_features)
            columns.append(match[..., None])
        if self.box_stem is not None:
            if box_cells is None:
                raise ValueError("pointer_box_stem needs the box stem's logits of image 1's cells")
            columns.append(box_cells.to(keys.dtype))
        return torch.cat(columns, dim=-1) if len(columns) > 1 else keys

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)`` states and ``(B, cells, key_width)`` keys -> ``(B, L, cells * sizes)`` logits."""
        q = self.query(hidden)
        d = q.shape[-1]
        cells = torch.einsum("bld,bcd->blc", q, keys[..., :d]) / math.sqrt(d)
        if self.match_sources:
            cells = cells + keys[:, None, :, d]
        sizes = self.size(hidden) + self.size_bias
        logits = cells[..., :, None] + sizes[..., None, :]
        if self.box_stem is not None:
            logits = logits + keys[:, None, :, -self.num_sizes:]
        return logits.flatten(-2).masked_fill(~valid[:, None, None], torch.finfo(logits.dtype).min)


FRAME_MATCH_CHANNELS = 8
"""Channels of the frame pointer's per-pixel match features: they run over every pixel of 16
frames per item, where the box pointer's run over one image; with the stem's 32 a step of frame
choice took twice as long (6.5 s against 3.2 s for 16 items), and a colour needs few channels."""


class TinyVLMFramePointer(nn.Module):
    """Frame-window logits (`agents.vlm.tiny.frames`): a pointer over the tokens of the input's frames.

    Token t of the input's f-th image (f up to ``max_frames``) scores ``q(h) . k_t / sqrt(d) + m_t``:
    ``k_t`` a key of its decoder state, ``m_t = (A u) . g_t / sqrt(d)`` a question-match term
    like the box pointer's (``g_t``: per-pixel features max-pooled over the token's patch and
    mixed with its neighbours; ``A`` starts at zero). ``u`` pools the states of the text before
    image 1 with learned weights (uniform at the start): with frame labels and options, the
    state just before image 1 is far from the word that names the object (docs/results.md).
    Frame f scores the log-sum-exp over its tokens, so the token that both matches what the
    question names and shows the event decides; a window takes the mean of its frames' scores
    plus a bias per window length. The keys and match terms are kept as
    ``(B, max_frames, tokens, dim + 1)`` so that generation carries them like the box keys.
    """

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.windows = FrameWindows(tuple(config.frame_windows), config.max_frames)
        self.max_frames, self.patch_size = config.max_frames, config.patch_size
        c = FRAME_MATCH_CHANNELS
        self.query = nn.Linear(config.hidden_size, config.pointer_dim, bias=False)
        self.key = nn.Linear(config.hidden_size, config.pointer_dim, bias=False)
        self.match_pixels = nn.Sequential(nn.Conv2d(3, c, 1), nn.GELU(), nn.Conv2d(c, c, 1))
        self.match_tokens = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                                          nn.Conv2d(c, config.pointer_dim, 3, padding=1))
        self.match_question = ZeroInitLinear(config.hidden_size, config.pointer_dim, bias=False)
        self.question_pool = ZeroInitLinear(config.hidden_size, 1, bias=False)
        self.length_bias = nn.Parameter(torch.zeros(len(self.windows.lengths)))

    def members(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(windows, max_frames)``: 1 / length on the frames of each window, 0 elsewhere (made
        here, not kept as a buffer: non-persistent buffers are not restored by `from_pretrained`)."""
        members = torch.zeros(len(self.windows), self.max_frames, device=device, dtype=dtype)
        for w, frames in enumerate(self.windows.frames):
            members[w, [f - 1 for f in frames]] = 1.0 / len(frames)
        return members

    def pixel_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``(image tokens, dim)`` match features of every image token, in the order of the input's image tokens."""
        def branch(images: torch.Tensor) -> torch.Tensor:
            pooled = F.max_pool2d(self.match_pixels(images), self.patch_size)
            return self.match_tokens(pooled).flatten(2).transpose(1, 2)

        every = list(range(len(image_grid_thw)))
        return torch.cat(run_per_image(pixel_values, image_grid_thw, every, self.patch_size, branch))

    def keys(self, hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, pad_token_id: int | None,
             pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, hidden)`` states of `input_ids` and its images -> ``(B, max_frames, T, dim + 1)``
        keys with the match term last, and ``(B, max_frames, T)``: which tokens the input holds
        (T: the most tokens of one frame)."""
        is_image = input_ids == image_token_id
        starts = image_starts(is_image)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        first = torch.where(starts.any(-1), starts.float().argmax(-1), input_ids.shape[1])
        text = (positions < first[:, None]) & (input_ids != pad_token_id)
        text[:, 0] |= ~text.any(-1)
        weights = self.question_pool(hidden).squeeze(-1).masked_fill(~text, float("-inf")).softmax(-1)
        asked = torch.einsum("bl,blh->bh", weights, hidden)
        features = hidden.new_zeros(*input_ids.shape, self.match_tokens[-1].out_channels)
        features = features.masked_scatter(is_image[..., None], self.pixel_features(pixel_values.to(hidden.dtype),
                                                                                   image_grid_thw))
        scale = math.sqrt(self.query.out_features)
        match = torch.einsum("bd,bld->bl", self.match_question(asked), features) / scale
        keys = torch.cat([self.key(hidden), match[..., None]], dim=-1)
        return image_slots(keys, is_image, self.max_frames)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)`` states, keys and held tokens from `keys` -> ``(B, L, windows)`` logits."""
        q = self.query(hidden)
        tokens = torch.einsum("bld,bftd->blft", q, keys[..., :-1]) / math.sqrt(q.shape[-1]) + keys[:, None, ..., -1]
        low = torch.finfo(tokens.dtype).min
        frames = tokens.masked_fill(~held[:, None], low).logsumexp(-1)
        present = held.any(-1)
        frames = frames.masked_fill(~present[:, None], 0.0)
        members = self.members(frames.device, frames.dtype)
        lengths = torch.tensor([self.windows.lengths.index(len(f)) for f in self.windows.frames], device=frames.device)
        logits = frames @ members.T + self.length_bias[lengths]
        complete = ((~present).to(frames.dtype) @ (members > 0).to(frames.dtype).T) == 0
        return logits.masked_fill(~complete[:, None, :], low)


COUNT_BIAS = -2.0
"""Initial density logit of the count head: each token starts holding 0.12 of a counted thing."""
COUNT_GATE = 0.1
"""Initial gate of the count head. At zero the head would never start: the gate grows only once
the count follows the answers, and the keys learn only through the gate."""


def question_mask(input_ids: torch.Tensor, image_token_id: int, end_token_id: int | list[int] | None,
                  pad_token_id: int | None) -> torch.Tensor:
    """``(B, L)``: the text of each row's first message that holds an image, up to its first image
    (after the last `end_token_id` before it, ``<|im_end|>``, or the first of a list; pads left
    out). In the layout that puts the question before the image
    (`agents.vlm.chat.ChatFormat.question_first`) that is the question, with the constant
    ``<|im_start|>user`` and ``<|vision_start|>`` around it."""
    before = (input_ids == image_token_id).long().cumsum(-1) == 0
    mask = before
    if isinstance(end_token_id, list):
        end_token_id = end_token_id[0] if end_token_id else None
    if end_token_id is not None:
        ends = ((input_ids == end_token_id) & before).long()
        mask = mask & (ends.flip(-1).cumsum(-1).flip(-1) == 0)
    if pad_token_id is not None:
        mask = mask & (input_ids != pad_token_id)
    return mask


QUESTION_STEM_FILMED = (1, 2, 3)
"""The convs of `TinyVLMQuestionStem` after which the question's scale and shift apply (0-based)."""


class TinyVLMQuestionStem(nn.Module):
    """Eyes of a head of its own: per part of each image token, logits of what the question asks.

    The count head's (``count_stem``: one logit per part, whether it holds an asked thing) and
    the box pointer's (``pointer_box_stem``: one logit per part and box size, how well a box of
    that size centred there holds the evidence) are both of this form.

    The warm start's stride-2 stem layout (three 3x3 convs, a patch-sized stride conv, a 3x3 conv
    over the token grid; GroupNorm and GELU after each) with the question's scale and shift
    (FiLM) after the 2nd, 3rd and 4th conv, then a 1x1 conv to `outputs` logits per token (the
    count head's: one per part, ``count_subcells**2`` row-major). The question is the sum of embeddings of its tokens
    (`question_mask`), mapped to each FiLM by a linear map that starts at zero. Read while the
    features are made, the question taught a stem of this size the asked things past the
    answer-only bound where a query meeting the finished features at the end was slower
    (docs/results.md, `agents.count_stem_probe`). Its inputs are the question's token ids and
    the images alone, so it can be pretrained apart from the decoder.
    """

    def __init__(self, config: TinyVLMConfig, outputs: int) -> None:
        super().__init__()
        c, hidden = config.stem_channels, config.hidden_size
        shapes = [(3, c, 3, 2), (c, 2 * c, 3, 2), (2 * c, 4 * c, 3, 2),
                  (4 * c, hidden, config.patch_size // 8, config.patch_size // 8), (hidden, hidden, 3, 1)]
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2 if k == 3 else 0), nn.GroupNorm(8, cout),
                          nn.GELU()) for cin, cout, k, stride in shapes)
        self.words = nn.Embedding(config.vocab_size, config.pointer_dim)
        self.film = nn.ModuleList(ZeroInitLinear(config.pointer_dim, 2 * shapes[i][1]) for i in QUESTION_STEM_FILMED)
        self.out = nn.Conv2d(hidden, outputs, 1)

    def question(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids and which are the question -> ``(B, pointer_dim)``: their embeddings summed."""
        return (self.words(input_ids) * mask[..., None]).sum(1)

    def forward(self, images: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` images and ``(n, pointer_dim)`` questions -> ``(n, outputs, h, w)``
        logits per token."""
        x = images
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i in QUESTION_STEM_FILMED:
                scale, shift = self.film[QUESTION_STEM_FILMED.index(i)](question).chunk(2, dim=-1)
                x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        return self.out(x)

    def token_logits(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, patch_size: int,
                     questions: torch.Tensor) -> torch.Tensor:
        """Qwen-layout patches and ``(images, pointer_dim)`` each image's question ->
        ``(total_patches, outputs)``: the logits of each image token, in order."""
        pieces: list[torch.Tensor] = [pixel_values[:0]] * image_grid_thw.shape[0]
        for indices, (t, _, _), images in images_by_grid(pixel_values, image_grid_thw, patch_size):
            asked = questions[indices].repeat_interleave(t, dim=0)
            logits = self(images, asked).flatten(2).transpose(1, 2)  # (n * t, tokens, parts)
            for j, i in enumerate(indices):
                pieces[i] = logits[j * t:(j + 1) * t].flatten(0, 1)
        return torch.cat(pieces)


class TinyVLMCountHead(nn.Module):
    """A count of what the question names, added to the logits of the digit tokens.

    At each position, every token t of the latest image before it holds one of the things
    asked for with probability ``p_t = sigmoid(q(h) . k_t / sqrt(d) + b)`` (``k_t`` a key of the
    token's decoder state), and ``E = sum_t p_t`` is their expected number. Digit ``d`` gets
    ``-g(h) (d - E)^2 / 2``: with the gate ``g`` (its weights zero and its bias `COUNT_GATE` at the
    start) a Gaussian around ``E``. Softmax attention averages what it attends to, and a
    tiny decoder taught counts by their answers alone read 0.30-0.34 of the oracle's crops
    after 1,000-2,100 steps (docs/results.md); the sum here is a count by construction, and what is left to
    learn is which tokens hold what is asked, as the box pointer learns where it is. With
    ``count_subcells`` s > 1 each token gives s*s keys, one per part of it (row-major), and the
    sum runs over the parts: two things whose centres share a token are both counted. Counts of
    two or more digits are not covered (each digit token gets the same term).

    With ``count_stem`` a part's logit is ``c_t + b``, ``c_t`` from `TinyVLMQuestionStem` over the
    image's pixels and the question's tokens, the same at every position: the key of a part is
    then that one logit (so cached keys carry it through generation), and the head has no query.
    """

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        if len(config.digit_token_ids) != 10:
            raise ValueError("count_head needs digit_token_ids: the ids of '0'..'9' (tiny_config sets them)")
        self.parts = config.count_subcells ** 2
        self.stem = TinyVLMQuestionStem(config, self.parts) if config.count_stem else None
        self.query = None if config.count_stem else nn.Linear(config.hidden_size, config.pointer_dim, bias=False)
        self.key = None if config.count_stem else nn.Linear(config.hidden_size, config.pointer_dim * self.parts,
                                                            bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        self.gate = ZeroInitLinear(config.hidden_size, 1)

    def keys(self, hidden: torch.Tensor, input_ids: torch.Tensor, config: TinyVLMConfig,
             pixel_values: torch.Tensor | None = None,
             image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, hidden)`` states -> ``(B, images, T * parts, dim)`` keys of each image's token
        parts (token-major; ``dim`` 1 with ``count_stem``, whose stem reads `pixel_values`) and
        ``(B, images, T * parts)``: which the input holds (T: the most tokens of one image)."""
        is_image = input_ids == config.image_token_id
        if self.stem is None:
            values = self.key(hidden)
        else:
            values = hidden.new_zeros(*input_ids.shape, self.parts)
            if bool(is_image.any()):
                if pixel_values is None or image_grid_thw is None:
                    raise ValueError("count_stem needs the pixel_values and image_grid_thw of the images in input_ids")
                mask = question_mask(input_ids, config.image_token_id, config.eos_token_id, config.pad_token_id)
                questions = self.stem.question(input_ids, mask)
                rows = image_starts(is_image).nonzero()[:, 0]  # each image's row, in input order
                values[is_image] = self.stem.token_logits(pixel_values.to(hidden.dtype), image_grid_thw,
                                                          config.patch_size, questions[rows]).to(hidden.dtype)
        slots, held = image_slots(values, is_image)
        return slots.unflatten(-1, (self.parts, -1)).flatten(2, 3), held.repeat_interleave(self.parts, dim=-1)

    def scores(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)`` states -> ``(B, L, images, T * parts)`` logits that each image token
        part holds what the position asks for."""
        if self.query is None:
            return (keys[..., 0] + self.bias)[:, None].expand(-1, hidden.shape[1], -1, -1)
        q = self.query(hidden)
        return torch.einsum("bld,bitd->blit", q, keys) / math.sqrt(q.shape[-1]) + self.bias

    @staticmethod
    def expected(scores: torch.Tensor, held: torch.Tensor, latest: torch.Tensor) -> torch.Tensor:
        """`scores`, ``(B, images, T * parts)`` held parts and ``(B, L)`` the number of each position's
        latest image (0: none yet) -> ``(B, L)`` ``E``, the expected count in that image (0 where
        none precedes)."""
        counts = (torch.sigmoid(scores) * held[:, None]).sum(-1)  # (B, L, images)
        picked = counts.gather(-1, (latest - 1).clamp(min=0)[..., None]).squeeze(-1)
        return picked * (latest > 0)

    def forward(self, hidden: torch.Tensor, expected: torch.Tensor, latest: torch.Tensor) -> torch.Tensor:
        """States, ``E`` (`expected`) and latest images ``(B, L)`` -> ``(B, L, 10)`` terms for the
        digits 0-9 (zero where no image precedes)."""
        digits = torch.arange(10, device=hidden.device, dtype=hidden.dtype)
        term = -0.5 * self.gate(hidden) * (digits - expected[..., None]) ** 2
        return term * (latest > 0)[..., None]


class TinyVLMTextHead(nn.Linear):
    """The LM head, tied to the embeddings, whose output is the logits of the text tokens alone.

    The box tokens' rows (the last of the vocabulary) go unused: the pointer head gives those
    logits. Over all rows the head took about 0.16 s of a 1.4 s float32 reading step (batch
    32, one AVX2 core). It stays a module, so hooks on the output embeddings see its input.
    """

    def __init__(self, hidden_size: int, vocab_size: int, text_rows: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
        self.text_rows = text_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight[:self.text_rows])


def image_starts(is_image: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the first token of each run of image tokens (one run is one image)."""
    return is_image & ~F.pad(is_image, (1, 0))[:, :-1]


def image_index(is_image: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: for each image token the number of its image in the row (1, 2, ...); 0 for text."""
    return image_starts(is_image).long().cumsum(-1) * is_image


def image_slots(values: torch.Tensor, is_image: torch.Tensor,
                images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, D)`` values of each token -> ``(B, images, T, D)``: those of each image's tokens in
    order, and ``(B, images, T)``: which slots the input holds (T: the most tokens of one image).
    Images past `images` are left out; None: as many as a row holds."""
    starts = image_starts(is_image)
    number = image_index(is_image)
    if images is None:
        images = max(int(number.max()), 1)
    number = torch.where(number <= images, number, 0)  # 0: text and later images
    positions = torch.arange(is_image.shape[1], device=is_image.device).expand_as(is_image)
    within = positions - torch.where(starts, positions, 0).cummax(-1).values
    within = torch.where(number > 0, within, 0)
    tokens = int(within.max()) + 1
    index = number * tokens + within
    slots = values.new_zeros(is_image.shape[0], (images + 1) * tokens, values.shape[-1])
    slots = slots.scatter(1, index[..., None].expand_as(values), values).unflatten(1, (images + 1, tokens))
    held = torch.zeros(is_image.shape[0], (images + 1) * tokens, dtype=torch.bool, device=is_image.device)
    held = held.scatter(1, index, number > 0).unflatten(1, (images + 1, tokens))
    return slots[:, 1:], held[:, 1:]


class ImageNumbers(nn.Embedding):
    """Row k: the vector added to the tokens of the input's k-th image; row 0 (text, and
    images past the last row) stays zero. Starts at zero, so a saved model given it is unchanged."""

    def __init__(self, count: int, hidden_size: int) -> None:
        super().__init__(count + 1, hidden_size, padding_idx=0)

    def forward(self, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
        is_image = input_ids == image_token_id
        number = image_index(is_image)
        return super().forward(torch.where(number < self.num_embeddings, number, 0))


class TinyVLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by the tiny VLM classes."""

    config: TinyVLMConfig
    config_class = TinyVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TinyVLMLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, (ZeroInitLinear, ImageNumbers)):
            init.zeros_(module.weight)
        elif isinstance(module, TinyVLMPointerHead):
            # Start with as much mass on all box tokens together as on one ordinary token.
            init.constant_(module.size_bias, -math.log(self.config.num_boxes))
            if module.box_stem is not None:  # a new box stem starts adding nothing
                init.zeros_(module.box_stem.out.weight)
                init.zeros_(module.box_stem.out.bias)
        elif isinstance(module, TinyVLMFramePointer):
            init.constant_(module.length_bias, -math.log(self.config.num_frame_tokens))
        elif isinstance(module, TinyVLMQuestionStem):
            # the question's sum over about a dozen tokens starts near unit scale
            init.normal_(module.words.weight, std=0.3)
        elif isinstance(module, TinyVLMCountHead):
            init.constant_(module.bias, COUNT_BIAS)
            init.constant_(module.gate.bias, COUNT_GATE)


class TinyVLMModel(TinyVLMPreTrainedModel):
    """Embeddings, image encoder and decoder; returns the final (normed) hidden states."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision = TinyVLMVisionEncoder(config)
        self.image_numbers = ImageNumbers(config.image_numbers, config.hidden_size) if config.image_numbers else None
        self.layers = nn.ModuleList(TinyVLMLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TinyVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image tokens put in place of ``<|image_pad|>``."""
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.config.image_token_id
        n_slots = int(image_mask.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return embeds
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw (the processor returns both)")
        features = self.vision(pixel_values.to(embeds.dtype), image_grid_thw)
        if features.shape[0] != n_slots:
            raise ValueError(f"input_ids hold {n_slots} image tokens but the images give {features.shape[0]}")
        embeds = embeds.masked_scatter(image_mask[..., None], features)
        if self.image_numbers is not None:
            embeds = embeds + self.image_numbers(input_ids, self.config.image_token_id)
        return embeds

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin ``(B, 1, L, head_dim)`` for the positions (computed, not stored as buffers)."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (self.config.rope_base ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (batch, past + length):
            raise ValueError(f"attention_mask must be (batch, cached + new) = {(batch, past + length)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None].expand(batch, -1)
        image_tokens = (input_ids == self.config.image_token_id
                        if self.config.bidirectional_images and input_ids is not None else None)
        mask = _decoder_mask(attention_mask, length, past, inputs_embeds.device, image_tokens)
        rotary = self.rotary(position_ids, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, mask, rotary, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None)


def _decoder_mask(attention_mask: torch.Tensor | None, length: int, past: int, device: torch.device,
                  image_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean ``(B, 1, length, past + length)`` mask: causal, padding masked, each token sees itself.

    With `image_tokens` ``(B, length)`` (the new image tokens), the tokens of each image also
    see each other both ways; a run of them is one image (an image's tokens always arrive in
    one forward pass, so runs never straddle the cache).
    """
    q_pos = torch.arange(past, past + length, device=device)
    k_pos = torch.arange(past + length, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]
    if image_tokens is not None and length > 1:
        block = image_index(image_tokens)
        same = (block[:, :, None] == block[:, None, :]) & image_tokens[:, :, None]
        allowed = allowed | F.pad(same, (past, 0))
    if attention_mask is None:
        return allowed[:, None] if length > 1 else None
    allowed = allowed & attention_mask.bool()[:, None, :]
    # A padding query would otherwise see nothing (NaN in SDPA); its output is unused.
    allowed = allowed | (k_pos[None, None, :] == q_pos[None, :, None])
    return allowed[:, None]


class TinyVLMForConditionalGeneration(TinyVLMPreTrainedModel, GenerationMixin):
    """The tiny VLM with its LM head and pointer head; drive it like Qwen2.5-VL through transformers."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        if config.box_token_start_id is None or config.image_token_id is None:
            raise ValueError("config.box_token_start_id and config.image_token_id must be set; "
                             "build the model with agents.vlm.tiny.build_tiny_model")
        self.model = TinyVLMModel(config)
        self.lm_head = TinyVLMTextHead(config.hidden_size, config.vocab_size, text_rows=config.box_token_start_id)
        self.pointer = TinyVLMPointerHead(config)
        self.frames = TinyVLMFramePointer(config) if config.frame_windows else None
        self.count = TinyVLMCountHead(config) if config.count_head else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`; beam search is refused (the pointer keys are not reordered)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or generation_config.num_beams or 1) > 1:
            raise ValueError("the tiny VLM does not support beam search; use greedy decoding or sampling")
        return super().generate(*args, **kwargs)

    def prefix_cache(self, prefix_ids: torch.Tensor, batch_size: int) -> DynamicCache:
        """KV cache of one text prefix shared by a batch (the system prompt), computed once.

        Continue with ``input_ids`` = each row's rest, left-padded, and
        ``attention_mask = cat([ones(batch, prefix_len), rest_mask], 1)``: positions and
        logits are those of the whole sequences. Under ``torch.no_grad()`` this gives a
        detached prefix: training then skips the prefix's share of the compute (about 410
        of ~640 tokens for a one-image prompt with the standard tool prompt), and its
        gradient.
        """
        if prefix_ids.ndim != 1 or bool((prefix_ids == self.config.image_token_id).any()):
            raise ValueError("the shared prefix must be a 1D tensor of text token ids (no image tokens)")
        cache = self.model(input_ids=prefix_ids[None], use_cache=True).cache
        cache.batch_repeat_interleave(batch_size)
        return cache

    def image_one_keys(self, hidden: torch.Tensor, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pointer keys ``(B, cells, dim)`` from the states of each row's first image, and which rows have one."""
        batch = hidden.shape[0]
        keys = hidden.new_zeros(batch, self.config.pointer_grid ** 2, hidden.shape[-1])
        asked = hidden.new_zeros(batch, hidden.shape[-1])
        sources = self.pointer.match_sources
        match = {source: hidden.new_zeros(batch, self.config.pointer_grid ** 2, self.config.pointer_dim)
                 for source in sources}
        parts = torch.zeros(batch, self.config.pointer_grid ** 2, dtype=torch.long, device=hidden.device)
        box_stem = self.pointer.box_stem
        box = None if box_stem is None else hidden.new_zeros(batch, self.config.pointer_grid ** 2, self.pointer.num_sizes)
        starts = image_starts(input_ids == self.config.image_token_id)
        per_row = starts.sum(-1)
        valid = per_row > 0
        if image_grid_thw is not None and bool(valid.any()):
            first_image = (per_row.cumsum(0) - per_row).tolist()
            rows = torch.nonzero(valid).flatten().tolist()
            stem, cells, box_logits = None, {}, []
            if self.pointer.stem is not None or sources or box_stem is not None:
                if pixel_values is None:
                    raise ValueError("the pointer's stems or match term need the pixel_values of the images in input_ids")
                pixels, firsts = pixel_values.to(hidden.dtype), [first_image[b] for b in rows]
                if box_stem is not None:
                    c = self.config
                    questions = box_stem.question(input_ids, question_mask(input_ids, c.image_token_id,
                                                                           c.eos_token_id, c.pad_token_id))
                    pieces = pixels.split([int(t * h * w) for t, h, w in image_grid_thw.tolist()])
                    grids = image_grid_thw[firsts]
                    box_logits = box_stem.token_logits(torch.cat([pieces[i] for i in firsts]), grids, c.patch_size,
                                                       questions[rows]).split(grids.prod(-1).tolist())
                if self.pointer.stem is not None:
                    stem = run_per_image(pixels, image_grid_thw, firsts, self.config.patch_size,
                                         self.pointer.stem_features)
                encoder = self.model.vision if self.pointer.match_encoder is None else self.pointer.match_encoder
                branches = {"pixels": self.pointer.match_features, "encoder": encoder.frame_tokens}
                for source in sources:  # per cell (pixel features) or per token (the encoder's)
                    cells[source] = run_per_image(pixels, image_grid_thw, firsts, self.config.patch_size,
                                                  branches[source])
            for j, b in enumerate(rows):
                _, grid_h, grid_w = (int(v) for v in image_grid_thw[first_image[b]])
                start = int(starts[b].nonzero()[0])
                tokens, parts[b] = self.pointer.cell_index(grid_h, grid_w, hidden.device)
                keys[b] = hidden[b, start + tokens] + (stem[j][tokens] if stem is not None else 0)
                if box is not None:
                    box[b] = self.pointer.box_stem_cells(box_logits[j], tokens, parts[b])
                asked[b] = hidden[b, max(start - 2, 0)]  # before <|vision_start|>: the end of the question
                if "pixels" in cells:
                    match["pixels"][b] = cells["pixels"][j]
                if "encoder" in cells:
                    match["encoder"][b] = self.pointer.match_tokens(cells["encoder"][j][tokens])
        else:
            valid = torch.zeros_like(valid)
        return self.pointer.keys(keys, parts, asked, match, box), valid

    def slot_box_logits(self, hidden: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                        slot: torch.Tensor) -> torch.Tensor:
        """``(B, L, cells * sizes)`` box logits, computed at the `slot` positions alone (the
        others get no mass, ``finfo.min``): a step's labelled positions are mostly text."""
        rows, positions = slot.nonzero(as_tuple=True)
        picked = self.pointer(hidden[rows, positions][:, None], keys[rows], valid[rows])[:, 0]
        boxes = picked.new_full((*hidden.shape[:2], self.pointer.num_boxes), torch.finfo(picked.dtype).min)
        return boxes.index_put((rows, positions), picked)

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pointer_keys: torch.Tensor | None = None,
                pointer_valid: torch.Tensor | None = None, frame_keys: torch.Tensor | None = None,
                frame_valid: torch.Tensor | None = None, count_keys: torch.Tensor | None = None,
                count_held: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> TinyVLMCausalLMOutputWithPast:
        r"""Logits for every kept position over the whole vocabulary.

        `labels` (``-100`` ignored) give the usual shifted next-token loss. `pointer_keys` /
        `pointer_valid` (from a previous output) are used instead of image 1's tokens in
        this input; without them and without image 1 in `input_ids`, box tokens get no mass.
        `frame_keys` / `frame_valid` likewise stand for the frames' tokens (``frame_windows``), and
        `count_keys` / `count_held` for every image's tokens (``count_head``): then each position
        counts in the last image they hold.
        `logits_to_keep`: 0 keeps all positions, ``n`` the last ``n``, a 1D tensor those indices.
        """
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("the tiny VLM returns neither attentions nor per-layer hidden states")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, use_cache=use_cache)
        hidden = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        slot = None
        if self.config.box_slot_token_id is not None and input_ids is not None:
            slot = (input_ids == self.config.box_slot_token_id)[:, kept]
        if pointer_keys is None:
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if input_ids is None or slot is not None and not use_cache and not bool(slot.any()):
                # no box token can follow a kept position and no cache carries the keys on
                pointer_keys = hidden.new_zeros(hidden.shape[0], self.config.pointer_grid ** 2, self.pointer.key_width)
                pointer_valid = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            else:
                pointer_keys, pointer_valid = self.image_one_keys(hidden, input_ids, image_grid_thw, pixel_values)
        elif pointer_valid is None:
            raise ValueError("pointer_keys need pointer_valid (both come in the model's output)")
        if self.frames is not None and frame_keys is None:
            if input_ids is None or pixel_values is None:
                frame_keys = hidden.new_zeros(hidden.shape[0], self.config.max_frames, 1, self.config.pointer_dim + 1)
                frame_valid = torch.zeros(frame_keys.shape[:3], dtype=torch.bool, device=hidden.device)
            else:
                frame_keys, frame_valid = self.frames.keys(hidden, input_ids, self.config.image_token_id,
                                                           self.config.pad_token_id, pixel_values, image_grid_thw)
        elif frame_keys is not None and frame_valid is None:
            raise ValueError("frame_keys need frame_valid (both come in the model's output)")
        latest = None
        if self.count is not None:
            if count_keys is None:
                if input_ids is None:
                    raise ValueError("the count head needs input_ids (or count_keys from a previous output)")
                count_keys, count_held = self.count.keys(hidden, input_ids, self.config, pixel_values, image_grid_thw)
                latest = image_starts(input_ids == self.config.image_token_id).long().cumsum(-1)
            elif count_held is None:
                raise ValueError("count_keys need count_held (both come in the model's output)")
            else:
                latest = count_held.any(-1).sum(-1, keepdim=True).expand(hidden.shape[:2])
            latest = latest[:, kept]
        hidden = hidden[:, kept]
        if slot is None:
            boxes = self.pointer(hidden, pointer_keys, pointer_valid)
        else:
            boxes = self.slot_box_logits(hidden, pointer_keys, pointer_valid, slot)
        text = self.lm_head(hidden)
        expected = scores = None
        if self.count is not None:
            scores = self.count.scores(hidden, count_keys)
            expected = self.count.expected(scores, count_held, latest)
            digits = torch.tensor(self.config.digit_token_ids, device=text.device)
            text = text.index_add(-1, digits, self.count(hidden, expected, latest).to(text.dtype))
        pieces = [text, boxes]
        if self.frames is not None:
            pieces.append(self.frames(hidden, frame_keys, frame_valid))
        logits = torch.cat(pieces, dim=-1)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return TinyVLMCausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                             pointer_keys=pointer_keys, pointer_valid=pointer_valid,
                                             frame_keys=frame_keys, frame_valid=frame_valid,
                                             count_keys=count_keys, count_held=count_held,
                                             count_expected=expected, count_scores=scores)

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False,
                                            num_new_tokens: int = 1) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        model_kwargs["pointer_keys"] = outputs.pointer_keys
        model_kwargs["pointer_valid"] = outputs.pointer_valid
        if outputs.frame_keys is not None:
            model_kwargs["frame_keys"] = outputs.frame_keys
            model_kwargs["frame_valid"] = outputs.frame_valid
        if outputs.count_keys is not None:
            model_kwargs["count_keys"] = outputs.count_keys
            model_kwargs["count_held"] = outputs.count_held
        return model_kwargs
