"""The exactness checks of every method on the Llama family (grouped-query attention, RMSNorm, tied embeddings)
and on Qwen2 (the same with q/k/v biases), next to GPT-2's in the other files: SmolLM2, the real model of the
study, is a Llama. Every reference is written here by hand, with the Trainer's no-decay rule spelled out."""

import copy
import re

import pytest
import torch
from helpers import LAMBDA, TAU, GPT2Reference, TokenDataset, l2_args, max_rel_diff, params_of, sgd_args
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Trainer

from hf_l2 import L2Trainer
from hf_l2.tools.cli import main

FAMILIES = ("llama", "qwen2")
CONFIGS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_model(family: str, seed: int = 0):
    """2 layers, 4 query heads sharing 2 key/value heads, tied input and output embeddings."""
    config_class, model_class = CONFIGS[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=True)
    model = model_class(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def causal_data(n: int = 8) -> TokenDataset:
    """`TokenDataset` with every first label masked: a causal LM never predicts it, but transformers 5.7 (the lowest
    version) counts it in `num_items_in_batch` where 5.24 counts `labels[..., 1:]`. Masked, every version
    normalizes by the tokens the hand-written loops divide by."""
    data = TokenDataset(n=n)
    data.labels[:, 0] = -100
    return data


def penalized(name: str) -> bool:
    """The Trainer's no-decay rule written out for these models: no biases, no RMSNorm weights."""
    return not re.search(r"bias|norm", name)


def hand_loop(family, data, alpha, clip, lr, steps, weights=None, decoupled=False):
    """SGD on Σ token losses / the window's tokens + (α/2)·Σ w·(θ − θ₀)² over the penalized weights (w = 1, or
    F), clipped; `decoupled`: no gradient term, the pull θ ← θ − lr·α·(θ − θ₀) before each step instead."""
    model = tiny_model(family)
    params = dict(model.named_parameters())
    anchor = {n: p.detach().clone() for n, p in params.items() if penalized(n)}
    weights = weights or {n: torch.ones_like(a) for n, a in anchor.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = data[list(range(len(data)))]
    tokens = (batch["labels"][:, 1:] != -100).sum()
    for _ in range(steps):  # one optimizer step sees every sequence, so the sample order does not matter
        opt.zero_grad()
        for i in range(0, len(data), 2):
            mb = {k: v[i:i + 2] for k, v in batch.items()}
            (model(**mb).loss * (mb["labels"][:, 1:] != -100).sum() / tokens).backward()
        if decoupled:
            with torch.no_grad():
                for n, a in anchor.items():
                    params[n] -= lr * alpha * weights[n] * (params[n] - a)
        else:
            sum(0.5 * alpha * (weights[n] * (params[n] - a).pow(2)).sum() for n, a in anchor.items()).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return params_of(model)


def train(tmp_path, family, data, **overrides):
    model = tiny_model(family)
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, **overrides), train_dataset=data)
    trainer.train()
    return params_of(model), trainer


def max_grad_norm(trainer) -> float:
    return max(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h)


@pytest.mark.parametrize("family", FAMILIES)
def test_mode_none_is_the_stock_trainer_bit_for_bit(tmp_path, family):
    ours, _ = train(tmp_path, family, TokenDataset(), l2_mode="none", gradient_accumulation_steps=2)
    stock = tiny_model(family)
    Trainer(model=stock, args=l2_args(tmp_path, l2_mode="none", gradient_accumulation_steps=2),
            train_dataset=TokenDataset()).train()
    assert all(torch.equal(ours[n], p) for n, p in params_of(stock).items())


@pytest.mark.parametrize("family", FAMILIES)
def test_l2_sp_impls_match_hand_written_loops(tmp_path, family):
    """grad and loss: accumulation 4, clipping active; decoupled: the pull, then SGD. The tied embedding is one
    parameter and is pulled once."""
    data, alpha, clip, lr, steps = causal_data(), 5.0, 0.5, 0.1, 3
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=steps, optim="sgd",
                  learning_rate=lr, l2_coef=alpha)
    expected = hand_loop(family, data, alpha, clip, lr, steps)
    for impl in ("grad", "loss"):
        got, trainer = train(tmp_path / impl, family, data, l2_impl=impl, max_grad_norm=clip, **common)
        assert max_grad_norm(trainer) > clip, "clipping is active"
        assert max_rel_diff(got, expected) < 1e-5, impl
    decoupled, _ = train(tmp_path / "decoupled", family, data, l2_impl="decoupled", max_grad_norm=0.0, **common)
    assert max_rel_diff(decoupled, hand_loop(family, data, alpha, 0.0, lr, steps, decoupled=True)) < 1e-5
    free, _ = train(tmp_path / "free", family, data, l2_mode="none", max_grad_norm=clip, **common)
    assert max_rel_diff(free, expected) > 1e-3, "the penalty matters for these comparisons to mean anything"


