"""Two CPU processes (gloo) train like one: identical weights on both ranks after an update,
equal to a one-process update on the same global batch, with plain data parallelism and
with the model sharded (FSDP); a sharded run's checkpoint loads in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("_dist_update_worker.py")
ENV = {**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "PXR_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}


def _two_processes(checkpoint: Path, out: Path, *args: str) -> Path:
    # --standalone: the rendezvous picks a free local port itself (no race for a probed one)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(WORKER), str(checkpoint), str(out), *args], env=ENV, check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, str(WORKER), str(tiny_checkpoint), str(out)], env=ENV, check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory) -> Path:
    """Two processes with ``fsdp``; the worker also checks that a resumed trainer gets the same state back."""
    return _two_processes(tiny_checkpoint, tmp_path_factory.mktemp("fsdp"), "fsdp")


def _assert_ranks_match_one_process(two: Path, one: Path, initial: Path) -> None:
    single = load_file(str(one / "rank0.safetensors"))
    rank0 = load_file(str(two / "rank0.safetensors"))
    rank1 = load_file(str(two / "rank1.safetensors"))
    start = load_file(str(next(initial.glob("*.safetensors"))))
    assert rank0.keys() == single.keys()
    moved = 0
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks disagree on {name}"
        # Adam's first step is about lr * sign(gradient): float summation order changes
        # near-zero gradients slightly, so the tolerance is 1% of the lr (1e-2).
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-4)
        moved += name in start and not torch.equal(value, start[name])
    assert moved > 0


def test_two_processes_match_one(tiny_checkpoint, one_process, tmp_path):
    _assert_ranks_match_one_process(_two_processes(tiny_checkpoint, tmp_path), one_process, tiny_checkpoint)


def test_sharded_processes_match_one(tiny_checkpoint, one_process, sharded):
    _assert_ranks_match_one_process(sharded, one_process, tiny_checkpoint)


def _load(run: Path, checkpoint: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A plain model and optimizer loaded from `run`'s checkpoint of step 1."""
    from transformers import AutoModelForImageTextToText

    import agents.vlm.tiny  # noqa: F401  (registers the tiny model)

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_checkpoint(run / "run" / "checkpoints" / "step-0000001", model, optimizer, restore_rng=False)
    assert state.step == 1
    return model, optimizer


def test_a_sharded_checkpoint_loads_in_one_process(tiny_checkpoint, one_process, sharded):
    model, optimizer = _load(sharded, tiny_checkpoint)
    weights = load_file(str(sharded / "rank0.safetensors"))
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name]), name
    # the optimizer state is the one-process run's, in the same layout
    _, single = _load(one_process, tiny_checkpoint)
    ours, theirs = optimizer.state_dict(), single.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-3, atol=1e-7)
