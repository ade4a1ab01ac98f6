"""Checkpoints: exact resume (parameters, optimizer, schedule, random draws), no pickle, atomic writes."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from agents import checkpoint as ckpt
from agents.checkpoint import (
    capture_rng_states,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from agents.schedules import cosine_schedule

TOTAL = 8


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, dict[str, Any]]:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=TOTAL, min_lr_ratio=0.5)
    generators = {
        "batches": torch.Generator().manual_seed(seed + 1),
        "replay": np.random.default_rng(seed + 2),
        "order": random.Random(seed + 3),
    }
    return model, optimizer, scheduler, generators


def _train(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, gens: dict[str, Any], steps: int
) -> None:
    """Steps that draw from every generator: globals (dropout, noise) and the named ones."""
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gens["batches"])
        noise = torch.from_numpy(gens["replay"].normal(size=(16, 1))).float()
        y = x.sum(1, keepdim=True) + 0.1 * noise + random.random() + float(np.random.rand()) + gens["order"].random()
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _draws(gens: dict[str, Any]) -> list[Any]:
    return [
        torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
        torch.rand(2, generator=gens["batches"]).tolist(), gens["replay"].random(2).tolist(), gens["order"].random(),
    ]


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    model, optimizer, scheduler, gens = _setup(0)
    _train(model, optimizer, scheduler, gens, TOTAL)
    straight = ([p.detach().clone() for p in model.parameters()], optimizer.param_groups[0]["lr"], _draws(gens))

    model, optimizer, scheduler, gens = _setup(0)
    _train(model, optimizer, scheduler, gens, TOTAL // 2)
    extra = {"config": {"lr": 1e-2}, "episodes": 64}
    saved = save_checkpoint(tmp_path, model, optimizer, scheduler, TOTAL // 2, capture_rng_states(gens), extra)
    assert saved.name == "step-0000004"

    model, optimizer, scheduler, gens = _setup(123)  # fresh objects, other weights, other random states
    _draws(gens)
    state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler, generators=gens)
    assert (state.step, state.extra) == (TOTAL // 2, extra)
    _train(model, optimizer, scheduler, gens, TOTAL - state.step)

    for resumed, expected in zip(model.parameters(), straight[0]):
        assert torch.equal(resumed, expected)
    assert optimizer.param_groups[0]["lr"] == straight[1]
    assert _draws(gens) == straight[2]


def test_files_are_safetensors_and_json_and_nothing_is_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler, gens = _setup(0)
    _train(model, optimizer, scheduler, gens, 2)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, 2, capture_rng_states(gens))
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
        "scheduler.json", "scheduler.safetensors", "trainer_state.json",
    ]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    fresh, fresh_optimizer, fresh_scheduler, fresh_gens = _setup(5)
    load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, generators=fresh_gens)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_a_transformers_model_round_trips_through_save_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = save_checkpoint(tmp_path, model, step=1)
    assert (path / "model" / "config.json").is_file() and (path / "model" / "model.safetensors").is_file()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    torch.manual_seed(1)
    other = LlamaForCausalLM(config)
    load_checkpoint(path, other, restore_rng=False)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_checkpoint_killed_mid_write_is_ignored_and_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler, _ = _setup(0)
    good = save_checkpoint(tmp_path, model, optimizer, scheduler, 4)
    # what a killed writer leaves: a temporary folder, and a step folder missing its state file
    shutil.copytree(good, tmp_path / ".tmp-step-0000006")
    (tmp_path / ".tmp-step-0000006" / "trainer_state.json").unlink()
    (tmp_path / "step-0000008").mkdir()
    assert latest_checkpoint(tmp_path) == good

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, optimizer, scheduler, 6)
    assert latest_checkpoint(tmp_path) == good and not (tmp_path / "step-0000006").exists()
    monkeypatch.undo()
    newer = save_checkpoint(tmp_path, model, optimizer, scheduler, 6)
    assert latest_checkpoint(tmp_path) == newer
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_resaving_a_step(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    for step in range(1, 6):
        save_checkpoint(tmp_path, model, step=step, extra={"n": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]
    save_checkpoint(tmp_path, model, step=5, extra={"n": 50}, keep_last=2)
    assert load_checkpoint(tmp_path / "step-0000005", model, restore_rng=False).extra == {"n": 50}
    assert latest_checkpoint(tmp_path / "missing") is None


def test_clear_errors(tmp_path: Path) -> None:
    model, optimizer, scheduler, gens = _setup(0)
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(tmp_path, model, step=1, extra={"bad": object()})
    save_checkpoint(tmp_path, model, optimizer, scheduler, 1, capture_rng_states(gens))
    with pytest.raises(FileNotFoundError, match="latest_checkpoint"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(ValueError, match="same names"):
        load_checkpoint(tmp_path / "step-0000001", model)
    with pytest.raises(TypeError, match="without pickling"):
        save_checkpoint(tmp_path, model, step=2, rng_states={"fn": lambda: 0})
