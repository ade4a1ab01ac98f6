"""How long the glyph pretraining of the tiny image encoder sits at the loss of the class prior.

The warm start's vision pretraining (`agents.vision_pretrain`, the glyph target: name the
glyph of a zoom-read crop) has a plateau when its head reads the max-pooled tokens (the
preset's ``"pooled"`` `glyph_head`): the loss stays near the entropy of the class prior
(about 3.27 nats over 36 glyphs) and the held-out accuracy near chance, for a number of
steps that follows the model's initialisation, then falls within about 200 steps. With
the head on the token that holds the glyph's centre (``"token"``) it leaves within 100-200
steps. This runs the preset's pretraining alone, one process, on one seed's crops, for
each model initialisation in `--inits` and each variant in `--variants` (JSON: fields of
`VisionPretrainConfig`, e.g. ``{"glyph_head": "token", "lr": 0.003}``, and ``{"model": {...}}``
for `TinyVLMConfig` fields), and writes each curve (``RUN/<label>/metrics.jsonl``, every
50 steps) and a plot of the held-out accuracy.

    python benchmarks/pretrain_plateau.py --inits 1 2 3 --steps 900 --out runs/plateau
    python benchmarks/pretrain_plateau.py --inits 2 --variants '{"lr": 0.003}' '{"model": {"vision_num_layers": 0}}'

Steps, not minutes, are what it compares (a 2-process warm start takes the same global
batches). docs/results.md ("The pretraining plateau") has the measurements.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from agents.logger import MetricLogger
from agents.plots import plot_curves
from agents.sft import PRESETS, BoxSnapper, SFTConfig, _build, box_vocab, task_source
from agents.traces import TraceOptions
from agents.vision_pretrain import glyph_crops, pretrain_vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", type=int, nargs="+", default=[1, 2, 3], help="model initialisation seeds")
    parser.add_argument("--crop-seed", type=int, default=2, help="the run seed whose pretraining crops are used")
    parser.add_argument("--variants", nargs="*", default=['{"glyph_head": "pooled"}', '{"glyph_head": "token"}'],
                        help="JSON overrides of the preset's pretraining (and 'model'), one run per init each")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--samples", type=int, default=None, help="crops (default: the preset's 9,600)")
    parser.add_argument("--workers", type=int, default=2, help="processes synthesizing the crops")
    parser.add_argument("--out", default="runs/plateau")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    preset = SFTConfig(**PRESETS["warmstart"], out=str(out), seed=args.crop_seed, progress=False)
    model, processor = _build(preset)
    base = replace(preset.vision_pretrain[0], steps=args.steps, minutes=None,
                   samples=args.samples or preset.vision_pretrain[0].samples)
    options = TraceOptions(box_writer=BoxSnapper(box_vocab(model.config)), chat_format=preset.chat_format,
                           env_kwargs=dict(preset.env_kwargs))
    images, points, _ = glyph_crops(task_source(base.tasks), base.samples, preset.seed * 1000 + 999, options,
                                    workers=args.workers, progress=True)
    runs = []
    for text in args.variants:
        variant = json.loads(text)
        for init in args.inits:
            config = replace(preset, seed=init, model={**preset.model, **variant.get("model", {})})
            model, _ = _build(config)
            torch.manual_seed(init)
            label = f"init{init}" + "".join(f"-{k}={v}" for k, v in sorted(variant.items()) if k != "model") + "".join(
                f"-{k}={v}" for k, v in sorted(variant.get("model", {}).items()))
            logger = MetricLogger(out / label, resume_step=0)
            record = pretrain_vision(model.model.vision, processor.image_processor, images, points,
                                     replace(base, **{k: v for k, v in variant.items() if k != "model"}),
                                     seed=preset.seed, log=logger.log)
            logger.close()
            print(f"{label}: held-out accuracy {record['pretrain/held_out_accuracy']:.3f} after {args.steps} steps")
            runs.append(out / label)
    plot_curves(runs, ["pretrain/held_out_accuracy", "pretrain/loss"], out / "plateau.png")
    print(f"wrote {out / 'plateau.png'}")


if __name__ == "__main__":
    main()
