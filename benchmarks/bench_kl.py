"""Cost of the KL anchor's term (`l2_kl_coef`): `token_kl_sum` in chunks of tokens against the whole-batch formula.

    python benchmarks/bench_kl.py                      # CPU: SmolLM2-135M's shapes (vocabulary 49,152), ~10 min
    python benchmarks/bench_kl.py --layers 4 --hidden 256 --repeats 3     # a quick look
    python benchmarks/bench_kl.py --device cuda --batch_size 16 --seq_len 1024

A Llama built from its config (random weights, SmolLM2-135M's shapes by default) trains on random tokens with
AdamW. Each timed step is `L2TokenLossMixin.compute_loss` written out: the task loss, the reference forward with
θ₀ (`OutputAnchor.reference_outputs`), the KL over the target tokens, backward, optimizer step. Variants, timed
side by side in a fresh random order per repeat: no penalty; the reference forward alone (its output unused); the
KL anchor as `hf_l2` computes it (chunks); the KL as it was computed before (kept here only: the whole-batch
formula, rows gathered by a boolean mask of a slice, the reference forward also computing its loss). The part
beyond the reference forward is (KL − reference forward alone) / no penalty; on a shared machine that difference of
two whole steps is noisy, so that part is also timed alone (`KLPart`) and given as a share of the no-penalty step.

Peak memory: each variant in its own process, at `--memory_vocab` (default 128,256, Llama 3's vocabulary), over one
step after a warm-up step; and the KL term alone (its forward and backward on given rows, beyond them).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics

import torch
import torch.nn.functional as F
from common import PeakMemory, add_run_arguments, call_times, default_device, environment, mib, write_section
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from hf_l2.output_anchor import OutputAnchor, eval_mode, token_kl_sum
from hf_l2.target_tokens import target_logits

LAMBDA = 1.0


def unchunked_token_kl_sum(policy: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """The former `token_kl_sum`: log-softmax and KL over all (N, vocab) rows at once."""
    if temperature != 1:
        policy, reference = policy / temperature, reference / temperature
    log_p = F.log_softmax(policy.float(), dim=-1)
    log_q = F.log_softmax(reference.float(), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="sum") * temperature**2


def former_target_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The former `target_logits` of a decoder-only model: a boolean mask over the slice of predicting positions."""
    logits, targets = logits[:, :-1], labels[:, 1:]
    return logits[targets != -100]


@torch.no_grad()
def former_reference_logits(anchor: OutputAnchor, model, batch: dict) -> torch.Tensor:
    """The former reference forward, which passed the labels on (and so computed a loss)."""
    with eval_mode(model):
        return functional_call(model, anchor.anchors(), args=(), kwargs=batch, strict=False)["logits"]


NOW, BEFORE = "KL anchor (chunks)", "KL anchor as before (whole batch)"
VARIANTS = ["no penalty", "reference forward alone", NOW, BEFORE]
KL_FORMS = {NOW: token_kl_sum, BEFORE: unchunked_token_kl_sum}


def llama(args: argparse.Namespace, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class Step:
    """One optimizer step of one variant on a fixed batch (the variants share the model and its optimizer)."""

    def __init__(self, model, optimizer, anchor: OutputAnchor, variant: str, batch: dict, temperature: float):
        self.model, self.optimizer, self.anchor, self.variant = model, optimizer, anchor, variant
        self.batch, self.temperature = batch, temperature

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self) -> torch.Tensor:
        """Task loss + λ·KL/N, as `compute_loss` returns it: its intermediates are freed before backward."""
        out = self.model(**self.batch)
        labels = self.batch["labels"]
        if self.variant == "reference forward alone":
            self.anchor.reference_outputs(self.model, self.batch)
            return out.loss
        if self.variant == NOW:
            reference = self.anchor.reference_outputs(self.model, self.batch)["logits"]
            policy = target_logits(out.logits, labels, None, shifts=True)
            kl_sum = token_kl_sum(policy, target_logits(reference, labels, None, True), self.temperature)
        elif self.variant == BEFORE:
            reference = former_reference_logits(self.anchor, self.model, self.batch)
            policy = former_target_logits(out.logits, labels)
            kl_sum = unchunked_token_kl_sum(policy, former_target_logits(reference, labels), self.temperature)
        else:
            return out.loss
        return out.loss + LAMBDA * kl_sum / max(len(policy), 1)


