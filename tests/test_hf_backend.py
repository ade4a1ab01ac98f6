"""The transformers backend with the tiny VLM on CPU: batched multi-turn rollouts through the env,
log-probs that trainers can recompute, save/load, and Qwen2.5-VL-style turns parsed end to end."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import pytest
import torch

import pxr_env  # noqa: F401
from agents.base import EpisodeContext
from agents.baselines import OraclePolicy
from agents.rollout import collect
from agents.vlm.chat import IM_END
from agents.vlm.hf import (
    TransformersPolicy, image_features, pad_items, placeholder_token_ids, policy_logprobs, token_logprobs,
    trajectory_item,
)
from agents.vlm.tiny import build_tiny_model, build_tiny_processor
from conftest import make_fixture_source
from pxr_env.actions import ERROR_NOTHING, format_answer, format_tool_call

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, pointer_dim=32, stem_channels=8)


@pytest.fixture(scope="module")
def processor() -> Any:
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model(processor: Any) -> Any:
    model = build_tiny_model(processor, seed=0, **SMALL)
    # Checkpoint defaults that would change the sampling distribution if they leaked into generate.
    model.generation_config.update(do_sample=True, top_k=1, repetition_penalty=1.5)
    return model


def make_envs(n: int, turns: int = 2) -> list[gym.Env]:
    return [gym.make("PixelQA-v0", tasks=make_fixture_source(), max_episode_steps=turns) for _ in range(n)]


def play(policy: TransformersPolicy, envs: list[gym.Env], seed: int = 0, **kwargs: Any) -> list[Any]:
    return collect(policy, envs, samples=["fx/choice", "fx/video"], seed=seed, progress=False, **kwargs)


def test_batched_multi_turn_rollouts_give_trainable_token_sequences(model, processor):
    policy = TransformersPolicy(model, processor, max_new_tokens=8)
    trajectories = play(policy, make_envs(3), group_size=2)
    image_token = processor.image_token_id
    for t in trajectories:
        assert t.has_tokens and len(t.token_ids) == len(t.generated_mask) == len(t.logprobs)
        assert 1 <= t.generated_mask.sum() <= 8 * len(t.turns)
        grid = image_features(processor, t.images)["image_grid_thw"]
        assert (t.token_ids == image_token).sum() == int(grid.prod(-1).sum())
        assert not np.any(t.token_ids[t.generated_mask] == image_token)
        text = processor.tokenizer.decode(t.token_ids)
        assert text.startswith("<|im_start|>system\n")
        positions = [text.index(turn.observation) for turn in t.turns]
        assert positions == sorted(positions)
        assert np.all(t.logprobs[t.generated_mask] < 0) and np.all(t.logprobs[~t.generated_mask] == 0)
    recomputed = policy.logprobs([t.token_ids for t in trajectories], [t.images for t in trajectories])
    for row, t in enumerate(trajectories):
        np.testing.assert_allclose(recomputed[row, :len(t.token_ids)].detach().numpy()[t.generated_mask],
                                   t.logprobs[t.generated_mask], atol=1e-4)
    # the trainers' path: items of agents.vlm.encoding, padded, one forward pass with gradients
    batch = pad_items(processor, [trajectory_item(processor, t) for t in trajectories])
    new = token_logprobs(model, batch, temperature=1.0, suppressed=placeholder_token_ids(processor))
    mask = batch["loss_mask"].bool()
    assert new.requires_grad and int(mask.sum()) == sum(int(t.generated_mask.sum()) for t in trajectories)
    torch.testing.assert_close(new[mask], batch["old_logprobs"][mask], atol=1e-4, rtol=0)
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    again = play(policy, make_envs(3), group_size=2)
    assert [t.token_ids.tolist() for t in again] == [t.token_ids.tolist() for t in trajectories]
    assert len({t.token_ids[t.generated_mask].tobytes() for t in trajectories}) == 4  # the group's samples differ


def test_left_padded_greedy_batches_match_one_episode_at_a_time(model, processor):
    policy = TransformersPolicy(model, processor, temperature=0, max_new_tokens=6)
    batched = play(policy, make_envs(2, turns=1))
    alone = play(policy, make_envs(1, turns=1))
    for a, b in zip(batched, alone):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_save_and_load_round_trip_gives_identical_logprobs(model, processor, tmp_path):
    policy = TransformersPolicy(model, processor, max_new_tokens=8)
    trajectories = play(policy, make_envs(2, turns=1))
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = TransformersPolicy.from_pretrained(tmp_path, max_new_tokens=8)
    args = ([t.token_ids for t in trajectories], [t.images for t in trajectories])
    assert torch.equal(policy.logprobs(*args), loaded.logprobs(*args))
    replay = play(loaded, make_envs(2, turns=1))
    assert [t.token_ids.tolist() for t in replay] == [t.token_ids.tolist() for t in trajectories]
    with pytest.raises(ValueError, match="dtype"):
        TransformersPolicy.from_pretrained(tmp_path, dtype="float33")


def test_policy_logprobs_drop_the_suppressed_tokens():
    logits = torch.tensor([[0.0, 5.0, math.log(2.0)]])
    got = policy_logprobs(logits, torch.tensor([2]), temperature=1.0, suppressed=[1])
    assert got.item() == pytest.approx(math.log(2 / 3))
    hot = policy_logprobs(logits, torch.tensor([0]), temperature=0.5, suppressed=[])
    assert hot.item() == pytest.approx(-math.log(1 + math.exp(10) + 4))


class ScriptedModel(torch.nn.Module):
    """Stands in for a VLM: each generate call emits, for every row, the text `script(prompt)`
    tokenized (cut at max_new_tokens, then padded), with logits that make it the argmax."""

    def __init__(self, processor: Any, script: Callable[[str], str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script = processor.tokenizer, script
        self.calls = 0

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any,
                 **kwargs: Any) -> SimpleNamespace:
        self.calls += 1
        rows = [self.tokenizer.encode(self.script(self.tokenizer.decode(ids[mask.bool()])), add_special_tokens=False)
                [:generation_config.max_new_tokens] for ids, mask in zip(input_ids, attention_mask)]
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), generation_config.pad_token_id)
        for i, r in enumerate(rows):
            new[i, :len(r)] = torch.tensor(r)
        logits = tuple(torch.nn.functional.one_hot(new[:, t], len(self.tokenizer)).float() * 30 for t in range(width))
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), logits=logits)


def turn_index(prompt: str) -> int:
    return prompt.count("<|im_start|>assistant") - 1


CROP = format_tool_call("crop_image", {"bbox_2d": [0.6, 0.12, 0.72, 0.28], "target_image": 1})
QWEN_STYLE_TURNS = [
    # a tool call; generation stops at </tool_call>, so the text after it is never part of the turn
    f"The square is small. Let me zoom in.\n{CROP}\nand then some",
    # neither a call nor an answer, cut by the token limit: an error, and the next prompt closes the turn
    "Hmm, I am not sure what to do here, let me think about it for a very long while " * 3,
    # both: an answer, then a call in the same turn; the call wins and the episode goes on
    f"It might be \\boxed{{A}}, but let me check again.\n{CROP}",
    # a boxed final answer with the end-of-turn token
    f"The cropped image shows a red square, so the answer is \\boxed{{B}}.{IM_END}",
]


def test_qwen_style_turns_are_parsed_end_to_end(processor):
    model = ScriptedModel(processor, lambda prompt: QWEN_STYLE_TURNS[turn_index(prompt)])
    policy = TransformersPolicy(model, processor, max_new_tokens=80)
    env = gym.make("PixelQA-v0", tasks=make_fixture_source())
    obs, info = env.reset(seed=0, options={"sample_id": "fx/choice"})
    context = EpisodeContext(slot=0, reset_info=info)
    steps = []
    while True:
        (generation,) = policy.act([obs], [context])
        context.history += [obs, generation.text]
        obs, reward, terminated, truncated, info = env.step(generation.text)
        steps.append((generation, info))
        if terminated or truncated:
            break
    (g0, i0), (g1, i1), (g2, i2), (g3, i3) = steps
    assert g0.text.endswith("</tool_call>") and "and then some" not in g0.text and i0["operation"] == "crop_image"
    assert len(g1.token_ids) == 80 and i1["action_error"] == ERROR_NOTHING
    assert g2.prompt_ids[0] == processor.tokenizer.convert_tokens_to_ids(IM_END)  # closes the cut turn
    assert i2["operation"] == "crop_image" and i2["n_visual_ops"] == 2
    assert g3.text.endswith("\\boxed{B}.") and IM_END not in g3.text
    assert terminated and reward == 1.0 and i3["correct"] and i3["n_turn_errors"] == 1
    state = context.state["vlm"]
    decoded = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", processor.tokenizer.decode(state.ids))
    assert decoded + "\n" == state.conversation.render(add_generation_prompt=False)
    assert all(lp == pytest.approx(0.0, abs=1e-3) for g, _ in steps for lp in g.logprobs)


def oracle_script(policy_source: Any) -> Callable[[str], str]:
    """The scripted oracle's turns, as a model would write them (answers end the turn)."""

    def script(prompt: str) -> str:
        sample = next(s for s in policy_source.samples if s.question in prompt)
        call = OraclePolicy.evidence_call(sample)
        if turn_index(prompt) == 0 and call is not None:
            return call
        return format_answer(sample.answers[0]) + IM_END

    return script


