"""Transformers backend: any ``AutoModelForImageTextToText`` VLM as a batched, token-level policy.

`TransformersPolicy` plays many episodes at once (`ChatPolicy` holds what it shares with
the vLLM backend, `agents.vlm.vllm_backend`). Each turn it appends every episode's new
observation to that episode's token sequence (the chat layer's continuation text,
`agents.vlm.chat.Conversation`, run through the processor, which expands each image into
its placeholder tokens), left-pads the sequences into one batch and calls
``model.generate`` once with the KV cache. A turn ends at the end-of-turn token
``<|im_end|>``, at a stop string (``</tool_call>`` by default: the environment answers the
call) or after ``max_new_tokens``. It returns `agents.base.Generation` records, so
`agents.rollout.collect` can assemble each conversation's token ids, generated-token mask
and log-probs.

**Log-probs.** Every generated token's log-prob is taken from the *raw* logits
(``output_logits``) divided by the temperature: ``log_softmax(logits / T)`` (``T = 1`` for
greedy decoding), with the image placeholder tokens removed (`placeholder_token_ids`: they
are never sampled, since a generated placeholder has no image and would break the next
forward pass). That is the policy distribution the trainers recompute with
`token_logprobs` in one forward pass. Top-k / top-p only choose which tokens can be
sampled; they are not part of the reported log-probs (``output_scores`` would give the
truncated distribution, with ``-inf`` outside the kept tokens).

**Sampling settings** are set in full on every call (the model's ``generation_config``
defaults, such as a repetition penalty, would otherwise change the distribution):
`temperature` (0 = greedy), `top_p`, `top_k` (0 = off), `max_new_tokens`. Sampling draws
from the policy's own random stream (`seed`), isolated from the global torch RNG.

**Processors.** The processor is called on text and images; ``input_ids`` extend the
sequence, and the other outputs (``pixel_values``, ``image_grid_thw``, ...) are per-image
tensors concatenated along their first dimension across turns and episodes. For
processors that list ``mm_token_type_ids`` (the Qwen2-VL family), those are rebuilt from
the image token id. Batches are padded by `agents.vlm.encoding.collate` in both
directions, so generation, SFT and RL updates see the same inputs.

**For trainers.** `trajectory_item(processor, trajectory)` turns a rollout into an item of
`agents.vlm.encoding` (``loss_mask`` = the generated-token mask, plus ``old_logprobs``);
``pad_items`` pads a list of them; `token_logprobs(model, batch, temperature)` recomputes
every token's log-prob in one forward pass. `sequence_logprobs` does all three from raw
token ids and images.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from agents.base import EpisodeContext, Generation
from agents.vlm import encoding
from agents.vlm.chat import IM_END, ChatFormat, Conversation, load_chat_format, save_chat_format
from agents.vlm.env_settings import load_env_settings, save_env_settings

TOOL_CALL_END = "</tool_call>"
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
"""Processor outputs that are per token; every other output is a per-image tensor."""
NOT_MODEL_INPUTS = ("loss_mask", "labels", "old_logprobs")
"""Entries of a padded batch that are for the loss, not for the model."""


@dataclass
class EpisodeState:
    """One episode's conversation and token ids, kept in ``EpisodeContext.state["vlm"]``."""

    conversation: Conversation
    ids: list[int] = field(default_factory=list)


@dataclass
class _FeatureState(EpisodeState):
    """The transformers backend also keeps each turn's image tensors for the next forward pass."""

    features: list[dict[str, torch.Tensor]] = field(default_factory=list)