class KLPart:
    """The part of a KL step beyond the reference forward, alone: from the two models' logits to the KL's gradient
    added into the policy's logits' gradient (which already holds the task loss's); before, also the loss that the
    reference forward computed from the labels. Far less noisy than the difference of two whole steps."""

    def __init__(self, model, variant: str, batch: dict):
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(1)
        shape = (*batch["labels"].shape, vocab)
        self.policy = torch.randn(shape, generator=generator).to(batch["labels"].device).requires_grad_()
        self.policy.grad = torch.zeros_like(self.policy)  # backward adds into it, as into the task loss's gradient
        self.reference = torch.randn(shape, generator=generator).to(self.policy.device)
        self.model, self.variant, self.labels = model, variant, batch["labels"]

    def __call__(self) -> None:
        labels = self.labels
        if self.variant == NOW:
            policy = target_logits(self.policy, labels, None, shifts=True)
            kl_sum = token_kl_sum(policy, target_logits(self.reference, labels, None, True), 1.0)
        else:
            with torch.no_grad():
                self.model.loss_function(logits=self.reference, labels=labels, vocab_size=self.reference.shape[-1])
            policy = former_target_logits(self.policy, labels)
            kl_sum = unchunked_token_kl_sum(policy, former_target_logits(self.reference, labels), 1.0)
        (LAMBDA * kl_sum / max(len(policy), 1)).backward()


