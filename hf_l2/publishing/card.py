"""The model card of a run: Hub metadata, the regularization in words, eval results, drift, curves and the command.

The text comes from the Jinja template `model_cards/template.md` (installed as `hf_l2/model_cards/`), rendered with
`huggingface_hub.ModelCard.from_template`, so the YAML header is built by `ModelCardData` the way the Hub reads it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.modelcard import TASK_MAPPING, TASK_TAG_TO_NAME_MAPPING, extract_hyperparameters_from_trainer
from transformers.utils import logging

from hf_l2._version import __version__
from hf_l2.layer_groups import parameter_group
from hf_l2.publishing.reproduce import card_command
from hf_l2.trainer import mixed_precision_turned_off

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hf_l2.lora import LoraDeltaPenalty
    from hf_l2.penalty import L2Penalty

TEMPLATE_NAME = "template.md"
CARD_FILE = "README.md"
PLOT_FILE = "l2_training.png"
MODE_TAGS = {"l2_sp": "l2-sp", "l2_sp_fisher": "l2-sp-fisher", "l2": "l2", "none": "no-penalty"}
# Keys of an evaluation log that describe the run, not the model.
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch", "step"}


def template_path() -> Path:
    """The card template: `hf_l2/model_cards/` in an installed package, `model_cards/` at the root of a checkout."""
    package = Path(__file__).resolve().parents[1]  # hf_l2/, above publishing/
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f"hf_l2's card template {TEMPLATE_NAME} is missing; reinstall hf_l2.")


@dataclass
class PenaltyMeasurement:
    """The penalty's numbers at the end of a run: `L2Penalty.group_statistics` by layer group (with `"all"`) and the
    LoRA weight change ‖ΔW − ΔW₀‖ (`l2_lora_delta`)."""

    groups: dict[str, dict[str, float]]
    lora_delta: float | None = None
    lora_layers: int = 0


def measure_penalty(
    penalty: L2Penalty | None, lora: LoraDeltaPenalty | None = None, group_by: str = "type"
) -> PenaltyMeasurement | None:
    """The `PenaltyMeasurement` of bound penalty terms; call it on every process (a collective under FSDP / ZeRO-3)."""
    if penalty is None:
        return None
    groups = penalty.group_statistics(lambda name: parameter_group(name, group_by))
    if lora is None:
        return PenaltyMeasurement(groups)
    return PenaltyMeasurement(groups, lora.delta_sq().sqrt().item(), len(lora.layers))


@dataclass(frozen=True)
class CardInfo:
    """What the caller tells the card, the fields of `Trainer.create_model_card` in its order plus `command`.

    `dataset_tags` are Hub dataset ids, the first one being the evaluation data; `dataset` their display names and
    `dataset_args` the first one's config name; `command` is the command line to record (default: this process's
    own, see `hf_l2.publishing.reproduce`). None means "not given".
    """

    language: str | list[str] | None = None
    license: str | None = None
    tags: str | list[str] | None = None
    model_name: str | None = None
    finetuned_from: str | None = None
    tasks: str | list[str] | None = None
    dataset_tags: str | list[str] | None = None
    dataset: str | list[str] | None = None
    dataset_args: str | list[str] | None = None
    command: str | None = None

    def updated(self, given: CardInfo) -> CardInfo:
        """These values, with those set in `given` taking their place."""
        return replace(self, **{f.name: v for f in fields(given) if (v := getattr(given, f.name)) is not None})


def write_model_card(
    trainer, output_dir: str, measurement: PenaltyMeasurement | None, info: CardInfo | None = None
) -> ModelCard:
    """Write `README.md` and the training plot for an `L2Trainer`'s run into `output_dir`; return the card.

    `measurement` is `measure_penalty` of the trainer's penalty terms (None for `l2_mode="none"`); `info` what the
    caller said about the run.
    """
    info = info or CardInfo()
    args, model = trainer.args, trainer.model
    base_model, source = _model_source(info.finetuned_from, trainer.l2_base_model)
    datasets = _as_list(info.dataset_tags)
    step, metrics = final_evaluation(trainer.state.log_history)
    model_name = info.model_name or (args.hub_model_id or Path(output_dir).absolute().name).split("/")[-1]
    task = _task(model, info.tasks)
    eval_results = None
    if metrics and task and datasets:  # the Hub drops a model-index entry without a task and a dataset
        eval_results = [
            EvalResult(
                task_type=task,
                task_name=TASK_TAG_TO_NAME_MAPPING.get(task),
                dataset_type=datasets[0],
                dataset_name=(_as_list(info.dataset) or datasets)[0],
                dataset_config=(_as_list(info.dataset_args) or [None])[0],
                metric_type=key,
                metric_name=f"eval_{key}",
                metric_value=value,
            )
            for key, value in metrics.items()
        ]
    card_tags = ["hf_l2", MODE_TAGS[args.l2_mode], *_as_list(info.tags), *(getattr(model, "model_tags", None) or [])]
    card_data = ModelCardData(
        base_model=base_model,
        # A local folder is no Hub id for `base_model`; recorded here, `hf-l2 interpolate` finds θ₀ without a flag.
        base_model_path=os.path.abspath(source) if base_model is None and source and os.path.exists(source) else None,
        datasets=datasets or None,
        language=info.language,
        license=info.license,
        library_name="peft" if _is_peft(model) else "transformers",
        tags=card_tags + ["generated_from_trainer"],
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )

    os.makedirs(output_dir, exist_ok=True)
    plotted = plot_training(trainer.state.log_history, os.path.join(output_dir, PLOT_FILE))
    drift_rows = _drift_rows(measurement)
    command, command_notes = card_command(info.command, output_dir)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        base_model=base_model,
        source=source,
        model_class=type(_unwrap(model)).__name__,
        data=", ".join(_as_list(info.dataset) or datasets),
        reg=_regularization(
            args, trainer.l2_terms.penalty, measurement, getattr(trainer, "l2_fisher_source", None)
        ),
        tokens=_token_terms(args),
        eval_step=step,
        eval_rows=[(f"eval_{key}", _number(value)) for key, value in metrics.items()],
        step=trainer.state.global_step,
        drift_rows=drift_rows,
        has_anchor=bool(drift_rows) and any("drift_sq" in sums for sums in measurement.groups.values()),
        plot_file=PLOT_FILE if plotted is not None else None,
        hyperparameters=list(_hyperparameters(trainer).items()),
        command=command,
        command_notes=command_notes,
        versions=_versions(_is_peft(model)),
    )
    card.save(os.path.join(output_dir, CARD_FILE))
    return card


# ---- facts about the run ----------------------------------------------------------------------------------------
def final_evaluation(log_history: list[dict]) -> tuple[int | None, dict[str, float]]:
    """Step and metrics (without the `eval_` prefix) of the last evaluation in `log_history`.

    Entries logged at that step are merged, so a metric logged after `evaluate()` (e.g. a perplexity) counts too.
    """
    def metrics_of(entry: dict) -> dict[str, float]:
        return {
            key.removeprefix("eval_"): value
            for key, value in entry.items()
            if key.startswith("eval_") and key.removeprefix("eval_") not in _NOT_METRICS
            and isinstance(value, (int, float))
        }

    evaluations = [entry for entry in log_history if metrics_of(entry)]
    if not evaluations:
        return None, {}
    step = evaluations[-1].get("step")
    merged: dict[str, float] = {}
    for entry in evaluations:
        if entry.get("step") == step:
            merged.update(metrics_of(entry))
    return step, merged


def mixed_precision_in_effect(trainer) -> str | None:
    """The mixed precision the run really trains with, None when it is plain fp32 as asked (for the card)."""
    accelerator, args = trainer.accelerator, trainer.args
    if trainer.is_deepspeed_enabled:  # DeepSpeed casts by its own config, which `fp16` / `bf16` fill in
        return "DeepSpeed fp16" if args.fp16 else "DeepSpeed bf16" if args.bf16 else None
    if accelerator.native_amp:
        return f"Native AMP ({accelerator.mixed_precision}{' with loss scaling' if accelerator.scaler else ''})"
    off = mixed_precision_turned_off(trainer)
    return None if off is None else f"none: {off}"


def _hyperparameters(trainer) -> dict:
    """The stock card's hyperparameters, with the mixed precision that actually ran."""
    hyperparameters = extract_hyperparameters_from_trainer(trainer)
    hyperparameters.pop("mixed_precision_training", None)
    if (precision := mixed_precision_in_effect(trainer)) is not None:
        hyperparameters["mixed_precision_training"] = precision
    return hyperparameters


