"""Memory of the output anchor (`l2_kl_coef`): θ₀ from the stored anchor vs a frozen deep copy of the model.

    python benchmarks/bench_output_anchor.py                      # CPU defaults, ~1 min
    python benchmarks/bench_output_anchor.py --device cuda --n_layer 12 --n_embd 768 --seq_len 512

For each `l2_mode`, two ways to train with task + Ω + λ·KL(p_θ₀ ‖ p_θ): `L2Trainer` with `l2_kl_coef` (the reference
forward runs the model itself with θ₀), and the way other implementations do it, an `L2Trainer` whose
`compute_loss` adds the KL from a frozen deep copy of the starting model. "θ₀ bytes" counts the tensors each keeps
besides the model (the penalty's anchors, the KL's own snapshot or the copy's parameters and buffers): exact, from
the tensors. "peak Δ" is the peak memory growth over building the trainer and a few optimizer steps, which also
holds the activations and the optimizer state (the same in both).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import tempfile

import torch
import torch.nn.functional as F
from common import PeakMemory, RandomTokens, add_run_arguments, default_device, environment, mib, write_section
from transformers import GPT2Config, GPT2LMHeadModel

from hf_l2 import L2Config, L2Trainer

LAMBDA = 1.0


class DeepCopyKL(L2Trainer):
    """task + Ω + λ·KL with the reference from a frozen deep copy (how a second-model implementation does it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen = copy.deepcopy(self.model).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            with torch.no_grad():
                reference = self.frozen(**inputs).logits[:, :-1]
            mask = inputs["labels"][:, 1:] != -100
            kl = F.kl_div(outputs.logits[:, :-1][mask].float().log_softmax(-1),
                          reference[mask].float().log_softmax(-1), log_target=True, reduction="sum")
            loss = loss + LAMBDA * kl / num_items_in_batch
        return (loss, outputs) if return_outputs else loss

    def held(self) -> int:
        return tensor_bytes(list(self.frozen.parameters()) + list(self.frozen.buffers()))


class AnchorKL(L2Trainer):
    def held(self) -> int:
        return tensor_bytes(self._l2_kl.own.values())


def tensor_bytes(tensors) -> int:
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


def run(cls, mode: str, args: argparse.Namespace, device: torch.device) -> tuple[int, int | None]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(args.n_embd // 64, 1),
                        n_positions=args.seq_len, vocab_size=args.vocab_size)
    model = GPT2LMHeadModel(config).to(device)
    data = RandomTokens(args.batch_size * args.steps, args.seq_len, config.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        settings = L2Config(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, report_to="none",
            save_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True, l2_mode=mode,
            l2_kl_coef=LAMBDA if cls is AnchorKL else 0.0, dataloader_num_workers=0,
        )
        with PeakMemory(device) as peak:
            trainer = cls(model=model, args=settings, train_dataset=data)
            penalty = [t for term in filter(None, trainer.l2_terms) for t in term.anchors.values()]
            trainer.train()
        held = trainer.held() + tensor_bytes(penalty)
    return held, peak.delta


def run_alone(*job) -> tuple[int, int | None]:
    """`run` in a fresh process, so that no variant inherits another's heap."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run, job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_bytes = tensor_bytes(GPT2LMHeadModel(GPT2Config(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(args.n_embd // 64, 1), n_positions=args.seq_len,
        vocab_size=args.vocab_size)).parameters())
    rows = []
    for mode in ("l2_sp", "none"):
        results = {name: run_alone(cls, mode, args, device) for name, cls in (("deep copy", DeepCopyKL),
                                                                        ("l2_kl_coef", AnchorKL))}
        (copy_held, copy_peak), (ours_held, ours_peak) = results["deep copy"], results["l2_kl_coef"]
        for name, (held, peak) in results.items():
            rows.append(f"| {mode} | {name} | {mib(held)} | {held / model_bytes:.2f} | {mib(peak)} |")
        rows.append(f"| {mode} | ratio l2_kl_coef / deep copy | {ours_held / copy_held:.2f} | | "
                    f"{'n/a' if None in (ours_peak, copy_peak) else f'{ours_peak / copy_peak:.2f}'} |")
    body = "\n".join([
        f"## Output anchor memory (`bench_output_anchor.py`, {device.type})",
        "",
        environment(device, f"GPT-2 {args.n_layer} layers × {args.n_embd}, vocabulary {args.vocab_size}, "
                            f"{model_bytes / 2**20:,.0f} MiB of parameters; batch {args.batch_size} × "
                            f"{args.seq_len} tokens, {args.steps} AdamW steps, λ = {LAMBDA}",
                    f"peak Δ: {PeakMemory.label(device)}, over building the trainer and training"),
        "",
        "| l2_mode | reference | θ₀ bytes held, MiB | × model | peak Δ MiB |",
        "|---|---|---:|---:|---:|",
        *rows,
    ])
    print(body)
    write_section(args.out, f"bench_output_anchor:{device.type}", body)


if __name__ == "__main__":
    main()
