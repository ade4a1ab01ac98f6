"""Pretrain the box pointer's own stem (``pointer_box_stem``) on initial views, apart from the decoder.

The tiny VLM's first crop is one box token: a cell of the ``pointer_grid`` x ``pointer_grid``
partition and a size. With ``pointer_box_stem`` each box gets a logit from a conv stem over
image 1's pixels that reads the question's tokens while its features are made
(`TinyVLMQuestionStem`), as the count head's stem does (docs/results.md). This module trains
that stem alone: on the initial views of held-apart items, the loss is the negative log of the
probability mass on the boxes whose crop (the env's padded crop) holds the whole evidence box,
the boxes of the smallest such size and of `size_steps` sizes more (a larger box holds more
often but magnifies less). It is measured on held-out views by the greedy box: how often its
crop holds the evidence (the env's ``crop_hit``), per tier.

``python -m agents.box_stem --out DIR --minutes 30`` writes ``metrics.jsonl``,
``model.safetensors`` and ``curve.png``; ``--attach MODEL DEST`` puts the trained stem into a
checkpoint's pointer head (`attach_box_stem`), so the VLM points with it (``--alone``: with it alone).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from agents.logger import read_metrics
from agents.stem_training import NpzArrays, timed_training

DEFAULT_MODEL = "checkpoints/tiny-warmstart"
"""The checkpoint whose chat format, env settings, tokenizer and box vocabulary the views follow."""
DEFAULT_TASKS: dict[str, dict[str, Any]] = {"count": {}}


@dataclass(frozen=True)
class BoxViews(NpzArrays):
    """Initial views of image items, their questions and which box tokens' crops hold the evidence."""

    images: np.ndarray
    """``(n, side, side, 3)`` uint8: the view as the processor gives it to the model, on the pointer's cells."""
    question_ids: np.ndarray
    """``(n, length)``: the question's tokens as the VLM reads them (`question_mask`), -1 after the end."""
    hits: np.ndarray
    """``(n, boxes)`` bool: whether the env's padded crop of each box token holds the evidence box."""
    tiers: np.ndarray
    """``(n,)`` each item's family and tier (``"count/hard"``; the family alone when it has none)."""



def box_views(tasks: dict[str, dict[str, Any]], seeds: Sequence[int], model: str | Path = DEFAULT_MODEL,
              progress: bool = False) -> BoxViews:
    """The initial views of the image items of `seeds` drawn from `tasks` (`agents.sft.task_source`),
    shown as `model` is shown them (its chat format, env settings and processor) and resized to the
    square whose 8-px parts are the pointer's cells (224 px for a 28-cell grid of 16-px tokens with
    2 x 2 parts; most views already are); items whose evidence no box token's crop holds are left out."""
    from agents.box_mass import hitting_boxes
    from agents.count_stem_probe import checkpoint_parts
    from agents.sft import box_vocab, task_source
    from agents.vlm.encoding import encode_segments
    from agents.vlm.tiny.modeling_tiny_vlm import images_by_grid, question_mask
    from pxr_env.env import PixelQAEnv

    config, processor, chat_format, env_kwargs = checkpoint_parts(model)
    vocab = box_vocab(config)
    if vocab is None:
        raise ValueError(f"{model} writes its boxes as numbers: the box stem needs a model with box tokens")
    if config.pointer_grid % config.pointer_subcells:
        raise ValueError(f"pointer_grid {config.pointer_grid} is not a whole number of tokens of "
                         f"{config.pointer_subcells} x {config.pointer_subcells} parts")
    side = config.pointer_grid // config.pointer_subcells * config.patch_size
    scale = processor.image_processor
    if list(scale.image_mean) != [0.5] * 3 or list(scale.image_std) != [0.5] * 3:
        raise ValueError("the views are stored from [-1, 1]; this model's processor scales them otherwise")
    source = task_source(tasks)
    env = PixelQAEnv(tasks=source, action_mode="text", **env_kwargs)
    rows: dict[str, list[Any]] = {k: [] for k in BoxViews.__dataclass_fields__}
    try:
        for seed in tqdm(seeds, desc="box views", unit="item", disable=not progress):
            rng = np.random.default_rng(seed)
            sample = source.sample(rng)
            if sample.is_video or sample.evidence_box is None:
                continue
            height, width = sample.load_image().shape[:2]
            hits = hitting_boxes(vocab, (width, height), sample.evidence_box, env.crop_padding)
            if not hits.any():
                continue
            obs, _ = env.reset(options={"sample_id": sample.sample_id})
            conversation = chat_format.conversation()
            prompt = conversation.add_observation(obs)
            item = encode_segments(processor, [(prompt, False)], [np.asarray(image) for image in conversation.images])
            (_, _, pixels), = images_by_grid(item["pixel_values"][:int(item["image_grid_thw"][0].prod())],
                                             item["image_grid_thw"][:1], config.patch_size)
            view = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            if view.shape[:2] != (side, side):  # a view of another token grid: its parts are not the cells
                view = np.asarray(Image.fromarray(view).resize((side, side), Image.BICUBIC))
            rows["images"].append(view)
            input_ids = item["input_ids"][None]
            mask = question_mask(input_ids, config.image_token_id, config.eos_token_id, config.pad_token_id)
            rows["question_ids"].append(input_ids[mask].numpy())
            rows["hits"].append(hits)
            tier = sample.meta.get("tier")
            rows["tiers"].append(f"{sample.family}/{tier}" if tier else sample.family)
    finally:
        env.close()
    if not rows["hits"]:
        raise ValueError("no image item of these seeds has evidence a box token's crop holds")
    longest = max(len(q) for q in rows["question_ids"])
    rows["question_ids"] = [np.pad(q, (0, longest - len(q)), constant_values=-1) for q in rows["question_ids"]]
    return BoxViews(images=np.stack(rows["images"]), question_ids=np.stack(rows["question_ids"]),
                    hits=np.stack(rows["hits"]), tiers=np.asarray(rows["tiers"]))


