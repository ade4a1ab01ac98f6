"""PixelQAEnv: spaces, operations through both action modes, errors, limits, rewards, info."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

import pxr_env
from pxr_env.env import PixelQAEnv


def crop_call(box, target=1) -> str:
    return '<tool_call>\n' + json.dumps({"name": "crop_image", "arguments": {"bbox_2d": box, "target_image": target}}) + '\n</tool_call>'


def frames_call(frames) -> str:
    return '<tool_call>\n' + json.dumps({"name": "select_frames", "arguments": {"target_frames": frames}}) + '\n</tool_call>'


@pytest.fixture
def env(fixture_source):
    e = PixelQAEnv(tasks=fixture_source, render_mode="rgb_array")
    yield e
    e.close()


def test_import_does_not_pull_torch_or_transformers():
    import subprocess
    import sys

    code = "import sys, pxr_env, gymnasium; gymnasium.make('PixelQA-v0'); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


def test_reset_gives_question_and_image_but_never_the_answer(env):
    obs, info = env.reset(seed=0, options={"sample_id": "fx/choice"})
    assert obs["text"].startswith("What colour") and "(B) red" in obs["text"]
    (view,) = obs["images"]
    assert view.dtype == np.uint8 and view.shape[0] % 28 == 0 and view.shape[1] % 28 == 0
    assert view.shape[0] * view.shape[1] <= 64 * 28 * 28
    assert info["sample_id"] == "fx/choice" and info["answer_type"] == "choice"
    assert info["choices"] == ["green", "red", "blue"]
    assert "answer" not in info and "gold_answers" not in info
    assert env.observation_space.contains(obs)


def test_crop_then_answer_scores_and_reports(env):
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    obs, reward, terminated, truncated, info = env.step(crop_call([500 / 800, 100 / 600, 540 / 800, 140 / 600]))
    assert info["action_error"] is None and info["operation"] == "crop_image"
    assert obs["text"].startswith("Here is the cropped image (image 2")
    (crop,) = obs["images"]
    assert abs(crop.shape[0] * crop.shape[1] - 64 * 28 * 28) < 64 * 28 * 28 * 0.3  # magnified to the crop bound
    assert reward == 0 and not terminated and not truncated
    obs, reward, terminated, truncated, info = env.step("The square is red. \\boxed{B}")
    assert reward == 1.0 and terminated and not truncated
    assert info["correct"] and info["answer"] == "B" and info["gold_answers"] == ["B"]
    assert info["n_visual_ops"] == 1 and info["n_op_errors"] == 0 and info["used_pixel_reasoning"]
    assert info["crop_iou"] == pytest.approx(1.0, abs=0.05)
    assert info["crop_hit"] is True and info["crop_area"] == pytest.approx(40 * 40 / (800 * 600))
    left, top, right, bottom = info["crop_box"]  # what the crop showed: the request, padded
    assert 0 <= left <= 500 and 0 <= top <= 100 and 540 <= right <= 800 and 140 <= bottom <= 600
    assert (right - left) * (bottom - top) < 800 * 600 / 4
    picture = env.render()
    assert picture.ndim == 3 and picture.shape[2] == 3


def test_pixel_boxes_refer_to_the_shown_image(env):
    obs, _ = env.reset(seed=0, options={"sample_id": "fx/choice"})
    h, w = obs["images"][0].shape[:2]
    _, _, _, _, info = env.step(crop_call([500 * w / 800, 100 * h / 600, 540 * w / 800, 140 * h / 600]))
    assert info["action_error"] is None
    _, _, _, _, info = env.step("\\boxed{B}")
    assert info["crop_iou"] == pytest.approx(1.0, abs=0.05)


def test_crop_of_a_crop_maps_back_to_the_original(env):
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    env.step(crop_call([0.5, 0.0, 0.9, 0.4]))
    _, _, _, _, info = env.step(crop_call([0.3, 0.3, 0.7, 0.7], target=2))
    assert info["action_error"] is None
    assert len(env._episode.boxes_in_original) == 3
    x1, y1, x2, y2 = env._episode.boxes_in_original[2]
    px1, py1, px2, py2 = env._episode.boxes_in_original[1]
    assert px1 <= x1 < x2 <= px2 and py1 <= y1 < y2 <= py2


def test_wrong_answer_and_counting_and_anls(env):
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    _, reward, terminated, _, info = env.step("\\boxed{A}")
    assert reward == 0 and terminated and not info["correct"]
    env.reset(seed=0, options={"sample_id": "fx/count"})
    _, reward, _, _, _ = env.step("Answer: 1")
    assert reward == 1
    env.reset(seed=0, options={"sample_id": "fx/text"})
    _, reward, _, _, info = env.step("\\boxed{open sesam}")
    assert 0.5 < reward < 1 and info["correct"]


@pytest.mark.parametrize("turn, message", [
    ("<tool_call>{not json}</tool_call>", "JSON"),
    ('<tool_call>{"name": "zoom", "arguments": {}}</tool_call>', "unknown tool 'zoom'"),
    ('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 0.5, 0.5]}}</tool_call>', "missing argument"),
    ('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 0.5, 0.5], "target_image": 1, "zoom": 2}}</tool_call>', "unexpected argument"),
    (crop_call("0.1 0.1 0.5 0.5"), "list of four numbers"),
    (crop_call([0.1, 0.1, "a", 0.5]), "must be a number"),
    ('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 1e999, 0.5], "target_image": 1}}</tool_call>', "finite"),
    (crop_call([0.5, 0.5, 0.1, 0.1]), "inverted"),
    (crop_call([0.1, 0.1, 0.5, 0.5], target=3), "target_image 3 is out of range"),
    (crop_call([0.1, 0.1, 0.5, 0.5], target=1.5), "must be an integer"),
    (crop_call([0.50, 0.50, 0.51, 0.51]), None),
    (frames_call([1, 2]), "only on a video"),
    ("I think it is red.", "no tool call and no final answer"),
])
def test_each_error_is_an_observation_with_its_message(env, turn, message):
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    obs, reward, terminated, truncated, info = env.step(turn)
    if message is None:  # a small but valid box: padding makes it big enough
        assert info["action_error"] is None
        return
    assert not terminated and not truncated and reward == 0
    assert info["action_error"] is not None and message in info["action_error"], info["action_error"]
    assert obs["text"] == f"Execution error: {info['action_error']}" and obs["images"] == ()


def test_too_small_crop(env):
    env.reset(seed=0, options={"sample_id": "fx/small"})
    _, _, _, _, info = env.step(crop_call([0.5, 0.5, 0.51, 0.51]))
    assert "cropped image is too small" in info["action_error"]
    _, _, _, _, info = env.step(crop_call([0.4, 0.4, 0.6, 0.6]))
    assert info["action_error"] is None


def test_video_errors_and_frames(env):
    obs, info = env.reset(seed=0, options={"sample_id": "fx/video"})
    low_res = obs["images"][0]
    assert len(obs["images"]) == 16 and info["is_video"] and info["num_frames"] == 16
    _, _, _, _, info = env.step(frames_call(list(range(1, 10))))
    assert "too many frames" in info["action_error"]
    _, _, _, _, info = env.step(frames_call([0, 3]))
    assert "out of range" in info["action_error"]
    _, _, _, _, info = env.step(frames_call([17]))
    assert "out of range" in info["action_error"]
    _, _, _, _, info = env.step(crop_call([0.1, 0.1, 0.5, 0.5]))
    assert "only on an image" in info["action_error"]
    obs, _, _, _, info = env.step(frames_call([6, 7]))
    assert info["action_error"] is None and len(obs["images"]) == 2
    assert obs["images"][0].size > low_res.size
    _, reward, terminated, _, info = env.step("\\boxed{A}")
    assert reward == 1 and info["frames_hit"] and info["n_op_errors"] == 4 and info["n_tool_calls"] == 5
    assert env.render().ndim == 3


def test_operation_limit_truncates_with_zero_reward(fixture_source):
    env = PixelQAEnv(tasks=fixture_source, max_ops=2)
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    for _ in range(2):
        _, _, _, truncated, info = env.step(crop_call([0.1, 0.1, 0.6, 0.6]))
        assert info["action_error"] is None and not truncated
    _, reward, terminated, truncated, info = env.step(crop_call([0.1, 0.1, 0.6, 0.6]))
    assert truncated and not terminated and reward == 0
    assert "limit of 2 operations" in info["action_error"] and info["n_visual_ops"] == 2 and not info["correct"]


def test_image_limit_truncates(fixture_source):
    env = PixelQAEnv(tasks=fixture_source, max_images=2, max_ops=8)
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    env.step(crop_call([0.1, 0.1, 0.6, 0.6]))
    _, reward, _, truncated, info = env.step(crop_call([0.1, 0.1, 0.6, 0.6]))
    assert truncated and reward == 0 and "limit of 2 images" in info["action_error"]


def test_unfixed_error_rule(fixture_source):
    for rule, expected in ((False, 1.0), (True, 0.0)):
        env = PixelQAEnv(tasks=fixture_source, zero_reward_on_unfixed_error=rule)
        env.reset(seed=0, options={"sample_id": "fx/choice"})
        env.step(crop_call([0.5, 0.5, 0.1, 0.1]))
        _, reward, _, _, _ = env.step("\\boxed{B}")
        assert reward == expected
    env = PixelQAEnv(tasks=fixture_source, zero_reward_on_unfixed_error=True)
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    env.step(crop_call([0.5, 0.5, 0.1, 0.1]))
    env.step(crop_call([0.1, 0.1, 0.5, 0.5]))
    _, reward, _, _, _ = env.step("\\boxed{B}")
    assert reward == 1.0


def test_non_string_actions_never_raise(env):
    env.reset(seed=0)
    for action in (None, 3, b"\\boxed{A}", ["x"], float("nan")):
        _, _, _, _, info = env.step(action)
        assert "must be a string" in info["action_error"]
    _, _, _, _, info = env.step("x" * 70_000)
    assert "too long" in info["action_error"]


def test_structured_mode_runs_the_same_operations(fixture_source):
    env = PixelQAEnv(tasks=fixture_source, action_mode="structured")
    obs, _ = env.reset(seed=0, options={"sample_id": "fx/choice"})
    assert env.observation_space.contains(obs)
    obs, _, _, _, info = env.step(np.array([0, 12, 3, 14, 5, 0, 0, 0, 0]))
    assert info["action_error"] is None and info["operation"] == "crop_image"
    assert not np.array_equal(obs["view"], obs["overview"])
    obs, _, _, _, info = env.step(np.array([0, 12, 3, 14, 5, 7, 0, 0, 0]))
    assert "out of range" in info["action_error"] and obs["status"][2] == 1.0
    _, _, _, _, info = env.step(np.array([1, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert "only on a video" in info["action_error"]
    _, reward, terminated, _, info = env.step(np.array([2, 0, 0, 0, 0, 0, 0, 0, 1]))
    assert terminated and reward == 1.0 and info["crop_iou"] > 0.3
    env.reset(seed=0, options={"sample_id": "fx/text"})
    _, _, terminated, _, info = env.step(np.array([2, 0, 0, 0, 0, 0, 0, 0, 1]))
    assert not terminated and "free-text" in info["action_error"]
    for bad in (np.array([9, 0, 0, 0, 0, 0, 0, 0, 0]), np.zeros(3), "crop", np.full(9, np.nan)):
        _, _, _, _, info = env.step(bad)
        assert "structured action must be" in info["action_error"]


def test_frames_hit_is_about_the_last_selection(env):
    for selections, hit in (([[6, 7], [1, 2]], False), ([[1, 2], [8]], True), ([[2], [3, 4], [5]], False)):
        env.reset(seed=0, options={"sample_id": "fx/video"})
        for frames in selections:
            assert env.step(frames_call(frames))[4]["action_error"] is None
        assert env.step("\\boxed{A}")[4]["frames_hit"] is hit, selections


def test_structured_video(fixture_source):
    env = PixelQAEnv(tasks=fixture_source, action_mode="structured")
    env.reset(seed=0, options={"sample_id": "fx/video"})
    _, _, _, _, info = env.step(np.array([1, 0, 0, 0, 0, 0, 5, 2, 0]))
    assert info["action_error"] is None
    _, reward, _, _, info = env.step(np.array([2, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert reward == 1 and info["frames_hit"]


def test_same_seed_same_bytes(fixture_source):
    a = PixelQAEnv(tasks=fixture_source)
    b = PixelQAEnv(tasks=fixture_source)
    for seed in range(5):
        oa, ia = a.reset(seed=seed)
        ob, ib = b.reset(seed=seed)
        assert oa["text"] == ob["text"] and ia == ib
        assert all(x.tobytes() == y.tobytes() for x, y in zip(oa["images"], ob["images"]))


def test_ansi_render_logs_turns(fixture_source):
    env = PixelQAEnv(tasks=fixture_source, render_mode="ansi")
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    env.step(crop_call([0.6, 0.1, 0.7, 0.3]))
    env.step("\\boxed{B}")
    log = env.render()
    assert "[user] What colour" in log and "crop_image" in log and "scored 1.000" in log


def test_constructor_misuse_says_how_to_fix():
    with pytest.raises(ValueError, match="action_mode"):
        PixelQAEnv(action_mode="pixels")
    with pytest.raises(ValueError, match="pixel preset"):
        PixelQAEnv(pixel_bounds="huge")
    with pytest.raises(ValueError, match="unknown task source"):
        PixelQAEnv(tasks="nope")


def test_pixel_bounds_mapping_changes_a_preset(fixture_source):
    from pxr_env.ops import PIXEL_PRESETS, PixelBounds

    small = PixelBounds.resolve({"crop": [112 * 112, 112 * 112]})
    assert small.crop == (12544, 12544) and small.image == PIXEL_PRESETS["tiny"].image
    assert PixelBounds.resolve({"preset": "train"}) == PIXEL_PRESETS["train"]
    env = PixelQAEnv(tasks=fixture_source, pixel_bounds={"crop": [12544, 12544]})
    env.reset(seed=0, options={"sample_id": "fx/choice"})
    obs, _, _, _, info = env.step(crop_call([0.1, 0.1, 0.4, 0.4]))
    assert info["action_error"] is None
    (crop,) = obs["images"]
    assert crop.shape[0] * crop.shape[1] == pytest.approx(12544, rel=0.3)
    with pytest.raises(ValueError, match="unknown"):
        PixelBounds.resolve({"crops": [1, 2]})
    with pytest.raises(ValueError, match=r"\[min, max\]"):
        PixelBounds.resolve({"crop": [5]})
    with pytest.raises(ValueError, match="min <= max"):
        PixelBounds.resolve({"crop": [9, 4]})


def test_step_before_reset_is_a_usage_error(fixture_source):
    with pytest.raises(RuntimeError, match="reset"):
        PixelQAEnv(tasks=fixture_source).step("\\boxed{A}")


def test_crop_padding_is_an_argument(fixture_source):
    sizes = {}
    for padding in (0.1, 0.02):
        env = PixelQAEnv(tasks=fixture_source, crop_padding=padding, pixel_bounds="train")
        env.reset(seed=0, options={"sample_id": "fx/choice"})
        obs, _, _, _, info = env.step(crop_call([0.6, 0.2, 0.7, 0.3]))
        assert info["action_error"] is None
        sizes[padding] = env._episode.sources[-1].shape[:2]
    for padding, side in ((0.1, 0.3), (0.02, 0.14)):  # the box's 0.1 plus twice the padding, of 600 x 800
        assert abs(sizes[padding][0] - side * 600) <= 2 and abs(sizes[padding][1] - side * 800) <= 2
    with pytest.raises(ValueError, match="crop_padding"):
        PixelQAEnv(tasks=fixture_source, crop_padding=0.7)
