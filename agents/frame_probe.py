"""Where choosing video frames fails: what the policy selects, and what its image tokens hold.

Two measurements on held-out video digit items (a small square briefly shows a digit):

- **Frame choice** (`first_choices`): the policy's first turn, greedy, on each item; whether
  the frames it selects include an evidence frame (the env's ``frames_hit``), per tier, and
  which frame it names first. A policy stuck on one or two frame numbers shows as a peaked
  histogram whatever the evidence.
- **Flash probe** (`flash_probe`): a logistic regression from the image encoder's tokens of
  each frame, as the env first shows it, to whether that frame shows the flash. Two feature
  sets: the token under the asked square (where the digit is, given) and the frame's tokens
  max-pooled (where it is not given). Trained on 70% of the clips, scored on the rest: the
  ROC AUC over frames and the share of clips whose top-scoring frame shows the flash. When
  the token under the square does not tell flash frames apart, no decoder reading it can
  choose them.

``python -m agents.frame_probe --model M`` prints both as JSON (docs/results.md, "Choosing
frames").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch

from pxr_env import ops
from pxr_env.actions import parse_turn
from pxr_env.tasks import Sample, TaskSource

PROBE_TASKS: dict[str, dict[str, Any]] = {"video": {"shortcut_share": 0.0}}
"""The default items: digit flashes of 2.5-3.75 px in the initial view (easy and hard tiers)."""


@dataclass(frozen=True)
class FrameChoice:
    """One item's first turn: the evidence frames, the frames selected (empty: none) and whether they hit."""

    sample_id: str
    tier: str
    evidence: tuple[int, ...]
    chosen: tuple[int, ...]
    hit: bool


def first_choices(policy: Any, source: TaskSource, sample_ids: Sequence[str], env_kwargs: dict[str, Any],
                  n_envs: int = 16) -> list[FrameChoice]:
    """The frames `policy` selects in its first turn on each of `sample_ids` (episodes end after one turn)."""
    from agents.rollout import collect

    envs = [gym.make("PixelQA-v0", tasks=source, max_episode_steps=1, **env_kwargs) for _ in range(n_envs)]
    rows = []
    for trajectory in collect(policy, envs, samples=list(sample_ids), group_size=1, seed=0):
        sample = source.get(trajectory.sample_id)
        call = parse_turn(trajectory.turns[0].action).tool_call
        frames = call.arguments.get("target_frames") if call is not None and call.name == "select_frames" else None
        chosen = tuple(f for f in frames if isinstance(f, int)) if isinstance(frames, list) else ()
        rows.append(FrameChoice(sample.sample_id, str(sample.meta.get("tier")), tuple(sample.evidence_frames),
                                chosen, bool(trajectory.turns[0].info.get("frames_hit"))))
    return rows


def summarize_choices(rows: Sequence[FrameChoice]) -> dict[str, Any]:
    """Hit rate per tier and overall, and how often each frame number is chosen first."""
    report: dict[str, Any] = {}
    for tier in sorted({r.tier for r in rows}):
        chosen = [r for r in rows if r.tier == tier]
        report[tier] = {"hit": sum(r.hit for r in chosen) / len(chosen), "items": len(chosen)}
    report["all"] = {"hit": sum(r.hit for r in rows) / max(len(rows), 1), "items": len(rows),
                     "no_selection": sum(not r.chosen for r in rows)}
    report["first_frame_chosen"] = dict(sorted(Counter(r.chosen[0] for r in rows if r.chosen).items()))
    report["first_evidence_frame"] = dict(sorted(Counter(r.evidence[0] for r in rows if r.evidence).items()))
    return report


@dataclass
class FrameFeatures:
    """Per frame of the probed clips: the two feature sets and the labels."""

    at_target: np.ndarray
    """``(frames, hidden)``: the encoder's token under the asked square."""
    pooled: np.ndarray
    """``(frames, hidden)``: the frame's tokens max-pooled."""
    flash: np.ndarray
    """Whether the frame shows the asked digit."""
    tier: np.ndarray
    clip: np.ndarray
    """Index of the clip the frame belongs to."""