def drift_by_group(groups: dict[str, dict[str, float]]) -> list[dict[str, float | str | None]]:
    """Rows of ‖θ‖, ‖θ − θ₀‖ and ‖θ − θ₀‖/‖θ₀‖ from `L2Penalty.group_statistics`: `"all"` first, then each group.

    Drift is `None` where a group has no anchored parameter.
    """
    rows = []
    for group in sorted(groups, key=lambda g: (g != "all", g)):
        sums = groups[group]
        drift = math.sqrt(sums["drift_sq"]) if "drift_sq" in sums else None
        rel = drift / math.sqrt(sums["anchor_sq"]) if drift is not None and sums["anchor_sq"] > 0 else None
        rows.append({"group": group, "norm": math.sqrt(sums["weight_sq"]), "drift": drift, "rel_drift": rel})
    return rows


def plot_training(log_history: list[dict], path: str) -> Figure | None:
    """Task loss (and eval loss), penalty Ω, drift ‖θ − θ₀‖ and a scheduled α against the step, saved as a PNG;
    None if nothing was logged."""
    panels = [  # (y label, [(logged key, legend)], drawn only when its values change)
        ("loss", [("loss", "train (task loss)"), ("eval_loss", "eval")], False),
        (r"penalty $\Omega$", [("l2/penalty", r"$\Omega(\theta)$")], False),
        ("drift", [("l2/drift", r"$\|\theta - \theta_0\|$"), ("l2/lora_delta", r"LoRA $\|\Delta W - \Delta W_0\|$")],
         False),
        (r"scheduled $\alpha$", [("l2/coef", r"$\alpha \cdot f(t)$")], True),
    ]
    series = []
    for ylabel, lines, only_if_changing in panels:
        drawn = []
        for key, label in lines:
            points = [(h["step"], h[key]) for h in log_history if key in h]
            if points and not (only_if_changing and len({value for _, value in points}) < 2):
                drawn.append((label, points))
        if drawn:
            series.append((ylabel, drawn))
    if not series:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 1.9 * len(series) + 0.6), layout="constrained")
    axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, lines) in zip(axes, series):
        for label, points in lines:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=110)
    return figure


