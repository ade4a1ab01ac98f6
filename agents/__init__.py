"""Policies and their training: baselines, vision-language-model agents, rollouts, trainers.

The top-level name ``agents`` is shared with other packages (an agents SDK installs one);
this is pxr's. Submodules import their heavy dependencies (torch, transformers) lazily.
"""
