"""The cosine schedule: warmup, decay and end values by hand."""

from __future__ import annotations

import math

import pytest
import torch

from agents.schedules import cosine_schedule


def _lrs(warmup: int, total: int, min_ratio: float, steps: int, lr: float = 2.0) -> list[float]:
    """The learning rate each optimizer step 0..steps-1 runs with."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = cosine_schedule(optimizer, warmup, total, min_ratio)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_to_the_floor() -> None:
    c = math.cos(math.pi / 4)
    expected = [1.0, 2.0, 2 * (0.5 + 0.25 * (1 + c)), 2 * 0.75, 2 * (0.5 + 0.25 * (1 - c)), 1.0, 1.0]
    assert _lrs(2, 6, 0.5, 7) == pytest.approx(expected)


def test_rl_and_sft_settings() -> None:
    rl = _lrs(3, 100, 0.5, 100, lr=1e-6)  # 3% warmup, floor 0.5 * lr
    assert rl[:3] == pytest.approx([1e-6 / 3, 2e-6 / 3, 1e-6])
    assert rl[-1] == pytest.approx(0.5e-6) and min(rl[2:]) == pytest.approx(0.5e-6)
    sft = _lrs(10, 100, 0.0, 100, lr=1.0)  # 10% warmup, decay to 0 at the last step
    assert sft[0] == pytest.approx(0.1) and sft[9] == pytest.approx(1.0) and sft[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(sft[9:], sft[10:]))


def test_no_warmup_and_bad_arguments() -> None:
    assert _lrs(0, 2, 0.0, 2) == pytest.approx([1.0, 0.0])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(optimizer, 10, 10)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(optimizer, 0, 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        cosine_schedule(optimizer, 0, 10, min_lr_ratio=1.5)
