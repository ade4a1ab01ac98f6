"""PPO with curiosity-shaped rewards: a value head on the policy, GAE over turns, no groups.

One step: draw `queries_per_step` training queries, play `group_size` (default 1) episodes
of each with the current policy, shape each episode's reward (`episode_rewards`: the task
reward, the curiosity bonus computed from a running per-query RaPR that the trainer keeps
(`RunningRaPR`), the efficiency penalty), read the value of the state before each policy
turn from a value head on the policy's last hidden state, run GAE over the episode's turns
(`episode_gae`; the reward arrives after the last turn), optionally whiten the advantages
over the batch's turns, and run `updates_per_step` updates of the clipped surrogate plus
``vf_coef`` times the (optionally clipped) value loss. Each turn's advantage and return
apply to every token the policy generated in that turn; tool outputs and prompts are
masked, as in GRPO.

**Where the value is read.** The value of turn k's state is the value head's output at
the position just before the turn's first generated token (the last prompt token, e.g.
the ``\\n`` after ``<|im_start|>assistant``): the hidden state there has read the whole
conversation up to and including the newest observation and nothing of the turn's own
tokens, so it is V(state) and not a function of the action. The value head reads the
input of the model's LM head (`last_hidden_state`), the same tensor
``output_hidden_states=True`` returns last, without asking the model for every layer's
states (the tiny VLM does not return them).

Everything else is GRPO's (`agents.grpo.GRPOTrainer`, which this subclasses): rollouts,
evaluation, the update loop (micro-batches, token-level averaging, gradient clipping,
data parallelism), metrics (plus ``loss/value``, ``train/value_mean``,
``train/explained_variance``, ``train/rapr_estimate``), checkpoints and exact resume. The
value head is saved beside the model as ``value_head.safetensors`` in every checkpoint's
``model/`` folder and in ``final/``; a starting model folder that holds one (a PPO run's
``final/``) continues with it. Checkpoints also keep the running RaPR statistics.

Run ``python -m agents.ppo --model checkpoints/tiny-warmstart --out runs/ppo`` (``--help``
lists every field of `PPOConfig`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from agents import distributed
from agents.advantages import gae, value_loss
from agents.grpo import REWARD_KEYS, GRPOConfig, GRPOTrainer
from agents.grpo import main as _main
from agents.rollout import Trajectory, policy_turn_spans
from agents.vlm.hf import load_model, model_inputs, pad_items, token_logprobs, trajectory_item
from wrappers.curiosity import RunningRaPR, curiosity_bonus
from wrappers.efficiency import efficiency_penalty

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_KEYS = ("returns", "old_values", "value_index")
"""Per-token entries of a PPO training item that feed the value loss, not the model."""


@dataclass
class PPOConfig(GRPOConfig):
    """Every setting of a PPO run: GRPO's (`agents.grpo.GRPOConfig`) without groups, plus the critic's."""

    out: str = "runs/ppo"
    """Run folder: metrics, TensorBoard events, checkpoints, the final model and value head."""
    queries_per_step: int = 128
    """Queries per rollout batch."""
    group_size: int = 1
    """Episodes per query in a batch (PPO compares no groups; 1 is the usual choice)."""
    filter_zero_variance: bool = False
    """GRPO only (drops equal-reward groups); PPO has no groups, keep it False."""
    gamma: float = 1.0
    """Discount per policy turn."""
    lam: float = 0.95
    """GAE lambda over turns (1: Monte Carlo returns, 0: one-step TD)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    value_clip: float = 0.2
    """Clip of the value's move from its rollout-time estimate in the value loss (0: unclipped)."""
    whiten_advantages: bool = True
    """Shift and scale the advantages to mean 0, std 1 over the batch's turns (every process's)."""
    value_hidden: int = 0
    """Value head: 0 is a linear layer on the last hidden state; n > 0 a 2-layer MLP with n tanh units."""
    rapr_window: int = 8
    """Episodes of one query that its running RaPR averages over."""
    rapr_global_window: int = 256
    """Episodes of all queries that the RaPR of a query seen for the first time averages over."""

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")
        if self.normalize_std or self.filter_zero_variance:
            raise ValueError("normalize_std and filter_zero_variance act on GRPO groups, which PPO has none of; "
                             "whiten_advantages normalises PPO's advantages")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.vf_coef < 0 or self.value_clip < 0 or self.value_hidden < 0:
            raise ValueError("vf_coef, value_clip and value_hidden must be >= 0")
        if min(self.rapr_window, self.rapr_global_window) < 1:
            raise ValueError("rapr_window and rapr_global_window count episodes and must be >= 1")
        if self.train_turns != "all":
            raise ValueError("train_turns is GRPO's: PPO's critic values every turn, so its loss trains them all")
        self._check_shared()


