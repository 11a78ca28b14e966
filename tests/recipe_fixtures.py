"""Tiny pretrained-looking models, tokenizers and data files for the recipe tests, all built locally."""

from __future__ import annotations

import csv
import inspect
import itertools
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

from hf_l2.build import train_bpe_tokenizer, train_marian_tokenizer

ROOT = Path(__file__).resolve().parents[1]

NOUNS = [("file", "Datei", "die"), ("window", "Fenster", "das"), ("folder", "Ordner", "der"),
         ("document", "Dokument", "das"), ("message", "Nachricht", "die")]
ADJECTIVES = [("red", "rot"), ("open", "offen"), ("empty", "leer"), ("new", "neu"), ("old", "alt"), ("ready", "bereit")]


def english_text() -> list[str]:
    """Paragraphs of standard-library docstrings: real English that every Python has."""
    import argparse, collections, json as json_module, pathlib  # noqa: E401

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
