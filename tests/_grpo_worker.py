"""Worker for tests/test_grpo.py's kill test: `python -m agents.grpo` with rewards that vary
within each group (an untrained model never answers right), so that every step updates."""

import sys

import numpy as np

import agents.grpo as grpo


def varied_rewards(trajectories, config):
    g = len(trajectories)
    task = np.array([float(len(t.token_ids) % 3) for t in trajectories]) + np.arange(g) * 0.1
    zeros = np.zeros(g)
    return {"reward": task, "reward_task": task, "reward_curiosity": zeros, "reward_penalty": zeros}


if __name__ == "__main__":
    grpo.shape_rewards = varied_rewards
    grpo.main(sys.argv[1:])
