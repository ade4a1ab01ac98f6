"""How fast a conv stem alone learns which cells of a count crop hold what the question asks.

The count head (docs/tiny-model.md) sums over the cells of the crop the probability that each
holds a thing of the colour and shape the question names (or of its shape inside the frame).
This probe takes the VLM away: a conv stem, the question and the head's cell targets
(`agents.sft.counted_cells` over 2 x 2 parts of 16-px tokens), trained from scratch on the
oracle's crops of count items (resized to a square) and measured on held-out crops. Two forms:

- ``keys``: the warm start's stem layout (`conv_stem`) and a bilinear score of a question query
  (embeddings of its colour, shape and kind) against four keys per token: the count head's
  first form, the question met only at the end;
- ``film``: the VLM's `TinyVLMQuestionStem` (``count_stem``), the same stride-2 layout with the
  question's scale and shift (FiLM) after its 2nd, 3rd and 4th conv, the question read from its
  tokens as the VLM reads them: the question read while the features are made.

With ``--glances N`` each step also counts first views of N shortcut items (the 224-px square the
processor shows; `count_crops` with ``glances``): the count head reads the first view when the
policy answers without a crop, and a stem trained on crops alone over-counts there (the large
objects of other kinds).

``python -m agents.count_stem_probe --form film --minutes 40 --out DIR`` writes ``metrics.jsonl``
(the cells' sum rounded against the count, per tier; its correlation and mean error; the cells at
p > 0.5 against the targets), ``model.safetensors`` and ``curve.png``; ``--compare DIR ...`` draws
other runs beside it. ``--attach MODEL DEST`` puts a trained ``film`` stem into a checkpoint's
count head instead (`attach_stem`), so the VLM counts with it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from agents.logger import read_metrics
from agents.stem_training import NpzArrays, timed_training

TOKEN_PX = 16
"""Pixels of a token side in the warm start (`TinyVLMConfig.patch_size`)."""
PARTS = 2
"""Parts per token side, as the count head's ``count_subcells`` 2."""
DEFAULT_MODEL = "checkpoints/tiny-warmstart"
"""The checkpoint whose chat format, env settings and tokenizer the crops and questions follow."""


@dataclass(frozen=True)
class CountCrops(NpzArrays):
    """Oracle crops of count items with what their questions ask and the counted cells."""

    images: np.ndarray
    """``(n, side, side, 3)`` uint8: the crop each item's oracle trace read, resized."""
    questions: np.ndarray
    """``(n, 3)``: colour (its index in ``COLOUR_NAMES``; one more for a frame question), shape, kind."""
    question_ids: np.ndarray
    """``(n, length)``: the question's tokens as the VLM reads them (`question_mask`), -1 after the end."""
    cells: np.ndarray
    """``(n, g, g)`` uint8: 1 where a counted centre falls (``g = side / 8``)."""
    counts: np.ndarray
    """``(n,)`` the answers."""
    hard: np.ndarray
    """``(n,)`` whether the item is of the hard tier (the rest are easy, or shortcut in glances)."""



class _KeptMeta:
    """A task source that keeps the meta of each sample it serves, so that a played item's
    question and tier are read without generating the sample again."""

    def __init__(self, source: Any) -> None:
        self.source, self.name, self.meta = source, source.name, {}

    def sample(self, rng: np.random.Generator) -> Any:
        return self.source.sample(rng)

    def get(self, sample_id: str) -> Any:
        sample = self.source.get(sample_id)
        self.meta[sample_id] = sample.meta
        return sample