def batch_for(args: argparse.Namespace, vocab: int, device: torch.device) -> dict:
    ids = torch.randint(vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def step_peak(args: argparse.Namespace, variant: str) -> int | None:
    """Peak memory growth over one step of ``variant`` at ``--memory_vocab``, after a warm-up step (optimizer state)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = llama(args, args.memory_vocab).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    anchor = OutputAnchor(model, LAMBDA, args.temperature)
    step = Step(model, optimizer, anchor, variant, batch_for(args, args.memory_vocab, device), args.temperature)
    step()
    with PeakMemory(device) as mem:
        step()
    return mem.delta


def kl_term_peak(args: argparse.Namespace, form: str) -> int | None:
    """Peak memory growth over the KL term's forward and backward on (tokens, vocab) rows, beyond the rows."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = args.batch_size * (args.seq_len - 1)
    policy = torch.randn(rows, args.memory_vocab, device=device, requires_grad=True)
    reference = torch.randn(rows, args.memory_vocab, device=device)
    with PeakMemory(device) as mem:
        KL_FORMS[form](policy, reference, args.temperature).backward()
    return mem.delta


def in_fresh_process(fn, *job):
    """Each measurement in its own process: the peak of one does not hide another's."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of the timed model (SmolLM2's)")
    parser.add_argument("--memory_vocab", type=int, default=128256, help="vocabulary of the memory runs (Llama 3's)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv_heads", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4, help="timed steps of each variant")
    parser.add_argument("--part_repeats", type=int, default=10, help="timed calls of each KL part alone")
    add_run_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    model = llama(args, args.vocab).to(device)
    anchor = OutputAnchor(model, LAMBDA, args.temperature)
    batch = batch_for(args, args.vocab, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps = {v: Step(model, optimizer, anchor, v, batch, args.temperature) for v in VARIANTS}
    wall, cpu = call_times(steps, device, args.warmup, args.repeats, order_seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    parts = {v: KLPart(model, v, batch) for v in KL_FORMS}
    part_wall, part_cpu = call_times(parts, device, args.warmup, args.part_repeats, order_seed=0)
    del model, optimizer, anchor, steps, parts

    def median_ms(times):
        return {v: 1e3 * statistics.median(times[v]) for v in VARIANTS}

    wall_ms, cpu_ms = median_ms(wall), median_ms(cpu)
    lines = [
        "| variant | median ms (wall / CPU) | min–max wall ms | step vs no penalty (wall / CPU) |",
        "|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        ratios = " / ".join(f"{100 * (ms[v] / ms['no penalty'] - 1):+.1f}%" for ms in (wall_ms, cpu_ms))
        lines.append(f"| {v} | {wall_ms[v]:,.0f} / {cpu_ms[v]:,.0f} | {1e3 * min(wall[v]):,.0f}–"
                     f"{1e3 * max(wall[v]):,.0f} | {'—' if v == 'no penalty' else ratios} |")
    lines += ["", "| KL form | beyond the reference forward, % of the no-penalty step (wall / CPU) |", "|---|---:|"]
    for form in KL_FORMS:
        beyond = [100 * (ms[form] - ms["reference forward alone"]) / ms["no penalty"] for ms in (wall_ms, cpu_ms)]
        lines.append(f"| {form} | {beyond[0]:+.1f}% / {beyond[1]:+.1f}% |")
    lines += ["", f"The KL part alone ({args.part_repeats} repeats; `KLPart`), τ = 1:", "",
              "| KL form | median ms (wall / CPU) | % of the no-penalty step (wall / CPU) |", "|---|---:|---:|"]
    for form in KL_FORMS:
        part_ms = [1e3 * statistics.median(times[form]) for times in (part_wall, part_cpu)]
        share = [100 * ms / step["no penalty"] for ms, step in zip(part_ms, (wall_ms, cpu_ms))]
        lines.append(f"| {form} | {part_ms[0]:,.0f} / {part_ms[1]:,.0f} | {share[0]:.1f}% / {share[1]:.1f}% |")
    timing = "\n".join(lines)
    print(timing, flush=True)

    peaks = {v: in_fresh_process(step_peak, args, v) for v in VARIANTS}
    term_peaks = {f: in_fresh_process(kl_term_peak, args, f) for f in KL_FORMS}
    logits_bytes = args.batch_size * args.seq_len * args.memory_vocab * 4
    lines = ["| variant | peak Δ of a step, MiB | vs no penalty |", "|---|---:|---:|"]
    for v in VARIANTS:
        ratio = "—" if None in (peaks[v], peaks["no penalty"]) else f"{peaks[v] / peaks['no penalty']:.2f}×"
        lines.append(f"| {v} | {mib(peaks[v])} | {ratio} |")
    lines += ["", "| KL term alone (forward + backward, beyond its input rows) | peak Δ MiB |", "|---|---:|"]
    lines += [f"| {f} | {mib(term_peaks[f])} |" for f in KL_FORMS]
    memory = "\n".join(lines)
    print(memory)

    body = "\n\n".join([
        f"## KL anchor term (`bench_kl.py`, {device.type})",
        environment(
            device,
            f"Llama from its config, random weights: {args.layers} layers, width {args.hidden}, tied embeddings; "
            f"{args.batch_size} × {args.seq_len} tokens per step, fp32, AdamW, λ = {LAMBDA}, τ = {args.temperature}",
            "the machine is shared with other jobs (2 cores): wall times include their load, CPU times leave out the "
            "time the cores were taken; compare the rows with one another, not with other runs",
        ),
        (f"### Time per step, vocabulary {args.vocab:,} ({n_params / 1e6:.1f}M parameters); "
         f"{args.repeats} repeats after {args.warmup} warm-up, medians"),
        timing,
        f"### Peak memory, vocabulary {args.memory_vocab:,} (one fp32 logits tensor: {mib(logits_bytes)} MiB)",
        (f"Each in a fresh process; {PeakMemory.label(device)}, over one step after a warm-up step; the KL term "
         f"alone on {args.batch_size * (args.seq_len - 1)} rows."),
        memory,
    ])
    write_section(args.out, f"bench_kl:{device.type}", body)


if __name__ == "__main__":
    main()
