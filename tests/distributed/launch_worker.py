"""Run under `accelerate launch --config_file recipes/accelerate_configs/{fsdp2,zero3}.yaml`: the whole L2Trainer.

    accelerate launch --config_file CONFIG --num_processes N tests/distributed/launch_worker.py OUT.pt IMPL[,IMPL...]

For each impl, trains a tiny GPT-2 for 4 optimizer steps (accumulation 2, clipping at 0.5, active), saving a
checkpoint at step 2, then a fresh trainer resumed from that checkpoint to step 4. Every rank takes 8 / (2·N)
sequences per micro-batch, so each step sees the same 8 sequences whatever N: one process with batch 4 ×
accumulation 2 is the same run. Rank 0 saves, per impl, the full final parameters of both runs, their logs and
how θ₀ was split, for tests/distributed/test_fsdp_trainer.py (CPU, gloo) and benchmarks/gpu_check.py (GPU) to check.

Without an accelerator, accelerate 1.15 keeps the FSDP plugin only for accelerator process groups
(`AcceleratorState.__init__`, the `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch, which
leaves out `MULTI_CPU`): on gloo it would silently train plain DDP. `enable_fsdp_on_cpu` applies that branch's
assignments to `MULTI_CPU` as well; everything after it (the Trainer, `accelerator.prepare` → `fully_shard`,
the sharded checkpoints) is the code a GPU run executes.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, l2_args, tiny_gpt2  # noqa: E402

from hf_l2 import L2Trainer  # noqa: E402
from hf_l2.sharding import clean_name, world_size  # noqa: E402

STEPS, SAVE_AT, GA, GLOBAL_BATCH = 4, 2, 2, 8


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP branch run for a gloo (`MULTI_CPU`) process group, as it does for GPU ones."""
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as the end of __init__ does

    AcceleratorState.__init__ = patched


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU, in fp32 (a collective: all ranks call it)."""
    params = dict(trainer.model.named_parameters())
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {clean_name(n): p.detach().float().cpu().clone() for n, p in params.items()}
    return {
        clean_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
        for n, p in params.items()
    }


def train(output_dir: Path, impl: str, resume: str | None = None, model=None, **overrides):
    on_gpu = torch.cuda.is_available()
    processes = int(os.environ["WORLD_SIZE"])  # set by the launcher; the process group does not exist yet
    args = l2_args(
        output_dir, per_device_train_batch_size=GLOBAL_BATCH // (GA * processes), gradient_accumulation_steps=GA,
        max_steps=STEPS, l2_coef=1.0, l2_impl=impl, max_grad_norm=0.5, save_strategy="steps", save_steps=SAVE_AT,
        use_cpu=not on_gpu, ddp_backend=None if on_gpu else "gloo",
        # As the launch config says (the Trainer checks a DeepSpeed config's bf16 against its own arguments).
        bf16=os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16", **overrides,
    )
    trainer = L2Trainer(model=model or tiny_gpt2(), args=args, train_dataset=TokenDataset(n=GLOBAL_BATCH))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def anchor_split(trainer) -> list[int]:
    """θ₀ values each rank holds."""
    mine = torch.tensor([sum(a.numel() for a in trainer.l2_terms.penalty.anchors.values())])
    if world_size() == 1:
        return mine.tolist()
    device = trainer.accelerator.device
    parts = [torch.zeros_like(mine, device=device) for _ in range(world_size())]
    dist.all_gather(parts, mine.to(device))
    return [int(p.item()) for p in parts]


def uninterrupted_and_resumed(root: Path, impl: str) -> dict:
    first = train(root / "uninterrupted", impl)
    checkpoint = root / "uninterrupted" / f"checkpoint-{SAVE_AT}"
    params = full_parameters(first)
    result = {
        "world_size": world_size(),
        "distributed_type": str(first.accelerator.distributed_type),
        "mixed_precision": first.accelerator.mixed_precision,
        "param_type": type(next(first.model.parameters())).__name__,
        "params": params,
        "log": first.state.log_history,
        "anchor_per_rank": anchor_split(first),
        "anchored_total": sum(p.numel() for n, p in params.items() if n in first.l2_terms.penalty.anchored_names),
        "anchor_files": sorted(f.name for f in checkpoint.glob("l2_anchor*")),
    }
    first.accelerator.wait_for_everyone()
    resumed = train(root / "resumed", impl, resume=str(checkpoint))
    result["resumed_params"] = full_parameters(resumed)
    result["resumed_log"] = resumed.state.log_history
    resumed.accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    out, impls = Path(sys.argv[1]), sys.argv[2].split(",")
    if not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    results = {impl: uninterrupted_and_resumed(out.parent / impl, impl) for impl in impls}
    if int(os.environ["RANK"]) == 0:
        torch.save(results, out)
        print(json.dumps({i: {k: v for k, v in r.items() if "params" not in k and "log" not in k}
                          for i, r in results.items()}))
    # Tear the process group down before the interpreter exits: gloo can abort a process exiting with it alive.
    from accelerate import PartialState

    PartialState().destroy_process_group()
