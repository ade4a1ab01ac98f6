"""The main job on the embedded default: play the synthetic suite with baseline policies.

Plays a few episodes of each synthetic family with the scripted oracle (look at the
evidence, then answer) and with a random policy, prints rewards and end-of-episode info,
and writes a picture of one episode per family to ``outputs/demo/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import numpy as np
from PIL import Image

import pxr_env  # noqa: F401  (registers PixelQA-v0)
from agents.base import EpisodeContext
from agents.baselines import OraclePolicy, RandomPolicy
from pxr_env.tasks import SYNTHETIC_FAMILIES


def play(env: gym.Env, policy, seed: int) -> tuple[float, dict, np.ndarray]:
    obs, info = env.reset(seed=seed)
    context = EpisodeContext(slot=0, reset_info=info)
    done, reward, info = False, 0.0, info
    while not done:
        (action,) = policy.act([obs], [context])
        context.history += [obs, action]
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return reward, info, env.render()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per family and policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'family':<10} {'policy':<8} {'sample':<18} {'reward':>6}  {'ops':>3} {'errors':>6}  answer")
    for family in SYNTHETIC_FAMILIES:
        env = gym.make("PixelQA-v0", tasks=family, render_mode="rgb_array")
        policies = {"oracle": OraclePolicy(env.unwrapped.task_source), "random": RandomPolicy(seed=args.seed)}
        for name, policy in policies.items():
            for k in range(args.episodes):
                reward, info, picture = play(env, policy, seed=args.seed + k)
                print(f"{family:<10} {name:<8} {info['sample_id']:<18} {reward:6.2f}  {info['n_visual_ops']:>3} "
                      f"{info['n_op_errors']:>6}  {info['answer']!r} (gold {info['gold_answers']})")
                if name == "oracle" and k == 0:
                    path = args.out / f"{family}-oracle.png"
                    Image.fromarray(picture).save(path)
        env.close()
    print(f"pictures written to {args.out}/")


if __name__ == "__main__":
    main()
