"""What the recipes share: arguments, logging set-up, data loading with clear errors, the end of a run, and
`load_recipe` to import one by name (the sweep and the demo call recipes in-process).

The recipes in `recipes/` stay thin: the data plumbing and bookkeeping common to both live here, and the training
itself (penalty, logging, checkpoints, card) lives in the trainers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import pkgutil
import shlex
import shutil
import sys
import types as pytypes
import typing
from argparse import ArgumentTypeError
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from datasets import Dataset, DatasetDict, load_dataset
from transformers import HfArgumentParser, PretrainedConfig, Trainer
from transformers.hf_argparser import string_to_bool

from hf_l2.config import ANCHORED_MODES
from hf_l2.output_lock import check_free
from hf_l2.publishing.hub import HubPublishError
from hf_l2.tools.saved_folders import checkpoints_newest_first, missing_from_checkpoint
from hf_l2.tools.suggestions import unknown_arguments_message

logger = logging.getLogger(__name__)

# File suffix → `datasets` builder.
DATA_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class RecipeInputError(ValueError):
    """Bad user input to a recipe: the message says which argument and what to do."""


# The shipped recipes: `recipes/` at the root of a checkout, installed as this package (see pyproject.toml).
RECIPES_PACKAGE = "hf_l2.recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with hf_l2 (`gpt2_generation`, ...)."""
    try:
        package = importlib.import_module(RECIPES_PACKAGE)
    except ModuleNotFoundError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_recipe(name_or_path: str):
    """Import a recipe script as a module: a shipped one by name (`gpt2_generation`) or any `.py` path.

    A recipe is a script with `main(argv) -> metrics dict` that saves its model to `--output_dir`. Shipped recipes
    are imported as `hf_l2.recipes.<name>`, from wherever hf_l2 is installed.
    """
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeInputError(f"Recipe script {path} not found: give a shipped recipe's name "
                                   f"{shipped_recipes()} or the path of a script with `main(argv)`.")
        spec = importlib.util.spec_from_file_location(f"hf_l2_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    else:
        if name_or_path not in shipped_recipes():
            raise RecipeInputError(
                f"Recipe {name_or_path!r} not found. Give a shipped recipe's name {shipped_recipes()} or the path of "
                "a script with `main(argv)`."
            )
        module = importlib.import_module(f"{RECIPES_PACKAGE}.{name_or_path}")
    if not callable(getattr(module, "main", None)):
        raise RecipeInputError(f"Recipe {name_or_path} has no `main(argv)` function.")
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
    max_row_chars: int = field(
        default=1_000_000,
        metadata={
            "help": "Refuse, before tokenizing, a data row (a line of a .txt file) longer than this many characters: "
            "a row is tokenized at once, at about 200 bytes of memory per character (a 93 MB line took 18 GB). "
            "Split long texts into lines, or raise this."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "When `--output_dir` holds checkpoints of an earlier run: delete them and train afresh "
            "(default: resume from the latest complete one, as transformers 4's run_clm.py did)."
        },
    )

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
        if self.max_row_chars < 1:
            raise RecipeInputError(f"`--max_row_chars` must be at least 1, got {self.max_row_chars}.")


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_args(types: tuple[type, ...], defaults: dict[str, Any], argv: list[str] | None = None) -> tuple:
    """Parse the recipe's dataclasses from the command line, optionally after a `.yaml`/`.json` config file given
    first: the file's values replace the defaults and the flags after it replace the file's (as TRL's `--config`).

    ``defaults`` are the recipe's own defaults for training arguments (e.g. ``predict_with_generate``); they are the
    parser's defaults, so `--help` shows them. A misspelled flag or key is refused with the nearest valid one.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(types)
    parser.set_defaults(**defaults)
    config_file = argv[0] if argv and Path(argv[0]).suffix in CONFIG_SUFFIXES else None
    flags = argv[1:] if config_file is not None else argv
    try:
        if config_file is not None:
            parser.set_defaults(**read_config_file(types, config_file))
        _, unknown = parser.parse_known_args(flags)
        if unknown:
            known = [option for action in parser._actions for option in action.option_strings]
            raise RecipeInputError(unknown_arguments_message(unknown, known))
        return parser.parse_args_into_dataclasses(flags)
    except RecipeInputError:
        raise
    except ValueError as err:  # the arguments' own checks (`__post_init__`)
        raise RecipeInputError(f"{config_file} and the command line: {err}" if config_file and flags
                               else f"{config_file}: {err}" if config_file else str(err)) from err


def read_config_file(types: tuple[type, ...], path: str) -> dict[str, Any]:
    """A config file's values, converted as the command line converts them; unknown keys are refused."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError as err:
        raise RecipeInputError(f"Config file not found: {err.filename}") from err
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise RecipeInputError(f"{path} is not valid YAML or JSON: {err}".replace("\n", " ")) from err
    if not isinstance(values, (dict, type(None))):
        raise RecipeInputError(f"{path}: the file must hold a mapping of argument names to values.")
    values = values or {}
    known = {f.name for dtype in types for f in dataclasses.fields(dtype) if f.init}
    unknown = [key for key in values if key not in known]
    if unknown:
        raise RecipeInputError(f"{path}: {unknown_arguments_message(unknown, known, what='key')}")
    return coerce_config_values(types, values, path)


# The field types a config-file value is checked against; other annotations (enums, unions) are left to the field.
_SCALARS = (bool, int, float, str)


def _field_kind(hint) -> tuple[type, bool] | None:
    """(scalar type, is a list of it) for `X`, `X | None`, `list[X]`, `list[X] | None`; None for anything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, pytypes.UnionType):
        if len(args) != 1:
            return None
        hint = args[0]
    if hint in _SCALARS:
        return hint, False
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in _SCALARS:
        return typing.get_args(hint)[0], True
    return None


def _coerce(name: str, value, kind: type):
    """`value` as the command line would turn the text of it into `kind`; RecipeInputError naming `name` if not."""
    shown = f"{value!r} ({type(value).__name__})"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return string_to_bool(value)
            except ArgumentTypeError:
                pass
        raise RecipeInputError(f"`{name}` must be true or false, got {shown}.")
    if kind is str:
        # Some text fields also take a boolean (`fsdp: true`, `resume_from_checkpoint: true`); a number is a slip.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise RecipeInputError(f"`{name}` must be text, got {shown}: put it in quotes.")
        return value
    if isinstance(value, bool):  # YAML's true/false: never a number here
        raise RecipeInputError(f"`{name}` must be a number, got the boolean {value}.")
    what = "a whole number" if kind is int else "a number"
    if isinstance(value, str):
        try:
            return kind(value)  # as argparse converts `--flag 1e-3`
        except ValueError:
            raise RecipeInputError(f"`{name}` must be {what}, got {shown}.") from None
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    raise RecipeInputError(f"`{name}` must be {what}, got {shown}.")


def coerce_config_values(types: tuple[type, ...], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A config file's values as the command line gives them, checked against the dataclass field types.

    PyYAML reads `1e-3` as a string and `yes` as a boolean; `HfArgumentParser.parse_dict` passes values through
    unchecked, so a wrong one fails far away (inside the optimizer, after all preprocessing). Here numbers given as
    text are converted as `--flag 1e-3` would be, booleans are refused for numbers, numbers for text, and each
    error names the file and the field.
    """
    kinds = {}
    for dtype in types:
        hints = typing.get_type_hints(dtype)
        kinds.update({f.name: _field_kind(hints[f.name]) for f in dataclasses.fields(dtype) if f.init})
    coerced = dict(values)
    try:
        for name, value in values.items():
            kind = kinds.get(name)
            if kind is None or value is None:
                continue
            scalar, is_list = kind
            if not is_list:
                coerced[name] = _coerce(name, value, scalar)
            elif isinstance(value, list):
                coerced[name] = [_coerce(f"{name}[{i}]", item, scalar) for i, item in enumerate(value)]
            elif not isinstance(value, str):  # one string stands for a one-item list, as on the command line
                raise RecipeInputError(f"`{name}` must be a list of {scalar.__name__} values, got {value!r}.")
    except RecipeInputError as err:
        raise RecipeInputError(f"{source}: {err}") from None
    return coerced


def no_pinned_memory_without_accelerator(training_args) -> None:
    """Pinned memory needs an accelerator: without one, every DataLoader the Trainer builds warns about it."""
    if not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False


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


def load_raw_datasets(
    data_args: DataArguments,
    cache_dir: str | None,
    seed: int,
    check: Callable[[Dataset, str], None] | None = None,
) -> DatasetDict:
    """`train` and `validation` splits from the Hub or local files; a missing validation split is carved from train.

    With `--pretrain_validation_file`, a split `pretrain_validation` holds it; with `--fisher_file`, a split `fisher`.
    ``check(dataset, where)`` sees each split as loaded, before the carving, so that its errors can name the file
    (``where``) and the row.
    """
    check = check or (lambda dataset, where: None)
    if data_args.dataset_name is not None:
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any loading failure gets the same advice
            raise RecipeInputError(
                f"`--dataset_name {data_args.dataset_name}` could not be loaded ({type(err).__name__}: {err}). "
                "Check the name and your connection, or use local `--train_file`/`--validation_file`."
            ) from err
        for split, dataset in raw.items():
            check(dataset, f"the {split} split of `--dataset_name {data_args.dataset_name}`")
    else:
        raw = DatasetDict()
        for split, name in (("train", "train_file"), ("validation", "validation_file")):
            if getattr(data_args, name) is not None:
                raw[split] = _load_file(getattr(data_args, name), name, cache_dir, check)
    if "train" not in raw:
        raise RecipeInputError(f"The dataset has no `train` split (splits: {list(raw)}).")
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    if data_args.pretrain_validation_file is not None:
        raw["pretrain_validation"] = _load_file(
            data_args.pretrain_validation_file, "pretrain_validation_file", cache_dir, check
        )
    if data_args.fisher_file is not None:
        raw["fisher"] = _load_file(data_args.fisher_file, "fisher_file", cache_dir, check)
    return raw


def _load_file(path: str, name: str, cache_dir: str | None, check: Callable[[Dataset, str], None]) -> Dataset:
    builder = DATA_BUILDERS[Path(path).suffix]
    extra = {"keep_linebreaks": True} if builder == "text" else {}
    where = f"`--{name}` {path}"
    try:
        dataset = load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **extra)
    except Exception as err:  # noqa: BLE001 - `datasets` wraps the cause; the file itself says what is wrong
        raise RecipeInputError(f"{where}: {describe_unreadable_file(path, err)}") from err
    try:
        check(dataset, where)
    except UnicodeDecodeError as err:  # the JSON reader keeps bytes that are not UTF-8; reading the rows fails
        raise RecipeInputError(f"{where}: {describe_unreadable_file(path, err)}") from err
    return dataset


