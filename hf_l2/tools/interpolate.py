"""WiSE-FT from a finished run: θ(t) = (1 − t)·θ₀ + t·θ (Wortsman et al., *Robust fine-tuning of zero-shot
models*, CVPR 2022), one `from_pretrained`-loadable folder per t, with the run's tokenizer and a card.

θ is the run's saved model; θ₀ is the run's own anchor file (`l2_anchor.safetensors` in the output folder, else in
its last checkpoint; per-rank files of a sharded run are merged) laid over the base model's weights (`base_model`,
else the card's `base_model` or `base_model_path`, else the local folder the anchor file names). The anchor holds
only the penalized weights (biases and norms are usually left out), so the base model fills in the rest. A weight
neither has, or has in another shape, is refused (another architecture), except, with `keep_missing`, one neither
has (a new head): it keeps its fine-tuned value and is listed in the card. For a LoRA run the adapter's change is
scaled instead: t·ΔW = s·(t·B)·A, written as an adapter.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_l2.anchor import read_weights
from hf_l2.publishing.card import CARD_FILE, template_path
from hf_l2.saved_state import ANCHOR_FILE, ANCHOR_FILES, load_anchor, rank_files_glob

INTERPOLATION_TEMPLATE = "interpolation.md"
# What a run folder holds besides its weights that a model folder needs: config, tokenizer, adapter config.
_COPIED = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|tokenizer.*|special_tokens_map\.json|vocab.*|"
    r"merges\.txt|added_tokens\.json|chat_template.*|.*\.spm|.*\.model|preprocessor_config\.json)$"
)
_LORA_B = re.compile(r"lora_(embedding_)?B")


class InterpolationError(ValueError):
    """Bad input to `hf-l2 interpolate`: one line that says what is wrong and what to do."""


@dataclass
class Anchor:
    """θ₀ for interpolation and where it came from, for the card."""

    weights: dict[str, torch.Tensor]
    sources: list[str] = field(default_factory=list)


def check_weights(weights: list[float], allow_extrapolation: bool) -> None:
    # θ(t) is computed in float32, whose range t must fit in.
    infinite = [t for t in weights if not abs(t) <= torch.finfo(torch.float32).max]
    if infinite:
        raise InterpolationError(f"--weight {infinite[0]:g} is not a finite float32 number; give t as a number (0 "
                                 "is θ₀, 1 the fine-tuned model).")
    bad = [t for t in weights if not 0.0 <= t <= 1.0]
    if bad and not allow_extrapolation:
        raise InterpolationError(
            f"--weight {bad[0]:g} is outside [0, 1] (0 is θ₀, 1 the fine-tuned model); pass --allow_extrapolation "
            "to go beyond them."
        )


def merge_rank_files(paths: list[str]) -> dict[str, torch.Tensor]:
    """The whole θ₀ from the per-rank files of a sharded run: each piece is written where its layout says."""
    flat: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}
    for path in paths:
        rank, world = map(int, re.search(r"rank(\d+)-of-(\d+)", os.path.basename(path)).groups())
        tensors, layout = load_anchor(os.path.dirname(path), rank, world)
        for name, piece in tensors.items():
            start, shape = layout.get(name, (0, piece.shape))
            if name not in flat:
                flat[name] = torch.zeros(shape.numel(), dtype=piece.dtype)
                covered[name] = torch.zeros(shape.numel(), dtype=torch.bool)
                shapes[name] = shape
            flat[name][start : start + piece.numel()] = piece.reshape(-1)
            covered[name][start : start + piece.numel()] = True
    gaps = [name for name, mask in covered.items() if not bool(mask.all())]
    if gaps:
        raise InterpolationError(
            f"the per-rank anchor files ({os.path.basename(paths[0])}, ...) do not cover all of {gaps[0]!r}: "
            "a rank's file is missing."
        )
    return {name: values.view(shapes[name]) for name, values in flat.items()}


def _anchor_files(run_dir: str) -> list[str]:
    """The run's θ₀ file(s): the whole file or the per-rank files, in the output folder, else its last checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    folders = [run_dir]
    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if last:
        folders.append(last)
    for folder in folders:
        whole = os.path.join(folder, ANCHOR_FILE)
        if os.path.isfile(whole):
            return [whole]
        pieces = sorted(glob.glob(os.path.join(folder, rank_files_glob(ANCHOR_FILES))))
        if pieces:
            return pieces
    return []


