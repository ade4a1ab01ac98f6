"""Advantages and losses for the GRPO and PPO trainers: pure functions on tensors.

Shapes use ``B`` for sequences (or queries), ``G`` for the rollouts of one query, ``T``
for token (or turn) positions. Masks are bool or 0/1 tensors of the same shape as the
values they select; masked-out positions may hold anything (padding log-probs of -inf
included), they never reach a result.

The GRPO recipe (shared REFERENCE section 4): advantage = reward - group mean, no division
by the standard deviation; groups whose rewards are all equal are dropped (selective sample
replay refills the batch from earlier non-zero-advantage samples); PPO clipped ratio with
the asymmetric clip 0.2 / 0.35; token-level averaging; no KL and no entropy term.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Literal, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

T = TypeVar("T")

ADVANTAGE_EPS = 1e-8
"""|advantage| at or below this counts as zero: such a sample carries no policy gradient."""


def _as_float_tensor(values: Tensor | np.ndarray | Sequence, name: str, ndim: int) -> Tensor:
    tensor = torch.as_tensor(values)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def group_advantages(
    rewards: Tensor | np.ndarray | Sequence, normalize_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages: each reward minus the mean of its group.

    Args:
        rewards: ``[B, G]``, the rewards of the G rollouts of each of B queries.
        normalize_std: also divide by the group's standard deviation (+ `eps`), as the
            original GRPO does; the Pixel Reasoner recipe does not. The sample standard
            deviation (Bessel-corrected) is used, so G must be >= 2.
        eps: added to the standard deviation; a group of equal rewards gets advantages 0.

    Returns:
        ``[B, G]`` advantages, floating point.
    """
    r = _as_float_tensor(rewards, "rewards", 2)
    advantages = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        if r.shape[1] < 2:
            raise ValueError("normalize_std needs at least 2 rollouts per group to estimate a standard deviation")
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages


def zero_variance_mask(rewards: Tensor | np.ndarray | Sequence, atol: float = ADVANTAGE_EPS) -> Tensor:
    """``[B]`` bool, True for the groups to drop: all G rewards equal (within `atol`).

    Such a group has all advantages 0 and gives no policy gradient; `selective_sample_replay`
    drops its rollouts. `rewards` is ``[B, G]``. The fraction of True is worth logging: when
    it nears 1 the batch is mostly refilled from the replay buffer.
    """
    r = _as_float_tensor(rewards, "rewards", 2)
    return (r.amax(dim=1) - r.amin(dim=1)) <= atol


@dataclass(frozen=True)
class Scored(Generic[T]):
    """One rollout (any payload, e.g. a trajectory) with its advantage.

    `replayed` is True when `selective_sample_replay` took it from the buffer rather than
    from the current rollouts.
    """

    item: T
    advantage: float
    replayed: bool = False


