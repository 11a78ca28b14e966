"""What the recipes share: arguments, logging set-up, data loading with clear errors, the end of a run, and
`load_recipe` to import one by name (the sweep and the demo call recipes in-process).

The recipes in `recipes/` stay thin: the data plumbing and bookkeeping common to both live here, and the training
itself (penalty, logging, checkpoints, card) lives in the trainers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import transformers
import yaml
from datasets import Dataset, DatasetDict, load_dataset
from transformers import HfArgumentParser, PretrainedConfig, Trainer

from .hub import HubPublishError

logger = logging.getLogger(__name__)

# File suffix → `datasets` builder.
DATA_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class RecipeInputError(ValueError):
    """Bad user input to a recipe: the message says which argument and what to do."""


# The shipped recipes sit beside the package in a source checkout (`pip install -e .`).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name_or_path: str):
    """Import a recipe script as a module: a shipped one by name (`gpt2_generation`) or any `.py` path.

    A recipe is a script with `main(argv) -> metrics dict` that saves its model to `--output_dir`.
    """
    path = Path(name_or_path) if name_or_path.endswith(".py") else RECIPES_DIR / f"{name_or_path}.py"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.py")) if RECIPES_DIR.is_dir() else []
        raise RecipeInputError(
            f"Recipe {name_or_path!r} not found ({path}). Give a shipped recipe's name {shipped} (from a source "
            "checkout installed with `pip install -e .`) or the path of a script with `main(argv)`."
        )
    spec = importlib.util.spec_from_file_location(f"hf_l2_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise RecipeInputError(f"Recipe {path} has no `main(argv)` function.")
    return module


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the pretrained model."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (or a local dataset script)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data: .txt, .json, .jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data, same formats."})
    pretrain_validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Local held-out data from the domain the model was pretrained on (same formats; the text column or "
            "language pairs the recipe reads). Evaluated like the validation data, as eval_pretrain_* metrics: "
            "how much fine-tuning forgot."
        },
    )
    fisher_file: str | None = field(
        default=None,
        metadata={
            "help": "`--l2_mode l2_sp_fisher`: local data the Fisher F is computed on (same formats and columns as "
            "the training data; data from the pretraining domain is the textbook choice). Default: the training set."
        },
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the preprocessing instead of reusing it."})
    num_samples: int = field(default=8, metadata={"help": "Held-out examples written out with the model's output."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None:
            raise RecipeInputError("Give `--dataset_name` (a Hub dataset) or `--train_file` (a local file).")
        for name in ("train_file", "validation_file", "pretrain_validation_file", "fisher_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).is_file():
                raise RecipeInputError(f"`--{name}` {path!r} does not exist or is not a file.")
            if Path(path).suffix not in DATA_BUILDERS:
                raise RecipeInputError(
                    f"`--{name}` {path!r}: unsupported file type; use one of {sorted(DATA_BUILDERS)}."
                )
        if not 0 < self.validation_split_percentage < 100:
            raise RecipeInputError("`--validation_split_percentage` must be between 1 and 99.")


def parse_args(types: tuple[type, ...], defaults: dict[str, Any], argv: list[str] | None = None) -> tuple:
    """Parse the recipe's dataclasses from the command line, or from one `.yaml`/`.json` file given alone.

    ``defaults`` are the recipe's own defaults for training arguments (e.g. ``predict_with_generate``); the command
    line or the file overrides them.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(types)
    try:
        if len(argv) == 1 and Path(argv[0]).suffix in (".yaml", ".yml", ".json"):
            with open(argv[0]) as f:
                values = yaml.safe_load(f) if Path(argv[0]).suffix != ".json" else json.load(f)
            return parser.parse_dict({**defaults, **(values or {})})
        flags = [item for key, value in defaults.items() for item in (f"--{key}", str(value))]
        return parser.parse_args_into_dataclasses(flags + argv)
    except FileNotFoundError as err:
        raise RecipeInputError(f"Config file not found: {err.filename}") from err


