"""The trainers on each device: SFT, GRPO and PPO train where ``device`` says, a CUDA run
matches the CPU one, and bfloat16 weights train. The CUDA cases run on GPU machines."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import agents.grpo as grpo
import agents.ppo as ppo
from agents.grpo import GRPOConfig, GRPOTrainer
from agents.logger import read_metrics
from agents.ppo import PPOConfig, PPOTrainer
from agents.sft import ZOOM_EASY, SFTConfig, SFTStage, train_sft
from agents.vlm.hf import pad_items, token_logprobs, trajectory_item

sys.path.insert(0, str(Path(__file__).parent))
from _grpo_worker import varied_rewards  # noqa: E402

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
DEVICES = ["cpu", CUDA]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vision_num_layers=1)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _sft(out: Path, device: str) -> dict:
    config = SFTConfig(out=str(out), stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=2, image_mix={"image/single": 1.0})],
                       model=SMALL, vision_pretrain={"samples": 6, "steps": 2, "batch_size": 2, "held_out": 2},
                       max_steps=8, batch_size=2, lr=1e-2, warmup_ratio=0.0, eval_every=0, eval_samples=1,
                       max_new_tokens=4, checkpoint_every=0, progress=False, log_every=1, device=device)
    return train_sft(config)


@pytest.mark.parametrize("device", DEVICES)
def test_sft_trains_on_the_device(tmp_path: Path, device: str) -> None:
    result = _sft(tmp_path, device)
    assert next(result["model"].parameters()).device.type == device
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    assert "accuracy" in result["eval"]  # the closed-loop evaluation ran on the device too


@pytest.mark.parametrize("device", [CUDA])
def test_sft_on_cuda_follows_the_cpu_run(tmp_path: Path, device: str) -> None:
    _sft(tmp_path / "cpu", "cpu")
    _sft(tmp_path / device, device)
    cpu, gpu = ([r["train/loss"] for r in read_metrics(tmp_path / run) if "train/loss" in r] for run in ("cpu", device))
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-2)  # the same initialisation and first batch
    assert gpu[-1] == pytest.approx(cpu[-1], rel=0.2, abs=0.05)


def _grpo_config(model: Path, out: Path, device: str, **overrides) -> dict:
    return dict(model=str(model), out=str(out), steps=2, queries_per_step=2, group_size=2, max_new_tokens=6,
                max_turns=2, eval_queries=2, eval_every=1, save_every=1, lr=1e-2, threads=1, progress=False,
                filter_zero_variance=False, device=device) | overrides


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_trains_on_the_device(tiny_checkpoint, tmp_path: Path, device: str, dtype: str, monkeypatch) -> None:
    monkeypatch.setattr(grpo, "shape_rewards", varied_rewards)
    trainer = GRPOTrainer(GRPOConfig(**_grpo_config(tiny_checkpoint, tmp_path, device, dtype=dtype)))
    param = next(trainer.model.parameters())
    assert (param.device.type, param.dtype) == (device, getattr(torch, dtype))
    trajectories = trainer.rollouts(step=0)
    items = [trajectory_item(trainer.processor, t) for t in trajectories]
    with torch.no_grad():  # the sampler's log-probs are the trainer's, so the first ratio is 1
        recomputed = token_logprobs(trainer.model, pad_items(trainer.processor, items), trainer.config.temperature,
                                    trainer.suppressed).float().cpu()
    for row, item in enumerate(items):
        mask = item["loss_mask"].bool()
        gap = (recomputed[row, :len(mask)][mask] - item["old_logprobs"][mask]).abs()
        assert float(gap.max()) < (0.1 if dtype == "bfloat16" else 1e-3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    final = trainer.train()
    assert "eval/accuracy" in final
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.device.type == device for p in trainer.model.parameters())
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_trains_on_the_device(tiny_checkpoint, tmp_path: Path, device: str, monkeypatch) -> None:
    def rewards(trajectories, rapr_estimates, config):
        task = np.arange(len(trajectories), dtype=float) * 0.5
        zeros = np.zeros(len(trajectories))
        return {"reward": task, "reward_task": task, "reward_curiosity": zeros, "reward_penalty": zeros}

    monkeypatch.setattr(ppo, "episode_rewards", rewards)
    fields = _grpo_config(tiny_checkpoint, tmp_path, device, queries_per_step=4)
    fields.pop("group_size"), fields.pop("filter_zero_variance")
    trainer = PPOTrainer(PPOConfig(**fields))
    head = [p.detach().clone() for p in trainer.value_head.parameters()]
    trainer.train()
    assert all(p.device.type == device for p in trainer.value_head.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(head, trainer.value_head.parameters()))
