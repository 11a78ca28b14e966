"""The demo's starting models: a tiny GPT-2 and a tiny Marian, pretrained here on the pretraining domain.

Each is built from a config with a tokenizer trained on its pretraining data, then trained by the task's own
recipe with `--l2_mode none`, exactly as a user would run it. A starting model is input to the demo, like its
data: it is cached under a folder named by a hash of everything it depends on (the data, these settings, the
torch and transformers versions) and rebuilt whenever one of them changes. Results are never cached.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

from hf_l2.tools.demo.data import DemoData, move_into_cache
from hf_l2.tools.local_tokenizers import train_bpe_tokenizer, train_marian_tokenizer
from hf_l2.tools.recipe_common import load_recipe
from hf_l2.tools.recipe_runs import RUN_DEFAULTS

RECIPES = {"generation": "gpt2_generation", "translation": "marian_translation"}


@dataclass(frozen=True)
class Pretraining:
    """Model size and pretraining schedule of one starting model."""

    vocab_size: int
    width: int  # hidden size (n_embd / d_model)
    layers: int  # GPT-2 blocks; Marian encoder and decoder layers each
    heads: int
    context: int  # positions (GPT-2: also the block size)
    steps: int
    batch_size: int
    learning_rate: float


GENERATION = Pretraining(vocab_size=1024, width=64, layers=2, heads=4, context=64, steps=400, batch_size=8,
                         learning_rate=3e-3)
TRANSLATION = Pretraining(vocab_size=1000, width=128, layers=1, heads=4, context=64, steps=2000, batch_size=32,
                          learning_rate=2e-3)



def starting_model(task: str, data: DemoData, settings: Pretraining, cache_dir: str | Path) -> Path:
    """The folder of the pretrained starting model (model + tokenizer) for `"generation"` or `"translation"`."""
    identity = {"task": task, "data": data.key, "settings": asdict(settings), "torch": torch.__version__,
                "transformers": transformers.__version__}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"start-{task}-{key}"
    if (folder / "model.safetensors").is_file():
        print(f"{task}: starting model reused from {folder}", flush=True)
        return folder
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".start-{task}-"))
    try:
        init = _save_initial_model(task, data, settings, staging / "init")
        metrics = _pretrain(task, data, settings, init, staging / "model", Path(cache_dir) / "datasets")
        (staging / "model" / "pretraining.json").write_text(json.dumps({**identity, "metrics": metrics}, indent=2))
        shutil.move(staging / "pretraining.log", staging / "model" / "pretraining.log")
        move_into_cache(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{task}: starting model pretrained in {time.perf_counter() - started:.0f} s ({folder})", flush=True)
    return folder


def _save_initial_model(task: str, data: DemoData, s: Pretraining, folder: Path) -> Path:
    torch.manual_seed(0)
    if task == "generation":
        texts = data.generation("pretrain_train").read_text(encoding="utf-8").splitlines()
        tokenizer = train_bpe_tokenizer(texts, vocab_size=s.vocab_size, model_max_length=s.context)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=s.context, n_embd=s.width, n_layer=s.layers,
                            n_head=s.heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        rows = [json.loads(line)["translation"] for line in data.translation("pretrain_train").open(encoding="utf-8")]
        tokenizer = train_marian_tokenizer([r["en"] for r in rows], [r["de"] for r in rows],
                                           vocab_size=s.vocab_size, model_max_length=s.context)
        config = MarianConfig(
            vocab_size=len(tokenizer), d_model=s.width, encoder_layers=s.layers, decoder_layers=s.layers,
            encoder_attention_heads=s.heads, decoder_attention_heads=s.heads, encoder_ffn_dim=4 * s.width,
            decoder_ffn_dim=4 * s.width, max_position_embeddings=s.context, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
            # The original transformer's scheme (weights ~ N(0, 1/width), embeddings scaled by √width): with the
            # default std of 0.02, the sinusoidal positions outweigh the tokens' embeddings tens of times over
            # and a small model from scratch barely learns.
            scale_embedding=True, init_std=s.width**-0.5,
        )
        model = MarianMTModel(config)
        model.generation_config.num_beams = 1  # greedy: evaluation stays fast on a CPU
        model.generation_config.max_length = s.context
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pretrain(task: str, data: DemoData, s: Pretraining, init: Path, out: Path, datasets_cache: Path) -> dict:
    files = data.generation if task == "generation" else data.translation
    argv = [
        "--model_name_or_path", str(init), "--output_dir", str(out), "--cache_dir", str(datasets_cache),
        "--train_file", str(files("pretrain_train")), "--validation_file", str(files("pretrain_validation")),
        "--l2_mode", "none", "--max_steps", str(s.steps), "--per_device_train_batch_size", str(s.batch_size),
        "--learning_rate", str(s.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", str(s.steps // 10),
        "--weight_decay", "0", "--use_cpu", "true", "--seed", "0", *RUN_DEFAULTS,
    ]
    if task == "generation":
        argv += ["--block_size", str(s.context)]
    else:
        argv += ["--max_source_length", str(s.context), "--max_target_length", str(s.context),
                 "--per_device_eval_batch_size", "64", "--train_sampling_strategy", "group_by_length"]
    recipe = load_recipe(RECIPES[task])
    with open(out.parent / "pretraining.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        return recipe.main(argv)
