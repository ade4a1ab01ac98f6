"""Training checkpoints: safetensors and JSON only, written atomically, resumed exactly.

Layout of ``DIR/step-0000042/`` (42 optimizer steps done):

    model/                       ``model.save_pretrained`` (config.json, *.safetensors), or
    model.safetensors            the state dict of a plain ``nn.Module``
    optimizer.json + .safetensors   the optimizer's state dict: structure + tensors
    scheduler.json + .safetensors   the learning-rate scheduler's, likewise
    rng.json + rng.safetensors      python, numpy, torch (and CUDA) states, named generators
    trainer_state.json              {"format", "step", "extra"}: written last

Nothing is pickled and nothing is read with ``torch.load``. A checkpoint is written into a
hidden temporary folder and renamed into place when complete, so a run killed while saving
leaves no half checkpoint that `latest_checkpoint` would pick. One process writes to a
directory (rank 0): a save removes the temporary folders earlier saves left behind.

Resuming with no lost or repeated step and identical random draws::

    state = load_checkpoint(path, model, optimizer, scheduler, generators={"replay": rng})
    logger = MetricLogger(run_dir, resume_step=state.step)
    for step in range(state.step, total_steps):   # the step indices not yet done
        ...
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, step + 1,
                        capture_rng_states({"replay": rng}), {"config": asdict(config)})
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

FORMAT_VERSION = 1
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")

RandomSource = Union[random.Random, np.random.Generator, torch.Generator]
"""A generator a trainer owns besides the global ones, restored by name."""


@dataclass(frozen=True)
class CheckpointState:
    """What `load_checkpoint` returns: the steps done, the caller's `extra`, the folder read."""

    step: int
    extra: dict[str, Any]
    path: Path


