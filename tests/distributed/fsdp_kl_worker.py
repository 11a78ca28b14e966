"""Run under `accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml` (see launch_worker.py, whose
training and CPU set-up this reuses): the output anchor (`l2_kl_coef`) with L2-SP under FSDP2.

    accelerate launch --config_file fsdp2.yaml --num_processes 2 tests/distributed/fsdp_kl_worker.py OUT.pt

Trains a tiny GPT-2 for 4 steps with the KL on (checkpoint at step 2), then resumes from that checkpoint a trainer
built from another model: only θ₀ restored from the per-rank files (the penalty's and the KL's own) can
end where the uninterrupted run did. Then runs one reference forward on the trained sharded model, with gradients
and the optimizer's state in place, after a forward without backward (as an evaluation runs, which leaves the root's
θ gathered), and compares it and the training forward after it with unsharded models.
Rank 0 saves the numbers for tests/distributed/test_fsdp_trainer.py.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, tiny_gpt2  # noqa: E402
from launch_worker import GLOBAL_BATCH, SAVE_AT, enable_fsdp_on_cpu, full_parameters, train  # noqa: E402

from hf_l2.sharding import world_size  # noqa: E402

KL = dict(l2_kl_coef=5.0, l2_kl_temperature=2.0)


def another_model() -> torch.nn.Module:
    """Not θ₀ in any parameter (GPT-2 starts biases and LayerNorms at 0 and 1 whatever the seed)."""
    model = tiny_gpt2(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def every_rank(value):
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def optimizer_state(trainer) -> list[torch.Tensor]:
    return [local(v).clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def reference_check(trainer, theta: dict[str, torch.Tensor]) -> dict:
    """What one reference forward changed on this rank, and the logits of it and of the training forward after it
    against unsharded models at θ₀ (a fresh `tiny_gpt2()`) and at θ (one loaded with the gathered `theta`)."""
    model = trainer.model
    rows = slice(dist.get_rank() * 4, dist.get_rank() * 4 + 4)
    whole = TokenDataset(n=GLOBAL_BATCH)[list(range(GLOBAL_BATCH))]
    batch = {k: v[rows].to(trainer.accelerator.device) for k, v in whole.items()}
    model.train()
    model(**batch).loss.backward()  # populated (reduce-scattered) gradients
    params = dict(model.named_parameters())
    before = {n: local(p).detach().clone() for n, p in params.items()}
    grads = {n: local(p.grad).clone() for n, p in params.items()}
    state = optimizer_state(trainer)
    storage = {n: local(p).data_ptr() for n, p in params.items()}
    stepped = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        model(**batch)  # as an evaluation does: FSDP2 leaves the root's θ gathered after it

    reference = trainer._l2_kl.reference_outputs(model, batch).logits

    after = dict(model.named_parameters())
    result = {
        "theta_changed": [n for n, p in after.items() if not torch.equal(local(p).detach(), before[n])],
        "grads_changed": [n for n, p in after.items() if not torch.equal(local(p.grad), grads[n])],
        "optimizer_changed": sum(not torch.equal(a, b) for a, b in zip(optimizer_state(trainer), state)),
        "same_objects": [id(p) for p in after.values()] == [id(p) for p in params.values()]
        and {n: local(p).data_ptr() for n, p in after.items()} == storage
        and set(stepped) <= set(map(id, after.values())),
        "all_resharded": all(isinstance(p, DTensor) for p in after.values()),
        "training_mode": model.training,
        "reference_requires_grad": reference.requires_grad,
    }
    start = tiny_gpt2().eval()
    now = tiny_gpt2()
    now.load_state_dict(theta, strict=False)  # lm_head.weight is tied to the wte loaded
    with torch.no_grad():
        at_start = start(input_ids=whole["input_ids"][rows]).logits
        at_now = now(input_ids=whole["input_ids"][rows]).logits
    training = model(**batch).logits.detach().float().cpu()  # gathers θ again: no θ₀ left gathered
    reference = reference.float().cpu()
    model.zero_grad(set_to_none=True)
    result.update(
        reference_vs_start=(reference - at_start).abs().max().item(),
        training_vs_now=(training - at_now).abs().max().item(),
        start_vs_now=(at_start - at_now).abs().max().item(),
    )
    return result


def kl_run(root: Path) -> dict:
    first = train(root / "uninterrupted", "grad", **KL)
    checkpoint = root / "uninterrupted" / f"checkpoint-{SAVE_AT}"
    params = full_parameters(first)
    own = first._l2_kl.own
    result = {
        "world_size": world_size(),
        "distributed_type": str(first.accelerator.distributed_type),
        "param_type": type(next(first.model.parameters())).__name__,
        "params": params,
        "log": first.state.log_history,
        "own_per_rank": every_rank(sum(t.numel() for t in own.values())),
        "own_total": sum(params[n].numel() for n in own),
        "kl_files": sorted(f.name for f in checkpoint.glob("l2_kl_anchor*")),
        "reference": every_rank(reference_check(first, params)),
    }
    first.accelerator.wait_for_everyone()
    resumed = train(root / "resumed", "grad", resume=str(checkpoint), model=another_model(), **KL)
    result["resumed_params"] = full_parameters(resumed)
    result["resumed_log"] = resumed.state.log_history
    resumed.accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    result = kl_run(out.parent / "kl")
    if int(os.environ["RANK"]) == 0:
        torch.save(result, out)
    PartialState().destroy_process_group()  # before exit: gloo can abort a process exiting with it alive
