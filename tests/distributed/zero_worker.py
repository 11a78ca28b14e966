"""Run by test_zero.py under torchrun (2 gloo processes, DeepSpeed's CPU accelerator): ZeRO-2/3 vs. one process.

Each rank also trains an unsharded copy on the whole global batch; the DeepSpeed engine sees half the batch per
rank, clips at the same norm and steps inside its own `step`, as under the Trainer. Rank 0 saves the numbers.
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, max_rel_diff, params_of, tiny_gpt2  # noqa: E402
from shard_worker import ALPHA, MAX_NORM, STEPS, build_penalty, step  # noqa: E402

from hf_l2.penalty import L2Penalty, snapshot  # noqa: E402
from hf_l2.sharding import local_pieces  # noqa: E402


def run(stage, anchor_from, rank, world):
    data = TokenDataset(n=8)
    ids, labels = data.ids, data.labels
    n_items = (labels[:, 1:] != -100).sum()
    rows = slice(rank * 4, rank * 4 + 4)

    reference = tiny_gpt2()
    ref_penalty = build_penalty(reference)
    ref_penalty.bind(dict(reference.named_parameters()))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)

    model = tiny_gpt2()
    penalty = build_penalty(model)  # full θ₀, cut at bind
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_NORM,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    pieces = local_pieces(engine.module)
    if anchor_from == "pieces":  # a model already partitioned when the trainer is built (`zero.Init`)
        names = penalty.anchored_names
        layout = {n: (pieces[n].start, pieces[n].shape) for n in names}
        penalty = L2Penalty(ALPHA, penalty.decay_coef, names, penalty.new_names,
                            snapshot(pieces, names, torch.float32, None), anchor_layout=layout)
    penalty.bind(pieces)
    anchor_local = sum(a.numel() for a in penalty.anchors.values())

    for _ in range(STEPS):
        step(reference, ref_penalty, ref_opt, (ids, labels, n_items), "loss", 1.0)
        loss = engine(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=n_items).loss * world
        engine.backward(loss + penalty.loss_term())
        engine.step()

    stats = {k: v.item() for k, v in penalty.statistics().items()}
    ref_stats = {k: v.item() for k, v in ref_penalty.statistics().items()}
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if stage == 3 else _nothing():
        trained = params_of(engine.module)
    return {
        "rel_diff": max_rel_diff(trained, params_of(reference)),
        "stats": stats,
        "ref_stats": ref_stats,
        "anchor_local": anchor_local,
        "anchored_total": sum(ref_penalty.anchors[n].numel() for n in ref_penalty.anchored_names),
        "sharded": penalty.sharded,
    }


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world}
    for stage, anchor_from in ((2, "full"), (3, "full"), (3, "pieces")):
        case = run(stage, anchor_from, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, case["anchor_local"])
        case["anchor_per_rank"] = gathered
        results[f"zero{stage}-{anchor_from}"] = case
    if rank == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()  # rank 0 has saved: every rank leaves gloo together
    dist.destroy_process_group()
