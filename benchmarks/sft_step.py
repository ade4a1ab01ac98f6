"""Time of one SFT step with logits at labelled positions only, against logits everywhere,
and with bfloat16 autocast against float32.

The warm start's loss needs the next-token distribution only where a label is; the output
layer over the whole vocabulary is a large share of a small model's step, and with the
28-grid box vocabulary (3,136 box tokens, whose logits come from the pointer head) more so.
`agents.sft.sft_loss_sum` asks the model for logits at the positions where some row of
the batch has a label (``logits_to_keep``); this compares it with the same loss computed
from the logits of every position, in one run, as a ratio (machines here are noisy). With a
box slot token the tiny model computes box logits at the slots alone and, when no kept
position is a slot (a reading step's text answers) and no cache is asked for, skips the
pointer keys: the benchmark compares that with the keys computed anyway. It
also times the labelled-position loss under ``torch.autocast(dtype=torch.bfloat16)``
(`SFTConfig.autocast`), whose matrix products run at about 2.7x the float32 speed on a CPU
with AVX-512 BF16 and far slower than float32 on one with AVX2 alone, where bfloat16 is
emulated (`agents.sft.native_bfloat16` tells them apart; the preset's ``"auto"`` uses it).

    python benchmarks/sft_step.py --grid 28 --subcells 2 --repeats 10
    python benchmarks/sft_step.py --view pointing --batch-size 16   # a pointing stage's step

Prints the median forward + backward time of each and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from agents.sft import sft_loss_sum
from agents.traces import Trace
from agents.vlm.encoding import IGNORE_INDEX, collate, encode_segments
from preset_model import preset_model_and_traces


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same summed cross-entropy from the logits of every position."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--subcells", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--view", choices=["whole", "reading", "pointing"], default="whole",
                        help="what of each trace a step trains on (the warm start's stage kinds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, traces = preset_model_and_traces(
        {"pointer_grid": args.grid, "pointer_subcells": args.subcells}, args.batch_size)
    views = {"whole": lambda t: (t.segments(), t.images), "reading": Trace.reading, "pointing": Trace.pointing}
    batch = collate([encode_segments(processor, *views[args.view](t)) for t in traces], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        kept, _ = sft_loss_sum(model, batch)
        torch.testing.assert_close(kept, full_logits_loss(model, batch), rtol=1e-4, atol=1e-3)
    def bf16_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sft_loss_sum(model, batch)[0]

    def keys_always(**inputs: torch.Tensor) -> object:
        """The model with the pointer keys computed even where no box slot is kept (a cache asked for)."""
        return model(**inputs | {"use_cache": True})

    keys_always.config = model.config  # read by sft_loss_sum

    variants = {"labelled positions": lambda: sft_loss_sum(model, batch)[0],
                "all positions": lambda: full_logits_loss(model, batch), "labelled, bfloat16": bf16_loss,
                "labelled, keys always": lambda: sft_loss_sum(keys_always, batch)[0]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, loss_of in variants.items():
            model.zero_grad()
            start = time.perf_counter()
            loss_of().backward()
            times[name].append(time.perf_counter() - start)
    length = batch["input_ids"].shape[1]
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).sum())
    print(f"grid {args.grid}, batch {args.batch_size} x {length} tokens, {labelled} positions with a label in some row")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, value in medians.items():
        print(f"  {name:20s} {value * 1000:7.1f} ms per forward + backward")
    print(f"  ratio (labelled / all): {medians['labelled positions'] / medians['all positions']:.2f}")
    print(f"  ratio (bfloat16 / float32): {medians['labelled, bfloat16'] / medians['labelled positions']:.2f}")
    print(f"  ratio (keys skipped where no slot is kept / keys always): "
          f"{medians['labelled positions'] / medians['labelled, keys always']:.2f}")


if __name__ == "__main__":
    main()