def stem_config(model: str | Path = DEFAULT_MODEL) -> Any:
    """`model`'s config with ``pointer_box_stem`` set: the sizes a probe takes, to be attached to that model."""
    from agents.vlm.tiny.configuration_tiny_vlm import TinyVLMConfig

    config = TinyVLMConfig.from_pretrained(str(model))
    config.pointer_box_stem = True
    return config


class BoxStemProbe(nn.Module):
    """The pointer's box stem of `config`'s sizes: a view and its question -> a logit per box token."""

    def __init__(self, config: Any) -> None:
        from agents.vlm.tiny.modeling_tiny_vlm import TinyVLMQuestionStem

        super().__init__()
        self.grid, self.subcells, self.sizes = config.pointer_grid, config.pointer_subcells, len(config.box_sizes)
        self.box_sizes = tuple(config.box_sizes)
        self.stem = TinyVLMQuestionStem(config, self.subcells ** 2 * self.sizes)
        nn.init.normal_(self.stem.words.weight, std=0.3)  # as the VLM initialises them: FiLM starts off
        for film in self.stem.film:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)

    def forward(self, images: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` views in [-1, 1] and ``(n, length)`` question ids (-1 padded) -> ``(n, boxes)``
        logits in the box vocabulary's order (cell-major, then size)."""
        question = self.stem.question(question_ids.clamp(min=0), question_ids >= 0)
        logits = self.stem(images, question)
        n, _, h, w = logits.shape
        s = self.subcells
        if h * s != self.grid or w * s != self.grid:
            raise ValueError(f"a {h}x{w}-token view with {s}x{s} parts is not the {self.grid}x{self.grid} "
                             f"pointer grid; the probe trains on views whose parts are its cells")
        cells = logits.view(n, s, s, self.sizes, h, w).permute(0, 4, 1, 5, 2, 3)  # (n, h, s, w, s, sizes)
        return cells.reshape(n, -1)


def allowed_boxes(hits: torch.Tensor, sizes: int, size_steps: int = 1) -> torch.Tensor:
    """``(n, boxes)`` hits -> the hits of the smallest size that has any, and of `size_steps` sizes more."""
    by_size = hits.view(hits.shape[0], -1, sizes)
    has = by_size.any(1)  # (n, sizes)
    smallest = torch.where(has, torch.arange(sizes, device=hits.device), sizes).min(1).values
    keep = torch.arange(sizes, device=hits.device)[None] <= (smallest + size_steps)[:, None]
    return (by_size & keep[:, None, :]).reshape(hits.shape)


def hit_loss(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean negative log of the softmax mass on the `allowed` boxes."""
    held = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return (torch.logsumexp(logits, -1) - torch.logsumexp(held, -1)).mean()


def batch_tensors(views: BoxViews, index: np.ndarray, grid: int, sizes: int,
                  rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views in [-1, 1], question ids and hits of `index`; with `rng` each view is flipped left-right
    and up-down at random, its hits with it (the box grid is symmetric)."""
    images = torch.from_numpy(views.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    hits = torch.from_numpy(views.hits[index]).view(len(index), grid, grid, sizes)
    if rng is not None:
        for dim_image, dim_hits in ((-1, 2), (-2, 1)):
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            images[flip] = images[flip].flip(dim_image)
            hits[flip] = hits[flip].flip(dim_hits)
    return images, torch.from_numpy(views.question_ids[index]).long(), hits.reshape(len(index), -1)


@torch.no_grad()
def measure(probe: BoxStemProbe, views: BoxViews, batch_size: int = 100) -> dict[str, float]:
    """The greedy box's crop holds the evidence (all and per tier), the mass on hitting boxes, and
    the greedy box's mean side (a fraction of the image side)."""
    was_training = probe.training
    probe.eval()
    hit, mass, side = [], [], []
    sides = torch.tensor(probe.box_sizes)
    for start in range(0, len(views.hits), batch_size):
        index = np.arange(start, min(start + batch_size, len(views.hits)))
        images, questions, hits = batch_tensors(views, index, probe.grid, probe.sizes)
        logits = probe(images, questions)
        best = logits.argmax(-1)
        hit.append(hits.gather(1, best[:, None]).squeeze(1).float())
        mass.append((torch.softmax(logits, -1) * hits).sum(-1))
        side.append(sides[best % probe.sizes])
    probe.train(was_training)
    hit_all, mass_all = torch.cat(hit).numpy(), torch.cat(mass).numpy()
    out = {"hit": float(hit_all.mean()), "hit_mass": float(mass_all.mean()), "side": float(torch.cat(side).mean())}
    for tier in sorted(set(views.tiers.tolist())):
        out[f"{tier}/hit"] = float(hit_all[views.tiers == tier].mean())
    return out


def train_box_stem(train: BoxViews, test: BoxViews, out: str | Path, minutes: float = 30.0,
                   steps: int = 1_000_000, batch_size: int = 32, lr: float = 2e-3, size_steps: int = 1,
                   eval_minutes: float = 5.0, seed: int = 0, model: str | Path = DEFAULT_MODEL,
                   init: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train a box stem (`BoxStemProbe` of `model`'s sizes, from run `init`'s weights if given)
    until `minutes` or `steps`; measure on `test` every `eval_minutes` and at the end, each record
    appended to ``out/metrics.jsonl``; the weights end in ``out/model.safetensors``. Returns the records."""
    out = Path(out)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = BoxStemProbe(stem_config(model))
    if init is not None:
        probe.load_state_dict(load_file(Path(init) / "model.safetensors"))

    def loss() -> torch.Tensor:
        index = rng.integers(0, len(train.hits), batch_size)
        images, questions, hits = batch_tensors(train, index, probe.grid, probe.sizes, rng)
        return hit_loss(probe(images, questions), allowed_boxes(hits, probe.sizes, size_steps))

    records = timed_training(probe, loss, lambda: measure(probe, test), out, lr, minutes, steps, eval_minutes,
                             "box stem", "hit", progress)
    save_file(probe.state_dict(), out / "model.safetensors")
    return records


ALONE_OFFSET = 30.0
"""Logit added to every box token when the stem points alone: at a box slot the box tokens then
outweigh the text tokens, which the decoder's own pointer terms had done (zeroed, the stem's logits
alone left the slot to text on shortcut items: broken tool calls)."""


def attach_box_stem(run: str | Path, model: str | Path, out: str | Path, alone: bool = False) -> Path:
    """`model` with a pointer box stem that is a trained probe's (``run/model.safetensors``), saved to
    `out` with the processor, chat format and env settings. With `alone` the box logits are the
    stem's alone (plus `ALONE_OFFSET`): the pointer's terms of the decoder's states (its query,
    size and question-match maps) are zeroed, so that training the decoder afterwards, with the
    pointer frozen, cannot move where it points."""
    from agents.count_stem_probe import checkpoint_parts
    from agents.sft import save_model
    from agents.vlm.hf import load_model

    weights = load_file(Path(run) / "model.safetensors")
    if "stem.out.weight" not in weights:
        raise ValueError(f"{run} holds no box stem (its weights have no stem.out)")
    _, processor, chat_format, env_kwargs = checkpoint_parts(model)
    vlm = load_model(str(model), config_overrides={"pointer_box_stem": True})
    pointer = vlm.pointer
    pointer.box_stem.load_state_dict({k[len("stem."):]: v for k, v in weights.items()})
    if alone:
        if vlm.config.box_slot_token_id is None:
            raise ValueError(f"{model} has no box_slot_token_id: with the stem alone its offset would put box "
                             "tokens into free text")
        with torch.no_grad():
            for part in (pointer.query, pointer.size, pointer.question, pointer.match_question,
                         pointer.match_token_question):
                if part is not None:
                    part.weight.zero_()
            pointer.size_bias.fill_(ALONE_OFFSET)
    return save_model(vlm, processor, chat_format, env_kwargs, out)


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> None:
    """Held-out greedy hit rate (solid) and the mass on hitting boxes (dashed) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, rows in runs.items():
        steps = [r["step"] for r in rows]
        line, = ax.plot(steps, [r["hit"] for r in rows], marker="o", ms=3, label=label)
        ax.plot(steps, [r["hit_mass"] for r in rows], ls="--", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_title("greedy box holds the evidence (solid); mass on such boxes (dashed)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run folder (with --attach: the run whose stem is attached)")
    parser.add_argument("--tasks", default=json.dumps(DEFAULT_TASKS), help="task spec JSON (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint whose chat format, settings, tokenizer and box tokens the views follow "
                             "(default: %(default)s)")
    parser.add_argument("--attach", nargs=2, metavar=("MODEL", "DEST"),
                        help="instead of training: save MODEL with --out's box stem in its pointer to DEST")
    parser.add_argument("--alone", action="store_true",
                        help="with --attach: the stem alone points (the pointer's decoder terms zeroed)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training minutes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="most steps (default: %(default)s)")
    parser.add_argument("--train-items", type=int, default=20_000, help="training items drawn (default: %(default)s)")
    parser.add_argument("--test-items", type=int, default=1_000, help="held-out items drawn (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=7_000_000,
                        help="training seeds start here, held-out ones 1,000,000 later (default: %(default)s, "
                             "apart from the SFT's items and held-out seeds)")
    parser.add_argument("--train-views", help="npz of training views: read if it exists, else written")
    parser.add_argument("--test-views", help="npz of held-out views: read if it exists, else written")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size-steps", type=int, default=1,
                        help="sizes above the smallest holding one whose boxes count as hits (default: %(default)s)")
    parser.add_argument("--init", help="a run whose stem training starts from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compare", nargs="*", default=[], help="other runs' folders to draw in curve.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.attach:
        print(attach_box_stem(args.out, args.attach[0], args.attach[1], args.alone))
        return 0
    torch.set_num_threads(args.threads)
    progress, tasks = not args.no_progress, json.loads(args.tasks)
    first = args.first_seed
    train = BoxViews.cached(args.train_views, lambda: box_views(
        tasks, list(range(first, first + args.train_items)), args.model, progress))
    test = BoxViews.cached(args.test_views, lambda: box_views(
        tasks, list(range(first + 1_000_000, first + 1_000_000 + args.test_items)), args.model, progress))
    records = train_box_stem(train, test, args.out, minutes=args.minutes, steps=args.steps, lr=args.lr,
                             batch_size=args.batch_size, size_steps=args.size_steps, seed=args.seed,
                             model=args.model, init=args.init, progress=progress)
    runs = {f"box stem ({args.out})": records, **{str(run): read_metrics(run) for run in args.compare}}
    plot_runs(runs, Path(args.out) / "curve.png")
    print(json.dumps(records[-1], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