def test_oracle_turns_through_the_chat_layer_score_everything(processor):
    source = make_fixture_source()
    model = ScriptedModel(processor, oracle_script(source))
    policy = TransformersPolicy(model, processor, max_new_tokens=200)
    trajectories = collect(policy, make_envs(3, turns=10), samples=[s.sample_id for s in source.samples],
                           progress=False)
    assert all(t.info["correct"] for t in trajectories)
    assert [t.info["n_visual_ops"] for t in trajectories] == [1, 1, 0, 0, 1]
    assert model.calls == 4  # one generate call per batched turn: 5 episodes on 3 envs take 4 turns


def test_a_tokenizer_without_the_chat_markup_is_refused(processor):
    broken = SimpleNamespace(tokenizer=SimpleNamespace(convert_tokens_to_ids=lambda t: None, unk_token_id=0),
                             image_token_id=1)
    with pytest.raises(ValueError, match="im_end"):
        TransformersPolicy(torch.nn.Linear(1, 1), broken)
    assert placeholder_token_ids(processor) == [processor.image_token_id]


def test_token_logprobs_on_loss_positions_equal_the_full_pass(model, processor):
    """With a ``loss_mask`` the logits are taken only at positions some row masks: the same
    values there as a pass over every position, 0 at positions no row masks."""
    policy = TransformersPolicy(model, processor, max_new_tokens=6)
    trajectories = play(policy, make_envs(2), group_size=2)
    batch = pad_items(processor, [trajectory_item(processor, t) for t in trajectories])
    suppressed = placeholder_token_ids(processor)
    masked = token_logprobs(model, batch, suppressed=suppressed)
    full = token_logprobs(model, {k: v for k, v in batch.items() if k != "loss_mask"}, suppressed=suppressed)
    mask = batch["loss_mask"].bool()
    torch.testing.assert_close(masked[mask], full[mask], atol=1e-5, rtol=0)
    nowhere = ~mask.any(0)
    assert torch.count_nonzero(masked[:, nowhere]) == 0 and torch.count_nonzero(full[:, nowhere]) > 0
