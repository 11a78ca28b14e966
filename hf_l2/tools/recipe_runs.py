"""A recipe run as `hf-l2 sweep`, the demo and `hf-l2 interpolate --eval` make it: the recipe's own `main(argv)`,
quiet, in this process or in a worker process, and the drift of the model it saved from the starting one."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from hf_l2.anchor import read_weights
from hf_l2.tools.recipe_common import load_recipe

# Quiet in-process runs without checkpoints; placed before the user's recipe arguments, so that those win.
RUN_DEFAULTS = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "warning",
                "--num_samples", "0"]


def drift(model_dir: str | Path, start: dict[str, torch.Tensor]) -> float:
    """‖θ − θ₀‖ between a saved model and the starting weights (`weights_drift`)."""
    return weights_drift(read_weights(str(model_dir)), start, str(model_dir))


def weights_drift(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor], what: str = "the model") -> float:
    """‖θ − θ₀‖ over the floating-point weights both share (same name and shape); for LoRA, pass merged weights."""
    shared = [n for n, v in weights.items() if n in start and v.is_floating_point() and v.shape == start[n].shape]
    if not shared:
        raise RuntimeError(f"{what} shares no weight (same name and shape) with the starting model.")
    return math.sqrt(sum((weights[n].double() - start[n].double()).pow(2).sum().item() for n in shared))


def quiet_process(threads: int) -> None:
    """What every recipe-running process sets first: no `datasets` progress bars, ``threads`` torch threads."""
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(threads)


def run_recipe(recipe: str, argv: list[str], log_path: str | Path, threads: int) -> tuple[dict, float]:
    """One recipe run, `main(argv)`, its printed output in ``log_path`` (a failure still raises here); returns its
    metrics and seconds. Runs in this process or in a worker of the sweep's pool, with ``threads`` torch threads."""
    quiet_process(threads)
    module = load_recipe(recipe)
    started = time.perf_counter()
    with open(log_path, "w") as log, redirect_stdout(log), redirect_stderr(log):
        metrics = module.main(argv)
    return metrics, time.perf_counter() - started


def worker_pool(jobs: int) -> ProcessPoolExecutor | None:
    """``jobs`` worker processes for recipe runs (None for one job: runs stay in this process). Spawned, not
    forked: a fork would copy torch's thread pools and any open process group."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None


def write_rows(rows: list[dict], output_dir: str | Path) -> Path:
    """Every run's numbers, one JSON object per line, as `results.jsonl` under ``output_dir``."""
    path = Path(output_dir) / "results.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path
