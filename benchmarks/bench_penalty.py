"""Time the L2-SP penalty's gradient alone: `L2Penalty` against the usual research-script loop and a plain copy.

    python benchmarks/bench_penalty.py                                      # CPU defaults, ~1.5 min
    python benchmarks/bench_penalty.py --device cuda --repeats 50 --warmup 5
    python benchmarks/bench_penalty.py --models tiny --repeats 3 --json out.json   # seconds: a dry run of the code

Shapes: GPT-2 small (124M) and Marian base (opus-mt-en-de), random weights built from their configs (nothing is
downloaded); `tiny` (a 2-layer GPT-2) only checks that the script runs. Regularized: every trainable tensor with
≥ 2 dimensions (about the L2Trainer's bias/norm exclusion).
Variants, all adding to gradients that already hold a backward's result:

- none: a no-op (timer floor); copy: ``dst.copy_(src)`` moving the same bytes as the ideal op (bandwidth ceiling);
- grad: ``penalty.add_to_grads_()`` (``l2_impl="grad"``); grad-bf16-anchor: the same with θ₀ stored in bfloat16;
  grad-cpu-anchor (CUDA only): θ₀ kept in host memory (``l2_anchor_device="cpu"``);
- loss: ``penalty.loss_term().backward()`` (``l2_impl="loss"``);
- decoupled: ``penalty.pull_()`` (``l2_impl="decoupled"``), θ ← θ − lr·α·(θ − θ₀), which reads θ and θ₀ and writes θ;
- naive: ``(sum((p - a).pow(2).sum() for p, a in ...) * α/2).backward()``.

Every repeat runs each variant once, in turn, so that drifts in clock speed or load hit all of them alike.
GB/s counts the bytes of the ideal op: read θ, read θ₀, read and write the gradient, each in its own dtype.
The script writes (or replaces) its section of ``--out``, keyed by device type.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from common import PeakMemory, add_run_arguments, call_times, default_device, environment, mib, write_section
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

from hf_l2.penalty import L2Penalty, snapshot

COEF = 0.01  # L2Config's default α
LR = 1e-5  # learning rate of the decoupled pull (its cost does not depend on it)
DRIFT = 1e-3  # std of the noise moving θ away from θ₀, as a few fine-tuning steps would

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config()),
    "tiny": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=2)),
    "marian": lambda: MarianMTModel(
        MarianConfig(
            vocab_size=58101,  # Helsinki-NLP/opus-mt-en-de
            d_model=512,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            max_position_embeddings=512,
        )
    ),
}


def ideal_bytes(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> int:
    """Read θ, read θ₀, read and write the gradient."""
    return sum(
        p.numel() * (p.element_size() + a.element_size() + 2 * p.grad.element_size()) for p, a in zip(params, anchors)
    )


def variants(params: dict[str, torch.Tensor]) -> dict[str, tuple[Callable[[], object], int | None]]:
    """Each variant's callable and the bytes its ideal op moves (None: no bandwidth to report)."""
    names = list(params)
    on_cuda = next(iter(params.values())).device.type == "cuda"
    anchor_sets = {"grad": snapshot(params, names, torch.float32, None)}
    anchor_sets["grad-bf16-anchor"] = snapshot(params, names, torch.bfloat16, None)
    if on_cuda:  # on the CPU a host anchor is the grad variant itself
        anchor_sets["grad-cpu-anchor"] = snapshot(params, names, torch.float32, "cpu")
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p), alpha=DRIFT)
            p.grad = torch.randn_like(p)

    thetas, thetas0 = list(params.values()), list(anchor_sets["grad"].values())
    nbytes = ideal_bytes(thetas, thetas0)
    # fp32 elements, half of the bytes read, half written; written once, as reading untouched pages costs nothing
    src = torch.ones(nbytes // 8, device=thetas[0].device)
    dst = torch.empty_like(src)
    cases = {"none": (lambda: None, None), "copy": (lambda: dst.copy_(src), 2 * src.numel() * src.element_size())}
    penalties = {
        variant: L2Penalty(COEF, 0.0, names, [], anchors, anchors_on_cpu=variant == "grad-cpu-anchor")
        for variant, anchors in anchor_sets.items()
    }
    for variant, penalty in penalties.items():
        penalty.bind(params)
        cases[variant] = (penalty.add_to_grads_, ideal_bytes(thetas, list(penalty.anchors.values())))

    def naive():
        (sum((p - a).pow(2).sum() for p, a in zip(thetas, thetas0)) * (COEF / 2)).backward()

    cases["loss"] = (lambda: penalties["grad"].loss_term().backward(), nbytes)
    # The decoupled pull reads θ and θ₀ and writes θ; no gradient is touched.
    pull_bytes = sum(p.numel() * (2 * p.element_size() + a.element_size()) for p, a in zip(thetas, thetas0))
    cases["decoupled"] = (lambda: penalties["grad"].pull_(lambda _: LR), pull_bytes)
    cases["naive"] = (naive, nbytes)
    return cases


def bench_model(name: str, device: torch.device, warmup: int, repeats: int) -> tuple[str, dict]:
    """The model's markdown table, and its numbers: per variant median/min seconds, bytes, peak memory growth."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    cases = variants(params)
    fns = {v: fn for v, (fn, _) in cases.items()}
    times, _ = call_times(fns, device, warmup, repeats)
    median = {v: statistics.median(t) for v, t in times.items()}
    peaks = {}
    for v, fn in fns.items():
        with PeakMemory(device) as mem:
            fn()
        peaks[v] = mem.delta

    copy_gbs = cases["copy"][1] / median["copy"] / 1e9
    numel = sum(p.numel() for p in params.values())
    lines = [
        (f"### {name}: {len(params)} tensors, {numel / 1e6:.1f}M regularized values "
        f"(model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"),
        "",
        "| variant | median ms | min ms | GB/s | % of copy GB/s | speedup vs naive | peak memory Δ MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, (_, nbytes) in cases.items():
        gbs = None if nbytes is None else nbytes / median[v] / 1e9
        cells = [
            v,
            f"{median[v] * 1e3:.2f}",
            f"{min(times[v]) * 1e3:.2f}",
            "—" if gbs is None else f"{gbs:.1f}",
            "—" if gbs is None else f"{100 * gbs / copy_gbs:.0f}%",
            "—" if v in ("none", "copy") else f"{median['naive'] / median[v]:.1f}×",
            mib(peaks[v]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    numbers = {
        "tensors": len(params),
        "regularized_values": numel,
        "variants": {
            v: {"median_s": median[v], "min_s": min(times[v]), "bytes": nbytes, "peak_bytes": peaks[v]}
            for v, (_, nbytes) in cases.items()
        },
    }
    del model, params, cases, fns
    gc.collect()
    return "\n".join(lines), numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["gpt2", "marian"], help="shapes to time")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--json", type=Path, help="also write the numbers of every model and variant to this file")
    add_run_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    results = {name: bench_model(name, device, args.warmup, args.repeats) for name in args.models}
    tables = [table for table, _ in results.values()]
    if args.json:
        args.json.write_text(json.dumps({name: numbers for name, (_, numbers) in results.items()}, indent=1))
    body = "\n\n".join(
        [
            f"## Penalty gradient alone (`bench_penalty.py`, {device.type})",
            environment(
                device,
                f"α = {COEF}; {args.repeats} timed calls per variant after {args.warmup} warm-up; GB/s, % of copy "
                "and speedup use the median",
                f"peak memory Δ: {PeakMemory.label(device)}, over one more call",
                "copy writes a buffer it has not read, which on write-allocate CPU caches also reads it first (1.5× "
                "the counted bytes); an op that writes only what it has read (decoupled) can then exceed 100%",
            ),
            *tables,
        ]
    )
    write_section(args.out, f"bench_penalty:{device.type}", body)


if __name__ == "__main__":
    main()
