"""The trainers on a Qwen2.5-VL of the 7B architecture, on one GPU: memory and speed.

Builds a Qwen2.5-VL with the layer sizes of ``Qwen/Qwen2.5-VL-7B-Instruct`` (8.3 B
parameters) and random weights, with the tiny model's tokenizer (no model hub is
reachable where this runs, so the weights carry no skill: what is measured is whether the
code runs at this size, its memory and its speed, not answers), saves it with
``save_pretrained`` and puts it through the code the tiny model uses:

- SFT (`agents.sft.train_sft` with ``init_from``): bfloat16 weights and AdamW state,
  synthesized traces of the zoom-read family, then the closed-loop evaluation and the export;
- GRPO (`agents.grpo.GRPOTrainer`): rollouts of G episodes per query in `PixelQA-v0`
  through `TransformersPolicy`, group advantages, the clipped update.

Each phase reports its wall time, tokens per second and the peak GPU memory, into
``OUT/scale.json`` as it finishes (a phase that fails is recorded with its error and the
next one still runs)::

    python benchmarks/gpu_scale.py --size 7b --device cuda --out runs/scale-7b
    python benchmarks/gpu_scale.py --size test --device cpu --out /tmp/scale   # a 2-layer one, any machine

Needs torchvision (the Qwen2.5-VL processor's video processor imports it).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from agents.grpo import GRPOConfig, GRPOTrainer
from agents.sft import ZOOM_EASY, SFTConfig, SFTStage, train_sft
from agents.vlm.tiny import build_tiny_processor

# Layer sizes of Qwen/Qwen2.5-VL-7B-Instruct's config.json; "test" is a 2-layer model of the same layout.
SIZES: dict[str, dict[str, Any]] = {
    "7b": {"text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                        rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
           "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          fullatt_block_indexes=[7, 15, 23, 31], window_size=112)},
    "test": {"text": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                          rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
             "vision": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                            fullatt_block_indexes=[1])},
}


def build_checkpoint(size: str, path: Path, device: str, max_pixels: int) -> int:
    """Save a randomly initialised Qwen2.5-VL of `size` with the tiny tokenizer to `path`; its parameter count."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_tiny_processor().tokenizer
    ids = tokenizer.convert_tokens_to_ids
    sizes = SIZES[size]
    if sizes["text"]["vocab_size"] < len(tokenizer):
        raise ValueError(f"size {size!r} has fewer token ids than the tokenizer ({len(tokenizer)})")
    config = Qwen2_5_VLConfig(
        text_config=dict(sizes["text"], eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id),
        vision_config=sizes["vision"], image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|image_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    processor = Qwen2_5_VLProcessor(Qwen2VLImageProcessor(min_pixels=4 * 784, max_pixels=max_pixels), tokenizer,
                                    Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)
    processor.save_pretrained(path)
    return n_params


def sft_phase(checkpoint: Path, out: Path, device: str, steps: int, batch_size: int) -> dict[str, Any]:
    """A short SFT from `checkpoint` in bfloat16 weights; its loss curve, step time and tokens/s."""
    config = SFTConfig(out=str(out), init_from=str(checkpoint), model={}, device=device, dtype="bfloat16",
                       stages=[SFTStage(tasks=ZOOM_EASY, n_pixel=4 * batch_size, image_mix={"image/single": 1.0})],
                       max_steps=steps, batch_size=batch_size, lr=1e-5, warmup_ratio=0.0, eval_every=0,
                       eval_samples=4, eval_batch_size=4, max_new_tokens=32, checkpoint_every=0, log_every=1,
                       progress=True)
    result = train_sft(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    return {"steps": result["step"], "train_minutes": result["minutes"], "loss_first": losses[0],
            "loss_last": losses[-1], "tokens_per_s_median": sorted(speeds)[len(speeds) // 2],
            "eval_accuracy": result["eval"].get("accuracy")}


def grpo_phase(checkpoint: Path, out: Path, device: str, steps: int, queries: int, group: int,
               max_new_tokens: int) -> dict[str, Any]:
    """`steps` GRPO rounds from `checkpoint` in bfloat16: rollout and update times, generated tokens/s."""
    trainer = GRPOTrainer(GRPOConfig(
        model=str(checkpoint), out=str(out), device=device, dtype="bfloat16", steps=steps, queries_per_step=queries,
        group_size=group, micro_batch_size=group, max_new_tokens=max_new_tokens, max_turns=2, lr=1e-6,
        filter_zero_variance=False, eval_every=0, eval_queries=queries, progress=False))
    before = [p.detach().float().norm().item() for p in list(trainer.model.parameters())[:4]]
    rounds = []
    for step in range(steps):
        tick = time.perf_counter()
        trajectories = trainer.rollouts(step)
        rolled = time.perf_counter()
        items, advantages, stats = trainer.batch(trajectories)
        update = trainer.update(items, advantages)
        done = time.perf_counter()
        generated = sum(int(t.generated_mask.sum()) for t in trajectories)
        rounds.append({"rollout_s": rolled - tick, "update_s": done - rolled, "episodes": len(trajectories),
                       "generated_tokens": generated, "generated_tokens_per_s": generated / (rolled - tick),
                       "sequence_tokens": sum(len(t.token_ids) for t in trajectories),
                       "policy_loss": update.get("loss/policy"), "grad_norm": update.get("loss/grad_norm"),
                       "reward_total": stats["reward/total"]})
    after = [p.detach().float().norm().item() for p in list(trainer.model.parameters())[:4]]
    tick = time.perf_counter()
    evaluation = trainer.evaluate()
    return {"rounds": rounds, "eval_s": time.perf_counter() - tick, "eval_accuracy": evaluation.get("eval/accuracy"),
            "first_param_norms_before": before, "first_param_norms_after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="where the random model is saved (default OUT/model)")
    parser.add_argument("--max-pixels", type=int, default=512 * 28 * 28, help="processor pixel bound of each image")
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--phases", default="build,sft,grpo", help="comma-separated phases to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or args.out / "model"
    cuda = torch.device(args.device).type == "cuda"
    report: dict[str, Any] = {"size": args.size, "device": args.device, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if cuda else None}

    def phase(name: str, run: Callable[[], Any]) -> None:
        if name not in args.phases.split(","):
            return
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        try:
            report[name] = {"result": run(), "ok": True}
        except Exception as error:  # recorded, so that the later phases still report
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-3000:]}
        report[name]["wall_s"] = round(time.perf_counter() - tick, 2)
        if cuda:
            report[name]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        (args.out / "scale.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({name: {k: v for k, v in report[name].items() if k != "traceback"}}, indent=2), flush=True)

    phase("build", lambda: {"parameters": build_checkpoint(args.size, checkpoint, args.device, args.max_pixels)})
    phase("sft", lambda: sft_phase(checkpoint, args.out / "sft", args.device, args.sft_steps, args.sft_batch))
    phase("grpo", lambda: grpo_phase(checkpoint, args.out / "grpo", args.device, args.grpo_steps, args.queries,
                                     args.group, args.max_new_tokens))


if __name__ == "__main__":
    main()
