"""Learning-rate schedules for the trainers.

REFERENCE section 4: RL uses a cosine decay to ``0.5 * lr`` after 3% warmup
(``min_lr_ratio=0.5``, ``warmup_steps = round(0.03 * total_steps)``); SFT uses 10% warmup.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate for optimizer step `step` (0-based).

    Linear warmup ``(step + 1) / warmup_steps``, reaching 1 at step ``warmup_steps - 1``, then
    a half cosine from 1 down to `min_lr_ratio`, reached exactly at the last step
    ``total_steps - 1`` and kept afterwards. No step gets a learning rate of 0 unless
    `min_lr_ratio` is 0 and it is the last one.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step + 1 - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A `LambdaLR` following `cosine_factor`; call ``scheduler.step()`` after each ``optimizer.step()``.

    Its state (the step count) goes into checkpoints through ``state_dict()``; the factor
    itself is rebuilt from these arguments, so pass the same ones when resuming.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps counts optimizer steps and must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps) = [0, {total_steps}), got {warmup_steps!r}; "
            "for a fraction f of training pass round(f * total_steps)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"min_lr_ratio is a fraction of the base learning rate and must be in [0, 1], got {min_lr_ratio}"
        )

    def factor(step: int) -> float:
        return cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)