def describe_unreadable_file(path: str, err: Exception) -> str:
    """Why `datasets` could not read a local data file, found in the file: empty, a line that is not UTF-8 or not
    JSON; else the innermost cause of the error."""
    data = Path(path).read_bytes()
    if not data.strip():
        return "the file is empty; give a file with at least one text or record."
    json_lines = Path(path).suffix in (".json", ".jsonl") and not _is_json_document(data)
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return (f"line {number} is not UTF-8 text (byte 0x{line[bad.start]:02x} at column {bad.start + 1}); "
                    "save the file as UTF-8.")
        if json_lines and text.strip():
            try:
                record = json.loads(text)
            except json.JSONDecodeError as bad:
                return f"line {number} is not valid JSON ({bad.msg} at column {bad.colno}); one object per line."
            if not isinstance(record, dict):
                return f"line {number} is a JSON {type(record).__name__}, not an object of column values."
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"it could not be read as {DATA_BUILDERS[Path(path).suffix]} data ({type(err).__name__}: {err})."


def _is_json_document(data: bytes) -> bool:
    """A .json file may hold one JSON document (a list of records) instead of JSON Lines."""
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def require_texts(values: Iterable, where: str, what: str, max_chars: int, allow_empty: bool = True) -> None:
    """Refuse, in one line naming ``where``, ``what`` and the rows (counted from 1), values that are missing or
    null, not text, longer than ``max_chars`` (`--max_row_chars`) or (unless ``allow_empty``) empty."""
    bad: dict[str, list[int]] = {}
    for row, value in enumerate(values, start=1):
        if value is None:
            bad.setdefault("missing or null", []).append(row)
        elif not isinstance(value, str):
            bad.setdefault(f"not text (e.g. {value!r})", []).append(row)
        elif len(value) > max_chars:
            problem = (f"longer than the `--max_row_chars` limit of {max_chars:,} characters (a row is tokenized at "
                       "once: split long texts into lines, or raise the limit)")
            bad.setdefault(problem, []).append(row)
        elif not allow_empty and not value.strip():
            bad.setdefault("empty", []).append(row)
    if bad:
        problem, rows = next(iter(bad.items()))
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise RecipeInputError(
            f"{where}: {what} is {problem} in {len(rows)} row(s) (row {shown}); fix or remove those rows."
        )


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


