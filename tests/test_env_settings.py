"""A saved policy keeps the env arguments it was trained with (agents.vlm.env_settings)."""

from __future__ import annotations

import json

import pytest

from agents.cli import main
from agents.vlm.env_settings import ENV_SETTINGS_FILE, load_env_settings, save_env_settings
from agents.vlm.hf import TransformersPolicy
from agents.vlm.tiny import build_tiny_model, build_tiny_processor


def test_round_trip_and_clear_errors(tmp_path):
    assert load_env_settings(tmp_path) == {}  # none saved
    assert load_env_settings("Qwen/Qwen2.5-VL-7B-Instruct") == {}  # a hub id
    save_env_settings({"crop_padding": 0.03, "pixel_bounds": "tiny"}, tmp_path)
    assert load_env_settings(tmp_path) == {"crop_padding": 0.03, "pixel_bounds": "tiny"}
    save_env_settings({}, tmp_path)
    assert not (tmp_path / ENV_SETTINGS_FILE).exists()
    with pytest.raises(ValueError, match="not PixelQAEnv arguments a checkpoint may fix"):
        save_env_settings({"tasks": "zoom-read"}, tmp_path)
    with pytest.raises(ValueError, match="crop_pading"):
        save_env_settings({"crop_pading": 0.03}, tmp_path)
    (tmp_path / ENV_SETTINGS_FILE).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_env_settings(tmp_path)
    (tmp_path / ENV_SETTINGS_FILE).write_text("[0.03]")
    with pytest.raises(ValueError, match="JSON object"):
        load_env_settings(tmp_path)


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    """A tiny policy saved with a crop padding of 0.02."""
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    policy = TransformersPolicy(model, processor)
    policy.env_kwargs = {"crop_padding": 0.02}
    path = tmp_path_factory.mktemp("policy")
    policy.save_pretrained(path)
    return path


def test_the_policy_loads_and_saves_its_env_settings(saved_policy, tmp_path):
    policy = TransformersPolicy.from_pretrained(saved_policy)
    assert policy.env_kwargs == {"crop_padding": 0.02}
    policy.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ENV_SETTINGS_FILE).read_text()) == {"crop_padding": 0.02}


def test_pxr_eval_builds_the_env_from_the_saved_settings(saved_policy, tmp_path, monkeypatch, capsys):
    import agents.cli as cli

    seen = []
    make = cli.gym.make

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return make(*args, **kwargs)

    monkeypatch.setattr(cli.gym, "make", spy)
    main(["eval", "--policy", str(saved_policy), "--tasks", "zoom-read", "--episodes", "1", "--batch-size", "1",
          "--max-new-tokens", "2", "--max-turns", "1", "--out", str(tmp_path / "a"), "--no-progress"])
    assert seen[-1]["crop_padding"] == 0.02 and "pixel_bounds" not in seen[-1]
    main(["eval", "--policy", str(saved_policy), "--tasks", "zoom-read", "--episodes", "1", "--batch-size", "1",
          "--max-new-tokens", "2", "--max-turns", "1", "--pixel-bounds", "train", "--out", str(tmp_path / "b"),
          "--no-progress"])
    assert seen[-1]["crop_padding"] == 0.02 and seen[-1]["pixel_bounds"] == "train"
    assert [p.name for p in (tmp_path / "a").iterdir()]  # the report was written
