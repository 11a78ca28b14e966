"""Throughput of whole optimizer steps: stock `transformers.Trainer` vs `L2Trainer` (L2-SP: grad, loss, decoupled).

    python benchmarks/bench_step.py                                         # CPU defaults, ~2 min
    python benchmarks/bench_step.py --device cuda --bf16 --n_layer 12 --n_embd 768 --seq_len 1024 --steps 30
    python benchmarks/bench_step.py ... --anchor_variants --json out.json   # + θ₀ in bf16 / in host memory
    python benchmarks/bench_step.py --model "$(hf-l2 smollm2)" --seq_len 64 --every_form   # a real model, every form

A randomly initialized GPT-2 (GPT-2's vocabulary, the size given by the flags), or the local model `--model`,
trains on random tokens. Each round
trains every variant once from the same weights, in a rotating order, so that drifts in clock speed or load hit
all of them alike. tokens/s counts the steps after the first ``WARMUP`` ones, from the ``on_step_end`` times,
and the median over rounds is reported. The script writes (or replaces) its section of ``--out``, keyed by device
type.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    PeakMemory,
    RandomTokens,
    add_run_arguments,
    default_device,
    environment,
    mib,
    synchronize,
    write_section,
)
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_l2 import L2Config, L2Trainer

WARMUP = 2  # untimed steps: the optimizer state and the anchor's first use are allocated there
COEF = 0.01  # L2Config's default α

VARIANTS = {
    "stock Trainer": (Trainer, TrainingArguments, {}),
    "L2Trainer grad": (L2Trainer, L2Config, {"l2_mode": "l2_sp", "l2_impl": "grad", "l2_coef": COEF}),
    "L2Trainer loss": (L2Trainer, L2Config, {"l2_mode": "l2_sp", "l2_impl": "loss", "l2_coef": COEF}),
    "L2Trainer decoupled": (L2Trainer, L2Config, {"l2_mode": "l2_sp", "l2_impl": "decoupled", "l2_coef": COEF}),
}
# The other forms (`--every_form`): Fisher-weighted L2-SP (F over a few examples, before the timed steps), the
# output-space anchor alone (one extra no-grad forward per micro-batch), DFT token weighting, and both (ASFT).
FORM_VARIANTS = {
    "L2Trainer l2_sp_fisher grad": (L2Trainer, L2Config, {"l2_mode": "l2_sp_fisher", "l2_coef": COEF,
                                                           "l2_fisher_samples": 4}),
    "L2Trainer l2_sp_fisher decoupled": (L2Trainer, L2Config, {"l2_mode": "l2_sp_fisher", "l2_impl": "decoupled",
                                                                "l2_coef": COEF, "l2_fisher_samples": 4}),
    "L2Trainer KL anchor": (L2Trainer, L2Config, {"l2_mode": "none", "l2_kl_coef": 1.0}),
    "L2Trainer DFT": (L2Trainer, L2Config, {"l2_mode": "none", "l2_token_weighting": "dft"}),
    "L2Trainer ASFT": (L2Trainer, L2Config, {"l2_mode": "none", "l2_kl_coef": 1.0, "l2_token_weighting": "dft"}),
}
# Where θ₀ is kept (`--anchor_variants`): bf16 storage halves its memory; host memory moves it off the device.
_GRAD = VARIANTS["L2Trainer grad"][2]
ANCHOR_VARIANTS = {
    "L2Trainer grad, bf16 anchor": (L2Trainer, L2Config, {**_GRAD, "l2_anchor_dtype": "bfloat16"}),
    "L2Trainer grad, host anchor": (L2Trainer, L2Config, {**_GRAD, "l2_anchor_device": "cpu"}),
}


def gpt2_config(args: argparse.Namespace) -> GPT2Config:
    return GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 64, n_positions=args.seq_len)


def build_model(args: argparse.Namespace):
    """The model every variant starts from: `--model`'s weights, or a GPT-2 seeded alike for every variant."""
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(args))


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (after the device has finished it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())


