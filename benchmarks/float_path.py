"""Which environment variables decide the floating-point path of a CPU training run, and what pinning it costs.

    python benchmarks/float_path.py             # every setting below, each a fresh process; writes RESULTS.md

One short training (AdamW, a 2-layer GPT-2 and a 1-layer Marian at the demo's sizes, 1 thread) runs in a fresh
process per setting: as this CPU picks by itself; as a CPU with AVX2 but no AVX-512 would (emulated: each library
told to use at most AVX2); with `make demo`'s pins (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_CBWR=AVX2`), with them on the emulated AVX2 CPU, and each pin alone. Each prints a hash of the final
parameters: equal hashes are bit-identical training. CPU seconds per setting (process time, so another process
holding a core does not count) give the cost of the pins, as a ratio to this CPU's own choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, environment, write_section

from hf_l2.tools.demo.float_path import PINS

# A CPU with AVX2 and no AVX-512, as each library would see it.
AVX2_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SETTINGS = {
    "this CPU's own choice": {},
    "an AVX2 CPU's own choice (emulated)": AVX2_CPU,
    "pinned (make demo)": PINS,
    "pinned, on the emulated AVX2 CPU": {**AVX2_CPU, **PINS},
    **{f"{name}={value} alone": {name: value} for name, value in PINS.items()},
}
FLOAT_PATH_VARIABLES = {*PINS, *AVX2_CPU}


def train_and_hash(steps: int) -> dict:
    """Runs in the child process: the trainings, their parameter hashes and CPU seconds."""
    from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

    torch.set_num_threads(1)

    def run(model, batch) -> str:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        digest = hashlib.sha256()
        for _, tensor in sorted(model.state_dict().items()):
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    started = time.process_time()
    torch.manual_seed(0)
    gpt2 = run(GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=64)),
               {"input_ids": ids, "labels": ids})
    torch.manual_seed(0)
    marian = run(MarianMTModel(MarianConfig(
        vocab_size=512, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=0,
        decoder_start_token_id=0, max_position_embeddings=64)),
        {"input_ids": ids[:, :32].contiguous(), "labels": ids[:, 32:].contiguous()})
    return {"kernels": torch.backends.cpu.get_cpu_capability(), "gpt2": gpt2, "marian": marian,
            "cpu_seconds": time.process_time() - started}


def in_fresh_process(variables: dict, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FLOAT_PATH_VARIABLES} | variables
    out = subprocess.run([sys.executable, __file__, "--child", str(steps)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved (CPU time: median)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(train_and_hash(args.child)))
        return
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, variables in SETTINGS.items():
            runs[name].append(in_fresh_process(variables, args.steps))
    own = sorted(r["cpu_seconds"] for r in runs["this CPU's own choice"])[args.repeats // 2]
    rows = ["| setting | torch kernels | GPT-2 hash | Marian hash | same every repeat | CPU time vs own choice |",
            "|---|---|---|---|---|---:|"]
    for name, results in runs.items():
        first = results[0]
        stable = all((r["gpt2"], r["marian"]) == (first["gpt2"], first["marian"]) for r in results)
        seconds = sorted(r["cpu_seconds"] for r in results)[args.repeats // 2]
        rows.append(f"| {name} | {first['kernels']} | `{first['gpt2']}` | `{first['marian']}` | "
                    f"{'yes' if stable else 'no'} | {seconds / own:.2f} |")
    body = "\n\n".join([
        "## The floating-point path of CPU runs (`float_path.py`)",
        environment(torch.device("cpu"), f"{args.steps} AdamW steps of each model, 1 thread, {args.repeats} "
                    "fresh processes per setting, interleaved; CPU time: median of the process times"),
        "\n".join(rows),
    ])
    write_section(args.out, "float_path:cpu", body)


if __name__ == "__main__":
    main()
