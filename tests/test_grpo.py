"""GRPO: reward shaping per group, the update moves parameters, logging, checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import agents.grpo as grpo
from agents.grpo import GRPOConfig, GRPOTrainer, shape_rewards
from agents.rollout import Trajectory, Turn


def _trajectory(score: float, ops: int, calls: int, group: int = 0, member: int = 0) -> Trajectory:
    info = {"score": score, "correct": score >= 0.5, "used_pixel_reasoning": ops > 0, "n_visual_ops": ops,
            "n_tool_calls": calls, "n_op_errors": calls - ops}
    return Trajectory(sample_id="zoom-read/1", family="zoom-read", seed=0, group=group, member=member,
                      reset_info={"is_video": False}, turns=[], images=[], info=info, terminated=True, truncated=False)


def test_shape_rewards_matches_hand_values():
    group = [_trajectory(1.0, 1, 1)] + [_trajectory(0.0, 0, 0) for _ in range(7)]
    paper = shape_rewards(group, GRPOConfig(variant="paper"))
    assert paper["reward_curiosity"][0] == pytest.approx(0.0875) and paper["reward_curiosity"][1:].sum() == 0
    assert paper["reward"][0] == pytest.approx(1.0875)
    code = shape_rewards(group, GRPOConfig(variant="code"))
    assert code["reward_curiosity"][0] == pytest.approx(0.175)
    off = shape_rewards(group, GRPOConfig(curiosity=False))
    assert off["reward_curiosity"].sum() == 0 and off["reward"][0] == pytest.approx(1.0)
    two_ops = [_trajectory(0.0, 3, 3)] + [_trajectory(0.0, 0, 0) for _ in range(7)]
    assert shape_rewards(two_ops, GRPOConfig())["reward_penalty"][0] == pytest.approx(-0.1)
    assert shape_rewards(two_ops, GRPOConfig(penalty=False))["reward_penalty"][0] == 0


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="variant"):
        GRPOConfig(variant="mine")
    with pytest.raises(ValueError, match="temperature"):
        GRPOConfig(temperature=0)
    with pytest.raises(ValueError, match="list of parameter-name prefixes"):
        GRPOConfig(freeze="model")
    with pytest.raises(ValueError, match="train_turns"):
        GRPOConfig(train_turns="answers")


def _config(model: Path, out: Path, **overrides) -> GRPOConfig:
    base = dict(model=str(model), out=str(out), steps=4, queries_per_step=2, group_size=2, max_new_tokens=6,
                max_turns=2, eval_queries=2, eval_every=2, save_every=2, lr=1e-2, threads=1, progress=False,
                filter_zero_variance=False)
    base.update(overrides)
    return GRPOConfig(**base)


sys.path.insert(0, str(Path(__file__).parent))
from _grpo_worker import varied_rewards as _varied_rewards  # noqa: E402


def test_update_moves_parameters(tiny_checkpoint, tmp_path):
    trainer = GRPOTrainer(_config(tiny_checkpoint, tmp_path))
    trajectories = trainer.rollouts(step=0)
    assert len(trajectories) == 4 and all(t.has_tokens for t in trajectories)
    from agents.vlm.hf import trajectory_item

    items = [trajectory_item(trainer.processor, t) for t in trajectories]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.update(items, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert np.isfinite(stats["loss/policy"]) and stats["loss/grad_norm"] > 0
    moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert moved > 0


def test_kl_to_the_reference_starts_at_zero_grows_as_the_policy_moves_and_leaves_the_reference(tiny_checkpoint,
                                                                                                 tmp_path):
    """``kl_coef`` > 0: a frozen copy of the starting model is the reference; the KL term is 0
    before the first update and positive after the policy moved, and the reference stays put."""
    from agents.vlm.hf import trajectory_item

    trainer = GRPOTrainer(_config(tiny_checkpoint, tmp_path, kl_coef=0.5))
    items = [trajectory_item(trainer.processor, t) for t in trainer.rollouts(step=0)]
    reference = [p.detach().clone() for p in trainer.reference.parameters()]
    first = trainer.update(items, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    second = trainer.update(items, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert first["loss/kl_ref"] == pytest.approx(0.0, abs=1e-6) and second["loss/kl_ref"] > 0
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.reference.parameters()))


def test_operation_turns_alone_are_trained_when_asked(tiny_checkpoint, tmp_path):
    """``train_turns="operations"``: the loss mask keeps the generated tokens of tool-calling turns
    and clears those of the answer turn; ``"all"`` keeps every generated token."""
    crop = '<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 10, 10]}}\n</tool_call>'
    turns = [Turn(observation="", image_indices=(), action=crop, reward=0.0, info={}),
             Turn(observation="", image_indices=(), action="\\boxed{7}", reward=1.0, info={})]
    tokens = Trajectory(sample_id="zoom-read/1", family="zoom-read", seed=0, group=0, member=0,
                        reset_info={"is_video": False}, turns=turns, images=[], info={}, terminated=True,
                        truncated=False, token_ids=np.arange(10), generated_mask=np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0], bool),
                        logprobs=np.zeros(10, np.float32))
    trainer = GRPOTrainer(_config(tiny_checkpoint, tmp_path, train_turns="operations"))
    assert trainer.item(tokens)["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    every = GRPOTrainer(_config(tiny_checkpoint, tmp_path / "all")).item(tokens)
    assert every["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    tokens.turns = turns[1:]
    with pytest.raises(ValueError, match="generated runs"):
        trainer.item(tokens)
    tokens.turns, tokens.generated_mask = turns, np.array([1, 1, 1, 0, 0, 0, 0, 1, 1, 0], bool)
    with pytest.raises(ValueError, match="prompt tokens of its own"):
        trainer.item(tokens)


def test_frozen_prefixes_stay_fixed_and_the_rest_trains(tiny_checkpoint, tmp_path):
    """``freeze: ["model"]`` trains the tiny model's pointer head alone; an unknown prefix is refused."""
    from agents.vlm.hf import trajectory_item

    trainer = GRPOTrainer(_config(tiny_checkpoint, tmp_path, freeze=["model"]))
    trainer.model.config.box_slot_token_id = None  # the untrained model then samples box tokens anywhere
    items = [trajectory_item(trainer.processor, t) for t in trainer.rollouts(step=0)]
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.update(items, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(name.startswith("pointer.") for name in moved)
    with pytest.raises(ValueError, match="match no parameter"):
        GRPOTrainer(_config(tiny_checkpoint, tmp_path / "bad", freeze=["decoder"]))


def test_training_logs_checkpoints_and_resumes_exactly(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "shape_rewards", _varied_rewards)
    straight = GRPOTrainer(_config(tiny_checkpoint, tmp_path / "straight"))
    straight.train()
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for key in ("train/accuracy", "train/rapr", "reward/curiosity", "loss/policy", "loss/clip_fraction",
                "eval/accuracy", "time/generated_tokens_per_s"):
        assert key in keys, key
    assert (tmp_path / "straight" / "final" / "config.json").exists()

    interrupted = GRPOTrainer(_config(tiny_checkpoint, tmp_path / "resumed", steps=4, max_minutes=1e-9))
    interrupted.train()  # stops after its first step, as a killed run would have saved it
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000001").exists()
    resumed = GRPOTrainer(_config(tiny_checkpoint, tmp_path / "resumed", resume=True))
    assert resumed.start_step == 1
    resumed.train()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_selective_sample_replay_refills_the_batch_from_earlier_rollouts(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "shape_rewards", _varied_rewards)
    trainer = GRPOTrainer(_config(tiny_checkpoint, tmp_path, replay_batch=6, filter_zero_variance=True))
    first, adv_first, _ = trainer.batch(trainer.rollouts(step=0))
    assert len(first) == 4 and len(trainer.replay) == 4  # all fresh rollouts kept, then stored
    second, adv_second, _ = trainer.batch(trainer.rollouts(step=1))
    assert len(second) == 6 and len(adv_second) == 6  # 4 fresh + 2 replayed
    for item in second:  # old log-probs are the current policy's, aligned with the tokens
        assert item["old_logprobs"].shape == item["input_ids"].shape
    stats = trainer.update(second, adv_second)
    assert np.isfinite(stats["loss/policy"])
    assert stats["loss/clip_fraction"] == 0.0  # fresh ratios are exactly 1 before the first update step


def test_a_killed_run_resumes_with_no_lost_or_repeated_step(tiny_checkpoint, tmp_path):
    """SIGKILL a training process after its second checkpoint, resume it, compare with a run
    that was never interrupted."""
    from safetensors.torch import load_file

    worker = Path(__file__).with_name("_grpo_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def argv(out: Path) -> list[str]:
        return [sys.executable, str(worker), "--model", str(tiny_checkpoint), "--out", str(out), "--steps", "5",
                "--queries-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--max-turns", "2",
                "--eval-queries", "2", "--eval-every", "0", "--save-every", "1", "--keep-checkpoints", "5",
                "--lr", "1e-2", "--threads", "1", "--no-progress", "--no-filter-zero-variance"]

    subprocess.run(argv(tmp_path / "straight"), env=env, check=True, timeout=300, capture_output=True)
    victim = subprocess.Popen(argv(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "killed" / "checkpoints" / "step-0000002" / "trainer_state.json"
    deadline = time.time() + 240
    while not second.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert second.exists() and not (tmp_path / "killed" / "final").exists(), "the run was not killed mid-training"
    subprocess.run(argv(tmp_path / "killed") + ["--resume"], env=env, check=True, timeout=300, capture_output=True)

    final = lambda run: load_file(str(next((tmp_path / run / "final").glob("*.safetensors"))))  # noqa: E731
    straight, resumed = final("straight"), final("killed")
    initial = load_file(str(next(tiny_checkpoint.glob("*.safetensors"))))
    assert any(not torch.equal(straight[k], initial[k]) for k in initial)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and max(steps) >= 5


@pytest.mark.parametrize("shipped", ["tiny-warmstart", "tiny-ablation-start", "tiny-curious"])
def test_the_final_policy_keeps_its_chat_format(tmp_path, shipped):
    """A shipped policy, saved again as the trainers save, loads back with the conversation layout it was trained in."""
    from agents.vlm.hf import TransformersPolicy

    source = Path(__file__).parents[1] / "checkpoints" / shipped
    policy = TransformersPolicy.from_pretrained(source)
    assert (policy.system, policy.question_first) != (None, False)
    policy.save_pretrained(tmp_path / "saved")
    again = TransformersPolicy.from_pretrained(tmp_path / "saved")
    assert (again.system, again.question_first) == (policy.system, policy.question_first)


def test_rollout_envs_take_the_model_env_settings_under_the_config(tiny_checkpoint, tmp_path):
    """GRPO plays in the env the warm start was trained in; its own `env_kwargs` override per key,
    and the final policy keeps the merged settings."""
    from agents.vlm.hf import TransformersPolicy

    policy = TransformersPolicy.from_pretrained(tiny_checkpoint)
    policy.env_kwargs = {"crop_padding": 0.02, "min_crop_side": 20}
    policy.save_pretrained(tmp_path / "model")
    trainer = GRPOTrainer(_config(tmp_path / "model", tmp_path / "run", env_kwargs={"min_crop_side": 10}))
    env = trainer.envs[0].unwrapped
    assert (env.crop_padding, env.min_crop_side) == (0.02, 10)
    assert trainer.policy.env_kwargs == {"crop_padding": 0.02, "min_crop_side": 10}


def test_the_ablation_example_passes_its_settings_to_each_arm(tmp_path, monkeypatch):
    """`examples/curiosity_ablation.py`: an arm runs GRPO with the study's settings and its own reward switches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("curiosity_ablation",
                                                  Path(__file__).parents[1] / "examples" / "curiosity_ablation.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up there
    spec.loader.exec_module(example)
    seen = []

    class Recorder:
        def __init__(self, config: GRPOConfig) -> None:
            seen.append(config)

        def train(self) -> dict[str, float]:
            return {"eval/accuracy": 0.5, "eval/rapr": 0.25}

    monkeypatch.setattr(grpo, "GRPOTrainer", Recorder)
    args = example.Args(out=str(tmp_path), alpha=2.0, lr=1e-4)
    assert example.run_arm(args, "code", seed=3)["eval/rapr"] == 0.25
    assert example.run_arm(args, "none", seed=3)["eval/accuracy"] == 0.5
    code, none = seen
    assert (code.alpha, code.variant, code.curiosity, code.seed, code.lr) == (2.0, "code", True, 3, 1e-4)
    assert not none.curiosity and none.out == str(tmp_path / "none-s3")
