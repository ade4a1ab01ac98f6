"""pxr_env: visual question answering as a Gymnasium environment of visual operations.

Importing it registers the environment ids; it imports neither torch nor transformers.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

MAX_TURNS = 10
ENV_IDS = ("PixelQA-v0", "PixelQA-Structured-v0")

if "PixelQA-v0" not in registry:
    register(id="PixelQA-v0", entry_point="pxr_env.env:PixelQAEnv", max_episode_steps=MAX_TURNS,
             kwargs={"action_mode": "text"})
    register(id="PixelQA-Structured-v0", entry_point="pxr_env.env:PixelQAEnv", max_episode_steps=MAX_TURNS,
             kwargs={"action_mode": "structured"})


def __getattr__(name: str):
    if name == "PixelQAEnv":
        from pxr_env.env import PixelQAEnv

        return PixelQAEnv
    raise AttributeError(name)