def _weighted_pick(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct indices, drawn in turn with probability proportional to `weights` (> 0)."""
    return rng.choice(len(weights), size=n, replace=False, p=weights / weights.sum())


class ReplayBuffer(Generic[T]):
    """The most recent non-zero-advantage rollouts, for refilling a GRPO batch.

    Holds at most `capacity` rollouts; adding beyond it evicts the oldest. Only rollouts
    with |advantage| > `ADVANTAGE_EPS` are stored, so every group with all rewards equal
    is left out. Not part of a checkpoint: a resumed run starts with an empty buffer.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity counts rollouts and must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._entries: deque[Scored[T]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, groups: Sequence[Sequence[T]], advantages: Tensor | np.ndarray | Sequence) -> int:
        """Store the rollouts of `groups` (``B`` lists of ``G``) whose advantage is non-zero.

        `advantages` is ``[B, G]``, aligned with `groups`. Returns how many were stored.
        """
        entries = _nonzero(groups, advantages)
        self._entries.extend(entries)
        return len(entries)

    def sample(self, n: int, rng: np.random.Generator) -> list[Scored[T]]:
        """`n` distinct stored rollouts, picked with probability proportional to |advantage|.

        They come back marked ``replayed=True`` and stay in the buffer. Deterministic for a
        given state of `rng`.
        """
        if n < 0 or n > len(self):
            raise ValueError(f"cannot sample {n} rollouts from a replay buffer holding {len(self)}")
        if n == 0:
            return []
        entries = list(self._entries)
        weights = np.array([abs(e.advantage) for e in entries])
        picked = _weighted_pick(weights, n, rng)
        return [Scored(entries[i].item, entries[i].advantage, replayed=True) for i in picked]


def _nonzero(groups: Sequence[Sequence[T]], advantages: Tensor | np.ndarray | Sequence) -> list[Scored[T]]:
    """The rollouts of `groups` with |advantage| > ADVANTAGE_EPS, in row-major order."""
    adv = _as_float_tensor(advantages, "advantages", 2).detach().cpu().double()
    if len(groups) != adv.shape[0] or any(len(g) != adv.shape[1] for g in groups):
        raise ValueError(
            f"groups must be {adv.shape[0]} lists of {adv.shape[1]} rollouts to match advantages "
            f"of shape {tuple(adv.shape)}, got lengths {[len(g) for g in groups]}"
        )
    return [
        Scored(item, float(a))
        for group, row in zip(groups, adv.tolist())
        for item, a in zip(group, row)
        if abs(a) > ADVANTAGE_EPS
    ]


def selective_sample_replay(
    groups: Sequence[Sequence[T]],
    advantages: Tensor | np.ndarray | Sequence,
    batch_size: int,
    buffer: ReplayBuffer[T],
    rng: np.random.Generator,
) -> list[Scored[T]]:
    """A training batch of non-zero-advantage rollouts (selective sample replay).

    1. Rollouts with advantage 0 (every rollout of a group of equal rewards) are dropped.
    2. If more than `batch_size` remain, `batch_size` of them are kept, drawn without
       replacement with probability proportional to |advantage|. Otherwise all are kept
       and the batch is refilled from `buffer` (rollouts of earlier calls, also drawn in
       proportion to |advantage|).
    3. The current non-zero rollouts are then added to `buffer`, so a batch never holds a
       rollout twice.

    Args:
        groups: ``B`` lists of ``G`` rollouts (any payload).
        advantages: ``[B, G]``, e.g. from `group_advantages`.
        batch_size: rollouts wanted; fewer come back only when the current rollouts and the
            buffer together hold fewer non-zero ones.
        buffer: the run's `ReplayBuffer`, updated in place.
        rng: the generator every draw uses (seed it for reproducible batches).

    Returns:
        The current rollouts kept (``replayed=False``, in their original order), then the
        replayed ones. A replayed rollout's stored log-probs come from an older policy;
        recompute ``logp_old`` with the policy that starts the update.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size counts rollouts and must be an int >= 1, got {batch_size!r}")
    fresh = _nonzero(groups, advantages)
    if len(fresh) > batch_size:
        weights = np.array([abs(s.advantage) for s in fresh])
        picked = np.sort(_weighted_pick(weights, batch_size, rng))
        batch = [fresh[i] for i in picked]
    else:
        batch = fresh + buffer.sample(min(batch_size - len(fresh), len(buffer)), rng)
    buffer.add(groups, advantages)
    return batch


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these tensors must share one shape: {shapes}")


def _mask_and_count(mask: Tensor, num_tokens: float | None) -> tuple[Tensor, float]:
    """Bool mask and the normaliser: `num_tokens` if given, else the count of masked positions."""
    keep = mask.bool()
    count = float(keep.sum()) if num_tokens is None else float(num_tokens)
    if count <= 0:
        raise ValueError("the mask selects no position (and no num_tokens was given): nothing to average over")
    return keep, count


def clipped_policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.35,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate loss with an asymmetric clip, averaged over policy tokens.

    Per token: ``ratio = exp(logp_new - logp_old)`` and
    ``loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``. The result is
    the sum over every masked token of the batch divided by the number of masked tokens
    (token-level averaging: a long sequence weighs in proportion to its length).

    Args:
        logp_new: ``[B, T]`` log-probs of the taken tokens under the policy being trained.
        logp_old: ``[B, T]`` the same under the policy that sampled them (detached here).
        advantages: ``[B]`` (one per sequence, broadcast over its tokens) or ``[B, T]``
            (detached here).
        mask: ``[B, T]``, true on policy tokens (tool outputs, prompts and padding false).
        clip_low: the ratio is clipped below at ``1 - clip_low``.
        clip_high: the ratio is clipped above at ``1 + clip_high``.
        num_tokens: divide by this instead of the mask's count: the policy tokens of the
            whole batch when this call sees one micro-batch of it, so that gradients
            accumulated over micro-batches still weigh every token equally.

    Returns:
        The scalar loss, and statistics over this call's masked tokens as floats:
        ``clip_fraction`` (tokens whose gradient the clip removes: ratio above
        ``1 + clip_high`` with A > 0, or below ``1 - clip_low`` with A < 0),
        ``approx_kl`` (mean of ``(ratio - 1) - log ratio``, an estimate of
        KL(old || new)), ``ratio_mean``.
    """
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low} and {clip_high}")
    _check_same_shape(logp_new=logp_new, logp_old=logp_old, mask=mask)
    if logp_new.ndim != 2:
        raise ValueError(f"log-probs must be [B, T], got shape {tuple(logp_new.shape)}")
    adv = advantages.detach().to(logp_new.dtype)
    if adv.shape == logp_new.shape[:1]:
        adv = adv.unsqueeze(1)
    elif adv.shape != logp_new.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logp_new.shape)}, got shape {tuple(advantages.shape)}"
        )
    keep, count = _mask_and_count(mask, num_tokens)
    log_ratio = torch.where(keep, logp_new - logp_old.detach(), torch.zeros_like(logp_new))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = torch.where(keep, per_token, torch.zeros_like(per_token)).sum() / count
    with torch.no_grad():
        n = keep.sum().clamp(min=1)
        cut = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
        stats = {
            "clip_fraction": float((cut & keep).sum() / n),
            "approx_kl": float(((ratio - 1.0 - log_ratio) * keep).sum() / n),
            "ratio_mean": float((ratio * keep).sum() / n),
        }
    return loss, stats


