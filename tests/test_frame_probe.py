"""The frame probe: first-turn frame choice and the linear flash probe of the encoder's tokens."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pxr_env  # noqa: E402,F401
from agents.baselines import OraclePolicy  # noqa: E402
from agents.frame_probe import (  # noqa: E402
    FrameFeatures, first_choices, flash_probe, frame_features, roc_auc, summarize_choices,
)
from agents.sft import eval_sample_ids, task_source  # noqa: E402
from pxr_env.actions import format_tool_call  # noqa: E402

TASKS = {"video": {"shortcut_share": 0.0}}


@pytest.fixture(scope="module")
def source():
    return task_source(TASKS)


@pytest.fixture(scope="module")
def ids():
    return eval_sample_ids(TASKS, 4, 10_000_000, set())


def test_roc_auc_matches_hand_counts():
    # pairs (positive, negative): 0.35 > 0.1 yes, 0.35 > 0.4 no, 0.8 > both: 3 of 4
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_oracle_selects_the_evidence_and_a_fixed_frame_hits_only_where_it_flashes(source, ids):
    oracle = first_choices(OraclePolicy(source), source, ids, {}, n_envs=2)
    assert [r.sample_id for r in oracle] == ids
    assert all(r.hit and r.chosen == r.evidence[:8] for r in oracle)
    fixed = first_choices(lambda obs, ctx: [format_tool_call("select_frames", {"target_frames": [2]})] * len(ctx),
                          source, ids, {}, n_envs=2)
    assert [r.hit for r in fixed] == [2 in r.evidence for r in fixed]
    answers = first_choices(lambda obs, ctx: ["\\boxed{A}"] * len(ctx), source, ids, {}, n_envs=2)
    summary = summarize_choices(answers)
    assert summary["all"] == {"hit": 0.0, "items": 4, "no_selection": 4} and summary["first_frame_chosen"] == {}
    summary = summarize_choices(fixed)
    assert summary["first_frame_chosen"] == {2: 4}
    assert sum(v["items"] for k, v in summary.items() if k in ("easy", "hard")) == 4


def test_frame_features_label_the_flash_frames_and_read_the_token_under_the_square(source, ids):
    from agents.vlm.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128).eval()
    samples = [source.get(i) for i in ids[:2]]
    bounds = gym.make("PixelQA-v0").unwrapped.bounds.video
    features = frame_features(model, processor, samples, bounds)
    assert features.at_target.shape == features.pooled.shape == (32, 64)
    for clip, sample in enumerate(samples):
        flashing = np.flatnonzero(features.flash[features.clip == clip]) + 1  # 1-based, as the env numbers frames
        assert tuple(flashing) == tuple(sample.evidence_frames)
    assert (features.pooled >= features.at_target - 1e-6).all()  # a max over the tokens holds the one under the square
    with pytest.raises(ValueError, match="reads the tiny model's image encoder"):
        frame_features(torch.nn.Linear(2, 2), processor, samples, bounds)
    with pytest.raises(ValueError, match="not a video digit item"):
        frame_features(model, processor, [task_source({"zoom-read": {}}).get("zoom-read/1")], bounds)


def test_flash_probe_finds_a_planted_feature_and_not_noise():
    rng = np.random.default_rng(0)
    clips, frames = 40, 16
    flash = np.zeros(clips * frames, bool)
    for c in range(clips):
        start = rng.integers(0, frames - 2)
        flash[c * frames + start: c * frames + start + 2] = True
    noise = rng.normal(size=(clips * frames, 8))
    planted = noise.copy()
    planted[:, 3] += 3.0 * flash  # the flash is in one direction of the token under the square
    features = FrameFeatures(at_target=planted, pooled=noise, flash=flash,
                             tier=np.array(["easy"] * (clips * frames)), clip=np.repeat(np.arange(clips), frames))
    report = flash_probe(features)
    assert report["at_target"]["easy"]["auc"] > 0.95 and report["at_target"]["easy"]["top_frame_hit"] > 0.9
    assert report["at_target"]["easy"]["clips"] == 12
    assert 0.3 < report["pooled"]["easy"]["auc"] < 0.7
    with pytest.raises(ValueError, match="cannot be split"):
        flash_probe(FrameFeatures(planted[:16], noise[:16], flash[:16], features.tier[:16], np.zeros(16, int)))
