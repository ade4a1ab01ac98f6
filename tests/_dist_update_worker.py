"""Worker for tests/test_distributed.py: one GRPO update on a fixed global batch, weights and a checkpoint saved.

Run alone (one process, the whole batch) or under ``torch.distributed.run`` with two
processes (rank 0 three items, rank 1 one; one item per micro-batch, so rank 1 runs two
padding passes); a third argument ``fsdp`` shards the model. Writes every rank's full
weights after the update to ``OUT/rank<r>.safetensors`` and a checkpoint to
``OUT/run/checkpoints``; a sharded run then resumes from that checkpoint and checks that
the resumed trainer holds the same weights and optimizer state.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from agents import distributed
from agents.grpo import GRPOConfig, GRPOTrainer
from agents.rollout import collect
from agents.vlm.hf import trajectory_item

model_dir, out, fsdp = sys.argv[1], Path(sys.argv[2]), sys.argv[3:] == ["fsdp"]
out.mkdir(parents=True, exist_ok=True)
distributed.init()
rank, world = distributed.rank_and_world()
config = GRPOConfig(model=model_dir, out=str(out / "run"), steps=1, queries_per_step=2, group_size=2,
                    max_new_tokens=6, max_turns=2, eval_queries=2, micro_batch_size=1, lr=1e-2, threads=1,
                    progress=False, fsdp=fsdp)
trainer = GRPOTrainer(config)
assert distributed.is_sharded(trainer.trained) == (fsdp and world > 1)
trainer.policy.temperature = 0.0  # greedy: every rank plays the same global batch
ids = ["zoom-read/11", "zoom-read/12", "zoom-read/13", "zoom-read/14"]
with distributed.unsharded(trainer.trained):
    trajectories = collect(trainer.policy, trainer.envs, samples=ids, group_size=1, seed=0, progress=False)
items = [trajectory_item(trainer.processor, t) for t in trajectories]
advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
mine = [0, 1, 2, 3] if world == 1 else [[0, 1, 2], [3]][rank]
trainer.update([items[i] for i in mine], advantages[mine])
trainer.checkpoint(1)
with distributed.unsharded(trainer.trained):  # the full weights, on every rank
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
save_file(weights, str(out / f"rank{rank}.safetensors"))

if distributed.is_sharded(trainer.trained):
    resumed = GRPOTrainer(replace(config, resume=True))
    assert resumed.start_step == 1
    model_state, optimizer_state = distributed.full_state(trainer.trained, trainer.optimizer)
    model_again, optimizer_again = distributed.full_state(resumed.trained, resumed.optimizer)
    if rank == 0:  # the full state dicts are gathered there
        torch.testing.assert_close(model_again, model_state, rtol=0, atol=0)
        torch.testing.assert_close(optimizer_again["state"], optimizer_state["state"], rtol=0, atol=0)
distributed.finish()
