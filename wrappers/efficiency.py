"""Efficiency penalty: a small negative reward for each visual operation beyond N.

Two formulas (shared REFERENCE section 3):

- ``"paper"``: ``beta * min(N - n_vo, 0)`` with ``n_vo`` the executed visual operations.
- ``"code"`` (the released code): ``-beta * (n_calls - 1)`` for an episode that requested
  at least one operation, else 0, where ``n_calls`` counts every requested call, failed
  ones included. This is the paper formula with N fixed at 1, applied to requested
  calls; `N` is not used.
"""

from __future__ import annotations

import math
from typing import Any, Literal, SupportsFloat

import gymnasium as gym

Variant = Literal["paper", "code"]
VARIANTS: tuple[str, ...] = ("paper", "code")

COUNT_KEYS: dict[str, str] = {"paper": "n_visual_ops", "code": "n_tool_calls"}
"""The final-info key each variant counts operations with."""


def check_variant(variant: str) -> None:
    """Raise a ValueError naming both variants unless `variant` is one of them."""
    if variant not in VARIANTS:
        raise ValueError(
            f"variant must be 'paper' (the paper's formula) or 'code' (the released code's), got {variant!r}"
        )


def check_weight(name: str, value: float) -> None:
    """Raise unless `value` is a finite number >= 0, as every reward weight must be."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} weighs a reward term and must be a finite number >= 0, got {value!r}")


def efficiency_penalty(n_ops: int, *, variant: Variant = "paper", beta: float = 0.05, N: int = 1) -> float:
    """The penalty (<= 0) of one episode, already scaled by `beta` (module doc).

    `n_ops` is the number of executed operations for ``"paper"`` and the number of
    requested calls for ``"code"``.
    """
    check_variant(variant)
    if n_ops < 0:
        raise ValueError(f"n_ops counts operations and cannot be negative, got {n_ops}")
    free = N if variant == "paper" else 1
    return beta * min(free - n_ops, 0)


def episode_value(info: dict[str, Any], key: str, truncated: bool, wrapper: str) -> Any:
    """`info[key]` at the end of an episode; None when a time limit cut the episode short.

    The environment sets its episode statistics whenever it ends an episode itself. A
    `TimeLimit` around it truncates without them; those episodes are left unshaped. A
    terminated episode without them means the wrapped environment is not a PixelQA one.
    """
    if key in info:
        return info[key]
    if truncated:
        return None
    raise ValueError(
        f"{wrapper} needs info[{key!r}] at the end of an episode, as PixelQA environments "
        f"set it; the wrapped environment did not"
    )


def start_shaping(info: dict[str, Any], reward: SupportsFloat, term_key: str, wrapper: str) -> dict[str, Any]:
    """A copy of the final `info` with ``reward_task`` set once (the env's own reward).

    Raises if `term_key` is already there: the same shaping would be added twice.
    """
    if term_key in info:
        raise ValueError(f"info already has {term_key!r}: {wrapper} is applied twice")
    shaped = dict(info)
    shaped.setdefault("reward_task", float(reward))
    return shaped


class EfficiencyPenalty(gym.Wrapper):
    """Adds the efficiency penalty to the reward at the end of each episode.

    Reads ``n_visual_ops`` (``variant="paper"``) or ``n_tool_calls`` (``variant="code"``)
    from the final step's info. Composes with `CuriosityReward` in either order.

    Info keys added at the final step:
        ``reward_task``: the environment's own reward (set only if absent).
        ``reward_penalty``: the penalty added to the reward (<= 0).

    Args:
        env: the environment, usually ``gymnasium.make("PixelQA-v0")``.
        variant: ``"paper"`` or ``"code"`` (module doc).
        beta: weight of the penalty (0.05 in the paper and the release).
        N: operations allowed without penalty (paper variant only; the release fixes 1).
    """

    def __init__(self, env: gym.Env, variant: Variant = "paper", beta: float = 0.05, N: int = 1) -> None:
        super().__init__(env)
        check_variant(variant)
        check_weight("beta", beta)
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"N is the number of free operations and must be an int >= 0, got {N!r}")
        self.variant: Variant = variant
        self.beta = float(beta)
        self.N = N

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not (terminated or truncated):
            return obs, reward, terminated, truncated, info
        name = type(self).__name__
        shaped = start_shaping(info, reward, "reward_penalty", name)
        n_ops = episode_value(info, COUNT_KEYS[self.variant], truncated, name)
        penalty = 0.0 if n_ops is None else efficiency_penalty(
            int(n_ops), variant=self.variant, beta=self.beta, N=self.N
        )
        shaped["reward_penalty"] = penalty
        return obs, float(reward) + penalty, terminated, truncated, shaped
