"""The rollout collector: scheduling, groups, seeds, vector envs, token assembly, time limits."""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import pxr_env  # noqa: F401
from agents.base import EpisodeContext, Generation
from agents.baselines import AnswerOnlyPolicy, OraclePolicy, RandomPolicy
from agents.rollout import FINAL_KEYS, assemble_tokens, collect
from conftest import make_fixture_source
from pxr_env.actions import format_tool_call

IDS = ["fx/choice", "fx/count", "fx/text", "fx/small", "fx/video"]
CALL = format_tool_call("crop_image", {"bbox_2d": [0.6, 0.1, 0.7, 0.3], "target_image": 1})


def make_envs(n: int, **kwargs: Any) -> list[gym.Env]:
    return [gym.make("PixelQA-v0", tasks=make_fixture_source(), **kwargs) for _ in range(n)]


class CountingPolicy:
    """Wraps a policy and records the size of every batched act call."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.batches = inner, []

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Any]:
        self.batches.append(len(observations))
        return self.inner.act(observations, contexts)


def test_oracle_groups_over_sample_ids_are_all_correct_and_ordered():
    envs = make_envs(3)
    policy = CountingPolicy(OraclePolicy(envs[0].unwrapped.task_source))
    trajectories = collect(policy, envs, samples=IDS, group_size=2, seed=5, progress=False)
    assert [(t.group, t.member) for t in trajectories] == [(q, g) for q in range(5) for g in range(2)]
    assert [t.sample_id for t in trajectories] == [s for s in IDS for _ in range(2)]
    assert all(t.info["correct"] and t.terminated and not t.truncated for t in trajectories)
    assert [t.seed for t in trajectories] == list(range(5, 15))
    # one act call per turn for all running episodes: 3 envs are full at the start
    assert policy.batches[0] == 3 and max(policy.batches) == 3
    assert sum(policy.batches) == sum(len(t.turns) for t in trajectories)
    crop = trajectories[0]
    assert crop.turns[0].info["operation"] == "crop_image" and len(crop.images) == 2
    assert crop.turns[0].image_indices == (0,) and crop.turns[1].image_indices == (1,)
    assert not crop.has_tokens and crop.reward == 1.0


def test_drawn_samples_are_shared_within_a_group_and_fixed_by_the_seed():
    runs = [collect(RandomPolicy(), make_envs(2), num_samples=6, group_size=3, seed=s, progress=False)
            for s in (0, 0, 1)]
    ids = [[t.sample_id for t in run] for run in runs]
    for run in runs:
        for q in range(6):
            assert len({t.sample_id for t in run if t.group == q}) == 1
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert [t.info for t in runs[0]] == [t.info for t in runs[1]]
    assert [[x.action for x in t.turns] for t in runs[0]] == [[x.action for x in t.turns] for t in runs[1]]


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_vector_env_matches_a_list_of_envs(mode):
    vector = SyncVectorEnv([lambda: gym.make("PixelQA-v0", tasks=make_fixture_source(), render_mode="rgb_array")
                            for _ in range(3)], autoreset_mode=mode)
    from_vector = collect(RandomPolicy(), vector, num_samples=9, seed=2, render=True, progress=False)
    from_list = collect(RandomPolicy(), make_envs(3, render_mode="rgb_array"), num_samples=9, seed=2, render=True,
                        progress=False)
    vector.close()
    assert [t.info for t in from_vector] == [t.info for t in from_list]
    assert all(np.array_equal(a.render, b.render) for a, b in zip(from_vector, from_list))
    assert all(a.images[0].tobytes() == b.images[0].tobytes() for a, b in zip(from_vector, from_list))


def test_same_step_vector_env_and_structured_envs_are_refused():
    vector = SyncVectorEnv([lambda: gym.make("PixelQA-v0", tasks=make_fixture_source())],
                           autoreset_mode=AutoresetMode.SAME_STEP)
    with pytest.raises(ValueError, match="SAME_STEP"):
        collect(AnswerOnlyPolicy(), vector, num_samples=1, progress=False)
    with pytest.raises(ValueError, match="text-mode"):
        collect(AnswerOnlyPolicy(), [gym.make("PixelQA-Structured-v0")], num_samples=1, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        collect(AnswerOnlyPolicy(), make_envs(1), progress=False)


class ScriptedTokens:
    """Answers after one crop, returning Generations with made-up token ids."""

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Generation]:
        out = []
        for ctx in contexts:
            if ctx.turn == 0:
                out.append(Generation(CALL, prompt_ids=[1, 2, 3], token_ids=[10, 11], logprobs=[-0.5, -0.25]))
            else:
                out.append(Generation("\\boxed{B}", prompt_ids=[4, 5], token_ids=[12], logprobs=[-1.0]))
        return out


def test_generations_become_token_ids_mask_and_logprobs():
    (trajectory,) = collect(ScriptedTokens(), make_envs(1), samples=["fx/choice"], progress=False)
    assert trajectory.info["correct"] and trajectory.has_tokens
    assert trajectory.token_ids.tolist() == [1, 2, 3, 10, 11, 4, 5, 12]
    assert trajectory.generated_mask.tolist() == [False, False, False, True, True, False, False, True]
    np.testing.assert_allclose(trajectory.logprobs, [0, 0, 0, -0.5, -0.25, 0, 0, -1.0])
    assert trajectory.token_ids.dtype == np.int64 and trajectory.logprobs.dtype == np.float32


def test_assemble_tokens_without_logprobs_and_mixed_outputs():
    ids, mask, logprobs = assemble_tokens([Generation("a", [1], [2]), Generation("b", [3], [4, 5])])
    assert ids.tolist() == [1, 2, 3, 4, 5] and mask.tolist() == [False, True, False, True, True]
    assert logprobs.size == 0
    with pytest.raises(ValueError, match="log-probs"):
        Generation("a", [], [1, 2], [0.0])

    def mixed(observations, contexts):
        return [Generation("<tool_call>{}</tool_call>", [1], [2]) if c.turn == 0 else "\\boxed{A}" for c in contexts]

    with pytest.raises(ValueError, match="every turn"):
        collect(mixed, make_envs(1), samples=["fx/choice"], progress=False)


def test_time_limit_episodes_get_the_end_of_episode_keys():
    def idle_after_a_crop(observations, contexts):
        return ['<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 0.5, 0.5], "target_image": 1}}'
                '</tool_call>' if c.turn == 0 else
                '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.5, 0.5, 0.6, 0.6], "target_image": 9}}'
                '</tool_call>' if c.turn == 1 else "thinking..." for c in contexts]

    envs = [gym.make("PixelQA-v0", tasks=make_fixture_source(), max_episode_steps=4)]
    (trajectory,) = collect(idle_after_a_crop, envs, samples=["fx/choice"], progress=False)
    info = trajectory.info
    assert trajectory.truncated and len(trajectory.turns) == 4 and set(FINAL_KEYS) <= set(info)
    assert (info["correct"], info["score"], info["answer"], info["family"]) == (False, 0.0, None, "fx")
    assert (info["n_visual_ops"], info["n_tool_calls"], info["n_op_errors"], info["n_turn_errors"]) == (1, 2, 1, 2)


def test_an_env_that_never_ends_is_reported():
    env = pxr_env.PixelQAEnv(tasks=make_fixture_source())
    with pytest.raises(RuntimeError, match="TimeLimit"):
        collect(lambda obs, ctx: ["hmm"] * len(obs), [env], num_samples=1, max_turns=5, progress=False)
