"""Run by test_distributed.py under torchrun: L2Trainer on 2 CPU (gloo) processes; rank 0 saves the parameters."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from helpers import TokenDataset, l2_args, params_of, tiny_gpt2  # noqa: E402

from hf_l2 import L2Trainer  # noqa: E402

if __name__ == "__main__":
    out, impl = sys.argv[1], sys.argv[2]
    kl_coef = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0  # the output anchor's λ
    model = tiny_gpt2()
    args = l2_args(os.path.dirname(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                   l2_coef=1.0, l2_impl=impl, max_grad_norm=0.5, ddp_backend="gloo",
                   l2_kl_coef=kl_coef)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(n=8))
    trainer.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if trainer.args.process_index == 0:
        torch.save({"params": params_of(model), "world_size": world, "log": trainer.state.log_history}, out)
    # Tear the process group down before the interpreter exits: gloo can abort a process exiting with it alive.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
