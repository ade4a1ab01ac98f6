"""Batched multi-turn rollouts: one policy plays many text-mode episodes at once.

`collect` drives N environments with one policy. Every turn it calls
``policy.act(observations, contexts)`` once for all running episodes (one batched
generation for a VLM), steps each environment with its turn, and refills an environment
with the next scheduled episode as soon as its episode ends. It returns one `Trajectory`
per episode, in schedule order.

**Environments.** Either a list of text-mode envs (``gymnasium.make("PixelQA-v0", ...)``),
the simplest choice: each env is reset on its own, when its episode ends. Or a gymnasium
`VectorEnv` of them with ``autoreset_mode`` ``NEXT_STEP`` (the default) or ``DISABLED``:
a finished sub-env is reset alone through ``options["reset_mask"]``, and sub-envs with no
episode left are stepped with an empty turn whose results are dropped (a vector env steps
all its sub-envs at once). ``SAME_STEP`` is refused: it replaces the final state of an
episode before the collector can read it.

**Schedule and seeds.** With ``samples=[ids]`` each sample is played `group_size` times
(the G rollouts of one query that GRPO compares); with ``num_samples=n`` the envs draw n
samples and each is played `group_size` times (the group's first episode draws, the others
replay its sample id). Episode ``k`` of the schedule (``k = group * group_size + member``)
is reset with seed ``seed + k``, and a policy with a ``seed(int)`` method is reseeded with
`seed`, so the same call with the same policy state, envs and batch size gives the same
trajectories.

**Tokens.** A policy that returns `agents.base.Generation` records hands over, for each
turn, the tokens appended to its context (`prompt_ids`: prompt, observation, chat markup)
and the tokens it generated with their log-probs. The collector concatenates them into
`Trajectory.token_ids` (the whole conversation, exactly as the policy saw it),
`Trajectory.generated_mask` (True on generated tokens only: prompts and tool outputs are
masked) and `Trajectory.logprobs` (the sampling-time log-probs, aligned with `token_ids`,
0 where the mask is False). `Trajectory.images` are the images of the observations in
the order the conversation shows them, so ``token_ids`` + ``images`` are what a trainer
needs to recompute log-probs in one forward pass (`agents.vlm.hf.sequence_logprobs`).
Policies that return plain strings (the baselines) leave the token fields empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from tqdm.auto import tqdm

from agents.base import EpisodeContext, Generation, Policy, action_of, as_policy
from pxr_env.actions import parse_turn

MAX_TURNS = 64
"""Turns after which `collect` gives up on an episode that its env never ends (envs made
with ``gymnasium.make`` end after ``pxr_env.MAX_TURNS`` turns)."""

FINAL_KEYS = ("sample_id", "family", "correct", "score", "answer", "n_visual_ops", "n_op_errors", "n_tool_calls",
              "n_turn_errors", "used_pixel_reasoning", "crop_iou", "crop_hit", "frames_hit")
"""The end-of-episode info keys every `Trajectory.info` carries."""


@dataclass
class Turn:
    """One step of an episode: the observation acted on, the turn taken and what it gave."""

    observation: str
    image_indices: tuple[int, ...]
    """Indices into `Trajectory.images` of the images that came with `observation`."""
    action: str
    reward: float
    info: dict[str, Any]


@dataclass
class Trajectory:
    """One episode: its turns, images, final info and (for token-level policies) its tokens."""

    sample_id: str
    family: str
    seed: int
    group: int
    """Index of the query in the schedule; the `group_size` episodes of a query share it."""
    member: int
    """Index of this episode within its group."""
    reset_info: dict[str, Any]
    turns: list[Turn]
    images: list[np.ndarray]
    info: dict[str, Any]
    """The last step's info: ``correct``, ``score``, ``n_visual_ops`` ... (see `FINAL_KEYS`)."""
    terminated: bool
    truncated: bool
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    generated_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    render: np.ndarray | None = None
    """The env's ``rgb_array`` picture of the finished episode (crop boxes drawn), when asked for."""

    @property
    def reward(self) -> float:
        """The episode return: the sum of the step rewards (task reward plus any wrapper terms)."""
        return float(sum(t.reward for t in self.turns))

    @property
    def has_tokens(self) -> bool:
        """Whether the policy handed over tokens (`agents.base.Generation` records)."""
        return len(self.token_ids) > 0


