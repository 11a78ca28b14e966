"""`hf-l2 demo`: the main job end to end, offline, in minutes on a CPU.

For generation and for translation: prepare the data (cached), build a small starting model by pretraining it
on the pretraining domain (cached, keyed by its settings), then sweep the fine-tuning recipe over
`l2_mode` none / l2 / l2_sp × α × seeds on a small fine-tuning-domain set, and report the target metric, the
pretraining-domain metric (what was forgotten) and the drift from the starting model, per setting, mean ± std.
Every number in the report comes from runs made by this invocation.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sweep_report import write_report
from ..recipe_common import RecipeInputError
from ..sweep import grid, run_sweep
from .data import DemoData, DemoDataError, prepare
from .starting_models import GENERATION, RECIPES, TRANSLATION, Pretraining, starting_model

TASKS = tuple(RECIPES)
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


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; `FULL` is what `hf-l2 demo` runs."""

    pretraining: dict[str, Pretraining]
    fine_tuning: dict[str, FineTuning]


FULL = Sizes(
    pretraining={"generation": GENERATION, "translation": TRANSLATION},
    fine_tuning={
        "generation": FineTuning(steps=80, batch_size=8, learning_rate=2e-3, max_eval_samples=64),
        "translation": FineTuning(steps=80, batch_size=16, learning_rate=1e-3, max_eval_samples=128),
    },
)


def recipe_arguments(task: str, data: DemoData, start: Path, tuning: FineTuning, context: int, cache: Path):
    """The recipe's command line for one fine-tuning run (the sweep adds mode, α, seed and output folder)."""
    files = data.generation if task == "generation" else data.translation
    argv = [
        "--model_name_or_path", str(start), "--cache_dir", str(cache),
        "--train_file", str(files("target_train")), "--validation_file", str(files("target_validation")),
        "--pretrain_validation_file", str(files("pretrain_validation")),
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
    modes: tuple[str, ...] = ("none", "l2", "l2_sp"),
    coefs: tuple[float, ...] = (0.01, 0.1, 1.0),
    seeds: tuple[int, ...] = (0, 1, 2),
    sizes: Sizes = FULL,
) -> Path:
    """Run the demo; return the path of `demo.md` (both tables, with what was run and how long it took)."""
    started = time.perf_counter()
    output_dir, cache_dir = Path(output_dir), Path(cache_dir)
    (output_dir / "demo.md").unlink(missing_ok=True)  # never leave an old report beside a failed run
    data = prepare(cache_dir)
    settings = grid(list(modes), list(coefs))
    sections = []
    for task in tasks:
        task_started = time.perf_counter()
        start = starting_model(task, data, sizes.pretraining[task], cache_dir)
        tuning = sizes.fine_tuning[task]
        argv = recipe_arguments(task, data, start, tuning, sizes.pretraining[task].context, cache_dir / "datasets")
        rows = run_sweep(RECIPES[task], argv, settings, list(seeds), output_dir / task)
        table, figure = write_report(rows, output_dir / task, TITLES[task])
        minutes = (time.perf_counter() - task_started) / 60
        sections.append(
            table.read_text(encoding="utf-8")
            + f"\n![{task}]({figure.relative_to(output_dir)})\n\n{len(rows) - 1} fine-tuning runs of {tuning.steps} "
            f"steps (batch {tuning.batch_size}, lr {tuning.learning_rate:g}) and one evaluation of the starting "
            f"model in {minutes:.1f} min.\n"
        )
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"# hf_l2 demo\n\nSeeds {list(seeds)}; {torch.get_num_threads()} CPU thread(s); Python "
        f"{platform.python_version()}, torch {torch.__version__}; data {data.key}; {minutes:.1f} min in all.\n\n"
    )
    path = output_dir / "demo.md"
    path.write_text(header + "\n".join(sections), encoding="utf-8")
    return path


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on a `hf-l2` command line: `add_demo_parser(parser.add_subparsers())`."""
    parser = subparsers.add_parser("demo", help="Run the offline L2-SP demo (generation and translation).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo", help="Where runs, tables and plots go.")
    parser.add_argument("--cache_dir", default="runs/demo/cache", help="Prepared data and starting models.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--l2_coef", nargs="+", type=float, default=[0.01, 0.1, 1.0], help="α values.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the models are tiny).")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    import datasets

    if args.threads < 1:
        sys.exit(f"error: `--threads` must be at least 1, got {args.threads}.")
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    try:
        path = run_demo(args.output_dir, args.cache_dir, tuple(args.tasks), coefs=tuple(args.l2_coef),
                        seeds=tuple(args.seeds))
    except (RecipeInputError, DemoDataError) as err:
        sys.exit(f"error: {err}")
    print(path.read_text(encoding="utf-8"))
    return 0
