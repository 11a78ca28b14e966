"""Quick start: fine-tune a tiny GPT-2 with L2-SP on text this machine already has, offline, in about a minute.

    python -m hf_l2.examples.quickstart --output_dir runs/quickstart --l2_mode l2_sp --l2_coef 0.1

Every `L2Config` flag works here (`--help` lists them). The model is built from a config and reads bytes
(vocabulary 256), so nothing is downloaded; the text is the docstrings of Python's standard library.
"""

import inspect
import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from hf_l2 import L2Config, L2Trainer, WeightNormCallback

BLOCK = 64


def docstring_blocks(modules: list[str]) -> torch.Tensor:
    """Byte blocks of the docstrings of some standard-library modules."""
    text = ""
    for name in modules:
        module = __import__(name)
        text += "\n".join(inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return data[: len(data) // BLOCK * BLOCK].view(-1, BLOCK)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main() -> None:
    defaults = ["--max_steps", "60", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
                "--logging_steps", "20", "--report_to", "tensorboard", "--save_strategy", "no"]
    (args,) = HfArgumentParser(L2Config).parse_args_into_dataclasses(defaults + sys.argv[1:])
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)  # stands in for a pretrained model; use from_pretrained("gpt2") with the Hub
    blocks = docstring_blocks(["json", "argparse", "collections"])
    train, held_out = Blocks(blocks[:-32]), Blocks(blocks[-32:])
    trainer = L2Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                        callbacks=[WeightNormCallback(track_drift=True)])
    trainer.train()
    metrics = trainer.evaluate()
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})  # none if steps < logging_steps
    shown = ("loss", "eval_loss", "l2/", "weights/drift")
    summary = {k: v for k, v in {**last, **metrics}.items() if k.startswith(shown)}
    print(json.dumps(summary, indent=2))
    trainer.save_model()


if __name__ == "__main__":
    main()