@dataclass
class _Episode:
    """Bookkeeping of one scheduled episode while it runs."""

    group: int
    member: int
    seed: int
    sample_id: str | None
    context: EpisodeContext | None = None
    observation: dict[str, Any] | None = None
    turns: list[Turn] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


def collect(policy: Any, envs: Sequence[gym.Env] | VectorEnv, *, samples: Sequence[str] | None = None,
            num_samples: int | None = None, group_size: int = 1, seed: int = 0, render: bool = False,
            progress: bool = True, max_turns: int = MAX_TURNS) -> list[Trajectory]:
    """Play ``group_size`` episodes of each sample with `policy` on `envs`; see the module doc.

    Give exactly one of `samples` (sample ids to play) and `num_samples` (how many samples
    the envs draw). With ``render=True`` each trajectory keeps the env's ``rgb_array``
    picture of its final state (envs made with ``render_mode="rgb_array"``).
    """
    if (samples is None) == (num_samples is None):
        raise ValueError("give exactly one of samples=[sample ids] and num_samples=n")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n_queries = len(samples) if samples is not None else int(num_samples)
    if n_queries < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    policy = as_policy(policy)
    slots = _VectorSlots(envs) if isinstance(envs, VectorEnv) else _ListSlots(envs)
    if hasattr(policy, "seed"):
        policy.seed(seed)
    pending = [
        _Episode(group=q, member=g, seed=seed + q * group_size + g,
                 sample_id=None if samples is None else samples[q])
        for q in range(n_queries) for g in range(group_size)
    ]
    pending.reverse()
    drawn: dict[int, str] = {}
    running: dict[int, _Episode] = {}
    finished: list[Trajectory] = []
    with tqdm(total=len(pending), desc="rollouts", unit="episode", disable=not progress) as bar:
        while pending or running:
            for slot in range(slots.num):
                if slot not in running and pending:
                    episode = pending.pop()
                    if episode.sample_id is None and episode.member > 0:
                        episode.sample_id = drawn[episode.group]
                    _start(slots, slot, episode, policy)
                    drawn.setdefault(episode.group, episode.context.sample_id)
                    running[slot] = episode
            order = sorted(running)
            observations = [running[s].observation for s in order]
            outputs = policy.act(observations, [running[s].context for s in order])
            if len(outputs) != len(order):
                raise ValueError(f"policy.act returned {len(outputs)} actions for {len(order)} observations")
            results = slots.step({s: action_of(out) for s, out in zip(order, outputs)})
            for slot, output in zip(order, outputs):
                episode = running[slot]
                obs, reward, terminated, truncated, info = results[slot]
                _record(episode, output, obs, reward, info)
                if terminated or truncated:
                    picture = slots.render(slot) if render else None
                    finished.append(_trajectory(episode, terminated, truncated, picture))
                    del running[slot]
                    bar.update(1)
                elif len(episode.turns) >= max_turns:
                    raise RuntimeError(
                        f"episode of sample {episode.context.sample_id!r} ran {max_turns} turns without ending: "
                        "wrap the env in a TimeLimit (gymnasium.make('PixelQA-v0') does) or raise max_turns")
    finished.sort(key=lambda t: (t.group, t.member))
    return finished


def _start(slots: "_ListSlots | _VectorSlots", slot: int, episode: _Episode, policy: Policy) -> None:
    options = {} if episode.sample_id is None else {"sample_id": episode.sample_id}
    obs, info = slots.reset(slot, episode.seed, options)
    episode.context = EpisodeContext(slot=slot, reset_info=info)
    episode.observation = obs
    if hasattr(policy, "reset"):
        policy.reset(episode.context)


