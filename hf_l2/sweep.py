"""`hf-l2 sweep`: run a recipe over a grid of penalties × seeds and report target metric, forgetting and drift.

Each run is the recipe itself (`main(argv)`, in this process) with `--l2_mode`, `--l2_coef`, `--l2_kl_coef`,
`--seed` and `--output_dir` set by the sweep and every other argument passed through. One extra run evaluates the
starting model without training. Per run the sweep keeps the recipe's `eval_*` metrics (with
`--pretrain_validation_file` also `eval_pretrain_*`: the pretraining domain, i.e. what was forgotten) and
measures the drift ‖θ − θ₀‖ between the saved model and the starting one. The results are written as
`results.jsonl`, a markdown table and a plot (see `hf_l2.sweep_report`), from this invocation's runs only.

    hf-l2 sweep --recipe gpt2_generation --l2_mode none l2 l2_sp --l2_coef 1e-3 1e-2 1e-1 --l2_kl_coef 0.1 1 \\
        --seeds 0 1 2 \\
        --output_dir runs/sweep -- --model_name_or_path gpt2 --train_file target.txt \\
        --validation_file target_valid.txt --pretrain_validation_file general_valid.txt --max_steps 500

Not `Trainer.hyperparameter_search`: that optimizes one objective over sampled trials (optuna / ray), while a
sweep here is a fixed grid whose every point is reported, with several metrics and seeds.

`--l2_kl_coef` values add the output-space anchor as one more method (`kl`, run with `l2_mode none`): a curve
beside L2-SP's on the same frontier, to see whether anchoring the weights or the predictions forgets less.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from .anchor import read_weights
from .config import MODES
from .recipe_common import RecipeInputError, load_recipe

# Set by the sweep for every run; the recipe arguments may not set them.
OWNED_FLAGS = ("--l2_mode", "--l2_coef", "--l2_kl_coef", "--seed", "--output_dir", "--do_train", "--do_eval")
# Quiet in-process runs without checkpoints; placed before the user's recipe arguments, so that those win.
RUN_DEFAULTS = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "warning",
                "--num_samples", "0"]
SHOWN = ("perplexity", "bleu", "chrf", "pretrain_perplexity", "pretrain_bleu", "pretrain_chrf")  # progress lines


KL = "kl"  # the sweep's name for the output-space anchor: `l2_mode none` with `l2_kl_coef` λ


@dataclass(frozen=True)
class Setting:
    """One penalty: `l2_mode` and α (0 for `none`), or `kl` and λ."""

    mode: str
    coef: float

    @property
    def label(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode} {'λ' if self.mode == KL else 'α'}={self.coef:g}"

    @property
    def slug(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}-{self.coef:g}"

    @property
    def flags(self) -> list[str]:
        if self.mode == KL:
            return ["--l2_mode", "none", "--l2_kl_coef", repr(self.coef)]
        return ["--l2_mode", self.mode, "--l2_coef", repr(self.coef)]


def grid(modes: list[str], coefs: list[float], kl_coefs: list[float] = ()) -> list[Setting]:
    """`none` once, then every other mode at every α, in the order given, then `kl` at every λ."""
    bad = [c for c in kl_coefs if not (math.isfinite(c) and c >= 0)]
    if bad:
        raise RecipeInputError(f"`--l2_kl_coef` {bad}: every λ must be a finite number ≥ 0.")
    return _weight_grid(modes, coefs) + [Setting(KL, float(c)) for c in dict.fromkeys(kl_coefs)]


def _weight_grid(modes: list[str], coefs: list[float]) -> list[Setting]:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise RecipeInputError(f"`--l2_mode` {unknown}: choose from {list(MODES)}.")
    bad = [c for c in coefs if not (math.isfinite(c) and c >= 0)]
    if bad:
        raise RecipeInputError(f"`--l2_coef` {bad}: every α must be a finite number ≥ 0.")
    penalized = [m for m in dict.fromkeys(modes) if m != "none"]
    if penalized and not coefs:
        raise RecipeInputError(f"`--l2_coef`: give at least one α for {penalized}.")
    settings = [Setting("none", 0.0)] if "none" in modes else []
    return settings + [Setting(mode, float(coef)) for mode in penalized for coef in dict.fromkeys(coefs)]


def starting_point(recipe_args: list[str]) -> str:
    """The recipe's `--model_name_or_path`: the θ₀ every run's drift is measured from."""
    if recipe_args and Path(recipe_args[0]).suffix in (".yaml", ".yml", ".json"):
        raise RecipeInputError(
            f"{recipe_args[0]}: the sweep passes the recipe's arguments as flags, which a config file would not "
            "combine with; give its settings as flags after `--`."
        )
    for flag in OWNED_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in recipe_args):
            raise RecipeInputError(
                f"`{flag}` is set by the sweep for each run: remove it from the recipe arguments "
                "(use the sweep's own `--l2_mode`, `--l2_coef`, `--seeds`, `--output_dir`)."
            )
    value = None
    for i, arg in enumerate(recipe_args):
        if arg == "--model_name_or_path" and i + 1 < len(recipe_args):
            value = recipe_args[i + 1]
        elif arg.startswith("--model_name_or_path="):
            value = arg.split("=", 1)[1]
    if value is None:
        raise RecipeInputError(
            "Pass `--model_name_or_path` among the recipe arguments (after `--`): each run's drift is measured from it."
        )
    return value


def drift(model_dir: str | Path, start: dict[str, torch.Tensor]) -> float:
    """‖θ − θ₀‖ over the floating-point weights the two saved models share."""
    weights = read_weights(str(model_dir))
    shared = [n for n, v in weights.items() if n in start and v.is_floating_point() and v.shape == start[n].shape]
    if not shared:
        raise RuntimeError(f"{model_dir} shares no weight (same name and shape) with the starting model.")
    return math.sqrt(sum((weights[n].double() - start[n].double()).pow(2).sum().item() for n in shared))


def run_sweep(
    recipe: str,
    recipe_args: list[str],
    settings: list[Setting],
    seeds: list[int],
    output_dir: str | Path,
) -> list[dict]:
    """Run the recipe for every (setting, seed), plus once on the untrained starting model; return one row per run.

    Each row holds `setting`, `mode`, `coef`, `seed`, the recipe's `eval_*` metrics and `drift`. Earlier results
    under `output_dir` are deleted first, so nothing reported can come from a previous invocation.
    """
    if not settings or not seeds:
        raise RecipeInputError("The sweep needs at least one setting and one seed.")
    seeds = list(dict.fromkeys(seeds))  # a repeated seed would repeat a run, not add one
    start_path = starting_point(recipe_args)
    module = load_recipe(recipe)
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / "runs", ignore_errors=True)
    for stale in ("results.jsonl", "results.md", "results.png"):
        (output_dir / stale).unlink(missing_ok=True)
    (output_dir / "runs").mkdir(parents=True)
    total = 1 + len(settings) * len(seeds)

    def call(name: str, extra: list[str]) -> dict:
        """One recipe run; its printed output goes to `runs/<name>.log` (a failure still raises here)."""
        started = time.perf_counter()
        argv = [*RUN_DEFAULTS, *recipe_args, *extra, "--output_dir", str(output_dir / "runs" / name)]
        with open(output_dir / "runs" / f"{name}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            metrics = module.main(argv)
        if not any(key.startswith("eval_") for key in metrics):
            raise RuntimeError(f"Run {name}: the recipe returned no eval_* metrics, only {sorted(metrics)}.")
        shown = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.removeprefix("eval_") in SHOWN}
        print(f"[{len(rows) + 1}/{total}] {name} ({time.perf_counter() - started:.0f} s): "
              + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
        return metrics

    rows: list[dict] = []
    rows.append({"setting": "start", "mode": "start", "coef": 0.0, "seed": None, "drift": 0.0,
                 **call("start", ["--do_train", "false", "--do_eval", "true"])})
    start_weights = read_weights(start_path)
    for setting in settings:
        for seed in seeds:
            name = f"{setting.slug}-seed{seed}"
            metrics = call(name, ["--do_train", "true", "--do_eval", "true", *setting.flags, "--seed", str(seed)])
            rows.append({"setting": setting.label, "mode": setting.mode, "coef": setting.coef, "seed": seed,
                         "drift": drift(output_dir / "runs" / name, start_weights), **metrics})
    with open(output_dir / "results.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sweep` on a `hf-l2` command line: `add_sweep_parser(parser.add_subparsers())`."""
    parser = subparsers.add_parser("sweep", help="Run a recipe over l2_mode × α × seeds; table and plot.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True,
                        help="gpt2_generation, marian_translation, or the path of a script with main(argv) that "
                        "takes the shipped recipes' arguments.")
    parser.add_argument("--l2_mode", nargs="+", default=["none", "l2", "l2_sp"], choices=MODES,
                        help="Modes to run (none runs once, the others at every α; l2_sp_fisher computes F on the "
                        "recipe's --fisher_file, default its training data). Default: none l2 l2_sp.")
    parser.add_argument("--l2_coef", nargs="+", type=float, default=[], help="α values for the penalized modes.")
    parser.add_argument("--l2_kl_coef", nargs="+", type=float, default=[],
                        help="λ values of the output-space anchor (KL to the starting model's predictions), run as "
                        "one more method, `kl`, with l2_mode none.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds per setting (spread).")
    parser.add_argument("--output_dir", required=True, help="Runs, results.jsonl, results.md and results.png.")
    parser.add_argument("--title", help="Title of the table and plot (default: the recipe's name).")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER,
                        help="After `--`: the recipe's own arguments, including --model_name_or_path.")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    import datasets

    from .sweep_report import write_report

    datasets.disable_progress_bars()
    recipe_args = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    try:
        rows = run_sweep(args.recipe, recipe_args, grid(args.l2_mode, args.l2_coef, args.l2_kl_coef), args.seeds, args.output_dir)
    except RecipeInputError as err:
        sys.exit(f"error: {err}")
    table, figure = write_report(rows, args.output_dir, args.title or Path(args.recipe).stem)
    print(table.read_text(encoding="utf-8") + f"\nPlot: {figure}")
    return 0