def setup_logging(training_args) -> None:
    """Readable logs on the main process, warnings only elsewhere (the Trainer's own convention)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler()]
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("hf_l2").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(f"Process {training_args.process_index}/{training_args.world_size} on {training_args.device}")


def load_raw_datasets(data_args: DataArguments, cache_dir: str | None, seed: int) -> DatasetDict:
    """`train` and `validation` splits from the Hub or local files; a missing validation split is carved from train.

    With `--pretrain_validation_file`, a split `pretrain_validation` holds it; with `--fisher_file`, a split `fisher`.
    """
    if data_args.dataset_name is not None:
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any loading failure gets the same advice
            raise RecipeInputError(
                f"`--dataset_name {data_args.dataset_name}` could not be loaded ({type(err).__name__}: {err}). "
                "Check the name and your connection, or use local `--train_file`/`--validation_file`."
            ) from err
    else:
        raw = DatasetDict()
        for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
            if path is not None:
                raw[split] = _load_file(path, cache_dir)
    if "train" not in raw:
        raise RecipeInputError(f"The dataset has no `train` split (splits: {list(raw)}).")
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    if data_args.pretrain_validation_file is not None:
        raw["pretrain_validation"] = _load_file(data_args.pretrain_validation_file, cache_dir)
    if data_args.fisher_file is not None:
        raw["fisher"] = _load_file(data_args.fisher_file, cache_dir)
    return raw


def _load_file(path: str, cache_dir: str | None) -> Dataset:
    builder = DATA_BUILDERS[Path(path).suffix]
    extra = {"keep_linebreaks": True} if builder == "text" else {}
    return load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **extra)


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def require_architecture(config: PretrainedConfig, *, encoder_decoder: bool, name: str, recipe: str, other: str):
    """Refuse a model the recipe cannot train, pointing to the recipe that can."""
    if bool(getattr(config, "is_encoder_decoder", False)) != encoder_decoder:
        kind = "an encoder-decoder" if not encoder_decoder else "a decoder-only"
        raise RecipeInputError(
            f"`--model_name_or_path {name}` is {kind} model ({config.model_type}); {recipe} needs "
            f"{'an encoder-decoder' if encoder_decoder else 'a decoder-only causal LM'}. Use {other} instead."
        )


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def evaluate_with_forgetting(trainer: Trainer, pretrain_set: Dataset | None = None, **kwargs) -> dict:
    """Eval metrics plus perplexity, and the same on the pretraining domain (`eval_pretrain_*`: what was forgotten).

    The perplexities are logged too, so that they reach the log history and the model card.
    """
    metrics = trainer.evaluate(**kwargs)
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    if pretrain_set is not None:
        metrics.update(trainer.evaluate(pretrain_set, metric_key_prefix="eval_pretrain", **kwargs),
                       eval_pretrain_samples=len(pretrain_set))
        metrics["eval_pretrain_perplexity"] = perplexity(metrics["eval_pretrain_loss"])
    trainer.log({k: v for k, v in metrics.items() if k.endswith("perplexity")})
    return metrics


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_and_report(trainer: Trainer, training_args, n_train: int, n_eval: int, run_eval: Callable[[], dict]):
    """The common end of a recipe: train (resuming if asked), evaluate, save model, metrics and state."""
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        # Model + tokenizer now, before anything that could fail (sampling, pushing); the card and the push come
        # once at the end (`write_card_and_push`), when the card can hold the eval results.
        trainer.save_weights()
        train_metrics = {**result.metrics, "train_samples": n_train}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        eval_metrics = {**run_eval(), "eval_samples": n_eval}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def write_card_and_push(trainer: Trainer, training_args, card_kwargs: dict) -> None:
    """Write the model card; with `--push_to_hub`, also push model, tokenizer and card (after the local save)."""
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)


def run(main: Callable[[], Any]) -> None:
    """Run a recipe's `main`, turning bad input or a failed push into one readable message instead of a traceback."""
    try:
        main()
    except (RecipeInputError, HubPublishError) as err:
        sys.exit(f"error: {err}")


def fisher_dataset(processed: dict, data_args: DataArguments) -> Dataset | None:
    """The `--fisher_file` examples, preprocessed like the training data, named for the card (None without it)."""
    dataset = processed.get("fisher")
    if dataset is not None:
        dataset.l2_fisher_description = f"`{Path(data_args.fisher_file).name}`"
    return dataset
