"""Train Stable-Baselines3 PPO on `PixelQA-Structured-v0` with curiosity and efficiency shaping.

The task is a tiny counting setting of the synthetic `count` family: one to three large
shapes on a plain 256-384 px canvas, no confusers, "How many <colour> <shape>s are
there?" answered with the integer part of the structured action. The shapes are
countable from the overview, so operations bring nothing; what `--curiosity` versus
`--no-curiosity` changes is how often the policy still calls them (RaPR). Counting
itself takes this CNN more than a few CPU-minutes to learn (docs/sb3.md has the numbers).

    .venv/bin/python examples/sb3_structured.py
    .venv/bin/python examples/sb3_structured.py --no-curiosity
    tensorboard --logdir runs/sb3_structured

Rewards: the env's task reward (1 if correct), plus `EfficiencyPenalty` (by default the
released code's rule: -beta per requested call beyond the first, failed ones included),
plus `CuriosityReward` (running single-env RaPR, paper formula) unless `--no-curiosity`.
Training draws seeds at or above `HELD_OUT`; evaluation replays the seeds below it, so
its questions are never trained on. Metrics go to TensorBoard and CSV through SB3's
logger: `train/*` per rollout from finished episodes, `eval/*` before training, every
`eval_every` timesteps and at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from torch import nn

import pxr_env  # noqa: F401  (registers PixelQA-Structured-v0)
from pxr_env.tasks import Sample
from pxr_env.tasks.synthetic import Count
from wrappers import CuriosityReward, EfficiencyPenalty

HELD_OUT = 10_000
"""Seeds 0 .. HELD_OUT - 1 are kept for evaluation; training draws the others."""


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``; booleans also take ``--no-flag``)."""

    total_timesteps: int = 12_288
    """Environment steps to train for, summed over all envs."""
    n_envs: int = 4
    """Parallel environments."""
    vec_env: str = "dummy"
    """'dummy' (all envs in this process) or 'subproc' (one process each)."""
    curiosity: bool = True
    """Add the curiosity bonus; --no-curiosity is the ablation."""
    alpha: float = 0.5
    """Weight of the curiosity bonus."""
    H: float = 0.3
    """Target RaPR of the curiosity bonus."""
    beta: float = 0.05
    """Weight of the efficiency penalty."""
    penalty_variant: str = "code"
    """'code' charges every requested call beyond the first, failed ones included; 'paper'
    charges executed operations beyond `free_ops` and lets failed calls go free."""
    free_ops: int = 1
    """Operations per episode free of the efficiency penalty (paper variant)."""
    max_ops: int = 1
    """Executed operations per episode; one more request truncates the episode."""
    view_size: int = 64
    """Side of the `view` and `overview` images."""
    box_grid: int = 20
    """Crop boxes are given in steps of 1/box_grid of the image side (a finer grid makes a
    random box valid more often: x1 < x2 and y1 < y2)."""
    max_count: int = 3
    """Questions count 1 .. max_count shapes; the action answers 0 .. max_count."""
    learning_rate: float = 1e-3
    n_steps: int = 128
    """Steps per env per rollout."""
    batch_size: int = 128
    n_epochs: int = 4
    gamma: float = 0.99
    ent_coef: float = 0.01
    features_dim: int = 128
    """Width of the features the CNN extractor hands to the policy and value heads."""
    eval_episodes: int = 200
    """Held-out questions per evaluation."""
    eval_every: int = 4096
    """Timesteps between evaluations (plus one at the end)."""
    seed: int = 0
    log_dir: str = "runs/sb3_structured"
    run_name: str = ""
    """Subfolder of log_dir; empty: '<curiosity|no-curiosity>-s<seed>'."""
    threads: int = 1
    """torch threads (1 keeps a shared CPU usable)."""

    def __post_init__(self) -> None:
        if self.penalty_variant not in ("code", "paper"):
            raise ValueError(f"penalty_variant must be 'code' or 'paper', got {self.penalty_variant!r}")
        if not 2 <= self.max_count <= 8:
            raise ValueError(f"max_count must be in [2, 8] (the count family's shortcut range), got {self.max_count}")
        if self.vec_env not in ("dummy", "subproc"):
            raise ValueError(f"vec_env must be 'dummy' or 'subproc', got {self.vec_env!r}")
        if self.n_envs < 1 or self.total_timesteps < 1 or self.eval_every < 1:
            raise ValueError("n_envs, total_timesteps and eval_every must be >= 1")
        if not 1 <= self.eval_episodes <= HELD_OUT:
            raise ValueError(f"eval_episodes must be in [1, {HELD_OUT}]: only that many seeds are held out")
        if (self.n_steps * self.n_envs) % self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} must divide n_steps * n_envs "
                             f"= {self.n_steps * self.n_envs}")
        if not self.run_name:
            self.run_name = f"{'curiosity' if self.curiosity else 'no-curiosity'}-s{self.seed}"


