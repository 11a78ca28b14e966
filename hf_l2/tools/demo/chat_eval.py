"""How the real-model study scores a chat model: greedy translations (chrF, BLEU), the cross-entropy of general
text, and the instruct probe, each through the model's chat template."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_l2.tools.demo.probe import QUESTIONS, is_correct

PROMPT = "Translate this message from English to German:\n{}"
GENERAL_BLOCK = 128  # tokens per block of general text


@dataclass
class StudyData:
    """Training pairs, held-out pairs to score, held-out general text, and general text for the Fisher."""

    train: list[tuple[str, str]]
    evaluation: list[tuple[str, str]]
    general_eval: list[str]
    general_fisher: list[str]



def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


@torch.no_grad()
def greedy_replies(model, tokenizer, questions: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Each question through the chat template, answered greedily (left-padded batches)."""
    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(questions), batch_size):
        texts = chat_prompts(tokenizer, questions[start:start + batch_size])
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]


@torch.no_grad()
def general_cross_entropy(model, tokenizer, texts: list[str], blocks: int, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over the first ``blocks`` 128-token blocks of the joined texts."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][: blocks * GENERAL_BLOCK]
    tensor = torch.tensor(ids[: len(ids) // GENERAL_BLOCK * GENERAL_BLOCK]).view(-1, GENERAL_BLOCK)
    total, count = 0.0, 0
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start:start + batch_size].to(model.device)
        loss = model(input_ids=batch, labels=batch).loss  # mean over the batch's predicted tokens
        n = batch.numel() - batch.shape[0]
        total, count = total + loss.item() * n, count + n
    return total / count


def evaluate_model(model, tokenizer, data: StudyData, eval_batch_size: int, general_blocks: int) -> dict:
    """chrF, BLEU, general-text cross-entropy and the probe's per-question correctness of one model."""
    import sacrebleu

    was_training = model.training
    model.eval()
    sources, references = zip(*data.evaluation)
    hypotheses = greedy_replies(model, tokenizer, [PROMPT.format(s) for s in sources], eval_batch_size, 40)
    answers = greedy_replies(model, tokenizer, [q for q, _ in QUESTIONS], eval_batch_size, 20)
    metrics = {
        "chrf": sacrebleu.corpus_chrf(hypotheses, [list(references)]).score,
        "bleu": sacrebleu.corpus_bleu(hypotheses, [list(references)]).score,
        "general_ce": general_cross_entropy(model, tokenizer, data.general_eval, general_blocks, eval_batch_size),
        "probe": [is_correct(a, ok) for a, (_, ok) in zip(answers, QUESTIONS)],
        "examples": {"translations": list(zip(sources[:5], hypotheses[:5])),
                     "capital_of_france": answers[0]},
    }
    model.train(was_training)
    return metrics
