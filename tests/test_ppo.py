"""PPO: GAE over turns, running-RaPR rewards, the value head learns, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import torch

import agents.ppo as ppo
from agents.grpo import _parse_args
from agents.ppo import (VALUE_HEAD_FILE, PPOConfig, PPOTrainer, ValueHead, episode_gae,
                        episode_rewards, explained_variance, per_token)
from agents.rollout import Trajectory, turn_spans
from wrappers.curiosity import RunningRaPR


def test_episode_gae_matches_hand_values():
    values = torch.tensor([0.2, 0.5, 0.8])
    # deltas: 0.5 - 0.2, 0.8 - 0.5, 1 - 0.8; A_k = delta_k + lam * A_{k+1}
    adv, ret = episode_gae(1.0, values, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([0.3 + 0.95 * 0.49, 0.3 + 0.95 * 0.2, 0.2]))
    torch.testing.assert_close(ret, adv + values)
    # discounted: deltas 0.9 * 0.5 - 0.2, 0.9 * 0.8 - 0.5, 1 - 0.8; gamma * lam = 0.45
    adv, ret = episode_gae(1.0, values, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.25 + 0.45 * 0.31, 0.22 + 0.45 * 0.2, 0.2]))
    adv, ret = episode_gae(1.0, values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.ones(3))  # Monte Carlo: every turn's return is the episode reward
    adv, ret = episode_gae(-0.05, torch.tensor([0.4]), gamma=1.0, lam=0.95)
    torch.testing.assert_close((adv, ret), (torch.tensor([-0.45]), torch.tensor([-0.05])))


def test_turn_spans_and_per_token_layout():
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], bool)
    spans = turn_spans(mask)
    assert spans == [(2, 4), (7, 10)]
    out = per_token(spans, torch.tensor([0.5, -1.0]), len(mask))
    torch.testing.assert_close(out, torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, -1, -1, -1, 0]))
    assert turn_spans(np.array([1, 1, 0], bool)) == [(0, 2)]


def test_running_rapr_and_episode_rewards():
    rapr = RunningRaPR(window=3, global_window=4)
    # a query seen first uses every query's recent episodes, then its own last `window`
    assert [rapr.update(q, u) for q, u in [("a", True), ("b", False), ("a", False), ("a", False), ("a", False)]] \
        == pytest.approx([1.0, 0.5, 0.5, 1 / 3, 0.0])
    assert rapr.update("c", True) == pytest.approx(1 / 4)  # global window: the last 4 episodes, F, F, F, T
    copy = RunningRaPR(window=3, global_window=4)
    copy.load_state_dict(json.loads(json.dumps(rapr.state_dict())))
    assert copy.update("a", True) == rapr.update("a", True) == pytest.approx(1 / 3)

    def episode(score: float, ops: int, calls: int) -> Trajectory:
        info = {"score": score, "used_pixel_reasoning": ops > 0, "n_visual_ops": ops, "n_tool_calls": calls}
        return Trajectory(sample_id="q", family="f", seed=0, group=0, member=0, reset_info={"is_video": False},
                          turns=[], images=[], info=info, terminated=True, truncated=False)

    episodes = [episode(1.0, 1, 1), episode(0.0, 3, 4), episode(1.0, 0, 0)]
    paper = episode_rewards(episodes, [0.125, 0.5, 0.125], PPOConfig())
    np.testing.assert_allclose(paper["reward_curiosity"], [0.0875, 0.0, 0.0])
    np.testing.assert_allclose(paper["reward_penalty"], [0.0, -0.1, 0.0])
    np.testing.assert_allclose(paper["reward"], [1.0875, -0.1, 1.0])
    code = episode_rewards(episodes, [0.125, 0.5, 0.125], PPOConfig(variant="code"))
    np.testing.assert_allclose(code["reward_curiosity"], [0.175, 0.0, 0.0])
    np.testing.assert_allclose(code["reward_penalty"], [0.0, -0.15, 0.0])
    off = episode_rewards(episodes, [0.125, 0.5, 0.125], PPOConfig(curiosity=False, penalty=False))
    np.testing.assert_allclose(off["reward"], [1.0, 0.0, 1.0])


def test_explained_variance():
    returns = np.array([0.0, 1.0, 2.0])
    assert explained_variance(returns, returns) == 1.0
    assert explained_variance(np.full(3, 1.0), returns) == pytest.approx(0.0)
    assert np.isnan(explained_variance(returns, np.ones(3)))


def test_config_defaults_and_rejections():
    config = PPOConfig()
    assert config.group_size == 1 and config.clip_low == 0.2 and config.clip_high == 0.35
    with pytest.raises(ValueError, match="groups"):
        PPOConfig(normalize_std=True)
    with pytest.raises(ValueError, match="groups"):
        PPOConfig(filter_zero_variance=True)
    with pytest.raises(ValueError, match="gamma"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="train_turns is GRPO's"):
        PPOConfig(train_turns="operations")
    with pytest.raises(ValueError, match="temperature"):  # GRPO's shared checks still apply
        PPOConfig(temperature=0)
    parsed = _parse_args(["--gamma", "0.9", "--no-whiten-advantages", "--value-hidden", "16"], PPOConfig)
    assert isinstance(parsed, PPOConfig) and parsed.gamma == 0.9 and not parsed.whiten_advantages
    assert parsed.value_hidden == 16 and parsed.group_size == 1


def test_value_head_saves_and_loads_as_safetensors(tmp_path):
    for inner in (0, 8):
        head = ValueHead(16, inner)
        torch.nn.init.normal_(head.net[-1].weight)
        head.save(tmp_path / VALUE_HEAD_FILE)
        loaded = ValueHead.load(tmp_path / VALUE_HEAD_FILE)
        assert loaded.inner_size == inner
        hidden = torch.randn(2, 5, 16)
        assert head(hidden).shape == (2, 5)
        torch.testing.assert_close(loaded(hidden), head(hidden))


def _config(model: Path, out: Path, **overrides) -> PPOConfig:
    base = dict(model=str(model), out=str(out), steps=4, queries_per_step=4, max_new_tokens=6, max_turns=2,
                eval_queries=2, eval_every=2, save_every=2, lr=1e-2, threads=1, progress=False)
    base.update(overrides)
    return PPOConfig(**base)


def _varied_rewards(trajectories, rapr_estimates, config):
    """Rewards that differ between episodes (an untrained model never answers right)."""
    task = np.array([float(len(t.token_ids) % 3) for t in trajectories]) + np.arange(len(trajectories)) * 0.1
    zeros = np.zeros(len(trajectories))
    return {"reward": task, "reward_task": task, "reward_curiosity": zeros, "reward_penalty": zeros}


def test_batch_layout_and_updates_fit_the_values(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "episode_rewards", _varied_rewards)
    trainer = PPOTrainer(_config(tiny_checkpoint, tmp_path, value_clip=0.0, vf_coef=1.0, whiten_advantages=False))
    trajectories = trainer.rollouts(step=0)
    items, advantages, stats = trainer.batch(trajectories)
    assert stats["train/value_mean"] == 0.0  # the output layer starts at zero
    spans = [turn_spans(t.generated_mask) for t in trajectories]
    rewards = _varied_rewards(trajectories, [], trainer.config)["reward"]
    returns = []
    for t, item, adv, s, reward in zip(trajectories, items, advantages, spans, rewards):
        policy = torch.as_tensor(t.generated_mask)
        turn_adv, turn_ret = episode_gae(float(reward), torch.zeros(len(s)), 1.0, 0.95)
        torch.testing.assert_close(item["returns"], per_token(s, turn_ret, len(policy)))
        torch.testing.assert_close(adv[:len(policy)], per_token(s, turn_adv, len(policy)))
        assert bool((adv[len(policy):] == 0).all()) and bool((item["returns"][~policy] == 0).all())
        assert item["value_index"][policy].unique().tolist() == sorted(start - 1 for start, _ in s)
        returns.append(turn_ret)

    def value_error() -> float:
        values = trainer.turn_values(items, spans)
        return float(sum(((v - r) ** 2).sum() for v, r in zip(values, returns)))

    before_error = value_error()
    model_before = [p.detach().clone() for p in trainer.model.parameters()]
    head_before = [p.detach().clone() for p in trainer.value_head.parameters()]
    losses = []
    for _ in range(6):
        update = trainer.update(items, advantages)
        assert np.isfinite(update["loss/policy"]) and update["loss/grad_norm"] > 0
        losses.append(update["loss/value"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert value_error() < 0.5 * before_error
    assert any(not torch.equal(a, b) for a, b in zip(model_before, trainer.model.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(head_before, trainer.value_head.parameters()))


def test_training_logs_checkpoints_and_resumes_exactly(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "episode_rewards", _varied_rewards)
    straight = PPOTrainer(_config(tiny_checkpoint, tmp_path / "straight"))
    straight.train()
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for key in ("train/accuracy", "train/rapr", "reward/total", "loss/policy", "loss/value", "loss/clip_fraction",
                "train/value_mean", "train/explained_variance", "train/rapr_estimate", "eval/accuracy"):
        assert key in keys, key
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-0000004"
    assert (checkpoint / "model" / VALUE_HEAD_FILE).exists()
    assert "rapr" in json.loads((checkpoint / "trainer_state.json").read_text())["extra"]
    final = tmp_path / "straight" / "final"
    saved = ValueHead.load(final / VALUE_HEAD_FILE)
    for a, b in zip(saved.parameters(), straight.value_head.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=0)

    interrupted = PPOTrainer(_config(tiny_checkpoint, tmp_path / "resumed", max_minutes=1e-9))
    interrupted.train()  # stops after its first step, as a killed run would have saved it
    resumed = PPOTrainer(_config(tiny_checkpoint, tmp_path / "resumed", resume=True))
    assert resumed.start_step == 1
    resumed.train()
    for a, b in zip(straight.trained.parameters(), resumed.trained.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed.rapr.state_dict() == straight.rapr.state_dict()

    continued = PPOTrainer(_config(final, tmp_path / "continued"))  # a PPO final folder brings its value head
    for a, b in zip(continued.value_head.parameters(), saved.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="value_hidden"):
        PPOTrainer(_config(final, tmp_path / "mismatch", value_hidden=8))
