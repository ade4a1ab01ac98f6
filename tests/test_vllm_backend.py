"""The vLLM backend: prompt formatting, sampling options and output parsing (always, with a stand-in
engine), and a real engine run when vllm and a GPU are present."""

from __future__ import annotations

import importlib.util
import re
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import pxr_env  # noqa: F401
from agents.base import EpisodeContext
from agents.rollout import collect
from agents.vlm.chat import IM_END, render_messages
from agents.vlm.vllm_backend import (
    PLACEHOLDER_BIAS, VLLMPolicy, engine_prompt, import_vllm, sampled_logprobs, sampling_options,
)
from conftest import make_fixture_source
from pxr_env.actions import format_tool_call

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CROP = format_tool_call("crop_image", {"bbox_2d": [0.6, 0.12, 0.72, 0.28], "target_image": 1})
TURNS = [f"Let me zoom in.\n{CROP}", f"The square is red: \\boxed{{B}}.{IM_END}"]


@pytest.fixture(scope="module")
def processor() -> Any:
    from agents.vlm.tiny import build_tiny_processor

    return build_tiny_processor()


class FakeEngine:
    """Stands in for ``vllm.LLM``: records the prompts and plays back scripted turns."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.prompts, self.params = tokenizer, [], []

    def generate(self, prompts: list[dict], sampling_params: list[dict], use_tqdm: bool = True) -> list[Any]:
        self.prompts.append(prompts)
        self.params.append(sampling_params)
        outputs = []
        for prompt in prompts:
            turn = self.tokenizer.decode(prompt["prompt_token_ids"]).count("<|im_start|>assistant") - 1
            ids = self.tokenizer.encode(TURNS[turn] + "\nextra text after the stop", add_special_tokens=False)
            logprobs = [{t: SimpleNamespace(logprob=-0.1 * (k + 1))} for k, t in enumerate(ids)]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=logprobs)]))
        return outputs


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, processor: Any) -> FakeEngine:
    """SamplingParams are plain dicts here, so the policy runs without vllm."""
    monkeypatch.setattr(VLLMPolicy, "_sampling_params", lambda self, seed: sampling_options(
        self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.stop_token_ids, self.stop_strings,
        self.suppressed, seed))
    return FakeEngine(processor.tokenizer)


def test_engine_prompt_and_sampling_options():
    image = np.zeros((28, 56, 3), np.uint8)
    prompt = engine_prompt([1, 2, 3], [image, image])
    assert prompt["prompt_token_ids"] == [1, 2, 3]
    assert [im.size for im in prompt["multi_modal_data"]["image"]] == [(56, 28)] * 2
    assert engine_prompt([4], []) == {"prompt_token_ids": [4]}
    sampled = sampling_options(1.0, 0.95, 0, 64, [7, 8], ["STOP"], [5], seed=3)
    assert (sampled["top_k"], sampled["top_p"], sampled["seed"], sampled["logprobs"]) == (-1, 0.95, 3, 0)
    assert sampled["stop_token_ids"] == [7, 8] and sampled["ignore_eos"] and sampled["stop"] == ["STOP"]
    assert sampled["include_stop_str_in_output"] and sampled["logit_bias"] == {5: PLACEHOLDER_BIAS}
    assert sampled["repetition_penalty"] == 1.0 and not sampled["skip_special_tokens"]
    greedy = sampling_options(0.0, 0.95, 40, 64, [7], [], [], seed=0)
    assert greedy["temperature"] == 0.0 and "top_k" not in greedy and "stop" not in greedy
    steps = [{3: SimpleNamespace(logprob=-1.5)}, {9: SimpleNamespace(logprob=-0.5), 1: None}]
    assert sampled_logprobs([3, 9], steps) == [-1.5, -0.5]


def test_episodes_reach_the_engine_with_one_placeholder_per_image(stand_in, processor):
    policy = VLLMPolicy(stand_in, processor, max_new_tokens=200)
    env = gym.make("PixelQA-v0", tasks=make_fixture_source())
    obs, info = env.reset(seed=0, options={"sample_id": "fx/choice"})
    context, generations = EpisodeContext(slot=0, reset_info=info), []
    shown = []
    while True:
        shown += list(obs["images"])
        (generation,) = policy.act([obs], [context])
        generations.append(generation)
        context.history += [obs, generation.text]
        obs, reward, terminated, truncated, info = env.step(generation.text)
        if terminated or truncated:
            break
    assert reward == 1.0 and info["n_visual_ops"] == 1
    assert generations[0].text.endswith("</tool_call>") and "extra text" not in generations[0].text
    assert generations[1].text.endswith("\\boxed{B}.")
    tokenizer, image_token = processor.tokenizer, processor.image_token_id
    last = stand_in.prompts[-1][0]
    assert last["prompt_token_ids"].count(image_token) == 2 == len(last["multi_modal_data"]["image"])
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(last["multi_modal_data"]["image"], shown))
    state = context.state["vlm"]
    assert tokenizer.decode(last["prompt_token_ids"]) == render_messages(state.conversation.messages[:-1])
    expanded = generations[0].prompt_ids + generations[0].token_ids + generations[1].prompt_ids
    assert expanded.count(image_token) > 2  # the trainers' ids carry every image token
    collapsed = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tokenizer.decode(expanded))
    assert collapsed == tokenizer.decode(last["prompt_token_ids"])
    assert generations[0].logprobs == pytest.approx([-0.1 * (k + 1) for k in range(len(generations[0].token_ids))])
    assert len({p["seed"] for params in stand_in.params for p in params}) == 2


def test_logprobs_are_kept_only_where_they_match_the_policy(stand_in, processor):
    for temperature, kept in ((1.0, True), (0.0, True), (0.7, False)):
        policy = VLLMPolicy(stand_in, processor, temperature=temperature, max_new_tokens=200)
        (trajectory,) = collect(policy, [gym.make("PixelQA-v0", tasks=make_fixture_source())], samples=["fx/choice"],
                                progress=False)
        assert trajectory.info["correct"] and (len(trajectory.logprobs) > 0) == kept


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_vllm_says_how_to_install_it(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'pxr\[vllm\]'"):
        import_vllm()
    with pytest.raises(ImportError, match="GPU"):
        VLLMPolicy.from_pretrained("any/model")
    from agents.cli import main

    with pytest.raises(SystemExit, match=r"pip install 'pxr\[vllm\]'"):
        main(["eval", "--policy", "any/model", "--backend", "vllm", "--episodes", "1", "--out", str(tmp_path)])


def _tiny_qwen_checkpoint(path: Any) -> Any:
    """A randomly initialised two-layer Qwen2.5-VL with the tiny tokenizer, saved to `path`."""
    import torch
    from transformers import (
        AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
    )

    from agents.vlm.tiny import build_tiny_processor

    tokenizer = build_tiny_processor().tokenizer
    ids = tokenizer.convert_tokens_to_ids
    processor = Qwen2_5_VLProcessor(Qwen2VLImageProcessor(min_pixels=4 * 784, max_pixels=256 * 784), tokenizer,
                                    Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         eos_token_id=ids(IM_END), pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|image_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    return AutoProcessor.from_pretrained(path)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (GPU machines: pip install 'pxr[vllm]')")
def test_real_engine_logprobs_match_the_transformers_recompute(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from agents.vlm.hf import sequence_logprobs

    processor = _tiny_qwen_checkpoint(tmp_path)
    policy = VLLMPolicy.from_pretrained(tmp_path, max_new_tokens=16, gpu_memory_utilization=0.3, max_model_len=4096)
    envs = [gym.make("PixelQA-v0", tasks=make_fixture_source(), max_episode_steps=2) for _ in range(2)]
    trajectories = collect(policy, envs, samples=["fx/choice", "fx/video"], progress=False)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        recomputed = sequence_logprobs(model, processor, [t.token_ids for t in trajectories],
                                       [t.images for t in trajectories]).float().cpu().numpy()
    for row, t in enumerate(trajectories):
        assert t.has_tokens and len(t.logprobs) == len(t.token_ids)
        gap = np.abs(recomputed[row, :len(t.token_ids)][t.generated_mask] - t.logprobs[t.generated_mask])
        assert gap.mean() < 0.05
