"""Supervised fine-tuning on a chat dataset through TRL, with an L2-SP penalty: `L2SFTTrainer` + `L2SFTConfig`.

Offline (the default), in a few seconds on a CPU: a tiny GPT-2 built from a config, a tokenizer trained here on the
conversations, and a dozen conversations written below.

    python -m hf_l2.examples.trl_sft --output_dir runs/trl_sft

With the Hub, a real chat model and dataset (any `messages` or `prompt`/`completion` dataset works):

    python -m hf_l2.examples.trl_sft --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --dataset_name trl-lib/Capybara --output_dir runs/smollm2-capybara-l2sp \
        --l2_coef 0.01 --max_steps 500 --per_device_train_batch_size 4 --gradient_accumulation_steps 4

Every field of `trl.SFTConfig` and every `--l2_*` field of hf_l2 is a flag here, or a key of a `--config` YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trl import TrlParser

from hf_l2.integrations.trl import L2SFTConfig, L2SFTTrainer
from hf_l2.tools.local_tokenizers import train_chat_tokenizer

CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("What colour is grass?", "Grass is green."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("Thank you.", "You are welcome."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is three plus one?", "Three plus one is four."),
    ("Name a fruit.", "An apple is a fruit."),
]


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder of a causal LM; default: a tiny GPT-2 built offline."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub chat dataset; default: the inline one."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})


def offline_model_and_data():
    """A tiny model that learns the inline conversations: nothing is downloaded."""
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS]
    )
    tokenizer = train_chat_tokenizer([f"{q} {a}" for q, a in CONVERSATIONS] * 10, vocab_size=300, model_max_length=128)
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                       **special))
    return model, tokenizer, data


def main() -> None:
    parser = TrlParser((ScriptArguments, L2SFTConfig))
    if not torch.cuda.is_available():
        parser.set_defaults(bf16=False)  # TRL's default, bf16, needs a GPU; `--bf16 true` still asks for it
    script, args = parser.parse_args_and_config()
    if script.model_name_or_path is None:
        model, tokenizer, data = offline_model_and_data()
    else:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        data = None
    if script.dataset_name is not None:
        data = load_dataset(script.dataset_name, split=script.dataset_split)
    if data is None:
        raise ValueError("With `--model_name_or_path`, also give `--dataset_name` (a Hub chat dataset).")

    # θ₀ of L2-SP is the model as given here; `peft_config=...` would anchor the LoRA adapters instead.
    trainer = L2SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()  # weights, tokenizer and the card (TRL's tags and citation + the regularization section)
    last = next((h for h in reversed(trainer.state.log_history) if "l2/drift" in h), None)  # none: steps < logging
    if last is not None:
        print(f"step {last['step']}: loss {last['loss']:.4g}, l2/penalty {last['l2/penalty']:.4g}, "
              f"l2/drift {last['l2/drift']:.4g}")
    print(f"card in {args.output_dir}/README.md")


if __name__ == "__main__":
    main()
