"""Run by test_distributed.py under torchrun on a machine without an accelerator, with `use_cpu` left unset (as a
user's script would): one epoch of 8 sequences at micro-batch 2. Rank 0 saves how many processes trained together
and how many optimizer steps the epoch took (4 alone, 2 with 2 processes in one DDP job) to OUT."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, l2_args, tiny_gpt2  # noqa: E402

from hf_l2 import L2Trainer  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1]
    args = l2_args(os.path.dirname(out), use_cpu=False, per_device_train_batch_size=2, max_steps=-1,
                   num_train_epochs=1)
    trainer = L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=8))
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"world_size": trainer.args.world_size, "use_cpu": trainer.args.use_cpu,
                    "steps": trainer.state.global_step}, out)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
