"""vLLM backend: the `agents.vlm.hf.ChatPolicy` interface with generation on a vLLM engine (GPU).

`VLLMPolicy` keeps each episode's conversation like the transformers backend and returns
the same `agents.base.Generation` records, whose ``prompt_ids`` are the *processor-expanded*
token ids (one ``<|image_pad|>`` per image patch group), so `agents.vlm.hf.sequence_logprobs`
recomputes log-probs on exactly the sequence the engine saw. vLLM itself is given each
episode as a token prompt with *one* placeholder per image and the images alongside::

    {"prompt_token_ids": [...], "multi_modal_data": {"image": [PIL images in conversation order]}}

because vLLM runs the multimodal processor and expands the placeholders itself
(expanded ids would be expanded a second time). Generated ids are appended to both
sequences unchanged, so nothing is re-tokenized.

Each request gets its own ``SamplingParams`` seed drawn from the policy's stream, the
same stops as the transformers backend (``<|im_end|>`` and ``</tool_call>`` as stop
token ids, ``ignore_eos`` so the model's other end tokens do not stop a turn) and
``logprobs=0`` (the sampled token's log-prob). vLLM reports log-probs of the raw logits
(its default ``logprobs_mode``), before temperature: they are the policy log-probs of
`agents.vlm.hf` for temperature 1 (the RL setting) and greedy decoding; for other
temperatures `Generation.logprobs` is left empty and trainers recompute them. Image
placeholder tokens are kept from being sampled by a logit bias; unlike the transformers
backend, vLLM's raw log-probs still count their (negligible) mass in the softmax.

vLLM runs on GPU machines only: ``pip install 'pxr[vllm]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from agents.vlm.hf import ChatPolicy, EpisodeState

VLLM_MISSING = "the vLLM backend needs vllm, which runs on GPU machines: pip install 'pxr[vllm]'"
PLACEHOLDER_BIAS = -100.0
"""Logit bias that keeps image placeholder tokens from being sampled."""


def import_vllm() -> Any:
    """The `vllm` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


@dataclass
class _EngineState(EpisodeState):
    """The episode as vLLM sees it: token ids with one placeholder per image, and the images."""

    engine_ids: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)


def engine_prompt(token_ids: Sequence[int], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """The vLLM token prompt of one episode (``multi_modal_data`` only when it has images)."""
    prompt: dict[str, Any] = {"prompt_token_ids": [int(t) for t in token_ids]}
    if len(images):
        prompt["multi_modal_data"] = {"image": [Image.fromarray(image) for image in images]}
    return prompt


def sampling_options(temperature: float, top_p: float, top_k: int, max_new_tokens: int, stop_token_ids: Sequence[int],
                     stop_strings: Sequence[str], suppressed: Sequence[int], seed: int) -> dict[str, Any]:
    """Keyword arguments of one request's ``vllm.SamplingParams`` (every sampling knob set explicitly)."""
    options: dict[str, Any] = dict(
        temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids), ignore_eos=True,
        logprobs=0, seed=seed, skip_special_tokens=False, spaces_between_special_tokens=False,
        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
        logit_bias={int(t): PLACEHOLDER_BIAS for t in suppressed})
    if temperature > 0:
        options.update(top_p=top_p, top_k=top_k if top_k > 0 else -1)
    if stop_strings:
        options.update(stop=list(stop_strings), include_stop_str_in_output=True)
    return options


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]]) -> list[float]:
    """The log-prob of each sampled token from a vLLM ``CompletionOutput.logprobs`` list."""
    return [float(step[int(token)].logprob) for token, step in zip(token_ids, logprobs, strict=True)]


class VLLMPolicy(ChatPolicy):
    """A vLLM engine (``vllm.LLM``) and the model's transformers processor as a batched policy.

    `from_pretrained` builds both from one model folder or hub id; options are the
    sampling options of `agents.vlm.hf.ChatPolicy`.
    """

    state_class = _EngineState

    def __init__(self, llm: Any, processor: Any, **options: Any) -> None:
        super().__init__(processor, **options)
        self.llm = llm

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str = "bfloat16", max_images: int = 16,
                        gpu_memory_utilization: float = 0.85, max_model_len: int = 16384,
                        trust_remote_code: bool = False, **options: Any) -> "VLLMPolicy":
        """Start a vLLM engine on `name_or_path` and load its processor with transformers."""
        vllm = import_vllm()
        from transformers import AutoProcessor

        llm = vllm.LLM(model=str(name_or_path), dtype=dtype, limit_mm_per_prompt={"image": max_images},
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       trust_remote_code=trust_remote_code, seed=options.get("seed", 0))
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(llm, processor, **options)

    def _encode(self, state: _EngineState, segment: str, images: list[np.ndarray]) -> Mapping[str, Any]:
        state.engine_ids += self.tokenizer.encode(segment, add_special_tokens=False)
        state.images += images
        return super()._encode(state, segment, images)

    def _generate(self, states: Sequence[_EngineState]) -> list[tuple[list[int], list[float]]]:
        prompts = [engine_prompt(s.engine_ids, s.images) for s in states]
        params = [self._sampling_params(self._next_seed()) for _ in states]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        keep_logprobs = self.temperature in (0, 1)
        turns = []
        for state, output in zip(states, outputs, strict=True):
            completion = output.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            n = self._turn_length(ids)
            logprobs = sampled_logprobs(ids[:n], completion.logprobs[:n]) if keep_logprobs else []
            state.engine_ids += ids[:n]
            turns.append((ids[:n], logprobs))
        return turns

    def _sampling_params(self, seed: int) -> Any:
        vllm = import_vllm()
        return vllm.SamplingParams(**sampling_options(
            self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.stop_token_ids, self.stop_strings,
            self.suppressed, seed))
