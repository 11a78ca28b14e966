"""`hf-l2 demo`: the main job end to end, offline, in minutes on a CPU.

For generation and for translation: prepare the data (cached), build a small starting model by pretraining it
on the pretraining domain (cached, keyed by its settings), then sweep the fine-tuning recipe on a small
fine-tuning-domain set over every method × strength × seed: `l2_mode` none / l2 / l2_sp / l2_sp_fisher at each α
(F from pretraining-domain data, the textbook choice), the output-space anchor (KL) at each λ and WiSE-FT of the
`none` runs at each t. Report the target metric, the pretraining-domain metric (what was forgotten) and the drift
from the starting model, per setting, mean ± std, and one frontier plot per task with a curve per method.
Then (unless `--no-real_model`) the real-model comparison on SmolLM2-135M-Instruct, `hf-l2 real-model --size demo`.
Every number in the tiny-model tables comes from runs made by this invocation; the real-model runs are stored
and resumed as the study's are.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from hf_l2.config import MODES
from hf_l2.tools.demo import real_model
from hf_l2.tools.demo.data import DemoData, DemoDataError, prepare
from hf_l2.tools.demo.float_path import float_path
from hf_l2.tools.demo.starting_models import GENERATION, RECIPES, TRANSLATION, Pretraining, starting_model
from hf_l2.tools.recipe_common import RecipeInputError
from hf_l2.tools.recipe_runs import quiet_process, worker_pool
from hf_l2.tools.sweep import WISE_FT, grid, run_sweep
from hf_l2.tools.sweep_report import write_report

TASKS = tuple(RECIPES)
DEMO_MODES = ("none", "l2", "l2_sp", "l2_sp_fisher")
COEFS = (0.01, 0.1, 1.0)  # α of l2, l2_sp and l2_sp_fisher
KL_COEFS = (0.1, 1.0, 10.0)  # λ of the output-space anchor
WISE_FT_WEIGHTS = (0.25, 0.5, 0.75)  # t of WiSE-FT
TITLES = {
    "generation": "Generation: tiny GPT-2 pretrained on Python's language reference, "
    "fine-tuned on Django's UI messages",
    "translation": "Translation en→de: tiny Marian pretrained on the messages of JupyterLab, Mercurial, Trac and "
    "Plone, fine-tuned on Django's",
}


@dataclass(frozen=True)
class FineTuning:
    """The fine-tuning runs of one task (the same for every setting and seed)."""

    steps: int
    batch_size: int
    learning_rate: float
    max_eval_samples: int
    fisher_samples: int  # pretraining-domain examples F is averaged over (computed once per task)


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; `FULL` is what `hf-l2 demo` runs."""

    pretraining: dict[str, Pretraining]
    fine_tuning: dict[str, FineTuning]


FULL = Sizes(
    pretraining={"generation": GENERATION, "translation": TRANSLATION},
    fine_tuning={
        "generation": FineTuning(steps=80, batch_size=8, learning_rate=2e-3, max_eval_samples=64, fisher_samples=256),
        "translation": FineTuning(steps=80, batch_size=16, learning_rate=1e-3, max_eval_samples=128,
                                  fisher_samples=256),
    },
)


def recipe_arguments(task: str, data: DemoData, start: Path, tuning: FineTuning, context: int, cache: Path):
    """The recipe's command line for one fine-tuning run (the sweep adds mode, α, seed and output folder)."""
    files = data.generation if task == "generation" else data.translation
    argv = [
        "--model_name_or_path", str(start), "--cache_dir", str(cache),
        "--train_file", str(files("target_train")), "--validation_file", str(files("target_validation")),
        "--pretrain_validation_file", str(files("pretrain_validation")),
        "--fisher_file", str(files("pretrain_train")), "--l2_fisher_samples", str(tuning.fisher_samples),
        "--max_eval_samples", str(tuning.max_eval_samples), "--max_steps", str(tuning.steps),
        "--per_device_train_batch_size", str(tuning.batch_size), "--per_device_eval_batch_size", "64",
        "--learning_rate", str(tuning.learning_rate), "--lr_scheduler_type", "constant", "--weight_decay", "0",
        "--use_cpu", "true",
    ]
    if task == "generation":
        return argv + ["--block_size", str(context)]
    # Batches of messages of similar lengths: little padding to compute.
    return argv + ["--max_source_length", str(context), "--max_target_length", str(context),
                   "--train_sampling_strategy", "group_by_length"]