def parse_args(argv: list[str] | None = None) -> Args:
    """`Args` from the command line: one ``--flag`` per field, ``--flag/--no-flag`` for booleans."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=hints[f.name], default=f.default)
    return Args(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------- the task
class SeedRange:
    """A synthetic family drawing only seeds in [low, high), so seeds outside stay unseen."""

    def __init__(self, family: Count, low: int, high: int = 2**31 - 1) -> None:
        self.family, self.low, self.high, self.name = family, low, high, family.name

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.family.generate(int(rng.integers(self.low, self.high)))

    def get(self, sample_id: str) -> Sample:
        return self.family.get(sample_id)


def make_family(max_count: int) -> Count:
    """The tiny counting setting: 1 .. max_count large shapes (6-8 px in a 64 px view) on a
    plain background, nothing else drawn."""
    return Count(canvas=(256, 384), shortcut_share=1.0, shortcut_count=(1, max_count), shortcut_size=(0.09, 0.12),
                 confusers=(0, 0), large_objects=(0, 0), backgrounds=("plain",), questions=("colour-shape",))


def make_env(args: Args, train: bool = True) -> gym.Env:
    """The structured env on the counting task; with training seeds and reward shaping if `train`."""
    family = make_family(args.max_count)
    env = gym.make("PixelQA-Structured-v0", tasks=SeedRange(family, HELD_OUT) if train else family,
                   view_size=args.view_size, box_grid=args.box_grid, max_ops=args.max_ops,
                   max_images=args.max_ops + 1, num_frames=1, max_answer=args.max_count)
    if not train:
        return env
    env = EfficiencyPenalty(env, variant=args.penalty_variant, beta=args.beta, N=args.free_ops)
    if args.curiosity:
        env = CuriosityReward(env, alpha=args.alpha, H=args.H)
    return Monitor(env)


# --------------------------------------------------------------------------- the policy
class PixelQAExtractor(BaseFeaturesExtractor):
    """A small CNN over `view` and `overview` stacked as six channels, a bag of question
    bytes and the status vector, mixed by one linear layer."""

    def __init__(self, observation_space: spaces.Dict, features_dim: int = 128, question_dim: int = 16) -> None:
        super().__init__(observation_space, features_dim)
        channels, height, width = observation_space["view"].shape  # channel-first after VecTransposeImage
        self.cnn = nn.Sequential(
            nn.Conv2d(2 * channels, 16, 5, stride=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_pixels = self.cnn(torch.zeros(1, 2 * channels, height, width)).shape[1]
        self.question = nn.EmbeddingBag(256, question_dim, mode="mean", padding_idx=0)
        n_status = observation_space["status"].shape[0]
        self.head = nn.Sequential(nn.Linear(n_pixels + question_dim + n_status, features_dim), nn.ReLU())

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = self.cnn(torch.cat([obs["view"], obs["overview"]], dim=1))
        question = self.question(obs["question"].long())
        return self.head(torch.cat([pixels, question, obs["status"]], dim=1))


# -------------------------------------------------------------------------- the metrics
def summarize(finals: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, RaPR (share of episodes with an executed operation), mean executed
    operations and op error rate (failed / requested operations) from final infos."""
    calls = sum(i["n_tool_calls"] for i in finals)
    return {
        "accuracy": float(np.mean([bool(i.get("correct", False)) for i in finals])),
        "rapr": float(np.mean([bool(i["used_pixel_reasoning"]) for i in finals])),
        "mean_ops": float(np.mean([i["n_visual_ops"] for i in finals])),
        "op_error_rate": sum(i["n_op_errors"] for i in finals) / calls if calls else 0.0,
    }


