"""Every registered id passes Gymnasium's (and SB3's) checkers, runs in vector envs, and
survives adversarial text turns."""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pxr_env

PIXELQA_IDS = sorted(i for i in gym.registry if i.startswith("PixelQA"))


def test_registry_holds_the_documented_ids():
    assert PIXELQA_IDS == sorted(pxr_env.ENV_IDS)


@pytest.mark.parametrize("env_id", PIXELQA_IDS)
def test_gymnasium_check_env_without_warnings(env_id):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(env_id, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=False)
    env.close()


@pytest.mark.parametrize("env_id", PIXELQA_IDS)
@pytest.mark.parametrize("action_mode", ["text", "structured"])
def test_every_id_in_both_modes_plays_random_episodes(env_id, action_mode):
    env = gym.make(env_id, action_mode=action_mode)
    env.action_space.seed(0)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    done, steps = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        done, steps = terminated or truncated, steps + 1
    assert steps <= pxr_env.MAX_TURNS and "n_visual_ops" in info


def test_stable_baselines3_check_env_structured():
    from stable_baselines3.common.env_checker import check_env

    env = gym.make("PixelQA-Structured-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, warn=True)


@pytest.mark.parametrize("vector_cls", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
@pytest.mark.parametrize("env_id", PIXELQA_IDS)
def test_vector_envs(vector_cls, env_id):
    fns = [lambda: gym.make(env_id) for _ in range(2)]
    text_mode = gym.spec(env_id).kwargs["action_mode"] == "text"
    # variable-size images cannot live in shared memory: text mode runs with shared_memory=False
    envs = vector_cls(fns, shared_memory=False) if vector_cls is gym.vector.AsyncVectorEnv and text_mode else vector_cls(fns)
    try:
        obs, infos = envs.reset(seed=[1, 2])
        for _ in range(3):
            obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        assert rewards.shape == (2,)
    finally:
        envs.close()


def test_vector_env_text_actions_are_strings():
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("PixelQA-v0") for _ in range(2)])
    obs, infos = envs.reset(seed=0)
    assert len(obs["text"]) == 2 and isinstance(obs["text"][0], str)
    obs, rewards, terminated, truncated, infos = envs.step(("\\boxed{A}", "not an answer"))
    assert terminated[0] and not terminated[1]
    envs.close()


def test_seeded_resets_are_byte_identical():
    a, b = gym.make("PixelQA-v0"), gym.make("PixelQA-v0")
    for seed in (0, 1, 7):
        oa, ia = a.reset(seed=seed)
        ob, ib = b.reset(seed=seed)
        assert oa["text"] == ob["text"] and ia["sample_id"] == ib["sample_id"]
        assert [x.tobytes() for x in oa["images"]] == [x.tobytes() for x in ob["images"]]


def test_replay_by_sample_id():
    env = gym.make("PixelQA-v0")
    obs, info = env.reset(seed=11)
    again, info2 = env.reset(options={"sample_id": info["sample_id"]})
    assert again["text"] == obs["text"] and info2["sample_id"] == info["sample_id"]
    assert [x.tobytes() for x in again["images"]] == [x.tobytes() for x in obs["images"]]


JUNK = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.builds(lambda a, b: f"<tool_call>{a}</tool_call>{b}", st.text(max_size=80), st.text(max_size=20)),
    st.builds(lambda a: "<tool_call>" * 3 + a, st.text(max_size=50)),
    st.builds(lambda a: "<tool_call>{\"name\": \"crop_image\", \"arguments\": {\"bbox_2d\": " + a, st.text(max_size=40)),
    st.builds(lambda xs, t: '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": %s, "target_image": %s}}</tool_call>' % (xs, t),
              st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)), max_size=6).map(str),
              st.one_of(st.integers(-10**20, 10**20), st.floats(), st.text(max_size=5)).map(repr)),
    st.builds(lambda a: "\\boxed{" * 5 + a + "}" * 3, st.text(max_size=30)),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 5000)).map(lambda s: f"<tool_call>{{\"name\":\"crop_image\",\"arguments\":{{\"bbox_2d\":{s}}}}}</tool_call>"),
)


_JUNK_ENV: list = []


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(turn=JUNK)
def test_text_mode_never_raises_on_junk(turn):
    if not _JUNK_ENV:  # one env for all examples: resets are the slow part
        _JUNK_ENV.append(gym.make("PixelQA-v0").unwrapped)
        _JUNK_ENV[0].reset(seed=0)
    env = _JUNK_ENV[0]
    start = time.perf_counter()
    obs, reward, terminated, truncated, info = env.step(turn)
    assert time.perf_counter() - start < 2.0
    assert env.observation_space.contains(obs)
    if terminated or truncated:
        env.reset()


@pytest.mark.parametrize("turn", [
    "x" * 1_000_000,
    "<tool_call>" + "{" * 500_000,
    "\\boxed{" * 200_000,
    "<tool_call>" + "[" * 60_000 + "</tool_call>",
    "\x00\xff\ud7ff" * 100_000,
    '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [1e308, 1e308, 1e309, 2e308], "target_image": 99999999999999999999999}}</tool_call>',
    '<tool_call>{"name": "select_frames", "arguments": {"target_frames": [' + ",".join(["1"] * 100_000) + "]}}</tool_call>",
])
def test_huge_and_nested_turns_are_bounded(turn):
    env = gym.make("PixelQA-v0", max_turn_chars=2_000_000).unwrapped
    env.reset(seed=0)
    start = time.perf_counter()
    obs, reward, terminated, truncated, info = env.step(turn)
    assert time.perf_counter() - start < 2.0
    assert env.observation_space.contains(obs)