def run_demo(
    output_dir: str | Path = "runs/demo",
    cache_dir: str | Path = "runs/demo/cache",
    tasks: tuple[str, ...] = TASKS,
    modes: tuple[str, ...] = DEMO_MODES,
    coefs: tuple[float, ...] = COEFS,
    seeds: tuple[int, ...] = (0, 1, 2),
    sizes: Sizes = FULL,
    kl_coefs: tuple[float, ...] = KL_COEFS,
    wise_ft_weights: tuple[float, ...] = WISE_FT_WEIGHTS,
    jobs: int = 1,
    real_model_size: real_model.StudySize | None = None,
) -> Path:
    """Run the demo; return the path of `demo.md` (the tables, with what was run and how long it took).

    ``jobs`` runs that many recipe calls at a time, each in its own process, from one pool: the starting models
    are submitted first, so the generation runs start while the translation model still pretrains. The numbers
    are the same as with one job. ``real_model_size``: then also the real-model comparison (`hf-l2 real-model`
    at that size, SmolLM2 cached in ``cache_dir``), in this process with every core's thread.
    """
    started = time.perf_counter()
    output_dir, cache_dir = Path(output_dir), Path(cache_dir)
    (output_dir / "demo.md").unlink(missing_ok=True)  # never leave an old report beside a failed run
    settings = grid(list(modes), list(coefs), list(kl_coefs), list(wise_ft_weights))
    data = prepare(cache_dir)
    pool = worker_pool(jobs)
    try:
        starts = starting_models(tasks, data, sizes, cache_dir, pool)
        sections = [task_section(task, start, data, sizes, settings, seeds, output_dir, cache_dir, jobs, pool)
                    for task, start in zip(tasks, starts)]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if real_model_size is not None:
        sections.append(real_model_section(output_dir, cache_dir, real_model_size))
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"# hf_l2 demo\n\nSeeds {list(seeds)}; {jobs} run(s) at a time, {torch.get_num_threads()} torch thread(s) "
        f"each; Python {platform.python_version()}, torch {torch.__version__}; {float_path()}; data {data.key}; "
        f"{minutes:.1f} min in all.\n\n"
    )
    path = output_dir / "demo.md"
    path.write_text(header + "\n".join(sections), encoding="utf-8")
    return path


def task_section(task: str, start: Callable[[], Path], data: DemoData, sizes: Sizes, settings: list, seeds: tuple,
                 output_dir: Path, cache_dir: Path, jobs: int, pool) -> str:
    """One task's sweep from its starting model (``start()`` waits for it) and its part of `demo.md`."""
    task_started = time.perf_counter()
    tuning = sizes.fine_tuning[task]
    argv = recipe_arguments(task, data, start(), tuning, sizes.pretraining[task].context, cache_dir / "datasets")
    rows = run_sweep(RECIPES[task], argv, settings, list(seeds), output_dir / task, jobs, pool)
    table, figure = write_report(rows, output_dir / task, TITLES[task])
    minutes = (time.perf_counter() - task_started) / 60
    trained = sum(row["mode"] not in ("start", WISE_FT) for row in rows)
    return (
        table.read_text(encoding="utf-8")
        + f"\n![{task}]({figure.relative_to(output_dir)})\n\n{trained} fine-tuning runs of {tuning.steps} "
        f"steps (batch {tuning.batch_size}, lr {tuning.learning_rate:g}), {len(rows) - trained} evaluations "
        f"(the starting model and the WiSE-FT models) in {minutes:.1f} min.\n"
    )