def image_features(processor: Any, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """The image processor's tensors for `images` (``pixel_values``, ``image_grid_thw``, ...); {} for none."""
    if not len(images):
        return {}
    return dict(processor.image_processor(images=list(images), return_tensors="pt"))


def _concat_features(chunks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = sorted({k for chunk in chunks for k in chunk})
    return {k: torch.cat([c[k] for c in chunks if k in c], dim=0) for k in keys}


def _image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def placeholder_token_ids(processor: Any) -> list[int]:
    """Ids of the image / video placeholder tokens, which the policy never samples."""
    tokenizer = processor.tokenizer
    ids = {_image_token_id(processor)}
    video = getattr(processor, "video_token", None)
    if video is not None and tokenizer.convert_tokens_to_ids(video) not in (None, tokenizer.unk_token_id):
        ids.add(tokenizer.convert_tokens_to_ids(video))
    return sorted(ids)


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    suppressed: Sequence[int]) -> torch.Tensor:
    """``log softmax(logits / temperature)[tokens]`` with the `suppressed` ids removed from the softmax.

    `logits` ``(..., V)``, `tokens` ``(...)``; the shared definition of the policy
    distribution for generation and training.
    """
    logits = logits.float() / temperature
    if suppressed:
        logits = logits.index_fill(-1, torch.as_tensor(list(suppressed), device=logits.device), float("-inf"))
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _pad_id(processor: Any) -> int:
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sequence_item(processor: Any, token_ids: Sequence[int], features: Mapping[str, torch.Tensor],
                  loss_mask: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """One token sequence in the item format of `agents.vlm.encoding` (what its `collate` pads).

    ``input_ids``, ``attention_mask``, ``loss_mask`` (`loss_mask`, or zeros), the
    ``mm_token_type_ids`` of the Qwen2-VL family (1 on image tokens), and the image tensors
    `features` (`image_features` of the images the placeholders stand for).
    """
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    mask = torch.zeros_like(ids) if loss_mask is None else torch.as_tensor(np.asarray(loss_mask, dtype=np.int64))
    item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
    if "mm_token_type_ids" in processor.model_input_names:
        item["mm_token_type_ids"] = (ids == _image_token_id(processor)).long()
    item.update(features)
    return item


def trajectory_item(processor: Any, trajectory: Any) -> dict[str, torch.Tensor]:
    """A rollout trajectory as a training item: `sequence_item` with the generated-token mask as
    ``loss_mask``, plus ``old_logprobs`` (the sampling-time log-probs) when it has them.

    ``agents.vlm.encoding.collate([...], pad_id)`` pads a list of them (and SFT items) into a
    batch; `token_logprobs` runs the model on it.
    """
    item = sequence_item(processor, trajectory.token_ids, image_features(processor, trajectory.images),
                         trajectory.generated_mask)
    if len(trajectory.logprobs):
        item["old_logprobs"] = torch.as_tensor(trajectory.logprobs, dtype=torch.float32)
    return item


def pad_items(processor: Any, items: Sequence[Mapping[str, torch.Tensor]],
              padding_side: str = "right") -> dict[str, torch.Tensor]:
    """`agents.vlm.encoding.collate` with the processor's pad token."""
    return encoding.collate(list(items), _pad_id(processor), padding_side)


def model_inputs(batch: Mapping[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The entries of a padded batch that the model takes (not the loss mask, labels or old log-probs)."""
    return {k: v.to(device) for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def token_logprobs(model: Any, batch: Mapping[str, torch.Tensor], temperature: float = 1.0,
                   suppressed: Sequence[int] = ()) -> torch.Tensor:
    """Log-probs of every token of a padded batch in one forward pass, with gradients: ``(B, L)``.

    Entry ``[b, t]`` is `policy_logprobs` of token ``t`` given tokens ``< t``; it is 0 at
    ``t = 0`` and on padding, aligned with ``loss_mask`` and ``old_logprobs``. A batch with a
    ``loss_mask`` gets logits only at the positions where some row has a masked token
    (``logits_to_keep``): the vocabulary head over every prompt and image token would be
    most of a small model's update; entries at the other positions are 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    targets = inputs["input_ids"][:, 1:]
    positions = (batch["loss_mask"][:, 1:].to(device).bool().any(0).nonzero().flatten() if "loss_mask" in batch
                 else torch.zeros(0, dtype=torch.long, device=device))
    if len(positions):
        logits = model(**inputs, logits_to_keep=positions).logits
        targets = targets[:, positions]
    else:
        positions = torch.arange(targets.shape[1], device=device)
        logits = model(**inputs).logits[:, :-1]
    picked = policy_logprobs(logits, targets, temperature, suppressed)
    out = torch.zeros(inputs["input_ids"].shape, dtype=picked.dtype, device=device)
    out[:, positions + 1] = picked * inputs["attention_mask"][:, positions + 1]
    return out


def sequence_logprobs(model: Any, processor: Any, token_ids: Sequence[Sequence[int]],
                      images: Sequence[Sequence[np.ndarray]], temperature: float = 1.0) -> torch.Tensor:
    """`token_logprobs` of token sequences and their images (right-padded to the longest): ``(B, L)``.

    `images` holds each sequence's images in conversation order (`Trajectory.images`);
    the placeholder tokens are left out of the softmax, as at generation.
    """
    items = [sequence_item(processor, ids, image_features(processor, ims))
             for ids, ims in zip(token_ids, images, strict=True)]
    return token_logprobs(model, pad_items(processor, items), temperature, placeholder_token_ids(processor))


class ChatPolicy(ABC):
    """What every VLM backend shares: per-episode chat state, prompt tokens, stops, turn decoding.

    A backend implements `_generate(states)`, returning for each episode the generated ids
    (cut after the first stop) and their log-probs (or an empty list when it has none).
    Per-episode state lives in ``context.state["vlm"]``; `reset` starts it, and `act`
    starts it when a loop skips reset. A turn stops at ``<|im_end|>`` and at each of
    `stop` (single tokens in the vocabulary are stop tokens, longer ones stop strings).
    """

    state_class: type[EpisodeState] = EpisodeState

    def __init__(self, processor: Any, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = 256, stop: Sequence[str] = (TOOL_CALL_END,), system: str | None = None,
                 question_first: bool = False, vision_ids: bool = False, seed: int = 0) -> None:
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
            raise ValueError("need temperature >= 0 (0 is greedy), 0 < top_p <= 1, top_k >= 0 (0 is off), "
                             "max_new_tokens >= 1")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = temperature, top_p, top_k, max_new_tokens
        self.system, self.question_first, self.vision_ids = system, question_first, vision_ids
        end_of_turn = self.tokenizer.convert_tokens_to_ids(IM_END)
        if end_of_turn is None or end_of_turn == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IM_END} token: the chat layer needs the Qwen2 chat markup")
        self.stop_token_ids = [end_of_turn]
        self.stop_strings: list[str] = []
        for text in stop:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                self.stop_token_ids.append(ids[0])
            else:
                self.stop_strings.append(text)
        self.suppressed = placeholder_token_ids(processor)
        self._generator = torch.Generator()
        self.seed(seed)

    @property
    def chat_format(self) -> ChatFormat:
        """The layout of this policy's conversations."""
        return ChatFormat(self.system, self.question_first, self.vision_ids)

    def seed(self, seed: int) -> None:
        """Restart the sampling stream from `seed`."""
        self._generator.manual_seed(seed)

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._generator))

    def reset(self, context: EpisodeContext) -> None:
        context.state["vlm"] = self.state_class(self.chat_format.conversation())

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Generation]:
        """One turn for every episode: extend each conversation, generate, return `Generation`s."""
        states, prompts = [], []
        for obs, context in zip(observations, contexts, strict=True):
            if "vlm" not in context.state:
                self.reset(context)
            state = context.state["vlm"]
            prompts.append(self._extend(state, obs))
            states.append(state)
        outputs = []
        for state, prompt_ids, (ids, logprobs) in zip(states, prompts, self._generate(states), strict=True):
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            state.conversation.add_assistant(text)
            state.ids += ids
            outputs.append(Generation(text=text[: -len(IM_END)] if text.endswith(IM_END) else text,
                                      prompt_ids=prompt_ids, token_ids=ids, logprobs=logprobs))
        return outputs

    def _extend(self, state: EpisodeState, obs: Mapping[str, Any]) -> list[int]:
        """Append `obs` to the episode's conversation; return the new prompt token ids."""
        segment = state.conversation.add_observation(obs)
        return self._encode(state, segment, list(obs["images"]))["input_ids"][0].tolist()

    def _encode(self, state: EpisodeState, segment: str, images: list[np.ndarray]) -> Mapping[str, torch.Tensor]:
        """Run the processor on a continuation segment and its images (placeholders expanded);
        append the ids to `state` and return the processor's outputs."""
        encoded = self.processor(text=[segment], images=images or None, add_special_tokens=False, return_tensors="pt")
        state.ids += encoded["input_ids"][0].tolist()
        return encoded

    @abstractmethod
    def _generate(self, states: Sequence[EpisodeState]) -> list[tuple[list[int], list[float]]]:
        """Generate one turn for each episode: (generated ids cut after the first stop, their log-probs)."""

    def _turn_length(self, ids: Sequence[int]) -> int:
        """Tokens up to and including the first stop token or completed stop string (all if none)."""
        stops = set(self.stop_token_ids)
        n = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        if self.stop_strings:
            def done(k: int) -> bool:
                text = self.tokenizer.decode(list(ids[:k]), skip_special_tokens=False)
                return any(s in text for s in self.stop_strings)

            if done(n):  # the shortest prefix holding a stop string (containment grows with k)
                lo, hi = 1, n
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if done(mid) else (mid + 1, hi)
                n = lo
        return n