def run_anchor(run_dir: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """θ₀ saved by the run (output folder first, then its last checkpoint), and the file it came from."""
    files = _anchor_files(run_dir)
    if not files:
        return None
    if len(files) == 1 and os.path.basename(files[0]) == ANCHOR_FILE:
        return load_file(files[0]), files[0]
    return merge_rank_files(files), os.path.join(os.path.dirname(files[0]), rank_files_glob(ANCHOR_FILES))


def _card_base_model(run_dir: str) -> str | None:
    """The card's `base_model` (a Hub id), else its `base_model_path` (a local folder) while that exists."""
    card = os.path.join(run_dir, CARD_FILE)
    if not os.path.isfile(card):
        return None
    from huggingface_hub import ModelCard

    data = ModelCard.load(card).data.to_dict()
    base = data.get("base_model")
    if base:
        return base[0] if isinstance(base, list) else base
    path = data.get("base_model_path")
    return path if path and os.path.exists(path) else None


def _anchor_source(run_dir: str) -> str | None:
    """The local model the run's θ₀ file says θ₀ was taken from, while it exists."""
    files = _anchor_files(run_dir)
    if not files:
        return None
    with safe_open(files[0], "pt") as f:
        source = (f.metadata() or {}).get("source")
    return source if source and os.path.exists(source) else None


def find_anchor(
    run_dir: str, base_model: str | None, theta: dict[str, torch.Tensor], keep_missing: bool = False
) -> Anchor:
    """θ₀ for the floating-point weights of the run's ``theta``: the base model's weights (``base_model``, else the
    one the run's card or θ₀ file records), overlaid with the run's anchor file; refused unless it has every one of
    them (``keep_missing``: some may lack one, a new head) in the same shape."""
    anchor = Anchor({})
    base = base_model or _card_base_model(run_dir) or _anchor_source(run_dir)
    if base:
        try:
            anchor.weights.update(read_weights(base))
        except ValueError as err:
            raise InterpolationError(f"the base model {base!r} cannot be read: {err}") from err
        anchor.sources.append(f"the weights of `{base}`")
    saved = run_anchor(run_dir)
    if saved is not None:
        weights, path = saved
        anchor.weights.update(weights)
        anchor.sources.append(f"the run's anchor file `{os.path.relpath(path, run_dir)}`")
    if not anchor.sources:
        raise InterpolationError(
            f"{run_dir} has no θ₀: no {ANCHOR_FILE} in it or its last checkpoint (an l2_mode=none run keeps none) and "
            "no base model recorded in its card; pass --base_model with the model the run was fine-tuned from."
        )
    _check_anchor_fits(anchor.weights, theta, base, keep_missing)
    return anchor


def _check_anchor_fits(theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], base: str | None,
                       keep_missing: bool) -> None:
    """Refuse θ₀ that lacks some of the run's floating-point weights (unless `keep_missing`) or has them in other
    shapes: those would be written at their fine-tuned values, not blended."""
    names = [n for n, v in theta.items() if v.is_floating_point()]
    mismatched = [f"{n}: run {tuple(theta[n].shape)}, θ₀ {tuple(theta0[n].shape)}" for n in names
                  if n in theta0 and theta0[n].shape != theta[n].shape]
    missing = [n for n in names if n not in theta0]
    if mismatched:
        raise InterpolationError(
            f"θ₀ has another shape for {len(mismatched)} of the run's {len(names)} weights, e.g. "
            f"{'; '.join(mismatched[:3])}: pass as --base_model the model the run was fine-tuned from."
        )
    if not base and missing:
        raise InterpolationError(
            f"the run's anchor file holds only the penalized weights ({len(missing)} others, e.g. {missing[:3]}, are "
            "not in it): pass --base_model with the model the run was fine-tuned from."
        )
    if missing and not keep_missing:
        raise InterpolationError(
            f"θ₀ lacks {len(missing)} of the run's {len(names)} weights, e.g. {missing[:3]}: is --base_model {base} "
            "the model the run was fine-tuned from (not another architecture)? If these are weights the run added "
            "(a new head), pass --keep_missing to keep them at their fine-tuned values."
        )


