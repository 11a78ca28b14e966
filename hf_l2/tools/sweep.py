"""`hf-l2 sweep`: run a recipe over a grid of penalties × seeds and report target metric, forgetting and drift.

Each run is the recipe itself (`main(argv)`, in this process) with `--l2_mode`, `--l2_coef`, `--l2_kl_coef`,
`--seed` and `--output_dir` set by the sweep and every other argument passed through. One extra run evaluates the
starting model without training. Per run the sweep keeps the recipe's `eval_*` metrics (with
`--pretrain_validation_file` also `eval_pretrain_*`: the pretraining domain, i.e. what was forgotten) and
measures the drift ‖θ − θ₀‖ between the saved model and the starting one. The results are written as
`results.jsonl`, a markdown table and a plot (see `hf_l2.tools.sweep_report`), from this invocation's runs only.

    hf-l2 sweep --recipe gpt2_generation --l2_mode none l2 l2_sp --l2_coef 1e-3 1e-2 1e-1 --l2_kl_coef 0.1 1 \\
        --wise_ft_weight 0.25 0.5 0.75 --seeds 0 1 2 \\
        --output_dir runs/sweep -- --model_name_or_path gpt2 --train_file target.txt \\
        --validation_file target_valid.txt --pretrain_validation_file general_valid.txt --max_steps 500

Not `Trainer.hyperparameter_search`: that optimizes one objective over sampled trials (optuna / ray), while a
sweep here is a fixed grid whose every point is reported, with several metrics and seeds.

`--l2_kl_coef` values add the output-space anchor as one more method (`kl`, run with `l2_mode none`): a curve
beside L2-SP's on the same frontier, to see whether anchoring the weights or the predictions forgets less;
`--asft_coef` values add Anchored SFT (`asft`: the same KL with DFT token weighting).
`--wise_ft_weight` values add WiSE-FT (`wise_ft`): each `none` run interpolated back toward θ₀ at weight t and
evaluated. With `l2_sp_fisher`, F is computed once, by the first such run, and loaded by the others.
`--jobs N` runs N recipe calls at a time in worker processes.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_l2.anchor import read_weights
from hf_l2.config import MODES
from hf_l2.saved_state import FISHER_FILE
from hf_l2.tools.interpolate import interpolate_run
from hf_l2.tools.recipe_common import RecipeInputError, load_recipe
from hf_l2.tools.recipe_runs import RUN_DEFAULTS, drift, run_recipe, worker_pool, write_rows

# Set by the sweep for every run; the recipe arguments may not set them.
OWNED_FLAGS = ("--l2_mode", "--l2_coef", "--l2_kl_coef", "--l2_token_weighting", "--seed", "--output_dir",
               "--do_train", "--do_eval")
SHOWN = ("perplexity", "bleu", "chrf", "pretrain_perplexity", "pretrain_bleu", "pretrain_chrf")  # progress lines


KL = "kl"  # the sweep's name for the output-space anchor: `l2_mode none` with `l2_kl_coef` λ
ASFT = "asft"  # Anchored SFT: the KL anchor at λ plus `l2_token_weighting dft`
WISE_FT = "wise_ft"  # the sweep's name for WiSE-FT: each `none` run interpolated back toward θ₀ at weight t


@dataclass(frozen=True)
class Setting:
    """One method at one strength: `l2_mode` and α (0 for `none`), `kl` or `asft` and λ, or `wise_ft` and t."""

    mode: str
    coef: float

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "none"
        return f"{self.mode} {({KL: 'λ', ASFT: 'λ', WISE_FT: 't'}).get(self.mode, 'α')}={self.coef:g}"

    @property
    def slug(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}-{self.coef:g}"

    @property
    def flags(self) -> list[str]:
        """The recipe flags of a training run (a `wise_ft` setting trains nothing: it evaluates interpolations)."""
        if self.mode in (KL, ASFT):
            weighting = "dft" if self.mode == ASFT else "none"
            return ["--l2_mode", "none", "--l2_kl_coef", repr(self.coef), "--l2_token_weighting", weighting]
        return ["--l2_mode", self.mode, "--l2_coef", repr(self.coef)]


def grid(modes: list[str], coefs: list[float], kl_coefs: list[float] = (),
         wise_ft_weights: list[float] = (), asft_coefs: list[float] = ()) -> list[Setting]:
    """`none` once, then every other mode at every α, in the order given, then `kl` at every λ, `asft` at every λ,
    then `wise_ft` at every t."""
    for flag, values in (("--l2_kl_coef", kl_coefs), ("--asft_coef", asft_coefs)):
        bad = [c for c in values if not (math.isfinite(c) and c >= 0)]
        if bad:
            raise RecipeInputError(f"`{flag}` {bad}: every λ must be a finite number ≥ 0.")
    bad = [t for t in wise_ft_weights if not 0 <= t <= 1]
    if bad:
        raise RecipeInputError(f"`--wise_ft_weight` {bad}: every t must be in [0, 1] (0 is θ₀, 1 the `none` run).")
    if wise_ft_weights and "none" not in modes:
        raise RecipeInputError("`--wise_ft_weight` interpolates the `none` runs: add `none` to `--l2_mode`.")
    return (_weight_grid(modes, coefs) + [Setting(KL, float(c)) for c in dict.fromkeys(kl_coefs)]
            + [Setting(ASFT, float(c)) for c in dict.fromkeys(asft_coefs)]
            + [Setting(WISE_FT, float(t)) for t in dict.fromkeys(wise_ft_weights)])


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


def with_model(recipe_args: list[str], model: str | Path) -> list[str]:
    """The recipe arguments with `--model_name_or_path` replaced by ``model``."""
    out = [arg for arg in recipe_args if not arg.startswith("--model_name_or_path=")]
    return [str(model) if i and out[i - 1] == "--model_name_or_path" else arg for i, arg in enumerate(out)]


@dataclass
class Run:
    """One recipe call of the sweep: its folder name under `runs/`, the flags it adds, and its row's fields."""

    name: str
    flags: list[str]
    row: dict
    recipe_args: list[str]
    measured: str | None = None  # the model folder whose drift is reported (default: the run's output folder)