def resolve_checkpoint(training_args, overwrite_output_dir: bool = False) -> str | None:
    """The checkpoint to resume from, deciding before any side effect what a run in a used output folder does.

    `--resume_from_checkpoint true` means the latest complete checkpoint in `--output_dir`; a path must be a
    complete checkpoint. Without it, checkpoints of an earlier run are resumed from (the latest complete one) or,
    with `--overwrite_output_dir true`, deleted, so a fresh run's rotation and its mix with the old run cannot lose
    or confuse them; `false` refuses them unless overwritten. Incomplete checkpoints (a kill during a save) are
    skipped with a message. Every process decides the same; the main one deletes, and says on stdout what it does.
    """
    requested = training_args.resume_from_checkpoint
    if not training_args.do_train:
        return requested
    expected = dict(save_only_model=training_args.save_only_model,
                    l2_sp=getattr(training_args, "l2_mode", None) in ANCHORED_MODES,
                    fisher=getattr(training_args, "l2_mode", None) == "l2_sp_fisher",
                    l2_kl=bool(getattr(training_args, "l2_kl_coef", 0)))
    say = print if training_args.process_index == 0 else (lambda *_: None)
    word = str(requested).lower()  # a config file may give a boolean
    latest, fresh = word == "true", word == "false"
    if requested is not None and not (latest or fresh):
        if not Path(requested).is_dir():
            raise RecipeInputError(f"`--resume_from_checkpoint {requested}` is not a folder.")
        missing = missing_from_checkpoint(requested, **expected)
        if missing:
            raise RecipeInputError(
                f"`--resume_from_checkpoint {requested}` is incomplete (a run killed while saving it?); it lacks: "
                f"{'; '.join(missing)}. Resume from an earlier checkpoint."
            )
        return requested
    found = checkpoints_newest_first(training_args.output_dir)
    if not found:
        if latest:
            raise RecipeInputError(
                f"`--resume_from_checkpoint true`: {training_args.output_dir} holds no checkpoint-N folder to resume "
                "from; drop the flag to start a new run."
            )
        return None
    if fresh and not overwrite_output_dir:
        raise RecipeInputError(
            f"`--resume_from_checkpoint false`, but {training_args.output_dir} holds checkpoints of an earlier run: "
            "pass `--overwrite_output_dir true` to delete them and start afresh, or another `--output_dir`."
        )
    if not latest and overwrite_output_dir:
        check_free(training_args.output_dir)  # not the checkpoints of a run still training there
        with training_args.main_process_first(desc="deleting the earlier run's checkpoints", local=False):
            if training_args.should_save:
                for folder in found:
                    shutil.rmtree(folder)
                say(f"--overwrite_output_dir: deleted {len(found)} checkpoint(s) of an earlier run in "
                    f"{training_args.output_dir}; training from the start.")
        return None
    for folder in found:
        missing = missing_from_checkpoint(folder, **expected)
        if not missing:
            how = "" if latest else " (found in --output_dir; pass --overwrite_output_dir true to start afresh)"
            say(f"Resuming from {folder}{how}.")
            return folder
        say(f"Skipping the incomplete checkpoint {folder}: it lacks {'; '.join(missing)}.")
    raise RecipeInputError(
        f"{training_args.output_dir} holds checkpoints but none is complete (see above): pass "
        "`--overwrite_output_dir true` to delete them and start afresh, or another `--output_dir`."
    )


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


