"""Run by trainer/test_output_lock.py under torchrun: 2 CPU (gloo) processes train into a folder whose lock another
process holds; each rank writes what `train()` raised (or "trained") to `<out>.rank<R>`."""

import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, l2_args, tiny_gpt2  # noqa: E402

from hf_l2 import L2Trainer  # noqa: E402
from hf_l2.output_lock import OutputDirInUseError  # noqa: E402

if __name__ == "__main__":
    output_dir, out = sys.argv[1], sys.argv[2]
    args = l2_args(output_dir, max_steps=2, ddp_backend="gloo", l2_coef=1.0)
    trainer = L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=8))
    try:
        trainer.train()
        said = "trained"
    except OutputDirInUseError as err:
        said = str(err)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with open(f"{out}.rank{trainer.args.process_index}", "w", encoding="utf-8") as f:
        f.write(f"{world}\n{said}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
