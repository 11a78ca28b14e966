"""What the tests share, imported as a module (`from helpers import ...`) by the tests in every folder under tests/
and by the torchrun workers in tests/distributed/: tiny models and data built locally (nothing here touches the
network), comparisons, the multi-process launcher, the runs and references that tests in several files build (the
KL's deep-copy reference, LoRA models, Fisher trainers, a tiny demo's sizes), and the pretrained-looking models,
data files and command lines of the recipe tests. Importing it sets the offline environment."""

from __future__ import annotations

import copy
import csv
import inspect
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel, TrainerCallback

from hf_l2 import L2Trainer
from hf_l2.tools.local_tokenizers import train_bpe_tokenizer, train_marian_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def tiny_gpt2(seed: int = 0, vocab_size: int = 64) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 without dropout, so that runs are deterministic and comparable."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def gpt2_from_checkpoint(checkpoint) -> GPT2LMHeadModel:
    """The model a user would rebuild from a checkpoint folder's weights."""
    model = tiny_gpt2()
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    model.tie_weights()
    return model


def penalized(name: str) -> bool:
    """GPT-2's decayed weights, the Trainer's own no-decay rule written out: no biases, no LayerNorms."""
    return "bias" not in name and ".ln_" not in name


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with some padding (label -100), so per-batch token counts differ."""

    def __init__(self, n: int = 16, length: int = 12, vocab_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, length), generator=g)
        self.labels = self.ids.clone()
        pad = torch.randint(length // 2, length + 1, (n,), generator=g)
        for i, p in enumerate(pad.tolist()):
            self.labels[i, p:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_marian(seed: int = 0, vocab_size: int = 40) -> MarianMTModel:
    """A 1-layer MarianMT without dropout. Its forward takes `**kwargs` but its loss is a plain mean that ignores
    `num_items_in_batch` (the Trainer guesses otherwise from the signature)."""
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return MarianMTModel(config)


class PairDataset(torch.utils.data.Dataset):
    """Random source / target token sequences, every target of the same length (no padding): the mean over a
    batch's tokens is then the mean of its micro-batches' means, however the batch is split."""

    def __init__(self, n: int = 8, source_length: int = 8, target_length: int = 6, vocab_size: int = 40):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab_size, (n, source_length), generator=g)
        self.labels = torch.randint(2, vocab_size, (n, target_length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Regression(nn.Module):
    """y ≈ X·w + b, loss ½·mean((ŷ − y)²); its forward takes no loss kwargs, so the Trainer divides by GA."""

    def __init__(self, dim: int, w0: torch.Tensor | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim) if w0 is None else w0.clone())
        self.head = nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        pred = x @ self.w + self.head
        return {"loss": 0.5 * ((pred - y) ** 2).mean()}


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def l2_args(tmp_path, **overrides):
    from hf_l2 import L2Config

    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return L2Config(**defaults)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all parameters together.

    Not per tensor: GPT-2's attention key bias has an exact zero gradient (softmax ignores a constant shift), so
    its gradient is rounding noise that Adam normalizes up to lr-sized steps, in any two runs that differ in the
    last bit.
    """
    assert a.keys() == b.keys()
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a)
    return (num / sum(b[k].double().pow(2).sum() for k in a)).sqrt().item()


# What a process that gloo itself aborted leaves in torchrun's report: a C++ `std::terminate` (SIGABRT) with no
# Python traceback. Seen once in CI in a worker that passed 24 of 24 reruns here, loaded and idle; gloo's CPU
# collectives are known to crash so now and then (pytorch/pytorch#65237).
GLOO_ABORT = "terminate called without an active exception"