def called_command(module_name: str, argv: list[str] | None) -> str | None:
    """The command line that runs the recipe ``module_name`` as `main(argv)` did, for the card of a run started
    from Python (the sweep, the demo, a script); None when it ran from its own command line, which the card records.
    """
    if argv is None:
        return None
    shipped = module_name.startswith(f"{RECIPES_PACKAGE}.")
    program = ["-m", module_name] if shipped else [sys.modules[module_name].__file__]
    return shlex.join(["python", *program, *argv])


def write_card_and_push(trainer: Trainer, training_args, card_kwargs: dict) -> None:
    """Write the model card; with `--push_to_hub`, also push model, tokenizer and card (after the local save).
    A run that trained nothing (`--do_train false`: an evaluation) gets neither: it has no fine-tuning to describe."""
    if not training_args.do_train:
        say = logger.warning if training_args.push_to_hub else logger.info
        say("Nothing was trained (--do_train false): no model card is written and nothing is pushed.")
        return
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)


def run(main: Callable[[], Any]) -> None:
    """Run a recipe's `main` as a script: any bad input, unreadable file or failed push ends in one line
    (`--log_level debug` shows the traceback too), and the process group, if any, is torn down before exit (gloo
    can abort a process that exits with it alive)."""
    try:
        main()
    except (ValueError, OSError, HubPublishError) as err:  # RecipeInputError is a ValueError
        logger.debug("Traceback of the error below:", exc_info=True)
        sys.exit(f"error: {err}")
    finally:
        end_process_group()


def end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fisher_dataset(processed: dict, data_args: DataArguments) -> Dataset | None:
    """The `--fisher_file` examples, preprocessed like the training data, named for the card (None without it)."""
    dataset = processed.get("fisher")
    if dataset is not None:
        dataset.l2_fisher_description = f"`{Path(data_args.fisher_file).name}`"
    return dataset
