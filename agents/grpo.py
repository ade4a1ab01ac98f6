"""GRPO with curiosity-shaped rewards: G rollouts per query, group-relative advantages.

One step: draw `queries_per_step` training queries, play `group_size` episodes of each with
the current policy (batched, multi-turn, through the real environment), shape each
group's rewards (`wrappers.curiosity.group_shaped_rewards`: the curiosity bonus with RaPR
measured on the group, the efficiency penalty), take ``r - mean(group)`` as every
generated token's advantage, drop groups whose rewards are all equal, and run
`updates_per_step` clipped-ratio updates (asymmetric clip, token-level averaging over the
policy's own tokens; tool outputs and prompts are masked). Optional: KL to the starting
policy, std normalisation, selective sample replay.

Metrics go to TensorBoard and ``metrics.jsonl`` (`agents.logger.MetricLogger`) under
``train/`` (the rollouts' accuracy, RaPR, operations, errors, crop hits; RaPR and
accuracy split by whether an item is answerable without operations), ``reward/`` (each
term), ``loss/`` (policy loss, KL, clip fraction) and ``eval/`` (greedy on held-out
queries, every `eval_every` steps). Checkpoints (`agents.checkpoint`) every `save_every`
steps; ``resume=True`` continues the latest one with no lost or repeated step.

Run ``python -m agents.grpo --model checkpoints/tiny-warmstart --out runs/grpo`` (``--help``
lists every field of `GRPOConfig`). The same code drives a real checkpoint (e.g.
``Qwen/Qwen2.5-VL-7B-Instruct``) on a GPU; under ``accelerate launch`` / ``torchrun`` each
process plays its share of the queries and gradients are averaged (`agents.distributed`),
and with ``fsdp`` the trained weights, gradients and optimizer state are sharded (FSDP2).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from agents import distributed
from agents.advantages import (ReplayBuffer, clipped_policy_loss, group_advantages, kl_penalty,
                               selective_sample_replay, zero_variance_mask)
from agents.checkpoint import (CheckpointState, capture_rng_states, latest_checkpoint, load_checkpoint,
                               save_checkpoint)
from agents.logger import MetricLogger
from agents.metrics import summarize
from agents.rollout import Trajectory, collect, operation_turn_mask
from agents.schedules import cosine_schedule
from agents.vlm.hf import (TransformersPolicy, freeze_parameters, load_model, pad_items, placeholder_token_ids,
                           token_logprobs, trajectory_item)
from pxr_env.tasks import make_task_source
from wrappers.curiosity import group_shaped_rewards


@dataclass
class GRPOConfig:
    """Every setting of a GRPO run; the defaults are the paper's where it gives one (REFERENCE sec 4)."""

    model: str = "checkpoints/tiny-warmstart"
    """Path or hub id of the starting policy (the warm start)."""
    out: str = "runs/grpo"
    """Run folder: metrics, TensorBoard events, checkpoints, the final model."""
    tasks: Any = "zoom-read"
    """Task source spec for `pxr_env.tasks.make_task_source` (a family, a mix, dataset folders)."""
    env_kwargs: dict = field(default_factory=dict)
    """Extra `PixelQAEnv` arguments (pixel bounds, limits), applied over the starting model's saved
    env settings (`agents.vlm.env_settings`; e.g. the crop padding it was warm-started with)."""
    steps: int = 200
    """Optimizer-update rounds (each: one batch of rollouts, `updates_per_step` updates)."""
    queries_per_step: int = 16
    """Queries per rollout batch (the paper: 512)."""
    group_size: int = 8
    """Rollouts per query (G)."""
    updates_per_step: int = 1
    """Optimizer updates per rollout batch (the paper: buffer 512 / train batch 256 = 2)."""
    micro_batch_size: int = 16
    """Trajectories per forward/backward pass (gradient accumulation inside an update)."""
    lr: float = 1e-6
    """Peak learning rate (the paper: 1e-6 for 7B; a from-scratch tiny model needs ~1e-4)."""
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.35
    kl_coef: float = 0.0
    """Weight of the k3 KL to the starting policy (the paper: 0)."""
    normalize_std: bool = False
    """Divide advantages by the group's std (the paper: no)."""
    filter_zero_variance: bool = True
    """Drop groups whose shaped rewards are all equal (they carry no gradient)."""
    replay_batch: int = 0
    """Selective sample replay: train on this many rollouts per step, kept in proportion to
    |advantage| and refilled from a buffer of earlier non-zero-advantage rollouts (0: off)."""
    replay_capacity: int = 1024
    """Rollouts the replay buffer holds."""
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 40
    max_new_tokens: int = 64
    max_turns: int = 4
    """Turns after which an episode is cut (reward 0)."""
    curiosity: bool = True
    """Add the curiosity bonus (the ablation switches it off)."""
    penalty: bool = True
    """Add the efficiency penalty."""
    variant: Literal["paper", "code"] = "paper"
    """Reward formulas: the paper's or the released code's (REFERENCE sec 3)."""
    alpha: float = 0.5
    """Curiosity weight of the paper's formula (the released code's has fixed constants)."""
    beta: float = 0.05
    """Efficiency-penalty weight, per operation beyond the free ones (both formulas)."""
    H: float = 0.3
    """Target RaPR: the bonus pays while a group's RaPR is under it."""
    N: int = 1
    """Operations an answer may use before the penalty (the paper's formula; the code's: 1)."""
    eval_every: int = 25
    """Greedy evaluation on held-out queries every this many steps (0: only at the end)."""
    eval_queries: int = 128
    eval_seed: int = 10_000
    """Seed of the held-out query draw (training queries come from a different stream)."""
    save_every: int = 25
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue from the latest checkpoint in ``out/checkpoints``."""
    max_minutes: float = 0.0
    """Stop (after a checkpoint and the final evaluation) once this much wall time is spent; 0: no limit."""
    seed: int = 0
    threads: int = 0
    """torch threads (0: leave torch's default)."""
    device: str = "cpu"
    dtype: str = "float32"
    """Weights (and optimizer state) dtype: ``"bfloat16"`` halves a large model's memory."""
    fsdp: bool = False
    """With several processes, shard the trained weights, gradients and optimizer state over them (FSDP2)."""
    progress: bool = True
    freeze: list[str] = field(default_factory=list)
    """Parameter-name prefixes held fixed, e.g. ``["model"]``: a tiny model then trains its pointer
    head alone (which box to crop), its reading and answering left as the warm start made them."""
    train_turns: Literal["all", "operations"] = "all"
    """Which turns of a rollout the loss trains: ``"all"`` (the paper), or ``"operations"``, the
    turns that call a tool alone: the reward still comes from the answer, but the answer turn
    gets no gradient, so a right reading of a crop that missed is not pushed down with the
    crop (reading eroded under ``"all"`` while the crops barely moved, docs/results.md)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: GRPO compares rollouts of the same query")
        self._check_shared()

    def _check_shared(self) -> None:
        """The checks of the settings GRPO shares with PPO (`agents.ppo.PPOConfig`)."""
        if min(self.steps, self.queries_per_step, self.updates_per_step, self.micro_batch_size, self.max_turns) < 1:
            raise ValueError("steps, queries_per_step, updates_per_step, micro_batch_size and max_turns must be >= 1")
        if self.variant not in ("paper", "code"):
            raise ValueError(f"variant must be 'paper' or 'code', got {self.variant!r}")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError("need 0 <= clip_low < 1 and clip_high >= 0")
        if self.temperature <= 0:
            raise ValueError("GRPO samples: temperature must be > 0")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, 0 <= warmup_ratio < 1 and 0 <= min_lr_ratio <= 1")
        if self.replay_batch < 0 or self.replay_capacity < 1:
            raise ValueError("need replay_batch >= 0 (0: off) and replay_capacity >= 1")
        if isinstance(self.freeze, str) or not all(isinstance(prefix, str) for prefix in self.freeze):
            raise ValueError(f"freeze must be a list of parameter-name prefixes, e.g. ['model'], got {self.freeze!r}")
        if self.train_turns not in ("all", "operations"):
            raise ValueError(f"train_turns must be 'all' or 'operations', got {self.train_turns!r}")


def shape_rewards(trajectories: Sequence[Trajectory], config: GRPOConfig) -> dict[str, np.ndarray]:
    """Shaped rewards of one query's G trajectories: ``reward`` and each term, shape ``(G,)``.

    The task reward is the env's score (0 for an episode cut before answering). Curiosity
    and penalty terms are zeroed when switched off in `config`.
    """
    infos = [t.info for t in trajectories]
    terms = group_shaped_rewards(
        [float(i.get("score") or 0.0) for i in infos],
        [bool(i.get("used_pixel_reasoning")) for i in infos],
        [int(i.get("n_visual_ops", 0)) for i in infos],
        [int(i.get("n_tool_calls", 0)) for i in infos],
        bool(trajectories[0].reset_info.get("is_video")),
        variant=config.variant, alpha=config.alpha, beta=config.beta, H=config.H, N=config.N,
    )
    if not config.curiosity:
        terms["reward_curiosity"] = np.zeros_like(terms["reward_curiosity"])
    if not config.penalty:
        terms["reward_penalty"] = np.zeros_like(terms["reward_penalty"])
    terms["reward"] = terms["reward_task"] + terms["reward_curiosity"] + terms["reward_penalty"]
    return terms


def rollout_metrics(records: Sequence[tuple[str, dict]], task_source: Any, prefix: str) -> dict[str, float]:
    """Episode metrics of ``(sample_id, final info)`` records under `prefix`, plus accuracy and
    RaPR split by whether the item is answerable without operations (``shortcut_*`` /
    ``needs_ops_*``) and accuracy split by whether the episode used an operation."""
    infos = [info for _, info in records]
    out = {k: v for k, v in summarize(infos).as_dict(prefix).items() if v is not None and not k.endswith("episodes")}
    split: dict[str, list[dict]] = {"shortcut": [], "needs_ops": []}
    for sample_id, info in records:
        answerable = task_source.get(sample_id).answerable_without_ops
        if answerable is not None:
            split["shortcut" if answerable else "needs_ops"].append(info)
    for name, group in split.items():
        if group:
            m = summarize(group)
            out[f"{prefix}{name}_accuracy"] = m.accuracy
            out[f"{prefix}{name}_rapr"] = m.rapr
    for name, used in (("with_ops", True), ("without_ops", False)):
        group = [i for i in infos if bool(i.get("used_pixel_reasoning")) == used]
        if group:
            out[f"{prefix}accuracy_{name}"] = summarize(group).accuracy
    return out


def _records(trajectories: Sequence[Trajectory]) -> list[tuple[str, dict]]:
    return [(t.sample_id, t.info) for t in trajectories]


REWARD_KEYS = (("total", "reward"), ("task", "reward_task"), ("curiosity", "reward_curiosity"),
               ("penalty", "reward_penalty"))


class GRPOTrainer:
    """Owns the model, optimizer, schedule, envs and logging of one GRPO run (see the module doc)."""

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rank, self.world = distributed.rank_and_world()
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.policy = TransformersPolicy.from_pretrained(
            config.model, device=config.device, dtype=config.dtype, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, max_new_tokens=config.max_new_tokens, seed=config.seed)
        self.policy.env_kwargs = {**self.policy.env_kwargs, **config.env_kwargs}
        self.model, self.processor = self.policy.model, self.policy.processor
        self.suppressed = placeholder_token_ids(self.processor)
        self.reference = None
        if config.kl_coef > 0:
            self.reference = load_model(config.model, dtype=config.dtype, device=config.device).eval()
            self.reference.requires_grad_(False)
        freeze_parameters(self.model, config.freeze)
        self.trained = self._trained_module()
        distributed.broadcast_parameters(self.trained)
        if config.fsdp and self.world > 1:
            distributed.shard(self.trained, self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.trained.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=config.weight_decay)
        total_updates = config.steps * config.updates_per_step
        self.scheduler = cosine_schedule(self.optimizer, round(config.warmup_ratio * total_updates), total_updates,
                                         config.min_lr_ratio)
        self.task_source = make_task_source(config.tasks)
        episodes = config.queries_per_step * config.group_size
        self.envs = [self._make_env() for _ in range(max(1, math.ceil(episodes / self.world)))]
        self.query_rng = np.random.default_rng([config.seed, 1])
        self.replay_rng = np.random.default_rng([config.seed, 4])
        self.replay: ReplayBuffer = ReplayBuffer(config.replay_capacity)
        self.eval_ids = self._draw_queries(np.random.default_rng([config.eval_seed, 2]), config.eval_queries)
        self.start_step = 0
        self.resumed: CheckpointState | None = None
        """The checkpoint this run continues, if any (its ``extra`` holds `checkpoint_extra`)."""
        if config.resume:
            path = latest_checkpoint(self.out / "checkpoints")
            if path is not None:
                sharded = distributed.is_sharded(self.trained)
                self.resumed = load_checkpoint(
                    path, self.trained, self.optimizer, self.scheduler, generators=self._generators(),
                    load_state=partial(distributed.load_full_state, self.trained, self.optimizer) if sharded else None)
                self.start_step = self.resumed.step

    def _generators(self) -> dict[str, np.random.Generator]:
        """The run's own random streams, saved and restored with checkpoints. (A resumed run
        starts with an empty replay buffer, so only runs without replay resume bit-exactly.)"""
        return {"queries": self.query_rng, "replay": self.replay_rng}

    def _trained_module(self) -> torch.nn.Module:
        """What the optimizer updates, gradients are averaged over and checkpoints hold: the policy model."""
        return self.model

    def checkpoint_extra(self) -> dict[str, Any]:
        """The JSON data a checkpoint keeps besides the weights and optimizer: the config."""
        return {"config": asdict(self.config)}

    def _make_env(self) -> gym.Env:
        return gym.make("PixelQA-v0", tasks=self.task_source, max_episode_steps=self.config.max_turns,
                        **self.policy.env_kwargs)

    def _draw_queries(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.task_source.sample(rng).sample_id for _ in range(n)]

    # ------------------------------------------------------------------ rollouts
    def rollouts(self, step: int) -> list[Trajectory]:
        """This process's share of the step's queries, `group_size` sampled episodes each."""
        config = self.config
        queries = self._draw_queries(self.query_rng, config.queries_per_step)
        mine = queries[self.rank::self.world]
        self.policy.temperature = config.temperature
        self.model.eval()
        return collect(self.policy, self.envs, samples=mine, group_size=config.group_size,
                       seed=config.seed * 1_000_003 + step * 10_007 + self.rank, progress=False)

    def evaluate(self) -> dict[str, float]:
        """Greedy episodes on the held-out queries (this process's share, metrics gathered)."""
        saved = self.policy.temperature
        self.policy.temperature = 0.0
        self.model.eval()
        mine = self.eval_ids[self.rank::self.world]
        with distributed.unsharded(self.trained):
            trajectories = collect(self.policy, self.envs, samples=mine, group_size=1, seed=self.config.eval_seed,
                                   progress=False)
        self.policy.temperature = saved
        return rollout_metrics(distributed.gather_objects(_records(trajectories)), self.task_source, "eval/")

    # -------------------------------------------------------------------- update
    def batch(self, trajectories: Sequence[Trajectory]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor,
                                                                   dict[str, float]]:
        """Training items of this process's `trajectories`, their advantages (``[N]``) and the batch's
        ``reward/`` and ``train/kept_groups`` metrics (over every process)."""
        config = self.config
        groups: dict[int, list[Trajectory]] = {}
        for t in trajectories:
            groups.setdefault(t.group, []).append(t)
        shaped = [shape_rewards(g, config) for g in groups.values()]
        rewards = torch.as_tensor(np.stack([s["reward"] for s in shaped]), dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=config.normalize_std)
        keep = (~zero_variance_mask(rewards) if config.filter_zero_variance
                else torch.ones(len(shaped), dtype=torch.bool))
        if config.replay_batch:
            chosen = selective_sample_replay([[self.item(t) for t in g] for g in groups.values()],
                                             advantages, config.replay_batch, self.replay, self.replay_rng)
            items, item_adv = [c.item for c in chosen], [c.advantage for c in chosen]
            self._refresh_old_logprobs(items)
        else:
            items, item_adv = [], []
            for g, (members, kept) in enumerate(zip(groups.values(), keep.tolist())):
                if kept:
                    for m, t in enumerate(members):
                        items.append(self.item(t))
                        item_adv.append(float(advantages[g, m]))
        all_shaped = distributed.gather_objects(shaped)
        stats = {f"reward/{name}": float(np.mean([s[key] for s in all_shaped])) for name, key in REWARD_KEYS}
        stats["train/kept_groups"] = distributed.all_reduce_sum(float(keep.sum())) / len(all_shaped)
        return items, torch.tensor(item_adv), stats

    def item(self, trajectory: Trajectory) -> dict[str, torch.Tensor]:
        """The training item of one rollout; with ``train_turns="operations"`` its loss mask keeps
        the tool-calling turns alone."""
        item = trajectory_item(self.processor, trajectory)
        if self.config.train_turns == "operations":
            item["loss_mask"] = torch.as_tensor(operation_turn_mask(trajectory), dtype=item["loss_mask"].dtype)
        return item

    @torch.no_grad()
    def _refresh_old_logprobs(self, items: list[dict[str, torch.Tensor]]) -> None:
        """Score `items` under the policy that starts the update (replayed rollouts were sampled
        from older ones; the ratio must compare with the current policy)."""
        self.model.eval()
        for start in range(0, len(items), self.config.micro_batch_size):
            chunk = items[start:start + self.config.micro_batch_size]
            logp = token_logprobs(self.model, pad_items(self.processor, chunk), self.config.temperature, self.suppressed)
            for item, row in zip(chunk, logp):
                item["old_logprobs"] = row[: len(item["input_ids"])].float().cpu()

    def update(self, items: list[dict[str, torch.Tensor]], advantages: torch.Tensor) -> dict[str, float]:
        """`updates_per_step` clipped-ratio updates over `items` (each with ``old_logprobs``).

        `advantages` is ``[N]`` (one per item) or ``[N, L]`` (per token, right-padded to at
        least the longest item). Every process calls it, with or without items: each runs as
        many forward/backward passes (the gradient reductions, and FSDP's gathers, are joined
        by all), a process with fewer running the extra ones on a spare item with weight 0.
        """
        config = self.config
        self.model.train()
        stats: dict[str, list[float]] = {}
        firsts = distributed.gather_objects(items[:1])  # every process's first item, on every process
        spare = (items or firsts)[:1]
        order = np.arange(len(items))
        np.random.default_rng([config.seed, 3, self.scheduler.last_epoch]).shuffle(order)
        for chunk in np.array_split(order, config.updates_per_step):
            local_tokens = sum(int(items[i]["loss_mask"].sum()) for i in chunk)
            num_tokens = distributed.all_reduce_sum(local_tokens)
            if num_tokens == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            micro = [chunk[s:s + config.micro_batch_size] for s in range(0, len(chunk), config.micro_batch_size)]
            for m in range(distributed.all_reduce_max(len(micro))):
                real = m < len(micro)
                batch = {k: v.to(config.device)
                         for k, v in pad_items(self.processor, [items[i] for i in micro[m]] if real else spare).items()}
                adv = (advantages[micro[m]] if real else torch.zeros(1)).to(config.device)
                if adv.ndim == 2:
                    adv = adv[:, :batch["input_ids"].shape[1]]
                loss, info = self.loss(batch, adv, num_tokens)
                # the loss is already divided by the global token count: sum over ranks, not mean
                (loss * (self.world if real else 0)).backward()
                if real:
                    for key, value in info.items():
                        stats.setdefault(key, []).append(value)
            distributed.average_gradients(self.trained)
            norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), config.max_grad_norm)
            stats.setdefault("loss/grad_norm", []).append(float(norm))
            self.optimizer.step()
            self.scheduler.step()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def loss(self, batch: dict[str, torch.Tensor], advantages: torch.Tensor,
             num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's loss (already divided by `num_tokens`, the update's policy tokens over
        every process) and its ``loss/`` statistics; `advantages` is ``[B]`` or ``[B, L]``."""
        logp = token_logprobs(self.model, batch, self.config.temperature, self.suppressed)
        return self.policy_loss(batch, logp, advantages, num_tokens)

    def policy_loss(self, batch: dict[str, torch.Tensor], logp: torch.Tensor, advantages: torch.Tensor,
                    num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate of the log-probs `logp` ``[B, L]`` (plus the KL to the reference
        policy when `kl_coef` > 0), masked to the policy's tokens, and its statistics."""
        config = self.config
        mask = batch["loss_mask"].float()
        loss, info = clipped_policy_loss(logp, batch["old_logprobs"], advantages, mask,
                                         config.clip_low, config.clip_high, num_tokens=num_tokens)
        stats = {"loss/clip_fraction": float(info["clip_fraction"]), "loss/approx_kl": float(info["approx_kl"])}
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference, batch, config.temperature, self.suppressed)
            kl = kl_penalty(logp, ref, mask, kind="k3", num_tokens=num_tokens)
            loss = loss + config.kl_coef * kl
            stats["loss/kl_ref"] = float(kl.detach())
        stats["loss/policy"] = float(loss.detach())
        return loss, stats

    # ---------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run the remaining steps; return the last evaluation's metrics."""
        config = self.config
        main = self.rank == 0
        logger = MetricLogger(self.out, resume_step=self.start_step if config.resume else None) if main else None
        if main:
            (self.out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        started, last_eval = time.time(), {}
        bar = tqdm(range(self.start_step, config.steps), desc="grpo", disable=not (config.progress and main),
                   initial=self.start_step, total=config.steps)
        step = self.start_step
        for step in bar:
            if step == 0 or (config.eval_every and step % config.eval_every == 0):
                last_eval = self.evaluate()
                if logger:
                    logger.log(step, last_eval)
            tick = time.time()
            with distributed.unsharded(self.trained):  # each process runs its own number of forward passes
                trajectories = self.rollouts(step)
                rollout_seconds = time.time() - tick
                items, advantages, batch_stats = self.batch(trajectories)
            update_stats = self.update(items, advantages) if distributed.all_reduce_sum(len(items)) else {}
            generated = sum(int(t.generated_mask.sum()) for t in trajectories)
            row = {
                **rollout_metrics(distributed.gather_objects(_records(trajectories)), self.task_source, "train/"),
                **batch_stats,
                **update_stats,
                "train/lr": self.scheduler.get_last_lr()[0],
                "time/rollout_s": rollout_seconds,
                "time/step_s": time.time() - tick,
                "time/generated_tokens_per_s": generated / max(rollout_seconds, 1e-9),
            }
            if logger:
                logger.log(step + 1, row)
            bar.set_postfix(acc=f"{row['train/accuracy']:.2f}", rapr=f"{row['train/rapr']:.2f}")
            # every process stops once one is out of time
            out_of_time = config.max_minutes > 0 and distributed.all_reduce_sum(
                float((time.time() - started) / 60 >= config.max_minutes)) > 0
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps or out_of_time:
                self.checkpoint(step + 1)
            if out_of_time:
                step += 1
                break
        else:
            step = config.steps
        last_eval = self.evaluate()
        if logger:
            logger.log(max(step, self.start_step) + 1, last_eval)
            logger.close()
        model_state, _ = distributed.full_state(self.trained)
        if main:
            self.save_final(self.out / "final", model_state)
            (self.out / "final_eval.json").write_text(json.dumps(last_eval, indent=2))
        return last_eval

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint of `step` steps done from rank 0. Every process calls it: a sharded
        module's full state is gathered from all of them."""
        model_state, optimizer_state = distributed.full_state(self.trained, self.optimizer)
        if self.rank == 0:
            save_checkpoint(self.out / "checkpoints", self.trained, self.optimizer, self.scheduler, step,
                            capture_rng_states(self._generators()), self.checkpoint_extra(),
                            keep_last=self.config.keep_checkpoints, model_state=model_state,
                            optimizer_state=optimizer_state)

    def save_final(self, path: Path, state: Mapping[str, torch.Tensor] | None) -> None:
        """Write the final policy to `path`, its weights from `state` when given (the full state
        dict of a sharded `trained` module, `agents.distributed.full_state`)."""
        self.policy.save_pretrained(path, state_dict=state)


def _parse_args(argv: Sequence[str] | None = None, config_class: type[GRPOConfig] = GRPOConfig) -> GRPOConfig:
    """`config_class` from command-line flags (one per field); the help opens with its module's doc."""
    parser = argparse.ArgumentParser(description=inspect.getmodule(config_class).__doc__.split("\n\n")[0])
    for f in fields(config_class):
        default = f.default if f.default is not field else None
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        elif f.name in ("tasks", "env_kwargs", "freeze"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=_json_or_text, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return config_class(**args)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main(argv: Sequence[str] | None = None, config_class: type[GRPOConfig] = GRPOConfig,
         trainer_class: type[GRPOTrainer] = GRPOTrainer) -> None:
    """Parse `config_class` from `argv`, train a `trainer_class` run, print its last evaluation."""
    config = _parse_args(argv, config_class)
    distributed.init()
    metrics = trainer_class(config).train()
    if distributed.rank_and_world()[0] == 0:
        print(json.dumps(metrics, indent=2))
    distributed.finish()


if __name__ == "__main__":
    main()
