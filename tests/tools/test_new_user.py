"""What a new user meets first: the README's snippets run as written (the Hub replaced by tiny local models and
data), and what an installed package shows says how to run it installed."""

from __future__ import annotations

import re

import datasets
import pytest
import torch
import transformers
from datasets import Dataset
from helpers import ROOT, english_text
from transformers import GPT2Config, GPT2LMHeadModel

from hf_l2.tools.local_tokenizers import train_bpe_tokenizer, train_chat_tokenizer

README = (ROOT / "README.md").read_text(encoding="utf-8")


def python_block(section: str) -> str:
    """The first ```python block of the README after the heading ``section``."""
    after = README[README.index(f"\n{section}\n"):]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def redirect_from_pretrained(monkeypatch, cls, folder) -> None:
    """`cls.from_pretrained(<any Hub id>)` loads the local ``folder`` instead."""
    load = cls.from_pretrained
    monkeypatch.setattr(cls, "from_pretrained", lambda name, *args, **kwargs: load(str(folder), *args, **kwargs))


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch):
    tokenizer = train_bpe_tokenizer(english_text(), vocab_size=320, model_max_length=128)
    model = tmp_path / "gpt2"  # 128 positions: the snippet cuts texts at 128 tokens, as GPT-2's 1024 allow
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(model)
    tokenizer.save_pretrained(model)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        redirect_from_pretrained(monkeypatch, cls, model)
    texts = Dataset.from_dict({"text": english_text()[:40] + ["", " \n"]})  # WikiText has empty lines too
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: texts)
    monkeypatch.chdir(tmp_path)
    exec(python_block("## Quick start"), {})
    assert "l2-sp" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the snippet's CPU case")
def test_the_trl_snippet_runs_as_written_on_a_cpu(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pairs = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello!")] * 4
    tokenizer = train_chat_tokenizer([f"{q} {a}" for q, a in pairs] * 10, vocab_size=300, model_max_length=64)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "chat")
    tokenizer.save_pretrained(tmp_path / "chat")
    chats = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in pairs])
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: chats)
    monkeypatch.chdir(tmp_path)
    snippet = python_block("## TRL").replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tmp_path / "chat")))
    exec(snippet, {})
    assert (tmp_path / "out").is_dir()


# Forms that work only in a checkout of this repository.
CHECKOUT_ONLY = re.compile(r"python (recipes|examples)/|pip install -e|--config_file recipes/|launch recipes/")


def test_what_the_package_ships_says_how_to_run_it_installed():
    """Docstrings, messages and shipped configs show `python -m hf_l2...` and `pip install "hf_l2[...]"`; a
    checkout's form appears only beside the word "checkout"."""
    shipped = [*ROOT.glob("hf_l2/**/*.py"), *ROOT.glob("recipes/**/*.py"), *ROOT.glob("recipes/**/*.yaml"),
               *ROOT.glob("examples/*.py"), *ROOT.glob("model_cards/*.md")]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in shipped for number, line in enumerate(path.read_text().splitlines(), start=1)
             if CHECKOUT_ONLY.search(line) and "checkout" not in line]
    assert found == []


def test_without_the_recipes_extra_the_core_imports_and_hf_l2_names_the_extra():
    """`pip install hf_l2` alone has no `datasets` (the `recipes` extra brings it): `import hf_l2` works and the
    `hf-l2` command says in one line what to install."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['datasets'] = None  # as if not installed\n"
            "import hf_l2; from hf_l2.tools import main; main(['--help'])")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 1 and ran.stderr.strip().splitlines()[-1] == (
        'hf-l2 needs `datasets`, which the core of hf_l2 does not install: pip install "hf_l2[recipes]"')
