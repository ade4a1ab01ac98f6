"""Time of a GRPO batch's forward (the rollout's prefill) and forward + backward (the update)
when the G rollouts of a query encode their shared first image once, against once per row.

A GRPO batch holds each query's image G times. The tiny model finds the copies
(`agents.vlm.tiny.modeling_tiny_vlm.unique_images`) and runs its image branches (the
encoder, the pointer stem, the question-match features) on each distinct image once. This
times the same batch with that sharing and with it turned off (`unique_images` replaced by
the identity), in one run, as ratios (machines here are noisy): the prompt up to the first
box token of `image/single` zoom-read traces (question, image 1 and the crop call's
opening), Q queries x G copies, the warm-start preset's model with the question-match term.

    python benchmarks/shared_images.py --queries 8 --group-size 4 --repeats 10

Prints the median times and the ratios (shared / per row).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from agents.sft import sft_loss_sum
from agents.traces import Trace
from agents.vlm.encoding import collate, encode_segments
from agents.vlm.tiny import modeling_tiny_vlm
from preset_model import preset_model_and_traces


def _identity(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, torch.arange(len(images), device=images.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, traces = preset_model_and_traces({"pointer_match": True}, args.queries)
    items = [encode_segments(processor, *Trace.pointing(t)) for t in traces for _ in range(args.group_size)]
    batch = collate(items, processor.tokenizer.pad_token_id)

    def prefill() -> None:
        with torch.no_grad():
            sft_loss_sum(model, batch)

    def update() -> None:
        model.zero_grad()
        sft_loss_sum(model, batch)[0].backward()

    shared = modeling_tiny_vlm.unique_images
    variants: dict[str, Callable[[], None]] = {"prefill": prefill, "update": update}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for mode, finder in (("shared", shared), ("per row", _identity)):
            modeling_tiny_vlm.unique_images = finder
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times.setdefault((name, mode), []).append(time.perf_counter() - start)
    modeling_tiny_vlm.unique_images = shared
    length = batch["input_ids"].shape[1]
    print(f"{args.queries} queries x {args.group_size} rollouts, {length} tokens a row, {args.threads} thread(s)")
    medians = {key: statistics.median(values) for key, values in times.items()}
    for (name, mode), value in medians.items():
        print(f"  {name:8s} {mode:8s} {value * 1000:8.1f} ms")
    for name in variants:
        print(f"  ratio {name} (shared / per row): {medians[(name, 'shared')] / medians[(name, 'per row')]:.2f}")


if __name__ == "__main__":
    main()