class ValueHead(nn.Module):
    """Scalar value of every position from the policy's last hidden state: ``(B, L, H)`` -> ``(B, L)``.

    A linear layer (``inner_size=0``) or Linear-Tanh-Linear. The output layer starts at
    zero, so every value is 0 before the first update. Computed in float32 whatever the
    policy's dtype.
    """

    def __init__(self, hidden_size: int, inner_size: int = 0) -> None:
        super().__init__()
        self.hidden_size, self.inner_size = hidden_size, inner_size
        layers = ([nn.Linear(hidden_size, inner_size), nn.Tanh(), nn.Linear(inner_size, 1)] if inner_size
                  else [nn.Linear(hidden_size, 1)])
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)

    def save(self, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the weights (or `state_dict`, a sharded head's full ones) to the safetensors file
        `path`, the sizes in its metadata."""
        state = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(path), metadata={"hidden_size": str(self.hidden_size),
                                                "inner_size": str(self.inner_size)})

    @classmethod
    def load(cls, path: str | Path) -> "ValueHead":
        """The head `save` wrote to `path` (on the CPU)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        head = cls(int(meta["hidden_size"]), int(meta["inner_size"]))
        head.load_state_dict(tensors)
        return head


class ActorCritic(nn.Module):
    """The policy model and its value head: what PPO's optimizer updates and its checkpoints hold.

    `save_pretrained` writes the model's folder and ``value_head.safetensors`` in it (from
    `state_dict`, a sharded module's full one, when given); `from_pretrained` reads both
    (`agents.checkpoint` calls them).
    """

    def __init__(self, model: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head

    def save_pretrained(self, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model.save_pretrained(path, state_dict=_substate(state_dict, "model."))
        self.value_head.save(Path(path) / VALUE_HEAD_FILE, _substate(state_dict, "value_head."))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ActorCritic":
        return cls(load_model(path), ValueHead.load(Path(path) / VALUE_HEAD_FILE))


def _substate(state: Mapping[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of `state` under `prefix`, the prefix dropped (None for None)."""
    return None if state is None else {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@contextlib.contextmanager
def last_hidden_state(model: Any) -> Iterator[list[torch.Tensor]]:
    """Within the block, append to the yielded list the last hidden state ``(B, L, H)`` of each
    forward pass of `model`: the input of its output embedding (the LM head), gradients kept."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def episode_rewards(trajectories: Sequence[Trajectory], rapr_estimates: Sequence[float],
                    config: PPOConfig) -> dict[str, np.ndarray]:
    """Shaped rewards of single episodes, ``(N,)`` each: ``reward`` and its three terms.

    As `agents.grpo.shape_rewards`, with each episode's running RaPR estimate in place of
    its group's RaPR. Terms switched off in `config` are 0.
    """
    task, curiosity, penalty = [], [], []
    for t, estimate in zip(trajectories, rapr_estimates, strict=True):
        info = t.info
        task.append(float(info.get("score") or 0.0))
        used = bool(info.get("used_pixel_reasoning"))
        curiosity.append(curiosity_bonus(estimate, used, variant=config.variant, alpha=config.alpha, H=config.H,
                                         is_video=bool(t.reset_info.get("is_video"))) if config.curiosity else 0.0)
        count = int(info.get("n_visual_ops" if config.variant == "paper" else "n_tool_calls", 0))
        penalty.append(efficiency_penalty(count, variant=config.variant, beta=config.beta, N=config.N)
                       if config.penalty else 0.0)
    terms = {"reward_task": np.array(task), "reward_curiosity": np.array(curiosity),
             "reward_penalty": np.array(penalty)}
    return {"reward": terms["reward_task"] + terms["reward_curiosity"] + terms["reward_penalty"], **terms}


def episode_gae(reward: float, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the T policy turns of one episode whose shaped `reward` comes after its last turn.

    `values` ``(T,)`` holds V(state before turn k). The last turn ends the episode, an
    episode cut by the turn limit included (its reward 0 is the outcome), so nothing is
    bootstrapped. Returns ``(advantages, returns)``, ``(T,)`` each; the returns are the
    value targets.
    """
    rewards = torch.zeros_like(values)
    rewards[-1] = reward
    dones = torch.zeros(values.shape, dtype=torch.bool)
    dones[-1] = True
    return gae(rewards, torch.cat([values, values.new_zeros(1)]), dones, gamma, lam)


def per_token(spans: Sequence[tuple[int, int]], per_turn: torch.Tensor, length: int) -> torch.Tensor:
    """``(length,)``: each turn's value of `per_turn` ``(T,)`` on its generated tokens, 0 elsewhere."""
    out = torch.zeros(length, dtype=per_turn.dtype)
    for (start, end), value in zip(spans, per_turn, strict=True):
        out[start:end] = value
    return out


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    """``1 - Var(returns - values) / Var(returns)``: 1 for a perfect critic, 0 for one no better
    than a constant; NaN when the returns do not vary."""
    var = float(np.var(returns))
    return float("nan") if var == 0 else 1.0 - float(np.var(returns - values)) / var


class PPOTrainer(GRPOTrainer):
    """A GRPO run (`agents.grpo.GRPOTrainer`) whose advantages come from a value head and GAE (module doc)."""

    config: PPOConfig

    def __init__(self, config: PPOConfig) -> None:
        self.rapr = RunningRaPR(config.rapr_window, config.rapr_global_window)
        super().__init__(config)
        if self.resumed is not None:
            self.rapr.load_state_dict(self.resumed.extra["rapr"])

    def _trained_module(self) -> ActorCritic:
        """The model and a value head: read from the starting folder when it has one, else new."""
        config = self.config
        path = Path(config.model) / VALUE_HEAD_FILE
        if path.is_file():
            head = ValueHead.load(path)
            if head.inner_size != config.value_hidden:
                raise ValueError(f"{path} is a value head with {head.inner_size} hidden units but value_hidden="
                                 f"{config.value_hidden}; set value_hidden={head.inner_size} to continue with it")
        else:
            head = ValueHead(self.model.get_output_embeddings().in_features, config.value_hidden)
        return ActorCritic(self.model, head.to(config.device))

    @property
    def value_head(self) -> ValueHead:
        return self.trained.value_head

    def checkpoint_extra(self) -> dict[str, Any]:
        """The config and the running RaPR statistics."""
        return {**super().checkpoint_extra(), "rapr": self.rapr.state_dict()}

    def rapr_estimates(self, trajectories: Sequence[Trajectory]) -> list[float]:
        """Each episode's running RaPR estimate. Every process records every process's episodes
        in rank order, so the statistics stay the same everywhere."""
        mine = [(t.sample_id, bool(t.info.get("used_pixel_reasoning"))) for t in trajectories]
        every = distributed.gather_objects([mine])
        estimates = [[self.rapr.update(sample_id, used) for sample_id, used in part] for part in every]
        return estimates[self.rank]

    @torch.no_grad()
    def turn_values(self, items: Sequence[dict[str, torch.Tensor]],
                    spans: Sequence[Sequence[tuple[int, int]]]) -> list[torch.Tensor]:
        """V(state before each turn) of each item, ``(T_i,)`` float32, read at the position just
        before the turn's first generated token."""
        self.model.eval()
        out = []
        step = self.config.micro_batch_size
        for start in range(0, len(items), step):
            batch = pad_items(self.processor, items[start:start + step])
            with last_hidden_state(self.model) as hidden:
                self.model(**model_inputs(batch, self.config.device))
            values = self.value_head(hidden[-1]).float().cpu()
            for row, item_spans in enumerate(spans[start:start + step]):
                out.append(values[row, [s - 1 for s, _ in item_spans]])
        return out

    def batch(self, trajectories: Sequence[Trajectory]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor,
                                                                   dict[str, float]]:
        """Training items with per-token ``returns``, ``old_values`` and ``value_index`` (the
        position each token's turn value is read at), advantages ``[N, L]`` per token, and the
        batch's ``reward/`` and ``train/`` critic metrics (over every process)."""
        config = self.config
        estimates = self.rapr_estimates(trajectories)
        shaped = episode_rewards(trajectories, estimates, config)
        items = [trajectory_item(self.processor, t) for t in trajectories]
        spans = [policy_turn_spans(t) for t in trajectories]
        values = self.turn_values(items, spans)
        targets = [episode_gae(float(r), v, config.gamma, config.lam) for r, v in zip(shaped["reward"], values)]
        advantages = [a for a, _ in targets]
        if config.whiten_advantages:
            every = torch.cat([torch.cat(a) for a in distributed.gather_objects([advantages])])
            mean, std = every.mean(), every.std(unbiased=False)
            advantages = [(a - mean) / (std + 1e-8) for a in advantages]
        token_advantages = torch.zeros(len(items), max(len(item["input_ids"]) for item in items))
        for i, (item, s, adv, (_, returns), v) in enumerate(zip(items, spans, advantages, targets, values)):
            length = len(item["input_ids"])
            item["returns"] = per_token(s, returns, length)
            item["old_values"] = per_token(s, v, length)
            item["value_index"] = per_token(s, torch.tensor([start - 1 for start, _ in s]), length)
            token_advantages[i, :length] = per_token(s, adv, length)
        gathered = distributed.gather_objects([{
            **shaped, "values": torch.cat(values).numpy(), "returns": torch.cat([r for _, r in targets]).numpy(),
            "rapr_estimate": np.array(estimates)}])
        every_value = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
        stats = {f"reward/{name}": float(np.mean(every_value[key])) for name, key in REWARD_KEYS}
        stats["train/value_mean"] = float(np.mean(every_value["values"]))
        stats["train/explained_variance"] = explained_variance(every_value["values"], every_value["returns"])
        stats["train/rapr_estimate"] = float(np.mean(every_value["rapr_estimate"]))
        return items, token_advantages, stats

    def loss(self, batch: dict[str, torch.Tensor], advantages: torch.Tensor,
             num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate plus ``vf_coef`` times the value loss, from one forward pass.

        The value loss is averaged like the policy loss, over the policy's tokens (each
        turn's value error counts once per token of the turn); ``loss/value`` logs this
        micro-batch's mean.
        """
        config = self.config
        inputs = {k: v for k, v in batch.items() if k not in VALUE_KEYS}
        with last_hidden_state(self.model) as hidden:  # every position: the values sit at turn ends
            logp = token_logprobs(self.model, {k: v for k, v in inputs.items() if k != "loss_mask"},
                                  config.temperature, self.suppressed)
        values = self.value_head(hidden[-1]).gather(1, batch["value_index"])
        loss, stats = self.policy_loss(inputs, logp, advantages, num_tokens)
        mask = batch["loss_mask"]
        clip = config.value_clip or None
        v_loss = value_loss(values, batch["returns"], mask, batch["old_values"] if clip else None, clip)
        stats["loss/value"] = float(v_loss.detach())
        return loss + config.vf_coef * v_loss * (float(mask.sum()) / num_tokens), stats

    def save_final(self, path: Path, state: Mapping[str, torch.Tensor] | None) -> None:
        """GRPO's final folder, plus the value head."""
        super().save_final(path, _substate(state, "model."))
        self.value_head.save(path / VALUE_HEAD_FILE, _substate(state, "value_head."))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m agents.ppo``: a `PPOConfig` from the flags, a `PPOTrainer` run."""
    _main(argv, PPOConfig, PPOTrainer)


if __name__ == "__main__":
    main()