def _record(episode: _Episode, output: Any, next_obs: dict[str, Any], reward: float, info: dict[str, Any]) -> None:
    obs = episode.observation
    start = len(episode.images)
    episode.images.extend(obs["images"])
    action = action_of(output)
    episode.turns.append(Turn(observation=obs["text"], image_indices=tuple(range(start, len(episode.images))),
                              action=action, reward=float(reward), info=info))
    episode.outputs.append(output)
    episode.context.history += [obs, action]
    episode.context.step_infos.append(info)
    episode.observation = next_obs


def _trajectory(episode: _Episode, terminated: bool, truncated: bool, picture: np.ndarray | None) -> Trajectory:
    info = dict(episode.turns[-1].info)
    if any(key not in info for key in FINAL_KEYS):
        info = {**_time_limit_info(episode), **info}
    reset_info = episode.context.reset_info
    trajectory = Trajectory(
        sample_id=reset_info["sample_id"], family=reset_info["family"], seed=episode.seed, group=episode.group,
        member=episode.member, reset_info=reset_info, turns=episode.turns, images=episode.images, info=info,
        terminated=terminated, truncated=truncated, render=picture)
    generations = [o for o in episode.outputs if isinstance(o, Generation)]
    if generations:
        if len(generations) != len(episode.outputs):
            raise ValueError("a policy must return Generation records for every turn of an episode or for none")
        trajectory.token_ids, trajectory.generated_mask, trajectory.logprobs = assemble_tokens(generations)
    return trajectory


