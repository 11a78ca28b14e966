"""What `l2_mode="l2_sp_fisher"` costs: the penalty step with F against plain L2-SP, and computing F against one
training epoch on the same examples.

    python benchmarks/bench_fisher.py                          # CPU defaults, ~3 min on 2 cores
    python benchmarks/bench_fisher.py --device cuda --repeats 50 --fisher_model gpt2

1. Penalty step: `L2Penalty` over GPT-2 small's ≥2-D tensors (124M values, random weights from the config), each
   impl with and without F (fp32), all called once per repeat in a fresh random order so that load drifts hit all
   alike; medians of wall and (on the CPU) process CPU seconds, and each call's peak memory growth. F adds one read
   of a full-size tensor (target: ≤ 1.3× the L2-SP step). The "decoupled floor" row is one pass that reads θ, θ₀
   and F and writes θ (`addcmul_`, θ += w·F·θ₀ at a negligible w: not the pull, a cost reference): what a fused
   kernel for the weighted pull would cost at best.
2. F vs an epoch: `L2Trainer` on the same N sequences, once computing F over them (one forward+backward per
   example, `hf_l2.fisher.trainer_fisher`) and once training one epoch at `--batch_size` (l2_sp), side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_penalty import COEF, DRIFT, LR
from common import (
    PeakMemory,
    add_run_arguments,
    call_times,
    default_device,
    environment,
    mib,
    synchronize,
    write_section,
)
from transformers import GPT2Config, GPT2LMHeadModel

from hf_l2 import L2Config, L2Trainer
from hf_l2.penalty import L2Penalty, snapshot

FISHER_MODELS = {
    "small": lambda: GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=8192),
    "gpt2": lambda: GPT2Config(),
}


def penalty_step(device: torch.device, warmup: int, repeats: int) -> str:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    names = list(params)
    anchors = snapshot(params, names, torch.float32, None)
    fisher = {n: torch.rand_like(a) * 2 for n, a in anchors.items()}  # mean 1, as after normalization
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p), alpha=DRIFT)
            p.grad = torch.randn_like(p)
    plain = L2Penalty(COEF, 0.0, names, [], anchors)
    weighted = L2Penalty(COEF, 0.0, names, [], dict(anchors))
    weighted.set_fisher(fisher)
    for penalty in (plain, weighted):
        penalty.bind(params)
    fns = {}
    for label, penalty in (("l2_sp", plain), ("l2_sp_fisher", weighted)):
        fns[f"grad {label}"] = penalty.add_to_grads_
        fns[f"loss {label}"] = lambda p=penalty: p.loss_term().backward()
        fns[f"decoupled {label}"] = lambda p=penalty: p.pull_(lambda _: LR)
    thetas = [p.detach() for p in params.values()]
    thetas0, weights = [anchors[n] for n in names], [fisher[n] for n in names]
    fns["decoupled floor"] = lambda: torch._foreach_addcmul_(thetas, weights, thetas0, value=LR * COEF)
    wall, cpu = call_times(fns, device, warmup, repeats, order_seed=0)
    peaks = {}
    for name, fn in fns.items():
        with PeakMemory(device) as mem:
            fn()
        peaks[name] = mem.delta
    on_cpu = device.type == "cpu"

    def ms(name: str) -> str:
        cells = [statistics.median(wall[name])] + ([statistics.median(cpu[name])] if on_cpu else [])
        return " / ".join(f"{1e3 * c:.0f}" for c in cells)

    def ratio(name: str, base: str) -> str:
        runs = [wall] + ([cpu] if on_cpu else [])
        return " / ".join(f"{statistics.median(t[name]) / statistics.median(t[base]):.2f}×" for t in runs)

    clock = "wall / CPU" if on_cpu else "wall"
    lines = [
        f"### Penalty step, GPT-2 small shapes ({sum(p.numel() for p in params.values()) / 1e6:.1f}M values)",
        "",
        (f"| impl | l2_sp median ms ({clock}) | l2_sp_fisher median ms ({clock}) | ratio ({clock}; target ≤ 1.3×) "
        "| peak Δ MiB l2_sp / l2_sp_fisher |"),
        "|---|---:|---:|---:|---:|",
    ]
    for impl in ("grad", "loss", "decoupled"):
        a, b = f"{impl} l2_sp", f"{impl} l2_sp_fisher"
        lines.append(f"| {impl} | {ms(a)} | {ms(b)} | {ratio(b, a)} | {mib(peaks[a])} / {mib(peaks[b])} |")
    lines.append(f"| decoupled floor (one pass over θ, θ₀, F) | | {ms('decoupled floor')} "
                 f"| {ratio('decoupled floor', 'decoupled l2_sp')} | {mib(peaks['decoupled floor'])} |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def fisher_vs_epoch(device: torch.device, model_name: str, examples: int, length: int, batch_size: int) -> str:
    config = FISHER_MODELS[model_name]()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (examples, length), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(**overrides) -> L2Trainer:
        torch.manual_seed(0)
        args = L2Config(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, num_train_epochs=1,
                        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                        use_cpu=device.type == "cpu", dataloader_num_workers=0, l2_fisher_samples=examples,
                        **overrides)
        return L2Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data)

    rounds = {"fisher": [], "epoch": []}
    for _ in range(2):  # alternate, so that a change in load hits both
        t = trainer(l2_mode="l2_sp_fisher")
        synchronize(device)
        start = time.perf_counter()
        t._l2_prepare_fisher(None)
        synchronize(device)
        rounds["fisher"].append(time.perf_counter() - start)
        t = trainer(l2_mode="l2_sp")
        synchronize(device)
        start = time.perf_counter()
        t.train()
        synchronize(device)
        rounds["epoch"].append(time.perf_counter() - start)
    fisher, epoch = min(rounds["fisher"]), min(rounds["epoch"])
    params = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    lines = [
        (f"### Computing F vs one epoch: GPT-2 `{model_name}` ({params / 1e6:.1f}M parameters), {examples} sequences "
        f"of {length} tokens"),
        "",
        "| | seconds (best of 2) | per example ms |",
        "|---|---:|---:|",
        f"| F (one forward+backward per example, batch 1) | {fisher:.2f} | {1e3 * fisher / examples:.1f} |",
        f"| one training epoch (l2_sp, batch {batch_size}) | {epoch:.2f} | {1e3 * epoch / examples:.1f} |",
        f"| ratio F / epoch | {fisher / epoch:.2f}× | |",
    ]
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fisher_model", choices=list(FISHER_MODELS), default="small")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    add_run_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tables = [penalty_step(device, args.warmup, args.repeats),
              fisher_vs_epoch(device, args.fisher_model, args.examples, args.length, args.batch_size)]
    body = "\n\n".join([
        f"## Fisher-weighted L2-SP (`bench_fisher.py`, {device.type})",
        environment(device, f"α = {COEF}; penalty: {args.repeats} timed calls per variant after {args.warmup} "
                    "warm-up, in a fresh random order per repeat, medians; F in fp32; CPU: process CPU seconds "
                    "(all threads), which leave out the time other processes hold the cores",
                    f"peak Δ: {PeakMemory.label(device)}, over one call"),
        *tables,
    ])
    write_section(args.out, f"bench_fisher:{device.type}", body)


if __name__ == "__main__":
    main()
