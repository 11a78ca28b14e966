"""Tokenizers trained locally, for models built from configs: what the offline demo and the tests start from.

Nothing here reaches the Hub. The results are ordinary `transformers` tokenizers; `save_pretrained` them next
to a model and the recipes load the folder with `--model_name_or_path`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import GPT2TokenizerFast, MarianTokenizer

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> GPT2TokenizerFast:
    """A byte-level BPE tokenizer in the GPT-2 style (one `<|endoftext|>` special token), trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=model_max_length
    )
    if not tokenizer("a b")["input_ids"]:  # transformers 5 can silently build an empty vocabulary
        raise RuntimeError("The trained BPE tokenizer encodes nothing.")
    return tokenizer


def train_marian_tokenizer(
    sources: Iterable[str], targets: Iterable[str], vocab_size: int, model_max_length: int
) -> MarianTokenizer:
    """A `MarianTokenizer`: one SentencePiece unigram model per side and a joint vocabulary, as opus-mt models have."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        specials = ["</s>", "<unk>", "<pad>"]  # ids 0, 1, 2 as in opus-mt vocabularies
        for side, texts in (("source", sources), ("target", targets)):
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(list(texts)), model_prefix=f"{tmp}/{side}", vocab_size=vocab_size,
                model_type="unigram", character_coverage=1.0, eos_id=0, unk_id=1, bos_id=-1, pad_id=-1,
                hard_vocab_limit=False, minloglevel=2,
            )
        vocab = list(specials)
        for side in ("source", "target"):
            processor = spm.SentencePieceProcessor(model_file=f"{tmp}/{side}.model")
            vocab += [p for p in map(processor.id_to_piece, range(processor.get_piece_size())) if p not in vocab]
        Path(tmp, "vocab.json").write_text(json.dumps({piece: i for i, piece in enumerate(vocab)}))
        return MarianTokenizer(
            source_spm=f"{tmp}/source.model", target_spm=f"{tmp}/target.model", vocab=f"{tmp}/vocab.json",
            model_max_length=model_max_length,
        )


# A minimal chat format: `<|role|> content<|endoftext|>` per message, and `<|assistant|>` as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}" + EOS + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> GPT2TokenizerFast:
    """`train_bpe_tokenizer` with `CHAT_TEMPLATE` and a pad token, as TRL's trainers want a chat model's tokenizer."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size, model_max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = EOS
    return tokenizer
