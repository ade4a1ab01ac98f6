"""Worker for tests/test_sft.py's data-parallel test: a short warm start (vision pretraining and
two SFT steps on a batch of pixel and textual traces), each rank's weights saved.

Run alone (one process) or under ``torch.distributed.run`` with two processes; writes the
weights every rank holds at the end to ``OUT/rank<r>.safetensors`` (rank 0 also saves the
run's final model and metrics in ``OUT/run``).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from agents import distributed
from agents.sft import SFTConfig, SFTStage, ZOOM_EASY, train_sft

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
distributed.init()
model_overrides = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vision_num_layers": 1,
                   "stem_channels": 8, "pointer_dim": 32}
config = SFTConfig(out=str(out / "run"), model=model_overrides, progress=False, log_every=1, checkpoint_every=0,
                   stages=[SFTStage(tasks={"zoom-read": {**ZOOM_EASY["zoom-read"], "shortcut_share": 0.5}}, n_pixel=4, n_text=2, image_mix={"image/single": 1.0})],
                   vision_pretrain={"samples": 10, "steps": 2, "batch_size": 4, "held_out": 2},
                   max_steps=2, batch_size=4, lr=3e-3, warmup_ratio=0.0, eval_every=0, eval_samples=1,
                   max_new_tokens=4)
model = train_sft(config)["model"]
save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()},
          str(out / f"rank{distributed.rank_and_world()[0]}.safetensors"))
distributed.finish()