def assemble_tokens(generations: Sequence[Generation]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate the turns of an episode: (token ids (L,) int64, generated mask (L,) bool,
    log-probs (L,) float32, 0 off the mask; empty when any turn lacks log-probs)."""
    ids: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    for g in generations:
        ids += list(g.prompt_ids) + list(g.token_ids)
        mask += [False] * len(g.prompt_ids) + [True] * len(g.token_ids)
        logprobs += [0.0] * len(g.prompt_ids) + list(g.logprobs)
    have_logprobs = all(len(g.logprobs) == len(g.token_ids) for g in generations)
    return (np.asarray(ids, np.int64), np.asarray(mask, bool),
            np.asarray(logprobs if have_logprobs else [], np.float32))


def turn_spans(generated_mask: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of generated tokens of a trajectory: its policy turns, in order."""
    edges = np.diff(np.concatenate([[0], np.asarray(generated_mask, np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def policy_turn_spans(trajectory: Trajectory) -> list[tuple[int, int]]:
    """`turn_spans` of a trajectory's tokens, one per turn; a mismatch is refused (a turn whose
    tokens follow no prompt tokens of their own would merge with the one before)."""
    spans = turn_spans(trajectory.generated_mask)
    if len(spans) != len(trajectory.turns) or spans and spans[0][0] < 1:
        raise ValueError(f"the tokens of an episode of {trajectory.sample_id!r} show {len(spans)} generated runs for "
                         f"{len(trajectory.turns)} turns: every turn must follow prompt tokens of its own")
    return spans


def operation_turn_mask(trajectory: Trajectory) -> np.ndarray:
    """`Trajectory.generated_mask` kept on the turns that call a tool (a visual operation or a
    malformed call), cleared on the answer turns: the tokens that decide where to look."""
    mask = np.zeros_like(trajectory.generated_mask)
    for (start, end), turn in zip(policy_turn_spans(trajectory), trajectory.turns):
        if parse_turn(turn.action).tool_call is not None:
            mask[start:end] = True
    return mask


def _time_limit_info(episode: _Episode) -> dict[str, Any]:
    """End-of-episode info for an episode a TimeLimit wrapper cut: no answer, score 0, and
    the operation counts read back from the turns with the env's own parser."""
    executed = sum(t.info.get("operation") is not None for t in episode.turns)
    calls = [t for t in episode.turns if isinstance(t.action, str) and parse_turn(t.action).tool_call is not None]
    op_errors = sum(t.info.get("action_error") is not None for t in calls)
    turn_errors = sum(t.info.get("action_error") is not None for t in episode.turns) - op_errors
    reset_info = episode.context.reset_info
    return {"sample_id": reset_info["sample_id"], "family": reset_info["family"], "is_video": reset_info["is_video"],
            "correct": False, "score": 0.0, "answer": None, "n_visual_ops": executed, "n_op_errors": op_errors,
            "n_tool_calls": len(calls), "n_turn_errors": turn_errors, "used_pixel_reasoning": executed > 0,
            "crop_iou": None, "crop_hit": None, "frames_hit": None}


def _check_text_mode(space: gym.Space) -> None:
    if not isinstance(space, gym.spaces.Text):
        raise ValueError(f"collect drives text-mode envs (PixelQA-v0), got an action space {space}; "
                         "structured-mode agents (SB3) use their own rollout loops")


class _ListSlots:
    """A list of envs, each reset and stepped on its own."""

    def __init__(self, envs: Sequence[gym.Env]) -> None:
        self.envs = list(envs)
        if not self.envs:
            raise ValueError("collect needs at least one env")
        for env in self.envs:
            _check_text_mode(env.action_space)
        self.num = len(self.envs)

    def reset(self, slot: int, seed: int | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.envs[slot].reset(seed=seed, options=options)

    def step(self, actions: Mapping[int, Any]) -> dict[int, tuple]:
        return {slot: self.envs[slot].step(action) for slot, action in actions.items()}

    def render(self, slot: int) -> np.ndarray | None:
        return self.envs[slot].render()


class _VectorSlots:
    """A gymnasium vector env: sub-envs reset alone by ``reset_mask``, idle ones fed empty turns."""

    FILLER = ""

    def __init__(self, envs: VectorEnv) -> None:
        if envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP) == AutoresetMode.SAME_STEP:
            raise ValueError("collect needs a vector env with autoreset_mode NEXT_STEP or DISABLED: SAME_STEP "
                             "resets a finished sub-env before its final state can be read")
        _check_text_mode(envs.single_action_space)
        self.envs = envs
        self.num = envs.num_envs
        self.done = np.ones(self.num, bool)
        # A masked reset batches the observations of every sub-env, so each needs one first.
        envs.reset()

    def reset(self, slot: int, seed: int | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        mask = np.zeros(self.num, bool)
        mask[slot] = True
        seeds: list[int | None] = [None] * self.num
        seeds[slot] = seed
        obs, infos = self.envs.reset(seed=seeds, options={**options, "reset_mask": mask})
        self.done[slot] = False
        return _item(obs, slot), _info_at(infos, slot)

    def step(self, actions: Mapping[int, Any]) -> dict[int, tuple]:
        for slot in range(self.num):
            if slot not in actions and self.done[slot]:
                self.reset(slot, None, {})  # an idle sub-env must be live before the batched step
        batch = tuple(actions.get(slot, self.FILLER) for slot in range(self.num))
        obs, rewards, terminated, truncated, infos = self.envs.step(batch)
        self.done = np.logical_or(terminated, truncated)
        return {slot: (_item(obs, slot), float(rewards[slot]), bool(terminated[slot]), bool(truncated[slot]),
                       _info_at(infos, slot)) for slot in actions}

    def render(self, slot: int) -> np.ndarray | None:
        return self.envs.call("render")[slot]


def _item(batched: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {key: value[i] for key, value in batched.items()}


def _info_at(infos: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sub-env `i`'s info from a vector env's batched info dict (``key`` / ``_key`` mask pairs).

    Batching turns a missing float into NaN; it comes back as None, as the env wrote it.
    """
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        present = infos.get(f"_{key}")
        if isinstance(value, Mapping):
            out[key] = _info_at(value, i)
            continue
        if present is not None and not present[i]:
            continue
        item = value[i]
        if isinstance(item, np.generic):
            item = item.item()
        if isinstance(item, float) and np.isnan(item):
            item = None
        out[key] = item
    return out