def run_distributed(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a multi-process command and fail with its stderr; a run that gloo aborted is run once more (a Python
    error, a wrong number or a second abort still fail)."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and GLOO_ABORT in done.stderr and "Traceback (most recent call last)" not in (
        done.stderr.split(GLOO_ABORT)[0]
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_two_processes(worker: str, *args: str, **env: str) -> None:
    """Run `tests/distributed/<worker>` under torchrun as 2 CPU processes (gloo).

    `--standalone` lets the rendezvous pick its own free port, so runs side by side cannot collide.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(os.path.dirname(__file__), "distributed", worker), *args]
    run_distributed(command, {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env})


# ---- runs and references that tests in several files build ------------------------------------------------------
QKV = "transformer.h.0.attn.c_attn.weight"  # tiny_gpt2's first attention weight, (16, 48)


def fisher_trainer(tmp_path, model=None, data=None, **overrides) -> L2Trainer:
    args = l2_args(tmp_path, **{"l2_mode": "l2_sp_fisher", **overrides})
    return L2Trainer(model=model or tiny_gpt2(), args=args, train_dataset=data or TokenDataset())


def tiny_generating_marian():
    """A Marian whose generation stops at 8 tokens (pad 39), for the predict_with_generate tests."""
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=39, eos_token_id=0, decoder_start_token_id=39, dropout=0.0, max_length=8,
    )
    return MarianMTModel(config)


class MaskedPairDataset(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.src = torch.randint(1, 39, (n, 6), generator=g)
        self.tgt = torch.randint(1, 39, (n, 5), generator=g)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return {"input_ids": self.src[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.tgt[i]}


class FinalParameters(TrainerCallback):
    """Records the parameters each `train()` ends with (a search runs several on one trainer)."""

    def __init__(self):
        self.runs = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runs.append(params_of(model))


# The output anchor (`l2_kl_coef`) against a frozen deep copy of the starting model.
LAMBDA, TAU = 3.0, 2.0


def kl_by_hand(logits, ref_logits, labels, shifts, tau):
    """τ²·Σ over label positions of Σ_v q·(log q − log p), q = softmax(z₀/τ), p = softmax(z/τ), in fp64."""
    if shifts:  # position t predicts token t + 1
        logits, ref_logits, labels = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    q = torch.softmax(ref_logits.double() / tau, -1)
    log_p = torch.log_softmax(logits.double() / tau, -1)
    per_token = (q * (q.log() - log_p)).sum(-1)
    return (per_token * (labels != -100)).sum().float() * tau**2


class DeepCopyReference:
    """Adds λ·KL to the loss from a frozen deep copy of the starting model, over the tokens the task loss counts
    (`num_items_in_batch`, which GPT-2's and Marian's losses divide by), with its own second forward."""

    def __init__(self, *args, coef=LAMBDA, tau=TAU, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.coef, self.tau = coef, tau
        self.shifts = not self.model.config.is_encoder_decoder

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return loss
        logits = model(**inputs).logits
        with torch.no_grad():
            ref = self.frozen(**inputs).logits
        kl = kl_by_hand(logits, ref, inputs["labels"], self.shifts, self.tau)
        if num_items_in_batch is None:  # a per-micro-batch mean, as the model's loss is then
            labels = inputs["labels"][:, 1:] if self.shifts else inputs["labels"]
            num_items_in_batch = (labels != -100).sum()
        return loss + self.coef * kl / num_items_in_batch


class GPT2Reference(DeepCopyReference, L2Trainer):
    pass


def sgd_args(tmp_path, **overrides):
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, optim="sgd",
                    learning_rate=0.3, max_grad_norm=0.5, l2_coef=2.0)
    return l2_args(tmp_path, **{**settings, **overrides})


# LoRA models.
def gpt2_lora(**config):
    from peft import LoraConfig, get_peft_model

    config = {"r": 2, "lora_alpha": 3, "target_modules": ["c_attn", "wte"], "fan_in_fan_out": True, **config}
    return get_peft_model(tiny_gpt2(), LoraConfig(**config))


def perturb_lora(model, seed=1):
    """Move every LoRA factor, as training would (B starts at zero, so ΔW would be zero otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def trainable_of(model):
    """The parameters training changes: comparing whole models would drown them in the frozen base weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_with_saved_module():
    """GPT-2 + LoRA on c_attn and wte, and a trainable copy of the position embedding (`modules_to_save`)."""
    return gpt2_lora(modules_to_save=["wpe"])


def tiny_demo_sizes():
    """A demo small enough for the test suite: the same code path as `hf-l2 demo`, seconds instead of minutes."""
    from hf_l2.tools.demo import FineTuning, Sizes
    from hf_l2.tools.demo.starting_models import Pretraining

    return Sizes(
        pretraining={
            "generation": Pretraining(vocab_size=300, width=16, layers=1, heads=2, context=32, steps=4,
                                      batch_size=4, learning_rate=1e-2),
            "translation": Pretraining(vocab_size=150, width=16, layers=1, heads=2, context=32, steps=4,
                                       batch_size=4, learning_rate=1e-2),
        },
        fine_tuning={
            "generation": FineTuning(steps=3, batch_size=4, learning_rate=1e-2, max_eval_samples=4,
                                     fisher_samples=4),
            "translation": FineTuning(steps=3, batch_size=4, learning_rate=1e-2, max_eval_samples=4,
                                      fisher_samples=4),
        },
    )


# ---- the recipe tests: tiny pretrained-looking models, tokenizers and data files -------------------------------
ROOT = Path(__file__).resolve().parents[1]


def build_wheel(folder: Path) -> Path:
    """Build hf_l2's wheel from a copy of what this checkout would ship (the checkout itself stays untouched)."""
    source = folder / "src"
    for name in ("hf_l2", "model_cards", "recipes", "examples"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(folder / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (folder / "dist").glob("hf_l2-*.whl")
    return wheel

NOUNS = [("file", "Datei", "die"), ("window", "Fenster", "das"), ("folder", "Ordner", "der"),
         ("document", "Dokument", "das"), ("message", "Nachricht", "die")]
ADJECTIVES = [("red", "rot"), ("open", "offen"), ("empty", "leer"), ("new", "neu"), ("old", "alt"), ("ready", "bereit")]


def english_text() -> list[str]:
    """Paragraphs of standard-library docstrings: real English that every Python has."""
    import argparse  # noqa: E401
    import collections
    import json as json_module
    import pathlib

    docs = [inspect.getdoc(obj) or "" for m in (argparse, collections, json_module, pathlib)
            for _, obj in inspect.getmembers(m)]
    return [p.strip() for d in docs for p in d.split("\n\n") if len(p.strip()) > 40]


def translation_pairs() -> list[tuple[str, str]]:
    """60 English→German sentence pairs from a tiny grammar: 'the file is not red' → 'die Datei ist nicht rot'."""
    pairs = []
    for (en, de, article), (adj_en, adj_de), negated in itertools.product(NOUNS, ADJECTIVES, (False, True)):
        pairs.append((f"the {en} is {'not ' if negated else ''}{adj_en}",
                      f"{article.capitalize()} {de} ist {'nicht ' if negated else ''}{adj_de}"))
    return pairs


def save_tiny_gpt2(folder: Path) -> Path:
    tokenizer = train_bpe_tokenizer(english_text(), vocab_size=320, model_max_length=64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_marian(folder: Path) -> Path:
    sources, targets = zip(*translation_pairs())
    tokenizer = train_marian_tokenizer(sources, targets, vocab_size=40, model_max_length=32)
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = MarianMTModel(config)
    model.generation_config.max_length = 16
    model.generation_config.num_beams = 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text_files(folder: Path) -> dict[str, Path]:
    """The same English paragraphs as .txt, .jsonl and .csv (train) plus a .txt validation file."""
    paragraphs = english_text()
    train, valid = paragraphs[:-20], paragraphs[-20:]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"txt": folder / "train.txt", "jsonl": folder / "train.jsonl", "csv": folder / "train.csv",
             "validation": folder / "valid.txt"}
    files["txt"].write_text("\n".join(p.replace("\n", " ") for p in train))
    files["validation"].write_text("\n".join(p.replace("\n", " ") for p in valid))
    files["jsonl"].write_text("".join(json.dumps({"content": p}) + "\n" for p in train))
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([p] for p in train)
    return files


def write_translation_files(folder: Path) -> dict[str, Path]:
    """Pairs in the `translation` layout (.jsonl) and as two columns (.csv); the last 12 pairs are held out."""
    pairs = translation_pairs()
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [pairs[i] for i in order]
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", pairs[:-12]), ("validation", pairs[-12:])):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in rows))
        files[f"{split}_csv"] = folder / f"{split}.csv"
        with open(files[f"{split}_csv"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["english", "german"])
            writer.writerows(rows)
    return files


# The recipes' command lines (the `workdir` fixture, in conftest.py, holds the models and files they name).
RUN = ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
       "--disable_tqdm", "true", "--seed", "0", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"]


def gpt2_args(workdir, out, *extra, train="txt"):
    return [
        "--model_name_or_path", str(workdir["gpt2"]), "--train_file", str(workdir["text"][train]),
        "--validation_file", str(workdir["text"]["validation"]), "--output_dir", str(out),
        "--cache_dir", str(workdir["cache"]), "--block_size", "32", "--max_steps", "4",
        "--num_samples", "2", "--max_new_tokens", "5", *RUN, *extra,
    ]


def marian_args(workdir, out, *extra, layout="jsonl"):
    files = workdir["pairs"]
    train, valid = (files["train"], files["validation"]) if layout == "jsonl" else (
        files["train_csv"], files["validation_csv"])
    return [
        "--model_name_or_path", str(workdir["marian"]), "--train_file", str(train), "--validation_file", str(valid),
        "--output_dir", str(out), "--cache_dir", str(workdir["cache"]), "--max_steps", "4", "--num_samples", "3",
        "--max_source_length", "16", "--max_target_length", "16", *RUN, *extra,
    ]
