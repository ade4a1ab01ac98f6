"""How fast a conv stem alone learns which cells of a count crop hold what the question asks.

The count head (docs/tiny-model.md) sums over the cells of the crop the probability that each
holds a thing of the colour and shape the question names (or of its shape inside the frame).
This probe takes the VLM away: a conv stem, a question embedding (colour, shape, question kind)
and the head's cell targets (`agents.sft.counted_cells` over 2 x 2 parts of 16-px tokens),
trained from scratch on the oracle's crops of count items (resized to a square) and measured on
held-out crops. Two forms:

- ``keys``: the warm start's stem layout (`conv_stem`) and a bilinear score of a question query
  against four keys per token: the count head's form, the question met only at the end;
- ``film``: the same stride-2 layout with the question's scale and shift (FiLM) after its
  2nd, 3rd and 4th conv: the question read while the features are made.

``python -m agents.count_stem_probe --form film --minutes 40 --out DIR`` writes ``metrics.jsonl``
(the cells' sum rounded against the count, per tier; its correlation and mean error; the cells at
p > 0.5 against the targets), ``model.safetensors`` and ``curve.png``; ``--compare DIR ...`` draws
other runs beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

TOKEN_PX = 16
"""Pixels of a token side in the warm start (`TinyVLMConfig.patch_size`)."""
PARTS = 2
"""Parts per token side, as the count head's ``count_subcells`` 2."""


@dataclass(frozen=True)
class CountCrops:
    """Oracle crops of count items with what their questions ask and the counted cells."""

    images: np.ndarray
    """``(n, side, side, 3)`` uint8: the crop each item's oracle trace read, resized."""
    questions: np.ndarray
    """``(n, 3)``: colour (its index in ``COLOUR_NAMES``; one more for a frame question), shape, kind."""
    cells: np.ndarray
    """``(n, g, g)`` uint8: 1 where a counted centre falls (``g = side / 8``)."""
    counts: np.ndarray
    """``(n,)`` the answers."""
    hard: np.ndarray
    """``(n,)`` whether the item is of the hard tier (the rest are easy: no shortcut items)."""

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> "CountCrops":
        with np.load(path) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})


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


def count_crops(seeds: Sequence[int], side: int = 112, progress: bool = False) -> CountCrops:
    """The oracle's single-crop traces of the default count items (no shortcut items) of `seeds`."""
    from PIL import Image

    from agents.sft import counted_cells
    from agents.traces import play_traces
    from pxr_env.tasks.synthetic.common import COLOUR_NAMES, SHAPES
    from pxr_env.tasks.synthetic.count import QUESTION_KINDS, Count

    if side % TOKEN_PX:
        raise ValueError(f"side must be a multiple of {TOKEN_PX} (whole tokens), got {side}")
    source, grid = _KeptMeta(Count(shortcut_share=0.0)), side // TOKEN_PX * PARTS
    rows: dict[str, list[Any]] = {k: [] for k in CountCrops.__dataclass_fields__}
    for start in tqdm(range(0, len(seeds), 500), desc="count crops", unit="500 items", disable=not progress):
        source.meta.clear()
        for trace in play_traces(source, [source.source.sample_id(s) for s in seeds[start:start + 500]]):
            meta = source.meta[trace.sample_id]
            rows["images"].append(np.asarray(Image.fromarray(trace.images[-1]).resize((side, side), Image.BICUBIC)))
            colour = COLOUR_NAMES.index(meta["colour"]) if meta["colour"] else len(COLOUR_NAMES)
            rows["questions"].append((colour, SHAPES.index(meta["shape"]), QUESTION_KINDS.index(meta["kind"])))
            rows["cells"].append(counted_cells(trace.info, grid, grid).numpy().astype(np.uint8))
            rows["counts"].append(len(trace.info["counted_centres"]))
            rows["hard"].append(meta["tier"] == "hard")
    if not rows["counts"]:
        raise ValueError("no count item of these seeds could be played")
    return CountCrops(**{k: np.stack(v) if k in ("images", "cells") else np.asarray(v) for k, v in rows.items()})


class Question(nn.Module):
    """A count question as one vector: the sum of its colour, shape and kind embeddings."""

    def __init__(self, dim: int, std: float = 1.0) -> None:
        from pxr_env.tasks.synthetic.common import COLOUR_NAMES, SHAPES
        from pxr_env.tasks.synthetic.count import QUESTION_KINDS

        super().__init__()
        sizes = (len(COLOUR_NAMES) + 1, len(SHAPES), len(QUESTION_KINDS))
        self.parts = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        for embedding in self.parts:
            nn.init.normal_(embedding.weight, std=std)

    def forward(self, questions: torch.Tensor) -> torch.Tensor:
        return sum(embedding(questions[:, i]) for i, embedding in enumerate(self.parts))


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2 if kernel == 3 else 0),
                         nn.GroupNorm(8, cout), nn.GELU())


def _token_parts(logits: torch.Tensor) -> torch.Tensor:
    """``(n, parts * parts, h, w)`` part logits (row-major) -> the ``(n, h * parts, w * parts)`` cell grid."""
    n, _, h, w = logits.shape
    return logits.view(n, PARTS, PARTS, h, w).permute(0, 3, 1, 4, 2).reshape(n, h * PARTS, w * PARTS)