def load_model(name_or_path: str | Path, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, config_overrides: Mapping[str, Any] | None = None) -> Any:
    """``AutoModelForImageTextToText`` from a folder or hub id, its weights in `dtype`, on `device`.

    `config_overrides` replace values of the saved config before the weights load, e.g.
    ``{"pointer_match": True}`` adds that branch to a saved tiny model (its new weights are
    initialised as in a fresh model; transformers lists them as missing).

    The tiny model of `agents.vlm.tiny` is registered first. Hub kernels stay off: transformers
    turns them on by default when the ``kernels`` package is installed and then downloads
    kernel code from the hub the first time the model is put in train or eval mode on a GPU,
    which fails on a machine without hub access and runs code nobody pinned.
    """
    from transformers import AutoModelForImageTextToText

    import agents.vlm.tiny  # noqa: F401  (registers the tiny model with the Auto classes)

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=getattr(torch, dtype),
                                                        trust_remote_code=trust_remote_code, use_kernels=False,
                                                        **dict(config_overrides or {}))
    return model.to(device)


def matching_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> set[str]:
    """Names of the parameters that start with one of `prefixes`; each prefix must match one."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
    if unknown:
        raise ValueError(f"freeze prefixes {unknown} match no parameter of the model")
    return {name for name in names if any(name.startswith(prefix) for prefix in prefixes)}


def freeze_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> None:
    """Keep the parameters whose names start with one of `prefixes` fixed; each prefix must match."""
    frozen = matching_parameters(model, prefixes)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


class TransformersPolicy(ChatPolicy):
    """A transformers VLM and its processor as a batched text-mode policy (see the module doc).

    Build it with `from_pretrained` (a local folder or a hub id already in the local cache)
    or from a loaded model and processor. `max_batch_size` caps the episodes per
    ``generate`` call (None: all running episodes at once).
    """

    def __init__(self, model: Any, processor: Any, *, max_batch_size: int | None = None, **options: Any) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        super().__init__(processor, **options)
        self.model, self.max_batch_size = model.eval(), max_batch_size
        self.env_kwargs: dict[str, Any] = {}
        """`PixelQAEnv` arguments the policy was trained with (from its checkpoint's env settings)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                        trust_remote_code: bool = False, **options: Any) -> "TransformersPolicy":
        """Load ``AutoModelForImageTextToText`` and ``AutoProcessor`` from `name_or_path`.

        `options` are the constructor's sampling and batching options. The tiny model of
        `agents.vlm.tiny` is registered first, so its checkpoints load like any other. A
        folder's saved `ChatFormat` (`agents.vlm.chat.load_chat_format`) gives the default
        ``system``, ``question_first`` and ``vision_ids``; checkpoints without one keep the standard format.
        Its saved env settings (`agents.vlm.env_settings`) become ``policy.env_kwargs``.
        """
        from transformers import AutoProcessor

        model = load_model(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        chat_format = load_chat_format(name_or_path) if Path(name_or_path).is_dir() else ChatFormat()
        options = {"system": chat_format.system, "question_first": chat_format.question_first,
                   "vision_ids": chat_format.vision_ids, **options}
        policy = cls(model, processor, **options)
        policy.env_kwargs = load_env_settings(name_or_path)
        return policy

    def save_pretrained(self, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the model (safetensors), the processor, the chat format and the env settings to
        `path`, so that `from_pretrained` plays the saved policy in the same layout and env.
        `state_dict`: the model weights to write instead of its own (a sharded model's full ones)."""
        self.model.save_pretrained(path, state_dict=state_dict)
        self.processor.save_pretrained(path)
        save_chat_format(self.chat_format, path)
        save_env_settings(self.env_kwargs, path)

    state_class = _FeatureState

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, state: _FeatureState, segment: str, images: list[np.ndarray]) -> Mapping[str, torch.Tensor]:
        encoded = super()._encode(state, segment, images)
        state.features.append({k: v for k, v in encoded.items() if k not in TEXT_KEYS})
        return encoded

    def logprobs(self, token_ids: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]]) -> torch.Tensor:
        """`sequence_logprobs` with this policy's model, processor and temperature (1 when greedy)."""
        return sequence_logprobs(self.model, self.processor, token_ids, images, self.temperature or 1.0)

    @contextlib.contextmanager
    def _sampling_rng(self) -> Iterator[None]:
        """Seed torch's RNG from the policy's stream for one call, restoring the global state after."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._next_seed())
            yield

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        greedy = self.temperature == 0
        options: dict[str, Any] = dict(
            do_sample=not greedy, max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_token_ids,
            pad_token_id=_pad_id(self.processor), return_dict_in_generate=True, output_logits=True,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, num_beams=1,
            suppress_tokens=self.suppressed, stop_strings=self.stop_strings or None)
        if not greedy:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, typical_p=1.0,
                           epsilon_cutoff=0.0, eta_cutoff=0.0)
        return GenerationConfig(**options)

    def _generate(self, states: Sequence[_FeatureState]) -> list[tuple[list[int], list[float]]]:
        step = self.max_batch_size or len(states)
        return [turn for start in range(0, len(states), step)
                for turn in self._generate_batch(states[start:start + step])]

    @torch.no_grad()
    def _generate_batch(self, states: Sequence[_FeatureState]) -> list[tuple[list[int], list[float]]]:
        items = [sequence_item(self.processor, s.ids, _concat_features(s.features)) for s in states]
        inputs = model_inputs(pad_items(self.processor, items, "left"), self.device)
        with self._sampling_rng():
            # synced_gpus=False: each process generates alone, FSDP-sharded or not (its weights
            # gathered beforehand, `agents.distributed.unsharded`), for its own number of calls
            out = self.model.generate(**inputs, generation_config=self._generation_config(),
                                      tokenizer=self.tokenizer if self.stop_strings else None, synced_gpus=False)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        scale = self.temperature or 1.0
        logprobs = torch.stack([policy_logprobs(step, new[:, t], scale, self.suppressed)
                                for t, step in enumerate(out.logits)], dim=1)
        turns = []
        for row in range(len(states)):
            ids = new[row].tolist()
            n = self._turn_length(ids)
            turns.append((ids[:n], logprobs[row, :n].tolist()))
        return turns
