"""Fine-tune a translation model (default: MarianMT opus-mt-en-de) with an L2 / L2-SP penalty.

The shape of transformers' `run_translation.py` with the `--l2_*` flags of `hf_l2.L2Seq2SeqConfig` added.
Data are pairs, either in the `{"translation": {"en": ..., "de": ...}}` layout or as two columns (by default
named after `--source_lang` / `--target_lang`). Evaluation generates translations and reports `eval_bleu` and
`eval_chrf` (sacreBLEU, from metric modules shipped with hf_l2, so no Hub access is needed) and the references'
`eval_perplexity`, and writes source / reference / hypothesis triples to `translations.jsonl`. With
`--pretrain_validation_file`, held-out pairs of the pretraining domain get the same metrics as `eval_pretrain_*`.

    python -m hf_l2.recipes.marian_translation --dataset_name wmt16 --dataset_config_name de-en \\
        --source_lang en --target_lang de --output_dir runs/opus-en-de --l2_mode l2_sp --l2_coef 0.01
    python -m hf_l2.recipes.marian_translation marian_translation.yaml --max_steps 3  # a config; flags after it win

    accelerate launch --config_file single_gpu.yaml -m hf_l2.recipes.marian_translation ...
    accelerate launch --config_file multi_gpu.yaml  -m hf_l2.recipes.marian_translation ...
    accelerate launch --config_file fsdp2.yaml      -m hf_l2.recipes.marian_translation ...
    accelerate launch --config_file zero2.yaml      -m hf_l2.recipes.marian_translation ... --l2_impl loss
    accelerate launch --config_file zero3.yaml      -m hf_l2.recipes.marian_translation ... --l2_impl loss
    accelerate launch --config_file cpu.yaml        -m hf_l2.recipes.marian_translation ...
    accelerate launch --multi_gpu --num_processes 2 -m hf_l2.recipes.marian_translation ... --use_cpu true  # 2 CPU

The config files ship with hf_l2 (`hf_l2/recipes/configs/`, `hf_l2/recipes/accelerate_configs/`: copy them). From
a checkout, `python recipes/marian_translation.py ...` and the paths `recipes/configs/...` work too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from hf_l2 import L2Seq2SeqConfig, L2Seq2SeqTrainer
from hf_l2.tools import metrics
from hf_l2.tools.recipe_common import (
    DataArguments,
    ModelArguments,
    RecipeInputError,
    called_command,
    evaluate_with_forgetting,
    fisher_dataset,
    limit,
    load_raw_datasets,
    no_pinned_memory_without_accelerator,
    parse_args,
    require_architecture,
    require_texts,
    resolve_checkpoint,
    run,
    setup_logging,
    train_and_report,
    write_card_and_push,
    write_jsonl,
)

logger = logging.getLogger(__name__)

DEFAULTS = {"do_train": True, "do_eval": True, "predict_with_generate": True}


@dataclass
class TranslationModelArguments(ModelArguments):
    model_name_or_path: str = field(
        default="Helsinki-NLP/opus-mt-en-de", metadata={"help": "Hub id or local folder of an encoder-decoder."}
    )


@dataclass
class TranslationDataArguments(DataArguments):
    source_lang: str = field(default="en", metadata={"help": "Source language code (a key of `translation`)."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    source_column: str | None = field(
        default=None, metadata={"help": "Column of source texts without a `translation` column (default: source_lang)."}
    )
    target_column: str | None = field(
        default=None, metadata={"help": "Column of target texts without a `translation` column (default: target_lang)."}
    )
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer inputs are truncated)."})
    max_target_length: int = field(
        default=128,
        metadata={"help": "Target tokens kept (longer targets are truncated); also how long evaluation generates, "
                  "unless `--generation_max_length` says otherwise."},
    )


def pair_columns(dataset, data_args: TranslationDataArguments) -> tuple[str, str] | None:
    """The (source, target) columns of the two-column layout, or None for the `translation` layout."""
    if "translation" in dataset.column_names:
        return None
    return data_args.source_column or data_args.source_lang, data_args.target_column or data_args.target_lang


def pair_reader(dataset, data_args: TranslationDataArguments):
    """A function example → (source, target), in the `translation` layout or two plain columns."""
    columns = pair_columns(dataset, data_args)
    if columns is None:
        src, tgt = data_args.source_lang, data_args.target_lang
        return lambda ex: (ex["translation"][src], ex["translation"][tgt])
    return lambda ex: (ex[columns[0]], ex[columns[1]])


def check_pairs(dataset, where: str, data_args: TranslationDataArguments) -> None:
    """Every row of a split holds a source and a target text, neither empty: an empty target would teach the
    model to stop at once."""
    columns = pair_columns(dataset, data_args)
    if columns is None:
        entries = [entry or {} for entry in dataset["translation"]]
        keys = sorted({key for entry in entries for key in entry})
        missing = [k for k in (data_args.source_lang, data_args.target_lang) if k not in keys]
        if missing:
            raise RecipeInputError(
                f"The `translation` entries of {where} have keys {keys}, not {missing}: "
                "set `--source_lang` / `--target_lang` to keys the data has."
            )
        texts = {f"`translation.{k}`": [entry.get(k) for entry in entries]
                 for k in (data_args.source_lang, data_args.target_lang)}
    else:
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise RecipeInputError(
                f"{where} has no column {missing} and no `translation` column; its columns: "
                f"{dataset.column_names}. Set `--source_column` / `--target_column` (or `--source_lang` / "
                "`--target_lang`)."
            )
        texts = {f"`{c}`": dataset[c] for c in columns}
    for what, values in texts.items():
        require_texts(values, where, f"the text of {what}", data_args.max_row_chars, allow_empty=False)


def tokenize_pairs(raw, tokenizer, data_args, training_args):
    """Tokenized splits and the validation split's reader; each split is read in its own layout."""
    readers = {split: pair_reader(dataset, data_args) for split, dataset in raw.items()}

    def tokenize(batch, read):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        sources, targets = zip(*(read(row) for row in rows))
        inputs = tokenizer(list(sources), max_length=data_args.max_source_length, truncation=True)
        inputs["labels"] = tokenizer(text_target=list(targets), max_length=data_args.max_target_length,
                                     truncation=True)["input_ids"]
        return inputs

    with training_args.main_process_first(desc="tokenizing"):
        tokens = DatasetDict({
            split: dataset.map(tokenize, fn_kwargs={"read": readers[split]}, batched=True,
                               remove_columns=dataset.column_names, desc=f"Tokenizing {split}",
                               num_proc=data_args.preprocessing_num_workers,
                               load_from_cache_file=not data_args.overwrite_cache)
            for split, dataset in raw.items()
        })
    return tokens, readers["validation"]