class KeysProbe(nn.Module):
    """The warm start's stem and the count head's bilinear score: question query . cell key."""

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
    """The same stride-2 layout with the question's scale and shift after the 2nd, 3rd and 4th conv."""

    FILMED = (1, 2, 3)

    def __init__(self, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        c = channels
        self.convs = nn.ModuleList([_conv(3, c), _conv(c, 2 * c), _conv(2 * c, 4 * c),
                                    _conv(4 * c, hidden, TOKEN_PX // 8, TOKEN_PX // 8),
                                    _conv(hidden, hidden, stride=1)])
        self.film = nn.ModuleList(Question(2 * self.convs[i][0].out_channels, std=0.1) for i in self.FILMED)
        self.out = nn.Conv2d(hidden, PARTS * PARTS, 1)

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        x = images
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i in self.FILMED:
                scale, shift = self.film[self.FILMED.index(i)](questions).chunk(2, dim=-1)
                x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        return _token_parts(self.out(x))


FORMS = {"keys": KeysProbe, "film": FiLMProbe}


def batch_tensors(crops: CountCrops, index: np.ndarray, rng: np.random.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [-1, 1], questions, cell targets and counts of `index`; with `rng`, each crop
    flipped left-right and up-down at random, its cells with it."""
    images = torch.from_numpy(crops.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    cells = torch.from_numpy(crops.cells[index]).float()
    if rng is not None:
        for dim_image, dim_cells in ((-1, -1), (-2, -2)):
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            images[flip] = images[flip].flip(dim_image)
            cells[flip] = cells[flip].flip(dim_cells)
    return (images, torch.from_numpy(crops.questions[index]).long(), cells,
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
        images, questions, _, _ = batch_tensors(crops, np.arange(start, min(start + batch_size, len(crops.counts))))
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
                eval_minutes: float = 5.0, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Train one probe until `minutes` or `steps`; measure on `test` every `eval_minutes` and at
    the end, each record appended to ``out/metrics.jsonl``; the weights end in
    ``out/model.safetensors``. Returns the records."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FORMS[form]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    records: list[dict[str, Any]] = []
    start, next_eval, step = time.monotonic(), 0.0, 0
    bar = tqdm(total=steps, desc=f"count stem probe ({form})", unit="step", disable=not progress)
    with open(out / "metrics.jsonl", "w") as log:
        def record(loss: float | None) -> None:
            row = {"step": step, "minutes": (time.monotonic() - start) / 60, "loss": loss, **measure(model, test)}
            records.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(exact=f"{row['exact']:.3f}")

        loss: float | None = None  # none before the first step
        while step < steps and time.monotonic() - start < minutes * 60:
            if time.monotonic() - start >= next_eval * 60:
                record(loss)
                next_eval += eval_minutes
            images, questions, cells, counts = batch_tensors(train, rng.integers(0, len(train.counts), batch_size), rng)
            value = probe_loss(model(images, questions), cells, counts, count_weight)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            loss, step = value.item(), step + 1
            bar.update()
        record(loss)
    bar.close()
    save_file(model.state_dict(), out / "model.safetensors")
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


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    with open(Path(run) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _crops(path: str | None, seeds: range, progress: bool) -> CountCrops:
    """Crops of `seeds`, read from `path` when it exists, else made (and saved there if given)."""
    if path and Path(path).exists():
        return CountCrops.load(path)
    crops = count_crops(list(seeds), progress=progress)
    if path:
        crops.save(path)
    return crops


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", choices=sorted(FORMS), default="film")
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl and curve.png")
    parser.add_argument("--minutes", type=float, default=40.0, help="training minutes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="most steps (default: %(default)s)")
    parser.add_argument("--train-items", type=int, default=24_000, help="training crops (default: %(default)s)")
    parser.add_argument("--test-items", type=int, default=1_000, help="held-out crops (default: %(default)s)")
    parser.add_argument("--train-crops", help="npz of training crops: read if it exists, else written")
    parser.add_argument("--test-crops", help="npz of held-out crops: read if it exists, else written")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--count-weight", type=float, default=0.0,
                        help="weight of the sum's squared error (default 0: from random cells the first sums, "
                             "about 100, drive every cell to the base rate and the cells are not learnt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compare", nargs="*", default=[], help="other runs' folders to draw in curve.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    # Seeds apart from the SFT's items (from 0) and its held-out ones (agents.sft's eval_seed).
    train = _crops(args.train_crops, range(6_000_000, 6_000_000 + args.train_items), progress)
    test = _crops(args.test_crops, range(9_000_000, 9_000_000 + args.test_items), progress)
    records = train_probe(args.form, train, test, args.out, minutes=args.minutes, steps=args.steps, lr=args.lr,
                          count_weight=args.count_weight, seed=args.seed, progress=progress)
    runs = {f"{args.form} ({args.out})": records, **{str(run): read_metrics(run) for run in args.compare}}
    plot_runs(runs, Path(args.out) / "curve.png")
    print(json.dumps(records[-1], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