def count_crops(seeds: Sequence[int], model: str | Path = DEFAULT_MODEL, side: int = 112,
                glances: bool = False, progress: bool = False) -> CountCrops:
    """The oracle's single-crop traces of the default count items (no shortcut items) of `seeds`,
    played as `model` plays them (its chat format, env settings and box tokens); each question's
    tokens are those its count head reads in the trace's reading item.

    With `glances`, the items are shortcut items instead, each its first view (a textual trace:
    the answer at once), which the tiny processor shows as a 224-px square (`side` 224): what the
    count head reads when the policy answers without a crop."""
    from PIL import Image

    from agents.sft import box_vocab, counted_cells, trace_options
    from agents.traces import TEXT_KIND, play_traces
    from agents.vlm.encoding import encode_segments
    from agents.vlm.tiny.modeling_tiny_vlm import question_mask
    from pxr_env.tasks.synthetic.common import COLOUR_NAMES, SHAPES
    from pxr_env.tasks.synthetic.count import QUESTION_KINDS, Count

    if side % TOKEN_PX:
        raise ValueError(f"side must be a multiple of {TOKEN_PX} (whole tokens), got {side}")
    config, processor, chat_format, env_kwargs = checkpoint_parts(model)
    options = trace_options(box_vocab(config), chat_format, env_kwargs)
    source, grid = _KeptMeta(Count(shortcut_share=1.0 if glances else 0.0)), side // TOKEN_PX * PARTS
    kind = TEXT_KIND if glances else "image/single"
    rows: dict[str, list[Any]] = {k: [] for k in CountCrops.__dataclass_fields__}
    for start in tqdm(range(0, len(seeds), 500), desc="count glances" if glances else "count crops",
                      unit="500 items", disable=not progress):
        source.meta.clear()
        ids = [source.source.sample_id(s) for s in seeds[start:start + 500]]
        for trace in play_traces(source, ids, image_kind=kind, options=options):
            meta = source.meta[trace.sample_id]
            rows["images"].append(np.asarray(Image.fromarray(trace.images[-1]).resize((side, side), Image.BICUBIC)))
            colour = COLOUR_NAMES.index(meta["colour"]) if meta["colour"] else len(COLOUR_NAMES)
            rows["questions"].append((colour, SHAPES.index(meta["shape"]), QUESTION_KINDS.index(meta["kind"])))
            input_ids = encode_segments(processor, *trace.reading())["input_ids"][None]
            mask = question_mask(input_ids, config.image_token_id, config.eos_token_id, config.pad_token_id)
            rows["question_ids"].append(input_ids[mask].numpy())
            rows["cells"].append(counted_cells(trace.info, grid, grid).numpy().astype(np.uint8))
            rows["counts"].append(len(trace.info["counted_centres"]))
            rows["hard"].append(meta["tier"] == "hard")
    if not rows["counts"]:
        raise ValueError("no count item of these seeds could be played")
    longest = max(len(q) for q in rows["question_ids"])
    rows["question_ids"] = [np.pad(q, (0, longest - len(q)), constant_values=-1) for q in rows["question_ids"]]
    stacked = ("images", "cells", "question_ids")
    return CountCrops(**{k: np.stack(v) if k in stacked else np.asarray(v) for k, v in rows.items()})