@torch.no_grad()
def frame_features(model: Any, processor: Any, samples: Sequence[Sample], video_bounds: tuple[int, int]) -> FrameFeatures:
    """The image encoder's tokens of every frame of `samples` (digit items) as the env first shows them
    (the tiny model's encoder, ``model.model.vision``)."""
    vision = getattr(getattr(model, "model", None), "vision", None)
    if vision is None:
        raise ValueError(f"the flash probe reads the tiny model's image encoder; {type(model).__name__} has none")
    at_target, pooled, flash, tiers, clips = [], [], [], [], []
    for index, sample in enumerate(samples):
        target = sample.meta.get("target", {})
        if sample.meta.get("kind") != "digit" or "box" not in target:
            raise ValueError(f"{sample.sample_id} is not a video digit item; the flash probe reads those alone")
        frames = sample.load_frames()
        shown = [ops.smart_resize(frame, video_bounds) for frame in frames]
        inputs = processor.image_processor(shown, return_tensors="pt")
        _, grid_h, grid_w = (int(v) for v in inputs["image_grid_thw"][0])
        tokens = vision(inputs["pixel_values"].to(model.dtype), inputs["image_grid_thw"])
        tokens = tokens.float().view(len(shown), grid_h * grid_w, -1)
        height, width = frames.shape[1:3]
        left, top, right, bottom = target["box"]
        under = int((top + bottom) / 2 / height * grid_h) * grid_w + int((left + right) / 2 / width * grid_w)
        at_target.append(tokens[:, under].numpy())
        pooled.append(tokens.max(1).values.numpy())
        flash.extend(t in target["frames"] for t in range(len(shown)))
        tiers.extend([str(sample.meta.get("tier"))] * len(shown))
        clips.extend([index] * len(shown))
    return FrameFeatures(np.concatenate(at_target), np.concatenate(pooled), np.array(flash, bool),
                         np.array(tiers), np.array(clips))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        raise ValueError("the ROC AUC needs positives and negatives")
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(above / (len(positive) * len(negative)))


def linear_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray, steps: int = 1500,
                 l2: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Scores of a logistic regression fitted on the `train` rows (features standardised on them), for every row."""
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    rows = torch.tensor(train)
    torch.manual_seed(seed)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = x[rows] @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[rows]) + l2 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    return (x @ weight + bias).detach().numpy()


def flash_probe(features: FrameFeatures, train_share: float = 0.7) -> dict[str, Any]:
    """Per feature set and tier: held-out ROC AUC and the share of held-out clips whose top frame shows the flash."""
    n_clips = int(features.clip.max()) + 1
    train = features.clip < int(round(train_share * n_clips))
    if train.all() or not train.any():
        raise ValueError(f"{n_clips} clips cannot be split {train_share:.0%} / {1 - train_share:.0%}")
    report: dict[str, Any] = {}
    for name in ("at_target", "pooled"):
        scores = linear_probe(getattr(features, name), features.flash, train)
        per_tier = {}
        for tier in sorted(set(features.tier[~train])):
            rows = ~train & (features.tier == tier)
            clips = sorted(set(features.clip[rows]))
            top = [features.flash[features.clip == c][np.argmax(scores[features.clip == c])] for c in clips]
            per_tier[tier] = {"auc": roc_auc(features.flash[rows], scores[rows]), "top_frame_hit": float(np.mean(top)),
                              "clips": len(clips)}
        report[name] = {"train_auc": roc_auc(features.flash[train], scores[train]), **per_tier}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoProcessor

    from agents.sft import eval_sample_ids, task_source
    from agents.vlm.hf import TransformersPolicy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id) of the policy")
    parser.add_argument("--tasks", default=json.dumps(PROBE_TASKS), help="video task spec JSON (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=64, help="held-out items of the frame choice, 0: skip it (default: %(default)s)")
    parser.add_argument("--probe-clips", type=int, default=300, help="clips of the flash probe, 0: skip it (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=10_000_000, help="held-out seeds start here")
    args = parser.parse_args(argv)

    tasks = json.loads(args.tasks)
    if list(tasks) != ["video"]:
        raise SystemExit(f"the frame probe reads the video family alone, got {sorted(tasks)}")
    source = task_source(tasks)
    policy = TransformersPolicy.from_pretrained(args.model, temperature=0.0, max_new_tokens=96, max_batch_size=16)
    report: dict[str, Any] = {}
    if args.samples:
        ids = eval_sample_ids(tasks, args.samples, args.first_seed, set())
        report["frame_choice"] = summarize_choices(first_choices(policy, source, ids, policy.env_kwargs))
    if args.probe_clips:
        bounds = gym.make("PixelQA-v0", **policy.env_kwargs).unwrapped.bounds.video
        samples = [source.get(i) for i in eval_sample_ids(tasks, args.probe_clips, args.first_seed + 1_000_000, set())]
        features = frame_features(policy.model.eval(), AutoProcessor.from_pretrained(args.model), samples, bounds)
        report["flash_probe"] = flash_probe(features)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
