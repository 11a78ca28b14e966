"""Fine-tune a causal LM (default: GPT-2) for text generation with an L2 / L2-SP penalty.

The shape of transformers' `run_clm.py` with the `--l2_*` flags of `hf_l2.L2Config` added. Texts are tokenized,
concatenated and cut into `--block_size` blocks; evaluation reports `eval_loss` and `eval_perplexity` and writes
sampled continuations of held-out prompts to `samples.jsonl`. With `--pretrain_validation_file`, held-out text of
the pretraining domain gets the same metrics as `eval_pretrain_*`.

    python -m hf_l2.recipes.gpt2_generation --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --output_dir runs/gpt2-wikitext --l2_mode l2_sp --l2_coef 0.01
    python -m hf_l2.recipes.gpt2_generation gpt2_generation.yaml --max_steps 3   # a config file; flags after it win

    accelerate launch --config_file single_gpu.yaml -m hf_l2.recipes.gpt2_generation ...
    accelerate launch --config_file multi_gpu.yaml  -m hf_l2.recipes.gpt2_generation ...
    accelerate launch --config_file fsdp2.yaml      -m hf_l2.recipes.gpt2_generation ...
    accelerate launch --config_file zero2.yaml      -m hf_l2.recipes.gpt2_generation ... --l2_impl loss
    accelerate launch --config_file zero3.yaml      -m hf_l2.recipes.gpt2_generation ... --l2_impl loss
    accelerate launch --config_file cpu.yaml        -m hf_l2.recipes.gpt2_generation ...
    accelerate launch --multi_gpu --num_processes 2 -m hf_l2.recipes.gpt2_generation ... --use_cpu true  # 2 CPU procs

The config files ship with hf_l2 (`hf_l2/recipes/configs/`, `hf_l2/recipes/accelerate_configs/`: copy them). From
a checkout, `python recipes/gpt2_generation.py ...` and the paths `recipes/configs/...` work too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

from hf_l2 import L2Config, L2Trainer
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

DEFAULTS = {"do_train": True, "do_eval": True}


@dataclass
class GenerationModelArguments(ModelArguments):
    model_name_or_path: str = field(default="gpt2", metadata={"help": "Hub id or local folder of a causal LM."})


@dataclass
class GenerationDataArguments(DataArguments):
    text_column: str = field(default="text", metadata={"help": "Column holding the text (json/csv data)."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training block (default: the model's context, at most 1024)."}
    )
    prompt_tokens: int = field(default=32, metadata={"help": "Tokens of each held-out block used as a prompt."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens sampled after each prompt."})


def check_texts(dataset, where: str, data_args) -> None:
    """Every row of a split holds its text (possibly empty: texts are joined into one stream)."""
    if data_args.text_column not in dataset.column_names:
        raise RecipeInputError(
            f"`--text_column {data_args.text_column}` is not in {where}; its columns: {dataset.column_names}."
        )
    require_texts(dataset[data_args.text_column], where, f"the text (`{data_args.text_column}`)",
                  data_args.max_row_chars)


def tokenize_and_block(raw, tokenizer, data_args, training_args, block_size):
    """Tokenize every text, concatenate them and cut the stream into blocks of `block_size` tokens."""

    def tokenize(batch):
        return tokenizer(batch[data_args.text_column])

    def group(batch):
        joined = {k: list(chain.from_iterable(batch[k])) for k in batch}
        total = len(joined["input_ids"]) // block_size * block_size
        blocks = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        blocks["labels"] = [b.copy() for b in blocks["input_ids"]]
        return blocks

    common = dict(batched=True, num_proc=data_args.preprocessing_num_workers,
                  load_from_cache_file=not data_args.overwrite_cache)
    with training_args.main_process_first(desc="tokenizing and grouping"):
        blocks = DatasetDict({
            split: dataset.map(tokenize, remove_columns=dataset.column_names, desc=f"Tokenizing {split}", **common)
            .map(group, desc=f"Grouping {split} into blocks of {block_size}", **common)
            for split, dataset in raw.items()
        })
    for split in blocks:
        if len(blocks[split]) == 0:
            raise RecipeInputError(
                f"The {split} data holds fewer than `--block_size {block_size}` tokens: lower --block_size "
                "or give more data."
            )
    return blocks


def model_context(config) -> int:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


def choose_block_size(requested: int | None, tokenizer, config) -> int:
    context = model_context(config)
    if requested is None:
        return min(1024, context, tokenizer.model_max_length)
    if requested > context:
        raise RecipeInputError(f"`--block_size {requested}` exceeds the model's context of {context} tokens.")
    if requested < 2:
        raise RecipeInputError("`--block_size` must be at least 2 tokens.")
    return requested


def sample_continuations(model, tokenizer, blocks, data_args, seed) -> list[dict]:
    """Continue the first tokens of some held-out blocks by sampling; every rank runs it (FSDP needs all ranks)."""
    n_prompt = min(data_args.prompt_tokens, len(blocks[0]["input_ids"]) - 1)
    n_new = min(data_args.max_new_tokens, model_context(model.config) - n_prompt)  # stay inside the context
    rows = []
    model.eval()
    set_seed(seed)
    for example in blocks.select(range(min(data_args.num_samples, len(blocks)))):
        ids = torch.tensor([example["input_ids"]], device=model.device)
        with torch.no_grad():
            out = model.generate(
                ids[:, :n_prompt],
                attention_mask=torch.ones_like(ids[:, :n_prompt]),
                do_sample=True,
                top_p=0.95,
                max_new_tokens=n_new,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        rows.append({
            "prompt": tokenizer.decode(ids[0, :n_prompt]),
            "reference": tokenizer.decode(ids[0, n_prompt:]),
            "generated": tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True),
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(
        (GenerationModelArguments, GenerationDataArguments, L2Config), DEFAULTS, argv
    )
    setup_logging(training_args)
    no_pinned_memory_without_accelerator(training_args)
    training_args.resume_from_checkpoint = resolve_checkpoint(training_args, data_args.overwrite_output_dir)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args.cache_dir, training_args.seed,
                            check=lambda dataset, where: check_texts(dataset, where, data_args))
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
               trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub)
    require_architecture(config, encoder_decoder=False, name=model_args.model_name_or_path,
                         recipe="hf_l2.recipes.gpt2_generation", other="python -m hf_l2.recipes.marian_translation")
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    block_size = choose_block_size(data_args.block_size, tokenizer, config)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config, **hub)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # new rows are treated as new parameters by L2-SP

    blocks = tokenize_and_block(raw, tokenizer, data_args, training_args, block_size)
    train_set = limit(blocks["train"], data_args.max_train_samples)
    eval_set = limit(blocks["validation"], data_args.max_eval_samples)
    pretrain_set = blocks.get("pretrain_validation")
    if pretrain_set is not None:
        pretrain_set = limit(pretrain_set, data_args.max_eval_samples)

    trainer = L2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set if training_args.do_train else None,
        fisher_dataset=fisher_dataset(blocks, data_args),
        eval_dataset=eval_set if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    def evaluate() -> dict:
        return evaluate_with_forgetting(trainer, pretrain_set)

    metrics = train_and_report(trainer, training_args, len(train_set), len(eval_set), evaluate)
    if data_args.num_samples > 0:
        samples = sample_continuations(trainer.model, tokenizer, eval_set, data_args, training_args.seed)
        if trainer.is_world_process_zero():
            write_jsonl(Path(training_args.output_dir) / "samples.jsonl", samples)

    card = {"command": called_command(__name__, argv), "finetuned_from": model_args.model_name_or_path,
            "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name or ''}".strip()
    write_card_and_push(trainer, training_args, card)
    return metrics


if __name__ == "__main__":
    run(main)