# ---- facts for the template (its words are in model_cards/template.md) ---------------------------------------
def _fisher(source: dict | None) -> dict | None:
    """Where the Fisher weights came from (`l2_sp_fisher`), for the card; None without them."""
    if source is None:
        return None
    examples = source.get("examples")
    return {"data": source.get("data"), "path": source.get("path"), "normalized": source.get("normalized", True),
            "examples": f"{examples:,}" if isinstance(examples, int) else None}


def _regularization(
    args, penalty: L2Penalty | None, measurement: PenaltyMeasurement | None, trainer_fisher_source: dict | None = None
) -> dict:
    """The penalty's settings and sizes, numbers formatted; `mode` is `"none"` when no penalty was built."""
    if penalty is None or measurement is None:
        return {"mode": "none", "weight_decay": args.weight_decay}
    totals = measurement.groups["all"]
    return {
        "mode": args.l2_mode,
        "impl": args.l2_impl,
        "weight_decay": args.weight_decay,
        "alpha": _number(args.l2_coef),
        "beta": _number(args.l2_head_coef),
        "schedule": _schedule(args),
        "anchor_path": args.l2_anchor_path,
        "fisher": _fisher(trainer_fisher_source),
        "head_params": args.l2_head_params or [],
        "exclude": args.l2_exclude or [],
        "exclude_bias_and_norm": args.l2_exclude_bias_and_norm,
        "anchored_tensors": len(penalty.anchored_names),
        "anchored_values": f"{int(totals['anchored_values']):,}",
        "new_tensors": len(penalty.new_names),
        "new_values": f"{int(totals['new_values']):,}",
        "lora": None if measurement.lora_delta is None else
        {"layers": measurement.lora_layers, "delta": _number(measurement.lora_delta)},
    }


