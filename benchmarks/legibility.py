"""Legibility of the synthetic families: is looking closer necessary, and is there a shortcut?

For each family and tier it measures, over seeds 0..n-1 of the default suite:

- ``with ops``: the template reader on what one well-aimed operation shows (a crop of
  the evidence box, or the evidence frames), in the tiny pixel preset;
- ``without``: the same reader on the initial observation alone;
- ``chance``: the expected score of a uniform guess;

and the generation time per sample (video: including encoding into an empty cache).
With ``--pictures DIR`` it also writes one picture per family: the original with its
evidence box, the initial observation and the crop observation (or, for video, the
evidence frames as first shown and as selected).

    .venv/bin/python benchmarks/legibility.py --n 300 --pictures docs/img
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pxr_env.ops import smart_resize
from pxr_env.scoring import score_answer
from pxr_env.tasks.synthetic import FAMILIES, chance_score, reader_answer
from pxr_env.tasks.synthetic.common import TINY, crop_view, initial_view

TIERS = ("shortcut", "easy", "hard")


@dataclass
class Args:
    n: int = 200
    """Items per family (seeds 0..n-1)."""
    families: tuple[str, ...] = tuple(FAMILIES)
    """Families to measure."""
    pictures: str | None = None
    """Folder for one picture per family (PNG), or None."""


def measure(family: str, n: int, cache_dir: str) -> dict[str, dict[str, float]]:
    """Mean scores per tier (and "all") of the reader with and without ops, chance, and timings."""
    options = {"cache_dir": cache_dir} if family == "video" else {}
    source = FAMILIES[family](**options)
    source.get(f"{family}/{n}")  # warm caches (photographs, fonts) before timing
    rows: dict[str, list[tuple[float, float, float]]] = {t: [] for t in TIERS}
    times = []
    for seed in range(n):
        start = time.perf_counter()
        sample = source.get(f"{family}/{seed}")
        times.append(time.perf_counter() - start)
        scores = tuple(score_answer(reader_answer(sample, with_ops), sample.answers, sample.answer_type,
                                    sample.choices) for with_ops in (True, False))
        rows[sample.meta["tier"]].append((*scores, chance_score(sample)))
    out: dict[str, dict[str, float]] = {}
    for tier, values in [*rows.items(), ("all", [v for vs in rows.values() for v in vs])]:
        if values:
            a = np.asarray(values)
            out[tier] = {"n": len(a), "with_ops": a[:, 0].mean(), "without": a[:, 1].mean(), "chance": a[:, 2].mean()}
    out["time"] = {"mean_ms": 1000 * float(np.mean(times)), "p95_ms": 1000 * float(np.percentile(times, 95))}
    return out


def _outline(image: np.ndarray, box: tuple[float, float, float, float], width: int) -> Image.Image:
    picture = Image.fromarray(image)
    ImageDraw.Draw(picture).rectangle(box, outline=(255, 0, 255), width=width)
    return picture


def _row(panels: list[Image.Image], height: int) -> Image.Image:
    """Panels side by side, each scaled to `height` (nearest-neighbour, so pixels stay visible)."""
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height), Image.Resampling.NEAREST)
              for p in panels]
    gap = 8
    out = Image.new("RGB", (sum(p.width for p in scaled) + gap * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for p in scaled:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def picture(family: str, cache_dir: str, path: Path) -> None:
    """Write the picture of the first hard item of `family` to `path` (a palette PNG)."""
    options = {"cache_dir": cache_dir} if family == "video" else {}
    source = FAMILIES[family](**options)
    sample = next(s for s in (source.get(f"{family}/{i}") for i in range(100)) if s.meta["tier"] == "hard")
    if sample.is_video:
        frames = sample.load_frames()
        numbers = list(sample.evidence_frames)
        low = [Image.fromarray(smart_resize(frames[i - 1], TINY.video)) for i in numbers]
        high = [Image.fromarray(smart_resize(frames[i - 1], TINY.frame)) for i in numbers]
        out = _row([*low, *high], 224)
    else:
        image = sample.load_image()
        view, _, _ = initial_view(image)
        shown, _ = crop_view(image, sample.evidence_box)
        big = _outline(image, sample.evidence_box, max(2, image.shape[1] // 300))
        big = big.resize((round(big.width * 448 / big.height), 448), Image.Resampling.BOX)
        out = _row([big, Image.fromarray(view), Image.fromarray(shown)], 448)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB): {sample.sample_id}: {sample.question_with_choices()!r}"
          f" -> {sample.answers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=Args.n)
    parser.add_argument("--families", nargs="+", default=list(Args.families), choices=list(FAMILIES))
    parser.add_argument("--pictures", default=None)
    namespace = parser.parse_args()
    args = Args(n=namespace.n, families=tuple(namespace.families), pictures=namespace.pictures)
    with tempfile.TemporaryDirectory() as cache_dir:
        print("| family | tier | n | with ops | without | chance |")
        print("| --- | --- | --- | --- | --- | --- |")
        timings = {}
        for family in args.families:
            result = measure(family, args.n, cache_dir)
            timings[family] = result.pop("time")
            for tier, r in result.items():
                print(f"| {family} | {tier} | {r['n']} | {r['with_ops']:.2f} | {r['without']:.2f} | {r['chance']:.2f} |")
        print()
        for family, t in timings.items():
            print(f"generation/{family}: mean {t['mean_ms']:.1f} ms, p95 {t['p95_ms']:.1f} ms")
        if args.pictures:
            for family in args.families:
                picture(family, cache_dir, Path(args.pictures) / f"{family}.png")


if __name__ == "__main__":
    main()
