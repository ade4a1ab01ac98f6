"""The SB3 example (examples/sb3_structured.py): its env passes SB3's checker, its arguments
parse, its seeds split, and its main function trains, evaluates and logs end to end."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sb3_structured.py"
EVAL_KEYS = {"eval/accuracy", "eval/rapr", "eval/mean_ops", "eval/op_error_rate"}


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("sb3_structured", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def tiny_args(example: ModuleType, log_dir: Path, **overrides: object) -> object:
    settings = dict(total_timesteps=256, n_envs=2, n_steps=64, batch_size=64, n_epochs=1, eval_episodes=8,
                    eval_every=128, view_size=48, log_dir=str(log_dir))
    return example.Args(**{**settings, **overrides})


def test_sb3_check_env_accepts_the_wrapped_env(example: ModuleType) -> None:
    from stable_baselines3.common.env_checker import check_env

    env = example.make_env(example.Args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, warn=True)


def test_the_wrapped_env_adds_curiosity_and_penalty(example: ModuleType) -> None:
    env = example.make_env(example.Args())
    answer, crop = np.array([2, 0, 0, 0, 0, 0, 0, 0, 3]), np.array([0, 1, 1, 3, 3, 0, 0, 0, 0])
    for episode in range(4):  # three answer-only episodes, then one with a crop: running RaPR 1/4
        env.reset(seed=episode)
        if episode == 3:
            *_, info = env.step(crop)
            assert info["operation"] == "crop_image"
        *_, terminated, _, info = env.step(answer)
        assert terminated
    assert info["rapr_estimate"] == pytest.approx(0.25)
    assert info["reward_curiosity"] == pytest.approx(0.5 * (0.3 - 0.25))
    assert info["reward_penalty"] == 0.0  # one operation is free


def test_parse_args_flags(example: ModuleType) -> None:
    args = example.parse_args(["--no-curiosity", "--total-timesteps", "64", "--vec-env", "subproc", "--H", "0.2"])
    assert (args.curiosity, args.total_timesteps, args.vec_env, args.H) == (False, 64, "subproc", 0.2)
    assert args.run_name == "no-curiosity-s0"
    assert example.parse_args([]).curiosity is True
    with pytest.raises(ValueError, match="batch_size"):
        example.parse_args(["--batch-size", "100"])


def test_training_seeds_avoid_the_held_out_ones(example: ModuleType) -> None:
    source = example.SeedRange(example.make_family(3), example.HELD_OUT)
    rng = np.random.default_rng(0)
    seeds = [int(source.sample(rng).sample_id.split("/")[1]) for _ in range(20)]
    assert min(seeds) >= example.HELD_OUT
    assert source.get("count/3").sample_id == "count/3"


@pytest.mark.parametrize("curiosity", [True, False])
def test_main_trains_evaluates_and_logs(example: ModuleType, tmp_path: Path, curiosity: bool) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = tiny_args(example, tmp_path, curiosity=curiosity)
    metrics = example.main(args)
    assert set(metrics) == EVAL_KEYS | {"time/cpu_seconds"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in EVAL_KEYS - {"eval/mean_ops"})
    assert 0.0 <= metrics["eval/mean_ops"] <= args.max_ops

    run_dir = tmp_path / ("curiosity-s0" if curiosity else "no-curiosity-s0")
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert EVAL_KEYS | {"train/accuracy", "train/rapr", "train/reward_curiosity", "train/reward_penalty"} <= tags
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 128, 256]
    assert events.Scalars("eval/rapr")[-1].value == pytest.approx(metrics["eval/rapr"])
    bonuses = [e.value for e in events.Scalars("train/reward_curiosity")]
    assert min(bonuses) >= 0.0 if curiosity else max(bonuses) == 0.0
