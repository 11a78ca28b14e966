"""Run by test_distributed.py under torchrun: L2Trainer on 2 CPU (gloo) processes; rank 0 saves the parameters.

With `no_avg` after the impl: `average_tokens_across_devices=False`, and also the stock Trainer with Ω added to each
micro-batch's loss by hand (over GA micro-batches that is Ω once), the reference for that setting. With `kl=λ`:
the output anchor, `l2_kl_coef=λ`, with a checkpoint at step 2 in the output's folder. With `dft`:
`l2_token_weighting="dft"`."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, l2_args, params_of, penalized, tiny_gpt2  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_l2 import L2Trainer  # noqa: E402


class HandOmega(Trainer):
    """The stock Trainer whose training loss adds Ω/GA per micro-batch, Ω = (α/2)·Σ‖θ − θ₀‖² written out."""

    def __init__(self, *args, alpha, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters() if penalized(n)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        omega = sum((self.model.get_parameter(n) - t).pow(2).sum() for n, t in self.start.items())
        return loss + 0.5 * self.alpha * omega / self.args.gradient_accumulation_steps

if __name__ == "__main__":
    out, impl = sys.argv[1], sys.argv[2]
    no_avg = "no_avg" in sys.argv[3:]
    mode = next((a for a in sys.argv[3:] if a not in ("no_avg", "dft") and not a.startswith("kl=")), "l2_sp")
    kl_coef = next((float(a[3:]) for a in sys.argv[3:] if a.startswith("kl=")), 0.0)  # the output anchor's λ
    weighting = "dft" if "dft" in sys.argv[3:] else "none"
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, max_grad_norm=0.5,
                  ddp_backend="gloo", **({"average_tokens_across_devices": False} if no_avg else {}),
                  **({"save_strategy": "steps", "save_steps": 2} if kl_coef else {}))
    model = tiny_gpt2()
    args = l2_args(os.path.dirname(out), l2_coef=1.0, l2_impl=impl, l2_mode=mode, l2_kl_coef=kl_coef,
                   l2_token_weighting=weighting, **common)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(n=8))
    trainer.train()
    saved = {"params": params_of(model), "log": trainer.state.log_history}
    if no_avg:
        reference = tiny_gpt2()
        HandOmega(model=reference, args=l2_args(os.path.dirname(out), l2_mode="none", **common),
                  train_dataset=TokenDataset(n=8), alpha=1.0).train()
        saved["reference"] = params_of(reference)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if trainer.args.process_index == 0:
        torch.save({**saved, "world_size": world}, out)
    # Tear the process group down before the interpreter exits: gloo can abort a process exiting with it alive.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