def run_sweep(
    recipe: str,
    recipe_args: list[str],
    settings: list[Setting],
    seeds: list[int],
    output_dir: str | Path,
    jobs: int = 1,
    pool: Executor | None = None,
) -> list[dict]:
    """Run the recipe for every (setting, seed), plus once on the untrained starting model; return one row per run.

    Each row holds `setting`, `mode`, `coef`, `seed`, the recipe's `eval_*` metrics and `drift`. Earlier results
    under `output_dir` are deleted first, so nothing reported can come from a previous invocation. With ``jobs``
    > 1 the runs go to that many worker processes (each run is independent and seeded: the same rows either way),
    or to ``pool`` when one is given (the demo shares one between its tasks).

    Two methods reuse earlier runs. `l2_sp_fisher`: F depends on θ₀ and the Fisher data, not on α, so the first
    `l2_sp_fisher` run computes it (on its seed's sample) and the others load it with `--l2_fisher_path`, unless
    the recipe arguments give one. `wise_ft`: the `none` run of each seed, interpolated at t
    (`hf-l2 interpolate`), then evaluated like the starting model.
    """
    if not settings or not seeds:
        raise RecipeInputError("The sweep needs at least one setting and one seed.")
    seeds = list(dict.fromkeys(seeds))  # a repeated seed would repeat a run, not add one
    start_path = starting_point(recipe_args)
    load_recipe(recipe)  # a wrong name or path fails here, before any run
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / "runs", ignore_errors=True)
    for stale in ("results.jsonl", "results.md", "results.png"):
        (output_dir / stale).unlink(missing_ok=True)
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True)
    evaluate = ["--do_train", "false", "--do_eval", "true"]
    first = [Run("start", evaluate, {"setting": "start", "mode": "start", "coef": 0.0, "seed": None}, recipe_args)]
    later: list[Run] = []
    shares_fisher = not any(a.split("=")[0] == "--l2_fisher_path" for a in recipe_args)
    fisher_from: str | None = None  # F's file, once the run that computes it is planned
    for setting in settings:
        for seed in seeds:
            row = {"setting": setting.label, "mode": setting.mode, "coef": setting.coef, "seed": seed}
            name = f"{setting.slug}-seed{seed}"
            if setting.mode == WISE_FT:
                folder = runs_dir / f"{WISE_FT}-seed{seed}" / f"weight-{setting.coef:g}"
                later.append(Run(name, evaluate, row, with_model(recipe_args, folder), measured=str(folder)))
                continue
            flags = ["--do_train", "true", "--do_eval", "true", *setting.flags, "--seed", str(seed)]
            if setting.mode == "l2_sp_fisher" and shares_fisher:
                if fisher_from:
                    later.append(Run(name, flags + ["--l2_fisher_path", fisher_from], row, recipe_args))
                    continue
                fisher_from = str(runs_dir / name / FISHER_FILE)
            first.append(Run(name, flags, row, recipe_args))
    total = len(first) + len(later)
    done: dict[str, dict] = {}
    threads = torch.get_num_threads()

    def finished(run: Run, metrics: dict, seconds: float) -> None:
        if not any(key.startswith("eval_") for key in metrics):
            raise RuntimeError(f"Run {run.name}: the recipe returned no eval_* metrics, only {sorted(metrics)}.")
        done[run.name] = metrics
        shown = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.removeprefix("eval_") in SHOWN}
        print(f"[{len(done)}/{total}] {run.name} ({seconds:.0f} s): "
              + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)

    def execute(batch: list[Run], pool) -> None:
        argvs = [[*RUN_DEFAULTS, *run.recipe_args, *run.flags, "--output_dir", str(runs_dir / run.name)]
                 for run in batch]
        logs = [runs_dir / f"{run.name}.log" for run in batch]
        if pool is None:
            for run, argv, log in zip(batch, argvs, logs):
                finished(run, *run_recipe(recipe, argv, log, threads))
            return
        futures = {pool.submit(run_recipe, recipe, argv, log, threads): run
                   for run, argv, log in zip(batch, argvs, logs)}
        for future in as_completed(futures):
            finished(futures[future], *future.result())

    owned = worker_pool(jobs) if pool is None else None
    pool = pool or owned
    try:
        execute(first, pool)
        wise_ft = sorted(s.coef for s in settings if s.mode == WISE_FT)
        for seed in seeds if wise_ft else ():
            interpolate_run(str(runs_dir / f"none-seed{seed}"), wise_ft, str(runs_dir / f"{WISE_FT}-seed{seed}"),
                            base_model=start_path)
        execute(later, pool)
    finally:
        if owned is not None:
            owned.shutdown(cancel_futures=True)
    start_weights = read_weights(start_path)
    rows = []
    for run in first + later:
        measured = run.measured or runs_dir / run.name
        rows.append({**run.row, "drift": 0.0 if run.name == "start" else drift(measured, start_weights),
                     **done[run.name]})
    order = {s.label: i for i, s in enumerate(settings)}
    rows[1:] = sorted(rows[1:], key=lambda r: (order[r["setting"]], seeds.index(r["seed"])))
    write_rows(rows, output_dir)
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
    parser.add_argument("--asft_coef", nargs="+", type=float, default=[],
                        help="λ values of Anchored SFT, one more method, `asft`: the KL anchor at λ with DFT token "
                        "weighting (l2_token_weighting dft), l2_mode none.")
    parser.add_argument("--wise_ft_weight", nargs="+", type=float, default=[],
                        help="t values of WiSE-FT, one more method, `wise_ft`: each `none` run interpolated toward "
                        "θ₀, (1 − t)·θ₀ + t·θ, and evaluated (needs `none` in --l2_mode).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds per setting (spread).")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs at a time, each in its own process (results are the same as one at a time).")
    parser.add_argument("--output_dir", required=True, help="Runs, results.jsonl, results.md and results.png.")
    parser.add_argument("--title", help="Title of the table and plot (default: the recipe's name).")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER,
                        help="After `--`: the recipe's own arguments, including --model_name_or_path.")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    import datasets

    from hf_l2.tools.sweep_report import write_report

    datasets.disable_progress_bars()
    recipe_args = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    if args.jobs < 1:
        sys.exit(f"error: `--jobs` must be at least 1, got {args.jobs}.")
    try:
        settings = grid(args.l2_mode, args.l2_coef, args.l2_kl_coef, args.wise_ft_weight, args.asft_coef)
        rows = run_sweep(args.recipe, recipe_args, settings, args.seeds, args.output_dir, args.jobs)
    except RecipeInputError as err:
        sys.exit(f"error: {err}")
    table, figure = write_report(rows, args.output_dir, args.title or Path(args.recipe).stem)
    print(table.read_text(encoding="utf-8") + f"\nPlot: {figure}")
    return 0