def run(variant: str, args: argparse.Namespace, device: torch.device, output_dir: str) -> tuple[float, int | None]:
    """Train one variant from fresh weights; its tokens/s after warm-up and the peak memory growth."""
    trainer_cls, args_cls, l2_fields = {**VARIANTS, **FORM_VARIANTS, **ANCHOR_VARIANTS}[variant]
    model = build_model(args).to(device)  # on the device first, so that memory growth excludes the weights
    training_args = args_cls(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        bf16=args.bf16,
        use_cpu=device.type == "cpu",
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=args.steps,  # one log, after the last timed step
        disable_tqdm=True,
        **l2_fields,
    )
    clock = StepClock(device)
    with PeakMemory(device) as mem:
        trainer = trainer_cls(
            model=model,
            args=training_args,
            train_dataset=RandomTokens(args.steps * args.batch_size, args.seq_len, model.config.vocab_size),
            callbacks=[clock],
        )
        trainer.train()
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    timed_steps = len(clock.times) - WARMUP
    return timed_steps * args.batch_size * args.seq_len / (clock.times[-1] - clock.times[WARMUP - 1]), mem.delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n_embd", type=int, default=256, help="hidden size (64 per attention head, as in GPT-2)")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8, help=f"optimizer steps per run, the first {WARMUP} untimed")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant (the median is reported)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--model", help="a local causal LM folder to train instead of a random GPT-2")
    parser.add_argument("--every_form", action="store_true",
                        help="also time l2_sp_fisher (grad, decoupled), the KL anchor, DFT and ASFT")
    parser.add_argument("--anchor_variants", action="store_true", help="also time θ₀ stored in bf16 and in host memory")
    parser.add_argument("--json", type=Path, help="also write every round's tokens/s and peak memory to this file")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    names = (list(VARIANTS) + (list(FORM_VARIANTS) if args.every_form else [])
             + (list(ANCHOR_VARIANTS) if args.anchor_variants else []))
    speed: dict[str, list[float]] = {v: [] for v in names}
    peak: dict[str, list[int | None]] = {v: [] for v in names}
    refused: dict[str, str] = {}  # variants hf_l2 refuses on this model (e.g. a decoupled Fisher pull ≥ 1 per step)
    with tempfile.TemporaryDirectory() as output_dir:
        for r in range(args.rounds):
            for v in names[r % len(names) :] + names[: r % len(names)]:
                if v in refused:
                    continue
                try:
                    tokens_per_s, delta = run(v, args, device, output_dir)
                except ValueError as err:
                    refused[v] = str(err)
                    print(f"round {r}: {v}: refused: {err}", flush=True)
                    continue
                speed[v].append(tokens_per_s)
                peak[v].append(delta)
                print(f"round {r}: {v}: {tokens_per_s:,.0f} tokens/s, peak memory Δ {mib(delta)} MiB", flush=True)

    if args.model:
        model = build_model(args)
        described = f"{Path(args.model).name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)"
        del model
    else:
        with torch.device("meta"):  # shapes only
            n_params = sum(p.numel() for p in GPT2LMHeadModel(gpt2_config(args)).parameters())
        described = f"GPT-2 with {args.n_layer} layers, width {args.n_embd} ({n_params / 1e6:.1f}M parameters)"
    stock = statistics.median(speed[names[0]])
    lines = [
        "| variant | tokens/s (median) | min–max | step time vs stock | peak memory Δ MiB (max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in names:
        if v in refused:
            lines.append(f"| {v} | refused: {refused[v].split(':', 1)[-1].split(', so ')[0].strip()} | | | |")
            continue
        med = statistics.median(speed[v])
        worst = None if None in peak[v] else max(peak[v])
        lines.append(
            f"| {v} | {med:,.0f} | {min(speed[v]):,.0f}–{max(speed[v]):,.0f} | "
            f"{'—' if v == names[0] else f'{100 * (stock / med - 1):+.1f}%'} | {mib(worst)} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.json:
        numbers = {v: {"tokens_per_s": speed[v], "peak_bytes": peak[v]} for v in names}
        args.json.write_text(json.dumps(numbers, indent=1))
    key = device.type + (":" + re.sub(r"\W+", "_", Path(args.model).name) if args.model else "")
    body = "\n\n".join(
        [
            f"## Whole optimizer steps (`bench_step.py`, {key})",
            environment(
                device,
                f"{described}, "
                f"{args.batch_size} × {args.seq_len} tokens per step, {'bf16' if args.bf16 else 'fp32'}; "
                f"{args.steps} steps per run, the first {WARMUP} untimed; {args.rounds} rounds; L2-SP, α = {COEF}",
                f"peak memory Δ: {PeakMemory.label(device)}, from building the trainer (anchor included) to the end "
                "of `train()`",
            ),
            table,
        ]
    )
    write_section(args.out, f"bench_step:{key}", body)


if __name__ == "__main__":
    main()