def checkpoint_parts(model: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """A saved tiny model's config, processor, chat format and env settings (its weights left unread)."""
    from transformers import AutoProcessor

    from agents.vlm.chat import load_chat_format
    from agents.vlm.env_settings import load_env_settings
    from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig

    return (TinyVLMConfig.from_pretrained(str(model)), AutoProcessor.from_pretrained(str(model)),
            load_chat_format(model), load_env_settings(model))


def stem_config(model: str | Path = DEFAULT_MODEL) -> Any:
    """`model`'s config with a count head of ``PARTS`` x ``PARTS`` parts that has its own stem
    (``count_stem``): the sizes a ``film`` probe takes, to be attached to that model."""
    from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig

    config = TinyVLMConfig.from_pretrained(str(model))
    if config.patch_size != TOKEN_PX:
        raise ValueError(f"the probe's crops have {TOKEN_PX}-px tokens; {model} has {config.patch_size}")
    config.count_head, config.count_subcells, config.count_stem = True, PARTS, True
    return config


class Question(nn.Module):
    """A count question as one vector: the sum of its colour, shape and kind embeddings."""

    def __init__(self, dim: int) -> None:
        from pxr_env.tasks.synthetic.common import COLOUR_NAMES, SHAPES
        from pxr_env.tasks.synthetic.count import QUESTION_KINDS

        super().__init__()
        sizes = (len(COLOUR_NAMES) + 1, len(SHAPES), len(QUESTION_KINDS))
        self.parts = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        for embedding in self.parts:
            nn.init.normal_(embedding.weight)

    def forward(self, questions: torch.Tensor) -> torch.Tensor:
        return sum(embedding(questions[:, i]) for i, embedding in enumerate(self.parts))


def _token_parts(logits: torch.Tensor) -> torch.Tensor:
    """``(n, parts * parts, h, w)`` part logits (row-major) -> the ``(n, h * parts, w * parts)`` cell grid."""
    n, _, h, w = logits.shape
    return logits.view(n, PARTS, PARTS, h, w).permute(0, 3, 1, 4, 2).reshape(n, h * PARTS, w * PARTS)


class KeysProbe(nn.Module):
    """The warm start's stem and the count head's bilinear score: question query . cell key."""

    reads = "questions"

    def __init__(self, channels: int = 32, hidden: int = 128, dim: int = 64) -> None:
        from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig
        from agents.vlm.tiny.modeling_tiny_vlm import conv_stem

        super().__init__()
        config = TinyVLMConfig(hidden_size=hidden, stem_channels=channels, stem_norm=True, token_conv=True,
                               patch_size=TOKEN_PX)
        self.stem, self.query = conv_stem(config), Question(dim)
        self.key = nn.Conv2d(hidden, dim * PARTS * PARTS, 1)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        keys = self.key(self.stem(images))
        n, _, h, w = keys.shape
        keys = keys.view(n, PARTS * PARTS, -1, h, w)
        query = self.query(questions)
        logits = torch.einsum("bpdhw,bd->bphw", keys, query) / query.shape[-1] ** 0.5 + self.bias
        return _token_parts(logits)


class FiLMProbe(nn.Module):
    """The VLM's count stem (`TinyVLMQuestionStem`) of `config`'s sizes, and the head's bias."""

    reads = "question_ids"

    def __init__(self, config: Any) -> None:
        from agents.vlm.tiny.modeling_tiny_vlm import TinyVLMQuestionStem

        super().__init__()
        self.stem = TinyVLMQuestionStem(config, config.count_subcells ** 2)
        nn.init.normal_(self.stem.words.weight, std=0.3)  # as the VLM initialises them: FiLM starts off
        for film in self.stem.film:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        question = self.stem.question(question_ids.clamp(min=0), question_ids >= 0)
        return _token_parts(self.stem(images, question) + self.bias)


FORMS = ("film", "keys")


def build_probe(form: str, model: str | Path = DEFAULT_MODEL) -> nn.Module:
    """A fresh probe of `form`; a ``film`` one has the sizes of `model`'s count stem (`stem_config`)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    return FiLMProbe(stem_config(model)) if form == "film" else KeysProbe()


def attach_stem(run: str | Path, model: str | Path, out: str | Path, gate: float = 2.0) -> Path:
    """`model` with a count head whose stem and bias are a ``film`` probe's (``run/model.safetensors``),
    its gate's bias set to `gate` (its weights zero: a fixed width around the stem's count),
    saved to `out` with the processor, chat format and env settings."""
    from safetensors.torch import load_file

    from agents.sft import save_model
    from agents.vlm.hf import load_model
    from agents.vlm.tiny import digit_token_ids

    weights = load_file(Path(run) / "model.safetensors")
    if "stem.words.weight" not in weights:
        raise ValueError(f"{run} holds no film probe (its weights have no stem.words): train one with --form film")
    config = stem_config(model)
    _, processor, chat_format, env_kwargs = checkpoint_parts(model)
    scale = processor.image_processor
    if list(scale.image_mean) != [0.5] * 3 or list(scale.image_std) != [0.5] * 3:
        raise ValueError("the probe's crops are scaled to [-1, 1]; this model's processor scales them otherwise")
    overrides = {k: getattr(config, k) for k in ("count_head", "count_subcells", "count_stem")}
    overrides["digit_token_ids"] = digit_token_ids(processor.tokenizer)
    vlm = load_model(str(model), config_overrides=overrides)
    vlm.count.stem.load_state_dict({k[len("stem."):]: v for k, v in weights.items() if k.startswith("stem.")})
    with torch.no_grad():
        vlm.count.bias.copy_(weights["bias"])
        vlm.count.gate.bias.fill_(gate)
    return save_model(vlm, processor, chat_format, env_kwargs, out)


def batch_tensors(crops: CountCrops, index: np.ndarray, rng: np.random.Generator | None = None,
                  reads: str = "questions") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (the tiny processor's scale), the questions (the field `reads`), cell
    targets and counts of `index`; with `rng`, each crop flipped left-right and up-down at random,
    its cells with it."""
    images = torch.from_numpy(crops.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    cells = torch.from_numpy(crops.cells[index]).float()
    if rng is not None:
        for dim_image, dim_cells in ((-1, -1), (-2, -2)):
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            images[flip] = images[flip].flip(dim_image)
            cells[flip] = cells[flip].flip(dim_cells)
    return (images, torch.from_numpy(getattr(crops, reads)[index]).long(), cells,
            torch.from_numpy(crops.counts[index]).float())


def probe_loss(logits: torch.Tensor, cells: torch.Tensor, counts: torch.Tensor, count_weight: float) -> torch.Tensor:
    """Binary cross-entropy per cell, plus `count_weight` times the squared error of the cells' sum."""
    loss = F.binary_cross_entropy_with_logits(logits, cells)
    if count_weight:
        loss = loss + count_weight * ((torch.sigmoid(logits).sum((1, 2)) - counts) ** 2).mean()
    return loss


@torch.no_grad()
def measure(model: nn.Module, crops: CountCrops, batch_size: int = 200) -> dict[str, float]:
    """The cells' sum rounded against the count (all, easy, hard), its correlation and mean absolute
    error, and the cells at p > 0.5 against the targets (precision, recall)."""
    was_training = model.training
    model.eval()
    probabilities = []
    for start in range(0, len(crops.counts), batch_size):
        index = np.arange(start, min(start + batch_size, len(crops.counts)))
        images, questions, _, _ = batch_tensors(crops, index, reads=model.reads)
        probabilities.append(torch.sigmoid(model(images, questions)))
    model.train(was_training)
    p = torch.cat(probabilities).numpy()
    total, counts, hard = p.sum((1, 2)), crops.counts, crops.hard.astype(bool)
    exact = np.round(total) == counts
    marked, held = p > 0.5, crops.cells > 0
    varies = counts.std() > 0 and total.std() > 0
    return {"exact": float(exact.mean()), "easy": float(exact[~hard].mean()) if (~hard).any() else float("nan"),
            "hard": float(exact[hard].mean()) if hard.any() else float("nan"),
            "corr": float(np.corrcoef(total, counts)[0, 1]) if varies else float("nan"),
            "mae": float(np.abs(total - counts).mean()),
            "precision": float((marked & held).sum() / max(marked.sum(), 1)),
            "recall": float((marked & held).sum() / max(held.sum(), 1))}


def train_probe(form: str, train: CountCrops, test: CountCrops, out: str | Path, minutes: float = 40.0,
                steps: int = 1_000_000, batch_size: int = 64, lr: float = 1e-3, count_weight: float = 0.0,
                eval_minutes: float = 5.0, seed: int = 0, model: str | Path = DEFAULT_MODEL,
                glances: tuple[CountCrops, CountCrops] | None = None, glance_batch: int = 16,
                init: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train one probe (`build_probe`, from run `init`'s weights if given) until `minutes` or
    `steps`; measure on `test` every `eval_minutes` and at the end, each record appended to
    ``out/metrics.jsonl``; the weights end in ``out/model.safetensors``. Returns the records.

    With `glances` (training and held-out first views of shortcut items, `count_crops`), each step
    adds the loss of `glance_batch` of them, and each record their measures as ``glance/<name>``:
    one stem then counts both the crops and what can be counted at a glance."""
    from safetensors.torch import load_file

    out = Path(out)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = build_probe(form, model)
    if init is not None:
        probe.load_state_dict(load_file(Path(init) / "model.safetensors"))
    batches = [(train, batch_size)] + ([(glances[0], glance_batch)] if glances else [])

    def loss() -> torch.Tensor:
        total = torch.zeros(())
        for arrays, size in batches:
            index = rng.integers(0, len(arrays.counts), size)
            images, questions, cells, counts = batch_tensors(arrays, index, rng, probe.reads)
            total = total + probe_loss(probe(images, questions), cells, counts, count_weight)
        return total

    def measures() -> dict[str, float]:
        held_out = measure(probe, test)
        if glances:
            held_out.update({f"glance/{k}": v for k, v in measure(probe, glances[1]).items()
                             if k in ("exact", "mae", "precision", "recall")})
        return held_out

    records = timed_training(probe, loss, measures, out, lr, minutes, steps, eval_minutes,
                             f"count stem probe ({form})", "exact", progress)
    save_file(probe.state_dict(), out / "model.safetensors")
    return records


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> None:
    """Held-out exact count, and the cells' recall (solid) and precision (dashed), against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, rows in runs.items():
        steps = [r["step"] for r in rows]
        line, = axes[0].plot(steps, [r["exact"] for r in rows], marker="o", ms=3, label=label)
        axes[1].plot(steps, [r["recall"] for r in rows], marker="o", ms=3, color=line.get_color())
        axes[1].plot(steps, [r["precision"] for r in rows], ls="--", color=line.get_color())
    for ax, title in zip(axes, ("sum of cells rounded = count", "cells at p > 0.5: recall, precision (dashed)")):
        ax.set_xlabel("step (batch 64)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", choices=sorted(FORMS), default="film")
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl and curve.png (with --attach: "
                                                     "the film run whose stem is attached)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint whose chat format, settings and tokenizer the crops follow "
                             "(default: %(default)s)")
    parser.add_argument("--attach", nargs=2, metavar=("MODEL", "DEST"),
                        help="instead of training: save MODEL with a count head holding --out's film stem to DEST")
    parser.add_argument("--gate", type=float, default=2.0, help="the attached head's gate (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=40.0, help="training minutes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="most steps (default: %(default)s)")
    parser.add_argument("--train-items", type=int, default=24_000, help="training crops (default: %(default)s)")
    parser.add_argument("--test-items", type=int, default=1_000, help="held-out crops (default: %(default)s)")
    parser.add_argument("--train-crops", help="npz of training crops: read if it exists, else written")
    parser.add_argument("--test-crops", help="npz of held-out crops: read if it exists, else written")
    parser.add_argument("--glances", type=int, default=0,
                        help="training shortcut items whose first views are counted beside the crops "
                             "(default 0: crops alone)")
    parser.add_argument("--test-glances", type=int, default=300, help="held-out shortcut items (default: %(default)s)")
    parser.add_argument("--train-glance-views", help="npz of training first views: read if it exists, else written")
    parser.add_argument("--test-glance-views", help="npz of held-out first views: read if it exists, else written")
    parser.add_argument("--glance-batch", type=int, default=16, help="first views per step (default: %(default)s)")
    parser.add_argument("--init", help="a probe run whose weights the training starts from")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--count-weight", type=float, default=0.0,
                        help="weight of the sum's squared error (default 0: from random cells the first sums, "
                             "about 100, drive every cell to the base rate and the cells are not learnt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compare", nargs="*", default=[], help="other runs' folders to draw in curve.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.attach:
        print(attach_stem(args.out, args.attach[0], args.attach[1], args.gate))
        return 0
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    # Seeds apart from the SFT's items (from 0) and its held-out ones (agents.sft's eval_seed).
    train = CountCrops.cached(args.train_crops, lambda: count_crops(
        list(range(6_000_000, 6_000_000 + args.train_items)), args.model, progress=progress))
    test = CountCrops.cached(args.test_crops, lambda: count_crops(
        list(range(9_000_000, 9_000_000 + args.test_items)), args.model, progress=progress))
    glances = None
    if args.glances:
        glances = (CountCrops.cached(args.train_glance_views, lambda: count_crops(
            list(range(6_500_000, 6_500_000 + args.glances)), args.model, 224, True, progress)),
                   CountCrops.cached(args.test_glance_views, lambda: count_crops(
            list(range(9_500_000, 9_500_000 + args.test_glances)), args.model, 224, True, progress)))
    records = train_probe(args.form, train, test, args.out, minutes=args.minutes, steps=args.steps, lr=args.lr,
                          count_weight=args.count_weight, seed=args.seed, model=args.model, glances=glances,
                          glance_batch=args.glance_batch, init=args.init, progress=progress)
    runs = {f"{args.form} ({args.out})": records, **{str(run): read_metrics(run) for run in args.compare}}
    plot_runs(runs, Path(args.out) / "curve.png")
    print(json.dumps(records[-1], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