def evaluate(model: PPO, env: gym.Env, n_episodes: int) -> dict[str, float]:
    """Greedy episodes on the held-out questions ``count/0 .. count/<n_episodes - 1>``."""
    finals = []
    for seed in range(n_episodes):
        obs, _ = env.reset(options={"sample_id": f"{env.unwrapped.task_source.name}/{seed}"})
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        finals.append(info)
    return summarize(finals)


class PixelQACallback(BaseCallback):
    """Logs `train/*` from the episodes finished in each rollout, and `eval/*` before training
    and every `eval_every` steps."""

    def __init__(self, eval_env: gym.Env, eval_episodes: int, eval_every: int) -> None:
        super().__init__()
        self.eval_env, self.eval_episodes, self.eval_every = eval_env, eval_episodes, eval_every
        self.finals: list[dict[str, Any]] = []
        self.next_eval = eval_every
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1

    def _on_training_start(self) -> None:
        self.run_eval()
        self.logger.dump(self.num_timesteps)

    def _on_step(self) -> bool:
        self.finals += [info for info, done in zip(self.locals["infos"], self.locals["dones"]) if done]
        return True

    def _on_rollout_end(self) -> None:
        if self.finals:
            for key, value in summarize(self.finals).items():
                self.logger.record(f"train/{key}", value)
            for term in ("reward_task", "reward_curiosity", "reward_penalty"):
                self.logger.record(f"train/{term}", float(np.mean([i.get(term, 0.0) for i in self.finals])))
            self.finals = []
        if self.num_timesteps >= self.next_eval:
            self.run_eval()
            self.next_eval += self.eval_every

    def run_eval(self) -> None:
        """Evaluate on the held-out questions and record the results under `eval/`."""
        self.last_eval = evaluate(self.model, self.eval_env, self.eval_episodes)
        self.last_eval_step = self.num_timesteps
        for key, value in self.last_eval.items():
            self.logger.record(f"eval/{key}", value)


def main(args: Args) -> dict[str, float]:
    """Train, evaluate at the end, and return the final ``eval/*`` metrics and
    ``time/cpu_seconds`` (CPU time of this process in `learn`, periodic evaluations included,
    subproc workers not)."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.log_dir) / args.run_name
    vec_cls = DummyVecEnv if args.vec_env == "dummy" else SubprocVecEnv
    envs = vec_cls([lambda: make_env(args) for _ in range(args.n_envs)])
    eval_env = make_env(args, train=False)
    model = PPO(
        "MultiInputPolicy", envs, learning_rate=args.learning_rate, n_steps=args.n_steps,
        batch_size=args.batch_size, n_epochs=args.n_epochs, gamma=args.gamma, ent_coef=args.ent_coef,
        policy_kwargs={"features_extractor_class": PixelQAExtractor,
                       "features_extractor_kwargs": {"features_dim": args.features_dim}},
        seed=args.seed, device="cpu",
    )
    model.set_logger(configure(str(run_dir), ["stdout", "csv", "tensorboard"]))
    callback = PixelQACallback(eval_env, args.eval_episodes, args.eval_every)
    start = time.process_time()
    model.learn(total_timesteps=args.total_timesteps, callback=callback)
    cpu_seconds = time.process_time() - start
    if callback.last_eval_step != model.num_timesteps:
        callback.run_eval()
    model.logger.record("time/cpu_seconds", cpu_seconds)
    model.logger.dump(model.num_timesteps)
    envs.close()
    eval_env.close()
    return {**{f"eval/{k}": v for k, v in callback.last_eval.items()}, "time/cpu_seconds": cpu_seconds}


if __name__ == "__main__":
    print(main(parse_args()))
