"""Reward shaping for PixelQA environments: curiosity bonus and efficiency penalty.

Each term exists as a pure function (for the group-based GRPO path) and as a
`gymnasium.Wrapper` (for single-environment PPO and SB3). The environment gives the
task reward; the wrappers add their terms at the end of an episode and report them in
info as ``reward_task``, ``reward_curiosity`` and ``reward_penalty``.
"""

from wrappers.curiosity import CuriosityReward, curiosity_bonus, group_shaped_rewards, rapr
from wrappers.efficiency import EfficiencyPenalty, efficiency_penalty

__all__ = [
    "CuriosityReward",
    "EfficiencyPenalty",
    "curiosity_bonus",
    "efficiency_penalty",
    "group_shaped_rewards",
    "rapr",
]
