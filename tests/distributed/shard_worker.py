"""Run by test_sharded.py under torchrun (2 gloo processes): the penalty on FSDP2 / FSDP1 shards vs. one process.

Each rank also trains an unsharded copy on the whole global batch (the single-process run); the sharded model
sees half the batch per rank. Rank 0 saves the numbers the test asserts on.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TokenDataset, max_rel_diff, params_of, tiny_gpt2  # noqa: E402

from hf_l2 import WeightNormCallback  # noqa: E402
from hf_l2.layer_groups import parameter_group  # noqa: E402
from hf_l2.penalty import L2Penalty, snapshot  # noqa: E402
from hf_l2.saved_state import load_anchor, save_anchor  # noqa: E402
from hf_l2.sharding import clean_name, local_pieces  # noqa: E402

ALPHA, BETA, STEPS, MAX_NORM = 2.0, 0.5, 3, 0.5
NEW = ["transformer.h.1.mlp.c_fc.weight"]  # a "new" tensor (plain L2) beside the anchored ones


def build_penalty(model):
    """As L2Trainer does: names and θ₀ from the model before it is wrapped (full tensors on every rank)."""
    names = [n for n, _ in model.named_parameters() if "bias" not in n and ".ln_" not in n and n not in NEW]
    return L2Penalty(ALPHA, BETA, names, NEW, snapshot(dict(model.named_parameters()), names, torch.float32, None))


def wrap(model, how):
    if how == "fsdp2":
        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)
    wrap = ModuleWrapPolicy({GPT2Block})
    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=wrap)


def full_params(model, how):
    if how == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    with FSDP.summon_full_params(model):
        return {clean_name(n): p.detach().clone() for n, p in model.named_parameters()}


def clip(model, how):
    if how == "fsdp2":
        return torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_NORM)
    return model.clip_grad_norm_(MAX_NORM)


def step(model, penalty, optimizer, batch, impl, scale, how=None):
    """One optimizer step; `scale` offsets the data-parallel gradient averaging, as the Trainer's ×num_processes."""
    ids, labels, n_items = batch
    loss = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss * scale
    if impl == "loss":
        loss = loss + penalty.loss_term()
    loss.backward()
    if impl == "grad":
        penalty.add_to_grads_()
    norm = clip(model, how) if how else torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()


def run(how, impl, rank, world, out_dir):
    data = TokenDataset(n=8)
    ids, labels = data.ids, data.labels
    n_items = (labels[:, 1:] != -100).sum()  # tokens the shifted causal loss counts, over the global batch
    rows = slice(rank * 4, rank * 4 + 4)

    reference = tiny_gpt2()
    ref_penalty = build_penalty(reference)
    ref_penalty.bind(dict(reference.named_parameters()))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)

    model = tiny_gpt2()
    penalty = build_penalty(model)
    model = wrap(model, how)
    penalty.bind(local_pieces(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    anchored_total = sum(ref_penalty.anchors[n].numel() for n in ref_penalty.anchored_names)
    anchor_local = sum(a.numel() for a in penalty.anchors.values())
    norms = []
    for _ in range(STEPS):
        norms.append((step(reference, ref_penalty, ref_opt, (ids, labels, n_items), impl, 1.0),
                      step(model, penalty, opt, (ids[rows], labels[rows], n_items), impl, world, how)))
    stats = {k: v.item() for k, v in penalty.statistics().items()}
    ref_stats = {k: v.item() for k, v in ref_penalty.statistics().items()}
    groups = penalty.group_statistics(lambda name: parameter_group(name, "type"))  # the model card's numbers
    ref_groups = ref_penalty.group_statistics(lambda name: parameter_group(name, "type"))
    value = torch.tensor(penalty.value().item())
    dist.all_reduce(value)  # each rank's share of Ω; together they are Ω

    # A checkpoint's per-rank anchor file restores θ₀ into a penalty whose own anchor is wrong.
    folder = os.path.join(out_dir, f"ckpt-{how}-{impl}")
    save_anchor(penalty.anchors, penalty.anchor_layout, folder, rank, world)
    dist.barrier()
    resumed = L2Penalty(ALPHA, BETA, penalty.anchored_names, NEW,
                        {n: torch.zeros_like(a) for n, a in ref_penalty.anchors.items()})
    saved, layout = load_anchor(folder, rank, world)
    resumed.anchors.update(saved)
    resumed.anchor_layout.update(layout)
    resumed.bind(local_pieces(model))
    resumed_stats = {k: v.item() for k, v in resumed.statistics().items()}

    # The same steps without the penalty end elsewhere: the comparison above has the power to see a missing term.
    plain = tiny_gpt2()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    no_penalty = L2Penalty(0.0, 0.0, [], [])
    no_penalty.bind({})
    for _ in range(STEPS):
        step(plain, no_penalty, plain_opt, (ids, labels, n_items), "grad", 1.0)

    # WeightNormCallback measures its own pieces too: its global norms and drift match the unsharded model's.
    weight_norms = WeightNormCallback(group_by="layer", reference=tiny_gpt2()).measure(model)
    ref_weight_norms = WeightNormCallback(group_by="layer", reference=tiny_gpt2()).measure(reference)

    return {
        "weight_norms": weight_norms,
        "ref_weight_norms": ref_weight_norms,
        "rel_diff": max_rel_diff(full_params(model, how), params_of(reference)),
        "penalty_effect": max_rel_diff(params_of(plain), params_of(reference)),
        "norms": norms,
        "stats": stats,
        "ref_stats": ref_stats,
        "groups": groups,
        "ref_groups": ref_groups,
        "value": value.item(),
        "ref_value": ref_penalty.value().item(),
        "resumed_stats": resumed_stats,
        "anchor_local": anchor_local,
        "anchored_total": anchored_total,
        "files": sorted(os.listdir(folder)),
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = sys.argv[1]
    results = {"world": world}
    for how in ("fsdp2", "fsdp1"):
        for impl in ("grad", "loss"):
            case = run(how, impl, rank, world, os.path.dirname(out))
            gathered = [None] * world
            dist.all_gather_object(gathered, case["anchor_local"])
            case["anchor_per_rank"] = gathered
            results[f"{how}-{impl}"] = case
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # rank 0 has saved: every rank leaves gloo together
    dist.destroy_process_group()
