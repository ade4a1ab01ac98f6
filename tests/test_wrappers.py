"""Tests for reward shaping: the pure formulas against hand values, then the wrappers."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from wrappers import (
    CuriosityReward,
    EfficiencyPenalty,
    curiosity_bonus,
    efficiency_penalty,
    group_shaped_rewards,
    rapr,
)

# --- pure functions ---------------------------------------------------------------------


def test_rapr() -> None:
    assert rapr([True, False, False, False]) == 0.25
    assert rapr([False] * 8) == 0.0
    assert rapr([1, 1]) == 1.0
    with pytest.raises(ValueError, match="at least one rollout"):
        rapr([])


def test_bonus_at_one_in_eight() -> None:
    assert curiosity_bonus(1 / 8, True) == pytest.approx(0.5 * (0.3 - 0.125))  # 0.0875
    assert curiosity_bonus(1 / 8, True) == pytest.approx(0.0875)
    # code: 0.175 / 2 / 0.125 * 0.25 = 0.175 ; video: 0.175 / 1.5 / 0.125 * 0.25 = 7 / 30
    assert curiosity_bonus(1 / 8, True, variant="code") == pytest.approx(0.175)
    assert curiosity_bonus(1 / 8, True, variant="code", is_video=True) == pytest.approx(7 / 30)


def test_variants_agree_at_one_quarter() -> None:
    paper = curiosity_bonus(0.25, True)
    code = curiosity_bonus(0.25, True, variant="code")
    assert paper == pytest.approx(0.025) and code == pytest.approx(0.025)
    # elsewhere they differ: at RaPR 0.2, paper 0.5 * 0.1 = 0.05, code 0.1 / 2 / 0.2 * 0.25 = 0.0625
    assert curiosity_bonus(0.2, True) == pytest.approx(0.05)
    assert curiosity_bonus(0.2, True, variant="code") == pytest.approx(0.0625)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("value", [0.3, 0.5, 1.0])
def test_no_bonus_at_or_above_target(variant: str, value: float) -> None:
    assert curiosity_bonus(value, True, variant=variant) == 0.0  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_no_bonus_without_an_operation(variant: str) -> None:
    assert curiosity_bonus(0.0, False, variant=variant) == 0.0  # type: ignore[arg-type]
    assert curiosity_bonus(0.125, False, variant=variant) == 0.0  # type: ignore[arg-type]


def test_bonus_parameters() -> None:
    assert curiosity_bonus(0.1, True, alpha=1.0, H=0.5) == pytest.approx(0.4)
    # alpha is not part of the released formula
    assert curiosity_bonus(0.1, True, variant="code", alpha=0.0) == curiosity_bonus(0.1, True, variant="code", alpha=9.0)
    assert curiosity_bonus(0.1, True, variant="code", H=0.5) == pytest.approx(0.4 / 2 / 0.1 * 0.25)


def test_bonus_errors() -> None:
    with pytest.raises(ValueError, match="must count that rollout"):
        curiosity_bonus(0.0, True, variant="code")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        curiosity_bonus(1.5, True)
    with pytest.raises(ValueError, match="variant must be 'paper'"):
        curiosity_bonus(0.5, True, variant="released")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="H is the target rate"):
        curiosity_bonus(0.5, True, H=2.0)


@pytest.mark.parametrize(
    ("n_ops", "variant", "N", "penalty"),
    [
        (0, "paper", 1, 0.0),
        (1, "paper", 1, 0.0),
        (3, "paper", 1, -0.1),  # 0.05 * (1 - 3)
        (3, "paper", 2, -0.05),
        (2, "paper", 0, -0.1),
        (0, "code", 1, 0.0),
        (1, "code", 1, 0.0),
        (4, "code", 1, -0.15),  # -0.05 * (4 - 1)
        (4, "code", 3, -0.15),  # the release fixes N = 1
    ],
)
def test_efficiency_penalty(n_ops: int, variant: str, N: int, penalty: float) -> None:
    assert efficiency_penalty(n_ops, variant=variant, N=N) == pytest.approx(penalty)  # type: ignore[arg-type]


def test_efficiency_penalty_errors() -> None:
    assert efficiency_penalty(5, beta=0.1) == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="cannot be negative"):
        efficiency_penalty(-1)


# One query, G = 8: rollout 0 crops twice (3 calls, one failed) and is right; rollout 1
# asks for one crop that fails and is right; rollout 3 asks twice, both fail, and is wrong.
GROUP = dict(
    task_rewards=[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    used_ops=[True, False, False, False, False, False, False, False],
    n_ops=[2, 0, 0, 0, 0, 0, 0, 0],
    n_calls=[3, 1, 0, 2, 0, 0, 0, 0],
)


def test_group_paper() -> None:
    out = group_shaped_rewards(**GROUP, is_video=False, variant="paper")
    np.testing.assert_allclose(out["reward_curiosity"], [0.0875, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out["reward_penalty"], [-0.05, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out["reward"], [1.0375, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["reward_task"], GROUP["task_rewards"])


def test_group_code() -> None:
    out = group_shaped_rewards(**GROUP, is_video=False, variant="code")
    np.testing.assert_allclose(out["reward_curiosity"], [0.175, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out["reward_penalty"], [-0.1, 0, 0, -0.05, 0, 0, 0, 0])
    np.testing.assert_allclose(out["reward"], [1.075, 1, 0, -0.05, 0, 0, 0, 0])
    video = group_shaped_rewards(**GROUP, is_video=True, variant="code")
    np.testing.assert_allclose(video["reward_curiosity"][0], 7 / 30)


def test_group_bonus_is_independent_of_correctness() -> None:
    out = group_shaped_rewards([1.0, 0.0, 0.0, 0.0], [True, True, False, False], [1, 1, 0, 0], [1, 1, 0, 0], False)
    assert out["reward_curiosity"][0] == out["reward_curiosity"][1] == pytest.approx(0.0)  # RaPR 0.5 >= H
    out = group_shaped_rewards([1.0] + [0.0] * 9, [True, True] + [False] * 8, [1] * 2 + [0] * 8, [1] * 2 + [0] * 8, False)
    assert out["reward_curiosity"][0] == out["reward_curiosity"][1] == pytest.approx(0.5 * (0.3 - 0.2))


def test_group_errors() -> None:
    with pytest.raises(ValueError, match="one entry per rollout"):
        group_shaped_rewards([1.0, 0.0], [True], [1], [1], False)
    with pytest.raises(ValueError, match="alpha weighs a reward term"):
        group_shaped_rewards([1.0], [True], [1], [1], False, alpha=-1.0)


# --- wrappers ---------------------------------------------------------------------------


class ScriptedEpisodes(gym.Env):
    """A fake PixelQA env: `reset(options=...)` scripts the episode the next steps play.

    Options: ``sample_id``, ``is_video``, ``reward`` (the task reward), ``n_ops`` (executed),
    ``n_calls`` (requested), ``steps`` (turns before the end), ``end`` ("terminate",
    "truncate" with statistics, or "cut" for a time limit without them), ``stats`` (False
    to leave the statistics out of a terminated episode), ``reset_keys`` (False to leave
    ``sample_id`` and ``is_video`` out of the reset info).
    """

    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[int, dict]:
        super().reset(seed=seed)
        self.script = {"sample_id": "s0", "is_video": False, "reward": 1.0, "n_ops": 0, "n_calls": 0,
                       "steps": 2, "end": "terminate", "stats": True, "reset_keys": True, **(options or {})}
        self.t = 0
        s = self.script
        return 0, ({"sample_id": s["sample_id"], "is_video": s["is_video"]} if s["reset_keys"] else {})

    def step(self, action: int) -> tuple[int, float, bool, bool, dict]:
        self.t += 1
        s = self.script
        if self.t < s["steps"]:
            return 0, 0.0, False, False, {"action_error": None}
        info: dict[str, Any] = {"action_error": None}
        if s["end"] != "cut" and s["stats"]:
            info.update(sample_id=s["sample_id"], is_video=s["is_video"], n_visual_ops=s["n_ops"],
                        n_tool_calls=s["n_calls"], used_pixel_reasoning=s["n_ops"] > 0)
        if not s["reset_keys"]:
            info.pop("sample_id", None)
            info.pop("is_video", None)
        terminated = s["end"] == "terminate"
        return 0, float(s["reward"]) if terminated else 0.0, terminated, not terminated, info


def play(env: gym.Env, **options: Any) -> tuple[float, dict[str, Any], list[float]]:
    """Run one scripted episode; return the final reward, the final info and earlier rewards."""
    env.reset(options=options)
    earlier: list[float] = []
    while True:
        _, reward, terminated, truncated, info = env.step(0)
        if terminated or truncated:
            return float(reward), info, earlier
        assert "reward_task" not in info and "reward_curiosity" not in info and "reward_penalty" not in info
        earlier.append(float(reward))


def test_curiosity_running_estimate_per_sample() -> None:
    env = CuriosityReward(ScriptedEpisodes())
    for _ in range(7):
        reward, info, earlier = play(env, sample_id="a", n_ops=0)
        assert reward == 1.0 and info["reward_curiosity"] == 0.0 and earlier == [0.0]
    reward, info, _ = play(env, sample_id="a", n_ops=1)  # history: 7 without, this one with
    assert info["rapr_estimate"] == pytest.approx(1 / 8)
    assert info["reward_curiosity"] == pytest.approx(0.0875)
    assert info["reward_task"] == 1.0
    assert reward == pytest.approx(1.0875)


@pytest.mark.parametrize(("is_video", "bonus"), [(False, 0.175), (True, 7 / 30)])
def test_curiosity_code_variant(is_video: bool, bonus: float) -> None:
    env = CuriosityReward(ScriptedEpisodes(), variant="code")
    for _ in range(7):
        play(env, sample_id="v", is_video=is_video)
    reward, info, _ = play(env, sample_id="v", is_video=is_video, n_ops=2, reward=0.0)
    assert info["reward_curiosity"] == pytest.approx(bonus)
    assert reward == pytest.approx(bonus)


def test_curiosity_window_slides() -> None:
    env = CuriosityReward(ScriptedEpisodes(), window=4)
    for _ in range(5):
        play(env, sample_id="a")
    _, info, _ = play(env, sample_id="a", n_ops=1)  # window holds 3 without, 1 with
    assert info["rapr_estimate"] == pytest.approx(0.25)
    assert info["reward_curiosity"] == pytest.approx(0.5 * 0.05)


@pytest.mark.parametrize(("global_window", "estimate"), [(256, 0.25), (2, 0.5)])
def test_curiosity_new_sample_uses_global_estimate(global_window: int, estimate: float) -> None:
    env = CuriosityReward(ScriptedEpisodes(), global_window=global_window)
    for sample_id in ("a", "b", "c"):
        play(env, sample_id=sample_id)
    _, info, _ = play(env, sample_id="d", n_ops=1)  # never seen: last episodes of all samples
    assert info["rapr_estimate"] == pytest.approx(estimate)
    assert info["reward_curiosity"] == pytest.approx(0.5 * max(0.3 - estimate, 0.0))
    _, info, _ = play(env, sample_id="d", n_ops=1)  # now its own history: 2 of 2
    assert info["rapr_estimate"] == 1.0 and info["reward_curiosity"] == 0.0


def test_curiosity_bonus_ignores_correctness() -> None:
    bonuses = []
    for reward in (1.0, 0.0):
        env = CuriosityReward(ScriptedEpisodes())
        for _ in range(7):
            play(env)
        _, info, _ = play(env, n_ops=1, reward=reward)
        bonuses.append(info["reward_curiosity"])
    assert bonuses[0] == bonuses[1] == pytest.approx(0.0875)


def test_curiosity_time_limit_leaves_episode_unshaped() -> None:
    env = CuriosityReward(ScriptedEpisodes())
    play(env, sample_id="a")
    reward, info, _ = play(env, sample_id="b", end="cut")
    assert reward == 0.0 and info["reward_curiosity"] == 0.0 and info["reward_task"] == 0.0
    assert "rapr_estimate" not in info
    _, info, _ = play(env, sample_id="b", n_ops=1)  # "b" still has no history: global [F, T]
    assert info["rapr_estimate"] == 0.5


def test_curiosity_truncation_with_statistics_is_shaped() -> None:
    env = CuriosityReward(ScriptedEpisodes())
    reward, info, _ = play(env, end="truncate", n_ops=0)
    assert info["rapr_estimate"] == 0.0 and reward == 0.0
    _, info, _ = play(env, end="truncate", n_ops=1)
    assert info["rapr_estimate"] == 0.5


def test_curiosity_falls_back_to_reset_info() -> None:
    env = CuriosityReward(ScriptedEpisodes(), variant="code")
    inner = env.unwrapped
    assert isinstance(inner, ScriptedEpisodes)
    # statistics at the end without sample_id / is_video: taken from the reset info
    env.reset(options={"sample_id": "r", "is_video": True, "n_ops": 1, "steps": 1})
    inner.script["reset_keys"] = False
    *_, info = env.step(0)
    assert info["rapr_estimate"] == 1.0 and "sample_id" not in info


def test_curiosity_missing_keys() -> None:
    env = CuriosityReward(ScriptedEpisodes())
    with pytest.raises(ValueError, match=r"CuriosityReward needs info\['used_pixel_reasoning'\]"):
        play(env, stats=False)
    env = CuriosityReward(ScriptedEpisodes(), variant="code")
    with pytest.raises(ValueError, match=r"needs info\['is_video'\] at reset or at the end"):
        play(env, reset_keys=False)


def test_curiosity_applied_twice() -> None:
    env = CuriosityReward(CuriosityReward(ScriptedEpisodes()))
    with pytest.raises(ValueError, match="CuriosityReward is applied twice"):
        play(env)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "released"}, "variant must be 'paper'"),
        ({"alpha": -0.5}, "alpha weighs a reward term"),
        ({"alpha": float("nan")}, "alpha weighs a reward term"),
        ({"H": 1.5}, "H is the target rate"),
        ({"window": 0}, "window counts episodes"),
        ({"window": True}, "window counts episodes"),
        ({"global_window": 2.5}, "global_window counts episodes"),
    ],
)
def test_curiosity_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CuriosityReward(ScriptedEpisodes(), **kwargs)


@pytest.mark.parametrize(("variant", "penalty"), [("paper", -0.1), ("code", -0.2)])
def test_efficiency_wrapper(variant: str, penalty: float) -> None:
    env = EfficiencyPenalty(ScriptedEpisodes(), variant=variant)  # type: ignore[arg-type]
    reward, info, earlier = play(env, n_ops=3, n_calls=5)
    assert earlier == [0.0]
    assert info["reward_penalty"] == pytest.approx(penalty)
    assert info["reward_task"] == 1.0
    assert reward == pytest.approx(1.0 + penalty)


def test_efficiency_wrapper_free_operations() -> None:
    env = EfficiencyPenalty(ScriptedEpisodes(), N=3, beta=0.1)
    assert play(env, n_ops=3)[1]["reward_penalty"] == 0.0
    assert play(env, n_ops=4)[1]["reward_penalty"] == pytest.approx(-0.1)


def test_efficiency_wrapper_edges() -> None:
    env = EfficiencyPenalty(ScriptedEpisodes())
    reward, info, _ = play(env, end="cut")
    assert reward == 0.0 and info["reward_penalty"] == 0.0
    with pytest.raises(ValueError, match=r"EfficiencyPenalty needs info\['n_visual_ops'\]"):
        play(env, stats=False)
    with pytest.raises(ValueError, match="EfficiencyPenalty is applied twice"):
        play(EfficiencyPenalty(env))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "paper2"}, "variant must be 'paper'"),
        ({"beta": -0.05}, "beta weighs a reward term"),
        ({"N": -1}, "N is the number of free operations"),
        ({"N": 1.5}, "N is the number of free operations"),
    ],
)
def test_efficiency_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EfficiencyPenalty(ScriptedEpisodes(), **kwargs)


@pytest.mark.parametrize("curiosity_outside", [True, False])
def test_wrappers_compose_in_either_order(curiosity_outside: bool) -> None:
    if curiosity_outside:
        env: gym.Env = CuriosityReward(EfficiencyPenalty(ScriptedEpisodes()))
    else:
        env = EfficiencyPenalty(CuriosityReward(ScriptedEpisodes()))
    for _ in range(7):
        play(env, reward=0.0)
    reward, info, _ = play(env, n_ops=3, reward=1.0)
    assert info["reward_task"] == 1.0
    assert info["reward_curiosity"] == pytest.approx(0.0875)
    assert info["reward_penalty"] == pytest.approx(-0.1)
    assert reward == pytest.approx(1.0 + 0.0875 - 0.1)