def real_model_section(output_dir: Path, cache_dir: Path, size: real_model.StudySize) -> str:
    """The real-model comparison's part of `demo.md`; its runs are stored and resumed as `hf-l2 real-model`'s."""
    section_started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        table = real_model.run_study(output_dir / "real_model", cache_dir, size)
    finally:
        torch.set_num_threads(threads)
    minutes = (time.perf_counter() - section_started) / 60
    return (table.read_text(encoding="utf-8").replace("# ", "## ", 1)
            + f"\n![real model](real_model/results.png)\n\n{minutes:.1f} min. The whole study (every method and "
            "baseline, 100 steps): `hf-l2 real-model`, described in the repository's docs/real_model.md.\n")


def starting_models(tasks: tuple[str, ...], data: DemoData, sizes: Sizes, cache_dir: Path,
                    pool) -> list[Callable[[], Path]]:
    """Per task, a call that returns its starting model's folder (cached). With a pool every model is submitted
    now and the call waits for its own; without one the call builds it."""
    if pool is None:
        return [partial(starting_model, task, data, sizes.pretraining[task], cache_dir) for task in tasks]
    futures = [pool.submit(_starting_model, task, data, sizes.pretraining[task], cache_dir, torch.get_num_threads())
               for task in tasks]
    return [future.result for future in futures]


def _starting_model(task: str, data: DemoData, settings: Pretraining, cache_dir: Path, threads: int) -> Path:
    quiet_process(threads)
    return starting_model(task, data, settings, cache_dir)


def available_cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs() -> int:
    """One run per CPU core this process may use, at most 4 (the runs are small and one thread each)."""
    return max(1, min(4, available_cores()))


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on a `hf-l2` command line: `add_demo_parser(parser.add_subparsers())`."""
    parser = subparsers.add_parser("demo", help="Run the offline L2-SP demo (generation and translation).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo", help="Where runs, tables and plots go.")
    parser.add_argument("--cache_dir", default="runs/demo/cache", help="Prepared data and starting models.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--l2_mode", nargs="+", choices=MODES, default=list(DEMO_MODES),
                        help="Weight-penalty methods (none runs once, the others at every α).")
    parser.add_argument("--l2_coef", nargs="+", type=float, default=list(COEFS), help="α values.")
    parser.add_argument("--l2_kl_coef", nargs="*", type=float, default=list(KL_COEFS),
                        help="λ values of the output-space anchor (KL to the starting model); none: no KL curve.")
    parser.add_argument("--wise_ft_weight", nargs="*", type=float, default=list(WISE_FT_WEIGHTS),
                        help="t values of WiSE-FT of the `none` runs; none: no WiSE-FT curve.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="Runs at a time, each in its own process (default: the CPU cores, at most 4).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (the models are tiny).")
    parser.add_argument("--real_model", action=argparse.BooleanOptionalAction, default=True,
                        help="Then the real-model comparison on SmolLM2-135M-Instruct (none, l2_sp, KL anchor, "
                        "WiSE-FT; one seed, a few minutes; `--no-real_model` skips it).")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    for flag in ("threads", "jobs"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: `--{flag}` must be at least 1, got {getattr(args, flag)}.")
    quiet_process(args.threads)
    try:
        path = run_demo(args.output_dir, args.cache_dir, tuple(args.tasks), tuple(args.l2_mode), tuple(args.l2_coef),
                        tuple(args.seeds), kl_coefs=tuple(args.l2_kl_coef),
                        wise_ft_weights=tuple(args.wise_ft_weight), jobs=args.jobs,
                        real_model_size=real_model.DEMO if args.real_model else None)
    except (RecipeInputError, DemoDataError) as err:
        sys.exit(f"error: {err}")
    print(path.read_text(encoding="utf-8"))
    return 0