# ---- nested state dicts <-> JSON + a flat dict of tensors --------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able copy of `obj`; tensors move into `tensors` under their path in the tree."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors would be stored under the name {path!r}")
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{path}/<key>"), _encode(v, tensors, f"{path}/{k}")]
                             for k, v in obj.items()]}
    raise TypeError(
        f"cannot store a {type(obj).__name__} (at {path or 'the top'}) without pickling; "
        "checkpoints hold tensors, arrays, numbers, strings, lists, tuples and dicts"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__ndarray__", "dtype"}:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__dict__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _save_tree(tree: Any, stem: Path) -> None:
    """Write `tree` as ``stem.json`` (structure) and ``stem.safetensors`` (its tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, "")
    stem.with_suffix(".json").write_text(json.dumps(encoded), encoding="utf-8")
    save_file(tensors, str(stem.with_suffix(".safetensors")))


def _load_tree(stem: Path) -> Any:
    for suffix in (".json", ".safetensors"):
        if not stem.with_suffix(suffix).is_file():
            raise FileNotFoundError(f"the checkpoint lacks {stem.with_suffix(suffix).name} ({stem.parent})")
    tensors = load_file(str(stem.with_suffix(".safetensors")), device="cpu")
    return _decode(json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")), tensors)


# ---- random number generators ------------------------------------------------------------


def _generator_kind(generator: Any, name: str) -> str:
    if isinstance(generator, torch.Generator):
        return "torch"
    if isinstance(generator, np.random.Generator):
        return "numpy"
    if isinstance(generator, random.Random):
        return "python"
    raise TypeError(
        f"generator {name!r} is a {type(generator).__name__}; use a torch.Generator, "
        "numpy.random.Generator or random.Random"
    )


def capture_rng_states(generators: Mapping[str, RandomSource] | None = None) -> dict[str, Any]:
    """The current states of the global generators (python, numpy, torch, every CUDA device)
    and of the named `generators`, to pass to `save_checkpoint`.

    Capture at the point the resumed run should continue from (before anything that draws
    random numbers and is not repeated after a resume).
    """
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {},
    }
    for name, generator in (generators or {}).items():
        kind = _generator_kind(generator, name)
        if kind == "torch":
            state: Any = generator.get_state()
        elif kind == "numpy":
            state = generator.bit_generator.state
        else:
            state = generator.getstate()
        states["generators"][name] = {"kind": kind, "state": state}
    return states


def restore_rng_states(states: Mapping[str, Any], generators: Mapping[str, RandomSource] | None = None) -> None:
    """Put back what `capture_rng_states` returned, into the globals and into `generators`.

    `generators` must name exactly the generators that were captured. CUDA states are
    restored when as many CUDA devices are present, else skipped with a warning.
    """
    generators = dict(generators or {})
    saved = states["generators"]
    if set(saved) != set(generators):
        raise ValueError(
            f"the checkpoint holds the states of generators {sorted(saved)} but {sorted(generators)} were "
            "given: pass the same names (or restore_rng=False to leave every generator as it is)"
        )
    for name, generator in generators.items():
        kind = _generator_kind(generator, name)
        if kind != saved[name]["kind"]:
            raise ValueError(f"generator {name!r} was saved from a {saved[name]['kind']} generator, not a {kind} one")
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            warnings.warn(
                f"the checkpoint holds the random states of {len(states['cuda'])} CUDA devices and this process "
                f"sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}: CUDA draws will differ",
                stacklevel=2,
            )
    for name, generator in generators.items():
        state = saved[name]["state"]
        if isinstance(generator, torch.Generator):
            generator.set_state(state)
        elif isinstance(generator, np.random.Generator):
            generator.bit_generator.state = state
        else:
            generator.setstate(state)


# ---- checkpoints -------------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints in `directory` (``step-N`` with a ``trainer_state.json``), by step."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the most steps in `directory`, or None if there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _save_model(model: nn.Module, target: Path, state: Mapping[str, torch.Tensor] | None) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(target / "model"), state_dict=state)
    elif state is None:
        save_model(model, str(target / "model.safetensors"))
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"))


def _saved_model_state(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the ``model/`` folder of checkpoint `path`, read with `model`'s class."""
    if not hasattr(type(model), "from_pretrained"):
        raise TypeError(
            f"{path / 'model'} was written by save_pretrained, and {type(model).__name__} has no from_pretrained"
        )
    from transformers import PreTrainedModel

    # from_pretrained undoes the key renaming save_pretrained may apply; hub kernels stay off
    # for transformers models, as in `agents.vlm.hf.load_model`
    options = {"use_kernels": False} if isinstance(model, PreTrainedModel) else {}
    return type(model).from_pretrained(str(path / "model"), **options).state_dict()


def _load_model(path: Path, model: nn.Module) -> None:
    """Load the weights into `model` in place (the optimizer holds its parameters)."""
    if (path / "model").is_dir():
        model.load_state_dict(_saved_model_state(path, model))
    elif (path / "model.safetensors").is_file():
        load_model(model, str(path / "model.safetensors"))
    else:
        raise FileNotFoundError(f"{path} holds no model (model/ or model.safetensors)")


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    rng_states: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    keep_last: int | None = 3,
    model_state: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/step-{step:07d}/`` atomically and return its path.

    Args:
        directory: the run's checkpoint folder (created if missing).
        model: saved with ``save_pretrained`` when it has one (a transformers model: the
            folder ``model/`` then loads with ``from_pretrained``), else its state dict.
        optimizer: its state dict, or None.
        scheduler: a learning-rate scheduler (anything with ``state_dict``), or None.
        step: optimizer steps done; a resumed run continues at this step index.
        rng_states: from `capture_rng_states`; None captures the global generators now.
        extra: JSON-serializable data to keep (the config, counters, the best score).
        keep_last: the number of checkpoints kept in `directory`, this one included, the
            older ones deleted; None keeps every one.
        model_state, optimizer_state: state dicts to write in place of `model`'s and
            `optimizer`'s own (the full ones of a sharded run, `agents.distributed.full_state`).

    A checkpoint of the same step is replaced.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step counts optimizer steps done and must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
    try:
        state_json = json.dumps({"format": FORMAT_VERSION, "step": int(step), "extra": dict(extra or {})}, indent=2)
    except TypeError as error:
        raise TypeError(f"extra must be JSON-serializable (dicts, lists, strings, numbers): {error}") from error
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(TMP_PREFIX + "*"), *root.glob(OLD_PREFIX + "*")]:
        shutil.rmtree(leftover)
    name = f"{CHECKPOINT_PREFIX}{int(step):07d}"
    final, tmp = root / name, root / (TMP_PREFIX + name)
    tmp.mkdir()
    try:
        _save_model(model, tmp, model_state)
        if optimizer is not None:
            _save_tree(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer")
        if scheduler is not None:
            _save_tree(scheduler.state_dict(), tmp / "scheduler")
        _save_tree(dict(rng_states) if rng_states is not None else capture_rng_states(), tmp / "rng")
        (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = root / (OLD_PREFIX + name)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last is not None:
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale)
    return final


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    generators: Mapping[str, RandomSource] | None = None,
    restore_rng: bool = True,
    load_state: Callable[[dict[str, torch.Tensor], Any], None] | None = None,
) -> CheckpointState:
    """Restore a checkpoint folder into existing objects, in place.

    `model` gets the weights, `optimizer` and `scheduler` (when given) their states; with
    `restore_rng` the global generators and the named `generators` (the same names that
    were captured) their states. Build the optimizer and scheduler exactly as in the saved
    run (same parameters, same schedule arguments) before loading. `load_state`, when given,
    gets the saved model and optimizer state dicts (None without `optimizer`) instead, and
    loads them (a sharded run: `agents.distributed.load_full_state`); it needs a ``model/``
    folder.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        hint = " (a run's checkpoint folder? use latest_checkpoint(path))" if list_checkpoints(path) else ""
        raise FileNotFoundError(f"{path} is not a complete checkpoint: no {STATE_FILE}{hint}")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    if load_state is not None:
        load_state(_saved_model_state(path, model), _load_tree(path / "optimizer") if optimizer is not None else None)
    else:
        _load_model(path, model)
        if optimizer is not None:
            optimizer.load_state_dict(_load_tree(path / "optimizer"))
    if scheduler is not None:
        scheduler.load_state_dict(_load_tree(path / "scheduler"))
    if restore_rng:
        restore_rng_states(_load_tree(path / "rng"), generators)
    return CheckpointState(step=int(state["step"]), extra=state["extra"], path=path)