def _check_finite(weights: list[float], blend) -> None:
    """Refuse t whose θ(t) (``blend(t)``: the state and the names kept) is not finite in the weights' dtypes. θ(t)
    is linear in t, so the smallest and largest t bound every other."""
    for t in sorted({min(weights), max(weights)}):
        state, _ = blend(t)
        bad = [n for n, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise InterpolationError(
                f"--weight {t:g} gives non-finite values in {len(bad)} weight(s), e.g. {bad[:3]}: they overflow their "
                "dtype (or θ or θ₀ is not finite there); pick t closer to [0, 1]."
            )


def _model_file(run_dir: str) -> str:
    """'adapter' for a PEFT adapter run, 'model' for a full model; a folder with neither is not a run."""
    has = lambda name: os.path.isfile(os.path.join(run_dir, name))  # noqa: E731
    if has("adapter_config.json") and has("adapter_model.safetensors"):
        return "adapter"
    if has("config.json") and any(has(n) for n in ("model.safetensors", "model.safetensors.index.json",
                                                    "pytorch_model.bin")):
        return "model"
    raise InterpolationError(
        f"{run_dir} is not a saved run: it lacks config.json with model.safetensors (or adapter_config.json with "
        "adapter_model.safetensors); pass the folder that trainer.save_model() wrote."
    )


def interpolate_state(theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], t: float):
    """θ(t) for every floating weight of θ that θ₀ has (same shape), and the names kept at θ (no θ₀ for them).

    `torch.lerp` gives θ₀ at t = 0 and θ at t = 1 exactly; it runs in fp32 and returns each weight's dtype.
    """
    out, kept = {}, []
    for name, value in theta.items():
        start = theta0.get(name)
        if not value.is_floating_point() or start is None or start.shape != value.shape:
            out[name] = value
            kept.append(name) if value.is_floating_point() else None
            continue
        out[name] = torch.lerp(start.float(), value.float(), t).to(value.dtype)
    return out, kept


