"""Curiosity bonus: reward pixel-space reasoning while the rate of it (RaPR) is low.

RaPR of a query is the fraction of its rollouts that use a visual operation. Two
formulas (shared REFERENCE section 3), both paid only to rollouts that used one, whether
or not their answer is correct:

- ``"paper"``: ``alpha * max(H - RaPR, 0)``. At RaPR = 1/8: 0.5 * 0.175 = 0.0875.
- ``"code"`` (the released code): ``max(H - RaPR, 0) / d / RaPR * 0.25`` with d = 2 for
  images and 1.5 for videos; `alpha` is not used. At RaPR = 1/8 the image bonus is
  0.175 and the video bonus 0.2333; at RaPR = 1/4 both formulas give 0.025 for images.

`group_shaped_rewards` is the paper's semantics (RaPR over the G rollouts of one query,
for GRPO). `CuriosityReward` is the single-environment form for PPO and SB3: it keeps a
running RaPR estimate per query.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence, SupportsFloat

import gymnasium as gym
import numpy as np

from wrappers.efficiency import (
    Variant,
    check_variant,
    check_weight,
    efficiency_penalty,
    episode_value,
    start_shaping,
)


def check_target(H: float) -> None:
    """Raise unless the target RaPR `H` is a number in [0, 1]."""
    if not isinstance(H, (int, float)) or not 0.0 <= H <= 1.0:
        raise ValueError(f"H is the target rate of pixel-space reasoning and must be in [0, 1], got {H!r}")


def rapr(used_ops: Sequence[bool]) -> float:
    """Rate of pixel-space reasoning: the fraction of rollouts that used an operation."""
    if len(used_ops) == 0:
        raise ValueError("rapr needs at least one rollout")
    return sum(bool(u) for u in used_ops) / len(used_ops)


def curiosity_bonus(
    rapr: float,
    used_op: bool,
    *,
    variant: Variant = "paper",
    alpha: float = 0.5,
    H: float = 0.3,
    is_video: bool = False,
) -> float:
    """The bonus (>= 0) of one rollout, already scaled (module doc); 0 if it used no operation.

    `rapr` must count the rollout itself, so it is > 0 whenever `used_op` is true; the
    ``"code"`` formula divides by it.
    """
    check_variant(variant)
    check_target(H)
    if not 0.0 <= rapr <= 1.0:
        raise ValueError(f"rapr is a fraction of rollouts and must be in [0, 1], got {rapr}")
    if not used_op:
        return 0.0
    if rapr == 0.0:
        raise ValueError("rapr is 0 for a rollout that used an operation: RaPR must count that rollout")
    gap = max(H - rapr, 0.0)
    if variant == "paper":
        return alpha * gap
    return gap / (1.5 if is_video else 2.0) / rapr * 0.25


def group_shaped_rewards(
    task_rewards: Sequence[float],
    used_ops: Sequence[bool],
    n_ops: Sequence[int],
    n_calls: Sequence[int],
    is_video: bool,
    *,
    variant: Variant = "paper",
    alpha: float = 0.5,
    beta: float = 0.05,
    H: float = 0.3,
    N: int = 1,
) -> dict[str, np.ndarray]:
    """Shaped rewards of the G rollouts of one query, RaPR measured on this group.

    `n_ops` are executed operations (the paper's penalty counts them), `n_calls` requested
    calls, failed ones included (the released code's penalty counts them). Returns float64
    arrays of shape ``(G,)``: ``reward`` = ``reward_task + reward_curiosity + reward_penalty``
    and the three terms as added.
    """
    g = len(task_rewards)
    if not g == len(used_ops) == len(n_ops) == len(n_calls):
        raise ValueError(
            f"one entry per rollout is needed: got {g} task rewards, {len(used_ops)} used_ops, "
            f"{len(n_ops)} n_ops and {len(n_calls)} n_calls"
        )
    check_weight("alpha", alpha)
    check_weight("beta", beta)
    group_rapr = rapr(used_ops)
    task = np.asarray(task_rewards, dtype=np.float64)
    curiosity = np.array(
        [curiosity_bonus(group_rapr, bool(u), variant=variant, alpha=alpha, H=H, is_video=is_video) for u in used_ops]
    )
    counts = n_ops if variant == "paper" else n_calls
    penalty = np.array([efficiency_penalty(int(n), variant=variant, beta=beta, N=N) for n in counts], dtype=np.float64)
    return {
        "reward": task + curiosity + penalty,
        "reward_task": task,
        "reward_curiosity": curiosity,
        "reward_penalty": penalty,
    }


class RunningRaPR:
    """Running RaPR per query, for the curiosity bonus without groups.

    The estimate of an episode is the fraction of the last `window` episodes of its query
    that used a visual operation, this one included; a query seen for the first time gets
    the fraction over the last `global_window` episodes of all queries. `CuriosityReward`
    keeps one per wrapped env; the PPO trainer keeps one for all its envs and processes
    and saves it in checkpoints.
    """

    def __init__(self, window: int = 8, global_window: int = 256) -> None:
        self.window = window
        self.per_query: dict[str, deque[bool]] = {}
        self.recent: deque[bool] = deque(maxlen=global_window)

    def update(self, sample_id: str, used: bool) -> float:
        """Record an episode of `sample_id` and return the estimate that includes it."""
        self.recent.append(used)
        history = self.per_query.get(sample_id)
        if history is None:
            self.per_query[sample_id] = deque([used], maxlen=self.window)
            return sum(self.recent) / len(self.recent)
        history.append(used)
        return sum(history) / len(history)

    def state_dict(self) -> dict[str, Any]:
        """The statistics as JSON data (for `agents.checkpoint` extras)."""
        return {"per_query": {k: list(v) for k, v in self.per_query.items()}, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.per_query = {k: deque(v, maxlen=self.window) for k, v in state["per_query"].items()}
        self.recent = deque(state["recent"], maxlen=self.recent.maxlen)


class CuriosityReward(gym.Wrapper):
    """Adds the curiosity bonus at the end of each episode, with a running RaPR estimate.

    The group statistic of the paper is replaced, for one environment, by the fraction of
    the last `window` episodes of the same ``sample_id`` that used an operation, this
    episode included. A sample seen for the first time uses the fraction over the last
    `global_window` episodes of all samples instead. Each wrapped copy of an environment
    keeps its own statistics.

    Reads from the final step's info ``used_pixel_reasoning``, ``sample_id`` and (for
    ``variant="code"``) ``is_video``, the last two falling back to the reset info.
    Episodes cut short by a `TimeLimit`, which carry no episode statistics, get no bonus
    and leave the estimates unchanged. Composes with `EfficiencyPenalty` in either order.

    Info keys added at the final step:
        ``reward_task``: the environment's own reward (set only if absent).
        ``reward_curiosity``: the bonus added to the reward (>= 0).
        ``rapr_estimate``: the RaPR the bonus was computed from (absent when unshaped).

    Args:
        env: the environment, usually ``gymnasium.make("PixelQA-v0")``.
        variant: ``"paper"`` or ``"code"`` (module doc).
        alpha: weight of the bonus (paper variant only; 0.5 in the paper).
        H: target RaPR; no bonus at or above it (0.3 in the paper and the release).
        window: episodes of one sample that its estimate averages over.
        global_window: episodes of all samples that the fallback estimate averages over.
    """

    def __init__(
        self,
        env: gym.Env,
        variant: Variant = "paper",
        alpha: float = 0.5,
        H: float = 0.3,
        window: int = 8,
        global_window: int = 256,
    ) -> None:
        super().__init__(env)
        check_variant(variant)
        check_weight("alpha", alpha)
        check_target(H)
        for name, value in (("window", window), ("global_window", global_window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} counts episodes to average over and must be an int >= 1, got {value!r}")
        self.variant: Variant = variant
        self.alpha = float(alpha)
        self.H = float(H)
        self.window = window
        self.estimate = RunningRaPR(window, global_window)
        self._reset_info: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._reset_info = info
        return obs, info

    def _lookup(self, info: dict[str, Any], key: str) -> Any:
        if key in info:
            return info[key]
        if key in self._reset_info:
            return self._reset_info[key]
        raise ValueError(
            f"{type(self).__name__} needs info[{key!r}] at reset or at the end of an episode, "
            "as PixelQA environments set it; the wrapped environment did not"
        )

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not (terminated or truncated):
            return obs, reward, terminated, truncated, info
        name = type(self).__name__
        shaped = start_shaping(info, reward, "reward_curiosity", name)
        used = episode_value(info, "used_pixel_reasoning", truncated, name)
        if used is None:
            shaped["reward_curiosity"] = 0.0
            return obs, float(reward), terminated, truncated, shaped
        is_video = bool(self._lookup(info, "is_video")) if self.variant == "code" else False
        estimate = self.estimate.update(self._lookup(info, "sample_id"), bool(used))
        bonus = curiosity_bonus(estimate, bool(used), variant=self.variant, alpha=self.alpha, H=self.H, is_video=is_video)
        shaped["reward_curiosity"] = bonus
        shaped["rapr_estimate"] = estimate
        return obs, float(reward) + bonus, terminated, truncated, shaped

