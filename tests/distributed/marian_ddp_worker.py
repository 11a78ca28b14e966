"""Run by test_distributed.py under torchrun: `L2Seq2SeqTrainer` on a tiny MarianMT, whose loss is a plain mean
that ignores `num_items_in_batch`, on 2 CPU (gloo) processes × micro-batch 2 × accumulation 2 (the 8 pairs of
`PairDataset` each step); rank 0 saves the parameters, the log and the world size to OUT."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import PairDataset, l2_args, params_of, tiny_marian  # noqa: E402

from hf_l2 import L2Seq2SeqConfig, L2Seq2SeqTrainer  # noqa: E402

MARIAN_RUN = dict(max_steps=3, l2_coef=10.0, max_grad_norm=0.5)  # shared with the 1-process run of the test

if __name__ == "__main__":
    out = sys.argv[1]
    args = L2Seq2SeqConfig.from_training_args(l2_args(
        os.path.dirname(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, ddp_backend="gloo",
        **MARIAN_RUN))
    model = tiny_marian()
    trainer = L2Seq2SeqTrainer(model=model, args=args, train_dataset=PairDataset())
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"params": params_of(model), "log": trainer.state.log_history,
                    "world_size": trainer.accelerator.num_processes}, out)
    # Tear the process group down before the interpreter exits: gloo can abort a process exiting with it alive.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
