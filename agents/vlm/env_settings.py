"""The `PixelQAEnv` arguments a saved policy was trained with, kept next to its weights.

A policy trained with, say, ``crop_padding=0.03`` sees a different crop for the same
``bbox_2d`` under the released padding of 0.1, so evaluation and RL must rebuild the env
it learned in. `agents.sft` writes ``env_settings.json`` when it exports a model;
`TransformersPolicy.from_pretrained` reads it into ``policy.env_kwargs``, and the eval
command and the RL trainers apply it under any arguments given explicitly.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Mapping

ENV_SETTINGS_FILE = "env_settings.json"
"""File of a checkpoint folder that holds its env arguments (absent: the env's defaults)."""

FIXED = ("tasks", "action_mode", "render_mode")
"""Arguments that belong to the caller, never to a checkpoint."""


def check_env_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` as a dict, after checking each key is a `PixelQAEnv` argument a checkpoint may fix."""
    from pxr_env.env import PixelQAEnv

    known = set(inspect.signature(PixelQAEnv.__init__).parameters) - {"self", *FIXED}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"env settings {unknown} are not PixelQAEnv arguments a checkpoint may fix; "
                         f"allowed: {sorted(known)}")
    return dict(settings)


def save_env_settings(settings: Mapping[str, Any], directory: str | Path) -> Path | None:
    """Write `settings` into a checkpoint folder; nothing is written for empty settings."""
    settings = check_env_settings(settings)
    path = Path(directory) / ENV_SETTINGS_FILE
    if not settings:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def load_env_settings(name_or_path: str | Path) -> dict[str, Any]:
    """The env settings saved in a checkpoint folder; ``{}`` for a folder without them or a hub id."""
    path = Path(name_or_path) / ENV_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of PixelQAEnv arguments, got {type(data).__name__}")
    try:
        return check_env_settings(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