def reference_fisher(family, data) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's own loss, one `.backward()` per example."""
    model = tiny_model(family)
    params = {n: p for n, p in model.named_parameters() if penalized(n)}
    squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(len(data)):
        row = data[i]
        keep = int((row["labels"] != -100).nonzero().max()) + 1  # padding is only ever labelled -100
        model.zero_grad()
        model(input_ids=row["input_ids"][None, :keep], labels=row["labels"][None, :keep]).loss.backward()
        for n, p in params.items():
            squares[n] += p.grad.double() ** 2
    return {n: (s / len(data)).float() for n, s in squares.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_weighted_l2_sp_matches_a_hand_written_loop(tmp_path, family):
    data, alpha, clip, lr, steps = causal_data(), 0.7, 0.5, 0.1, 3
    fisher = reference_fisher(family, data)
    expected = hand_loop(family, data, alpha, clip, lr, steps, weights=fisher)
    for impl in ("grad", "loss"):
        got, trainer = train(tmp_path / impl, family, data, l2_mode="l2_sp_fisher", l2_fisher_normalize=False,
                             l2_impl=impl, l2_coef=alpha, max_grad_norm=clip, optim="sgd", learning_rate=lr,
                             max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=4)
        computed = trainer.l2_terms.penalty.fisher
        assert sorted(computed) == sorted(fisher)
        for n in fisher:
            torch.testing.assert_close(computed[n], fisher[n], rtol=1e-4, atol=1e-9)
        assert max_rel_diff(got, expected) < 1e-5, impl


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_anchor_matches_a_frozen_deep_copy_reference(tmp_path, family):
    data = TokenDataset(n=8)
    model = tiny_model(family)
    ours = L2Trainer(model=model, args=sgd_args(tmp_path, l2_kl_coef=LAMBDA, l2_kl_temperature=TAU),
                     train_dataset=data)
    ours.train()
    reference_model = tiny_model(family)
    GPT2Reference(model=reference_model, args=sgd_args(tmp_path), train_dataset=data).train()  # a generic reference
    assert max_grad_norm(ours) > 0.5, "clipping is active"
    assert max_rel_diff(params_of(model), params_of(reference_model)) < 1e-6
    without, _ = train(tmp_path / "without", family, data, **{k: v for k, v in vars(sgd_args(tmp_path)).items()
                                                               if k in ("max_steps", "optim", "learning_rate")})
    assert max_rel_diff(params_of(model), without) > 1e-4, "the KL moves the parameters"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_delta_penalty_is_the_closed_form_on_merged_weights(tmp_path, family):
    """(α/2)·Σ‖W_merged − W₀‖² over the adapted layers, with W_merged from PEFT's own merge; grad = loss."""
    alpha = 5.0
    lora = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    results = {}
    for impl in ("grad", "loss"):
        model = get_peft_model(tiny_model(family), LoraConfig(**lora))
        trainer = L2Trainer(model=model, train_dataset=TokenDataset(),
                            args=l2_args(tmp_path / impl, l2_lora_delta=True, l2_coef=alpha, l2_impl=impl,
                                         max_steps=3, learning_rate=0.05, gradient_accumulation_steps=2,
                                         per_device_train_batch_size=2, logging_steps=1, max_grad_norm=0.3))
        trainer.train()
        results[impl] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    start = tiny_model(family).state_dict()
    adapted = [n for n in start if re.search(r"(q_proj|v_proj|down_proj)\.weight$", n)]
    squared = sum((merged[n].double() - start[n].double()).pow(2).sum().item() for n in adapted)
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert squared > 0
    assert log["l2/lora_delta"] == pytest.approx(squared**0.5, rel=1e-4)
    assert log["l2/penalty"] == pytest.approx(0.5 * alpha * squared, rel=1e-4)
    assert max_rel_diff(results["loss"], results["grad"]) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_interpolation_midpoint_is_the_mean_of_start_and_run(tmp_path, family):
    trainer = L2Trainer(model=tiny_model(family), train_dataset=TokenDataset(),
                        args=l2_args(tmp_path / "run", max_steps=3, learning_rate=0.05, l2_coef=0.1))
    trainer.train()
    trainer.save_model()
    tiny_model(family).save_pretrained(tmp_path / "base")  # fills in the norms, which θ₀'s file leaves out
    start = load_file(str(tmp_path / "base" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0.5", "--output_dir", str(tmp_path / "wise"),
                 "--base_model", str(tmp_path / "base")]) == 0
    half = load_file(str(tmp_path / "wise" / "weight-0.5" / "model.safetensors"))
    assert any(not torch.equal(tuned[n], start[n]) for n in tuned)
    for n in tuned:
        torch.testing.assert_close(half[n], (start[n].double() + tuned[n].double()).div(2).float(), rtol=0, atol=1e-6)
