"""Advantages and losses checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.advantages import (
    ReplayBuffer,
    clipped_policy_loss,
    gae,
    group_advantages,
    kl_penalty,
    selective_sample_replay,
    value_loss,
    zero_variance_mask,
)

LOG = math.log


def test_group_advantages_subtract_the_group_mean() -> None:
    adv = group_advantages([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.75, -0.25, -0.25, -0.25]])
    torch.testing.assert_close(adv, expected)


def test_group_advantages_normalized_by_sample_std() -> None:
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]), normalize_std=True)
    # sample std of [1, 0, 0, 1] = sqrt(1/3); 0.5 / sqrt(1/3) = 0.8660; a constant group stays 0
    torch.testing.assert_close(adv[0], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-3, rtol=0)
    torch.testing.assert_close(adv[1], torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages([[1.0], [0.0]], normalize_std=True)
    with pytest.raises(ValueError, match="2 dimensions"):
        group_advantages([1.0, 0.0])


def test_zero_variance_mask_flags_groups_of_equal_rewards() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0875, 1.0, 1.0]])
    assert zero_variance_mask(rewards).tolist() == [True, True, False, False]


def test_replay_buffer_keeps_nonzero_rollouts_and_evicts_the_oldest() -> None:
    buffer: ReplayBuffer[str] = ReplayBuffer(capacity=3)
    stored = buffer.add([["a", "b", "c"], ["d", "e", "f"]], torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert stored == 2 and len(buffer) == 2
    buffer.add([["g", "h"]], [[1.0, -1.0]])
    assert len(buffer) == 3
    items = {s.item for s in buffer.sample(3, np.random.default_rng(0))}
    assert items == {"b", "g", "h"}  # "a" was evicted, "c" and the zero group never stored
    with pytest.raises(ValueError, match="holding 3"):
        buffer.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="lists of 3"):
        buffer.add([["x", "y"]], [[1.0, -1.0, 0.0]])


def test_replay_buffer_samples_in_proportion_to_abs_advantage() -> None:
    buffer: ReplayBuffer[str] = ReplayBuffer(capacity=10)
    buffer.add([["big", "small"]], [[-0.9, 0.1]])
    rng = np.random.default_rng(123)
    picks = [buffer.sample(1, rng)[0].item for _ in range(4000)]
    assert abs(picks.count("big") / 4000 - 0.9) < 0.02
    again = buffer.sample(2, np.random.default_rng(5))
    assert all(s.replayed for s in again) and {s.item for s in again} == {"big", "small"}
    assert [s.item for s in buffer.sample(1, np.random.default_rng(7))] == [
        s.item for s in buffer.sample(1, np.random.default_rng(7))
    ]


def test_selective_sample_replay_drops_zero_groups_and_refills_from_earlier_batches() -> None:
    buffer: ReplayBuffer[str] = ReplayBuffer(capacity=100)
    rng = np.random.default_rng(0)
    first = [["a0", "a1", "a2", "a3"], ["z0", "z1", "z2", "z3"]]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    batch = selective_sample_replay(first, group_advantages(rewards), 6, buffer, rng)
    # only the non-zero group survives; the buffer was empty, so the batch is short
    assert [s.item for s in batch] == ["a0", "a1", "a2", "a3"]
    assert [s.advantage for s in batch] == [0.75, -0.25, -0.25, -0.25]
    assert not any(s.replayed for s in batch) and len(buffer) == 4

    second = [["b0", "b1"], ["y0", "y1"]]
    batch = selective_sample_replay(second, group_advantages([[0.0, 1.0], [0.0, 0.0]]), 4, buffer, rng)
    assert [s.item for s in batch[:2]] == ["b0", "b1"] and not batch[0].replayed
    replayed = batch[2:]
    assert len(replayed) == 2 and all(s.replayed for s in replayed)
    assert {s.item for s in replayed} <= {"a0", "a1", "a2", "a3"}  # never this call's own rollouts
    assert len({s.item for s in batch}) == 4 and len(buffer) == 6


def test_selective_sample_replay_subsamples_a_large_batch_deterministically() -> None:
    groups = [[f"q{q}r{r}" for r in range(4)] for q in range(4)]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    runs = [
        selective_sample_replay(groups, group_advantages(rewards), 5, ReplayBuffer(50), np.random.default_rng(9))
        for _ in range(2)
    ]
    assert [s.item for s in runs[0]] == [s.item for s in runs[1]]
    assert len(runs[0]) == 5 and len({s.item for s in runs[0]}) == 5
    assert not any(s.replayed or s.item.startswith("q3") for s in runs[0])


def test_clip_high_caps_a_positive_advantage_ratio_at_1_35() -> None:
    logp_old = torch.tensor([[LOG(0.2)]])
    logp_new = torch.tensor([[LOG(0.3)]], requires_grad=True)  # ratio 1.5
    loss, stats = clipped_policy_loss(logp_new, logp_old, torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(-1.35)
    assert logp_new.grad is not None and logp_new.grad.item() == 0.0  # the clip removes the gradient
    assert stats["clip_fraction"] == 1.0 and stats["ratio_mean"] == pytest.approx(1.5)
    assert stats["approx_kl"] == pytest.approx(0.5 - LOG(1.5))


def test_clip_low_floors_a_negative_advantage_ratio_at_0_8() -> None:
    logp_old = torch.tensor([[LOG(0.4)]])
    logp_new = torch.tensor([[LOG(0.2)]], requires_grad=True)  # ratio 0.5
    loss, stats = clipped_policy_loss(logp_new, logp_old, torch.tensor([-1.0]), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(0.8)
    assert logp_new.grad.item() == 0.0 and stats["clip_fraction"] == 1.0


def test_clip_is_pessimistic_only() -> None:
    """Ratio 0.5 with A > 0 and ratio 1.5 with A < 0 keep the unclipped (worse) term."""
    logp_old = torch.tensor([[LOG(0.4), LOG(0.2)]])
    logp_new = torch.tensor([[LOG(0.2), LOG(0.3)]], requires_grad=True)
    loss, stats = clipped_policy_loss(logp_new, logp_old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 + 1.5) / 2)
    # d/dlogp of -ratio*A/2 = -ratio*A/2: -0.25 and +0.75
    torch.testing.assert_close(logp_new.grad, torch.tensor([[-0.25, 0.75]]))
    assert stats["clip_fraction"] == 0.0


def test_token_level_averaging_weighs_every_policy_token_equally() -> None:
    """Sequences with 1 and 3 policy tokens, advantages +1 and -1, ratio 1 everywhere."""
    logp = torch.full((2, 4), -1.0)
    logp[0, 1:] = float("-inf")  # padding, masked out
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    loss, stats = clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx((-1.0 + 3 * 1.0) / 4)  # per sequence it would be 0
    assert stats == {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}
    half, _ = clipped_policy_loss(logp[:1], logp[:1].clone(), torch.tensor([1.0]), mask[:1], num_tokens=4)
    rest, _ = clipped_policy_loss(logp[1:], logp[1:].clone(), torch.tensor([-1.0]), mask[1:], num_tokens=4)
    assert (half + rest).item() == pytest.approx(loss.item())  # micro-batches add up to the batch loss


def test_policy_loss_rejects_bad_shapes_and_empty_masks() -> None:
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_policy_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="share one shape"):
        clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="selects no position"):
        clipped_policy_loss(logp, logp, torch.zeros(2), torch.zeros(2, 3))


def test_kl_penalty_k1_and_k3() -> None:
    logp = torch.tensor([[LOG(0.5), LOG(0.5), 0.0]])
    logp_ref = torch.tensor([[LOG(0.25), LOG(0.5), float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    # token 0: d = log 0.5; k1 = log 2, k3 = 0.5 - log 0.5 - 1; token 1: 0
    assert kl_penalty(logp, logp_ref, mask, "k1").item() == pytest.approx(LOG(2) / 2)
    assert kl_penalty(logp, logp_ref, mask).item() == pytest.approx((0.5 + LOG(2) - 1) / 2)
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl_penalty(logp, logp_ref, mask, "k2")  # type: ignore[arg-type]


def test_gae_by_hand() -> None:
    adv, ret = gae(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0, 3.0]), torch.tensor([False, True]), 0.9, 0.5)
    # t=1 ends the episode: delta = 2 - 1 = 1.  t=0: delta = 1 + 0.9*1 - 0.5 = 1.4; A = 1.4 + 0.45*1
    torch.testing.assert_close(adv, torch.tensor([1.85, 1.0]))
    torch.testing.assert_close(ret, torch.tensor([2.35, 2.0]))


def test_gae_does_not_leak_across_episodes_and_bootstraps_at_the_end() -> None:
    rewards = torch.tensor([[1.0, 0.0, 1.0]])
    values = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    dones = torch.tensor([[1, 0, 0]])
    adv, _ = gae(rewards, values, dones, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 6.0, 6.0]]))
    td, _ = gae(rewards, values, dones, gamma=0.5, lam=0.0)
    torch.testing.assert_close(td, torch.tensor([[1.0, 0.0, 3.5]]))
    with pytest.raises(ValueError, match=r"T \+ 1"):
        gae(rewards, values[:, :3], dones, 1.0, 1.0)


def test_value_loss_plain_and_clipped() -> None:
    values = torch.tensor([[1.0, 2.0, 9.0]])
    returns = torch.tensor([[0.0, 2.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert value_loss(values, returns, mask).item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    # old 1.0, clip 0.2: new 0.4 is pulled back to 0.8, whose error (0.3^2) is the larger
    clipped = value_loss(torch.tensor([0.4]), torch.tensor([0.5]), torch.ones(1), torch.tensor([1.0]), clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * 0.09)
    with pytest.raises(ValueError, match="both old_values and clip"):
        value_loss(values, returns, mask, clip=0.2)