def bleu_and_chrf(tokenizer):
    """`compute_metrics` for generated token ids: sacreBLEU BLEU and chrF on the decoded text."""
    bleu, chrf = metrics.load("sacrebleu"), metrics.load("chrf")

    def compute(eval_preds):
        preds, labels = eval_preds
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        hyps = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        lengths = [np.count_nonzero(p != tokenizer.pad_token_id) for p in preds]
        return {
            "bleu": bleu.compute(predictions=hyps, references=refs)["score"],
            "chrf": chrf.compute(predictions=hyps, references=refs)["score"],
            "gen_len": float(np.mean(lengths)),
        }

    return compute


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(
        (TranslationModelArguments, TranslationDataArguments, L2Seq2SeqConfig), DEFAULTS, argv
    )
    setup_logging(training_args)
    no_pinned_memory_without_accelerator(training_args)
    training_args.resume_from_checkpoint = resolve_checkpoint(training_args, data_args.overwrite_output_dir)
    set_seed(training_args.seed)
    if training_args.generation_max_length is None:  # else the model's own, often 20 tokens, in every evaluation
        training_args.generation_max_length = data_args.max_target_length
    if training_args.do_eval and not training_args.predict_with_generate:
        logger.warning("Without `--predict_with_generate`, evaluation reports the loss only (no BLEU / chrF).")

    raw = load_raw_datasets(data_args, model_args.cache_dir, training_args.seed,
                            check=lambda dataset, where: check_pairs(dataset, where, data_args))
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
               trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub)
    require_architecture(config, encoder_decoder=True, name=model_args.model_name_or_path,
                         recipe="hf_l2.recipes.marian_translation", other="python -m hf_l2.recipes.gpt2_generation")
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config, **hub)

    tokens, read = tokenize_pairs(raw, tokenizer, data_args, training_args)
    train_set = limit(tokens["train"], data_args.max_train_samples)
    eval_set = limit(tokens["validation"], data_args.max_eval_samples)
    pretrain_set = tokens.get("pretrain_validation")
    if pretrain_set is not None:
        pretrain_set = limit(pretrain_set, data_args.max_eval_samples)
    pad_to = 8 if training_args.fp16 or training_args.bf16 else None
    trainer = L2Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set if training_args.do_train else None,
        fisher_dataset=fisher_dataset(tokens, data_args),
        eval_dataset=eval_set if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=pad_to),
        compute_metrics=bleu_and_chrf(tokenizer) if training_args.predict_with_generate else None,
    )

    def evaluate() -> dict:
        return evaluate_with_forgetting(trainer, pretrain_set)

    results = train_and_report(trainer, training_args, len(train_set), len(eval_set), evaluate)
    if data_args.num_samples > 0:
        shown = range(min(data_args.num_samples, len(eval_set)))
        predictions = trainer.predict(eval_set.select(shown)).predictions
        hyps = tokenizer.batch_decode(np.where(predictions != -100, predictions, tokenizer.pad_token_id),
                                      skip_special_tokens=True)
        if trainer.is_world_process_zero():
            pairs = [read(raw["validation"][i]) for i in shown]
            write_jsonl(Path(training_args.output_dir) / "translations.jsonl",
                        [{"source": s, "reference": r, "hypothesis": h.strip()} for (s, r), h in zip(pairs, hyps)])

    card = {"command": called_command(__name__, argv), "finetuned_from": model_args.model_name_or_path,
            "tasks": "translation", "language": [data_args.source_lang, data_args.target_lang]}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name or ''}".strip()
    write_card_and_push(trainer, training_args, card)
    return results


if __name__ == "__main__":
    run(main)