def kl_penalty(
    logp: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    kind: Literal["k1", "k3"] = "k3",
    num_tokens: float | None = None,
) -> Tensor:
    """Token-averaged estimate of KL(policy || reference) on tokens sampled from the policy.

    With ``d = logp_ref - logp`` per token: ``"k1"`` is ``-d`` (unbiased, can be negative),
    ``"k3"`` is ``exp(d) - d - 1`` (unbiased, always >= 0, lower variance). Shapes
    ``[B, T]``; averaged like `clipped_policy_loss` (over masked tokens, or divided by
    `num_tokens`). The Pixel Reasoner recipe uses no KL term; this is for ablations.
    """
    _check_same_shape(logp=logp, logp_ref=logp_ref, mask=mask)
    keep, count = _mask_and_count(mask, num_tokens)
    d = torch.where(keep, logp_ref.detach() - logp, torch.zeros_like(logp))
    if kind == "k1":
        per_token = -d
    elif kind == "k3":
        per_token = torch.exp(d) - d - 1.0
    else:
        raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")
    return torch.where(keep, per_token, torch.zeros_like(per_token)).sum() / count


def gae(
    rewards: Tensor, values: Tensor, dones: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over turns.

    Args:
        rewards: ``[..., T]``, the reward after each turn.
        values: ``[..., T + 1]``, the value of the state before each turn, then the value
            of the state after the last one (the bootstrap; ignored when that turn ends an
            episode).
        dones: ``[..., T]``, true where the turn ends an episode: nothing after it is
            credited to it. For an episode cut short by a time limit, mark it done and add
            ``gamma * V(final state)`` to its reward.
        gamma: discount per turn.
        lam: the GAE lambda (0: one-step TD, 1: Monte Carlo returns).

    Returns:
        ``(advantages, returns)``, both ``[..., T]``; ``returns = advantages + values[..., :T]``.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
    v = torch.as_tensor(values)
    if not v.is_floating_point():
        v = v.to(torch.get_default_dtype())
    r = torch.as_tensor(rewards).to(v.dtype)
    done = torch.as_tensor(dones).bool()
    if r.shape != done.shape or v.shape[:-1] != r.shape[:-1] or v.shape[-1] != r.shape[-1] + 1:
        raise ValueError(
            f"rewards and dones must be [..., T] and values [..., T + 1], got {tuple(r.shape)}, "
            f"{tuple(done.shape)} and {tuple(v.shape)}"
        )
    not_done = (~done).to(r.dtype)
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        delta = r[..., t] + gamma * v[..., t + 1] * not_done[..., t] - v[..., t]
        running = delta + gamma * lam * not_done[..., t] * running
        advantages[..., t] = running
    return advantages, advantages + v[..., :-1]


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    old_values: Tensor | None = None,
    clip: float | None = None,
) -> Tensor:
    """Masked mean of ``0.5 * (values - returns)^2``, optionally clipped as in PPO.

    With `clip`, the per-position loss is the larger of the unclipped one and that of
    ``old_values + clamp(values - old_values, -clip, clip)``, so the value cannot gain by
    moving more than `clip` from `old_values`. All tensors share one shape (e.g. ``[B, T]``);
    `returns` and `old_values` are detached.
    """
    if (old_values is None) != (clip is None):
        raise ValueError("value clipping needs both old_values and clip (or neither)")
    _check_same_shape(values=values, returns=returns, mask=mask)
    keep, count = _mask_and_count(mask, None)
    target = returns.detach().to(values.dtype)
    loss = (values - target) ** 2
    if old_values is not None and clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        _check_same_shape(values=values, old_values=old_values)
        old = old_values.detach().to(values.dtype)
        clipped = old + torch.clamp(values - old, -clip, clip)
        loss = torch.maximum(loss, (clipped - target) ** 2)
    return 0.5 * torch.where(keep, loss, torch.zeros_like(loss)).sum() / count