def _token_terms(args) -> dict[str, str | bool | None] | None:
    """The token-level terms of the loss (DFT weighting, the KL anchor) for the card; None without either."""
    dft, kl = args.l2_token_weighting == "dft", bool(args.l2_kl_coef)
    if not (dft or kl):
        return None
    return {"dft": dft, "kl": _number(args.l2_kl_coef) if kl else None, "temperature": _number(args.l2_kl_temperature)}


def _schedule(args) -> dict[str, str] | None:
    """The schedule of α and β and its parameters, or None when they stay constant."""
    if args.l2_coef_schedule == "constant":
        return None
    return {
        "name": args.l2_coef_schedule,
        "end": _number(args.l2_coef_end_factor),
        "k": _number(args.l2_sigmoid_k),
        "t0": None if args.l2_sigmoid_t0 is None else _number(args.l2_sigmoid_t0),
    }


def _drift_rows(measurement: PenaltyMeasurement | None) -> list[dict[str, str]]:
    """The drift table, numbers formatted; empty when nothing was regularized."""
    totals = measurement.groups["all"] if measurement is not None else None
    if totals is None or totals["anchored_values"] + totals["new_values"] == 0:
        return []
    return [{key: value if key == "group" else _number(value) for key, value in row.items()}
            for row in drift_by_group(measurement.groups)]


def _versions(peft: bool) -> list[tuple[str, str]]:
    names = ["transformers", "torch", "accelerate"] + (["peft"] if peft else []) + ["datasets", "tokenizers"]
    found = [("hf_l2", __version__)]
    for name in names:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return found


# ---- small helpers ----------------------------------------------------------------------------------------------
def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def _is_peft(model) -> bool:
    from transformers.trainer_utils import _is_peft_model

    return _is_peft_model(model)


def _unwrap(model):
    return model.get_base_model() if _is_peft(model) else model


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _model_source(finetuned_from: str | None, base_model: str | None) -> tuple[str | None, str | None]:
    """(Hub id for the `base_model` metadata, name to show) of the model fine-tuned: `finetuned_from`, else the
    trainer's `l2_base_model`, the model's `_name_or_path` when the trainer was first built (empty for a model built
    from a config, a path for one loaded from a folder; kept through resume, so not the checkpoint's)."""
    name = finetuned_from or base_model
    if name is None or os.path.exists(name):  # a local folder is named in the text, not claimed as a Hub id
        return None, name
    if _is_repo_id(name):
        return name, name
    if finetuned_from is not None:
        logger.warning(
            f"`finetuned_from`={finetuned_from!r} is neither a Hub model id ('name' or 'org/name') nor a local "
            "folder: the card names it but leaves `base_model` out of its metadata."
        )
    return None, name


def _task(model, tasks: str | list[str] | None) -> str | None:
    """The first of `tasks`, else the pipeline task of the model's class (as the stock Trainer card infers it)."""
    if tasks:
        return _as_list(tasks)[0]
    class_name = type(_unwrap(model)).__name__
    for task, mapping in TASK_MAPPING.items():
        for names in mapping.values():
            if class_name in ((names,) if isinstance(names, str) else names):
                return task
    return None