def scale_adapter(adapter: dict[str, torch.Tensor], t: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The LoRA adapter of t·ΔW: every B factor times t (ΔW = s·B·A is linear in B); other tensors (e.g.
    `modules_to_save` copies) are kept and named."""
    if any("lora_magnitude_vector" in n for n in adapter):
        raise InterpolationError("a DoRA adapter's change is not linear in its factors; it cannot be scaled by t.")
    out, kept = {}, []
    for name, value in adapter.items():
        if _LORA_B.search(name):
            out[name] = (value.float() * t).to(value.dtype)
        else:
            out[name] = value
            kept.append(name) if "lora_A" not in name and "lora_embedding_A" not in name else None
    return out, kept


def interpolate_run(
    run_dir: str, weights: list[float], output_dir: str, base_model: str | None = None,
    allow_extrapolation: bool = False, keep_missing: bool = False,
) -> list[Path]:
    """Write one model folder per t under ``output_dir`` (``weight-<t>``); return them. Everything is checked
    before the first folder is written."""
    check_weights(weights, allow_extrapolation)
    if not os.path.isdir(run_dir):
        raise InterpolationError(f"{run_dir} is not a folder; pass the output folder of a run.")
    kind = _model_file(run_dir)
    if kind == "adapter":
        theta = load_file(os.path.join(run_dir, "adapter_model.safetensors"))
        anchor = Anchor({}, ["the adapter's base model (ΔW = 0)"])
        _check_finite(weights, lambda t: scale_adapter(theta, t))
    else:
        theta = read_weights(run_dir)
        anchor = find_anchor(run_dir, base_model, theta, keep_missing)
        _check_finite(weights, lambda t: interpolate_state(anchor.weights, theta, t))
    folders = []
    for t in weights:
        folder = Path(output_dir) / f"weight-{t:g}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(run_dir):
            if _COPIED.match(name) and os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy2(os.path.join(run_dir, name), folder / name)
        if kind == "adapter":
            state, kept = scale_adapter(theta, t)
            save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            state, kept = interpolate_state(anchor.weights, theta, t)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
        _write_card(folder, run_dir, t, kind, anchor.sources, kept,
                    _command(run_dir, t, output_dir, base_model, allow_extrapolation))
        folders.append(folder)
    return folders


def check_evaluation(run_dir: str, recipe: str, recipe_args: list[str]) -> None:
    """Refuse an `--eval` that cannot run, before anything is written."""
    from hf_l2.tools.recipe_common import load_recipe

    load_recipe(recipe)
    if os.path.isdir(run_dir) and _model_file(run_dir) == "adapter":
        raise InterpolationError(
            "--eval needs a full fine-tuning run; for a LoRA run, load each weight-<t> adapter with "
            "`PeftModel.from_pretrained` and evaluate it."
        )
    if any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in recipe_args):
        raise InterpolationError("--eval sets --model_name_or_path to each weight-<t> folder: remove it from the "
                                 "recipe arguments.")


def evaluate_interpolations(
    run_dir: str, folders: list[Path], weights: list[float], recipe: str, recipe_args: list[str], output_dir: str,
    base_model: str | None = None, keep_missing: bool = False,
) -> tuple[Path, Path]:
    """Evaluate each θ(t) folder with the recipe (its `--do_eval` on the recipe arguments' data, the model set to
    the folder) and write `results.md`, `results.png` and `results.jsonl` under ``output_dir``: one row per t with
    the recipe's `eval_*` metrics and the drift ‖θ(t) − θ₀‖, so that t can be picked on validation data."""
    from hf_l2.tools.recipe_runs import RUN_DEFAULTS, drift, run_recipe, write_rows
    from hf_l2.tools.sweep_report import write_report

    check_evaluation(run_dir, recipe, recipe_args)
    theta = read_weights(run_dir)
    theta0 = find_anchor(run_dir, base_model, theta, keep_missing).weights
    rows = []
    for folder, t in zip(folders, weights):
        evaluation = Path(output_dir) / "eval" / folder.name  # beside, not in, the model folder a user may push
        evaluation.mkdir(parents=True, exist_ok=True)
        argv = [*RUN_DEFAULTS, *recipe_args, "--model_name_or_path", str(folder), "--do_train", "false",
                "--do_eval", "true", "--output_dir", str(evaluation)]
        metrics, _ = run_recipe(recipe, argv, evaluation / "eval.log", torch.get_num_threads())
        rows.append({"setting": f"wise_ft t={t:g}", "mode": "wise_ft", "coef": t, "seed": None,
                     "drift": drift(folder, theta0), **metrics})
    write_rows(rows, output_dir)
    return write_report(rows, output_dir, f"WiSE-FT of {os.path.basename(os.path.abspath(run_dir))}")


def _command(run_dir: str, t: float, output_dir: str, base_model: str | None, allow_extrapolation: bool) -> str:
    """The `hf-l2 interpolate` command that writes the folder of this t again."""
    words = ["hf-l2", "interpolate", run_dir, "--weight", f"{t:g}", "--output_dir", str(output_dir)]
    words += ["--base_model", base_model] if base_model else []
    words += ["--allow_extrapolation"] if allow_extrapolation else []
    return shlex.join(words)


def _write_card(folder: Path, run_dir: str, t: float, kind: str, sources: list[str], kept: list[str],
                command: str) -> None:
    from huggingface_hub import ModelCard

    template = template_path().parent / INTERPOLATION_TEMPLATE
    card = ModelCard.from_template(
        _card_data(run_dir), template_path=str(template), t=f"{t:g}", run=os.path.abspath(run_dir),
        lora=kind == "adapter", sources=sources, kept=kept[:10], kept_count=len(kept), command=command,
    )
    card.save(str(folder / CARD_FILE))


def _card_data(run_dir: str):
    """The run card's metadata (base model, datasets, language), with a `wise-ft` tag."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(run_dir, CARD_FILE)
    data = ModelCard.load(path).data if os.path.isfile(path) else ModelCardData()
    data.tags = [*(data.tags or []), "wise-ft"]
    data.model_index = None  # the run's eval results are not this model's
    data.eval_results = None
    return data


def add_interpolate_parser(subparsers):
    """Register `interpolate` on a `hf-l2` command line."""
    parser = subparsers.add_parser(
        "interpolate", help="WiSE-FT: models between a run's θ₀ and its fine-tuned weights",
        description="Write, for each --weight t, a model folder with θ(t) = (1 − t)·θ₀ + t·θ (LoRA runs: the adapter "
        "of t·ΔW), with the run's tokenizer and a card.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (what trainer.save_model wrote)")
    parser.add_argument("--weight", type=float, action="append", required=True, metavar="T",
                        help="t: 0 is θ₀, 1 the fine-tuned model; repeat for several")
    parser.add_argument("--output_dir", required=True, help="one folder weight-<t> per t is written here")
    parser.add_argument("--base_model", default=None,
                        help="folder or Hub id of the model the run started from (default: the card's base_model); "
                        "fills in θ₀ for the weights the run's anchor file does not hold")
    parser.add_argument("--allow_extrapolation", action="store_true", help="accept t outside [0, 1]")
    parser.add_argument("--keep_missing", action="store_true",
                        help="weights that neither the base model nor the run's anchor file holds (a head the run "
                        "added) keep their fine-tuned values instead of being refused")
    parser.add_argument("--eval", metavar="RECIPE", default=None,
                        help="evaluate each t with this recipe (gpt2_generation, marian_translation or a script) and "
                        "write results.md / .png / .jsonl; its arguments (the run's data flags, e.g. "
                        "--train_file, --validation_file, --pretrain_validation_file) follow `--`")
    parser.set_defaults(run=_main, recipe_args=[])  # hf_l2.tools.cli puts what follows `--` in recipe_args
    return parser


def _main(args) -> int:
    import sys

    from hf_l2.tools.recipe_common import RecipeInputError

    recipe_args = args.recipe_args
    if recipe_args and not args.eval:
        print(f"hf-l2 interpolate: recipe arguments {recipe_args[:2]}... are only for --eval RECIPE.", file=sys.stderr)
        return 2
    try:
        if args.eval:
            check_evaluation(args.run_dir, args.eval, recipe_args)
        folders = interpolate_run(args.run_dir, args.weight, args.output_dir, args.base_model,
                                  args.allow_extrapolation, args.keep_missing)
        for folder in folders:
            print(f"Wrote {folder}")
        if args.eval:
            table, figure = evaluate_interpolations(args.run_dir, folders, args.weight, args.eval, recipe_args,
                                                    args.output_dir, args.base_model, args.keep_missing)
            print(table.read_text(encoding="utf-8") + f"\nPlot: {figure}")
    except (InterpolationError, RecipeInputError) as err:
        print(f"hf-l2 interpolate: {err}", file=sys.stderr)
        return 2
    return 0
