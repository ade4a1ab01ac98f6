"""Worker for tests/test_distributed.py: one GRPO update on a fixed global batch, weights saved.

Run alone (one process, the whole batch) or under ``torch.distributed.run`` (each rank its
share of the batch); writes ``OUT/rank<r>.safetensors``.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from agents import distributed
from agents.grpo import GRPOConfig, GRPOTrainer
from agents.vlm.hf import trajectory_item

model_dir, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
distributed.init()
rank, world = distributed.rank_and_world()
config = GRPOConfig(model=model_dir, out=str(out / "run"), steps=1, queries_per_step=2, group_size=2,
                    max_new_tokens=6, max_turns=2, eval_queries=2, lr=1e-2, threads=1, progress=False)
trainer = GRPOTrainer(config)
trainer.policy.temperature = 0.0  # greedy: every rank plays the same global batch
ids = ["zoom-read/11", "zoom-read/12", "zoom-read/13", "zoom-read/14"]
from agents.rollout import collect

trajectories = collect(trainer.policy, trainer.envs, samples=ids, group_size=1, seed=0, progress=False)
items = [trajectory_item(trainer.processor, t) for t in trajectories]
advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
mine = list(range(rank, len(items), world))
trainer.update([items[i] for i in mine], advantages[mine])
save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}, str(out / f"rank{rank}.safetensors"))
