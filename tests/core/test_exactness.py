"""The penalty's effect equals minimizing task loss + Ω, once per optimizer step, whatever the batching."""

import re

import pytest
import torch
from helpers import (
    Regression,
    RegressionData,
    TokenDataset,
    l2_args,
    max_rel_diff,
    params_of,
    tiny_gpt2,
)
from transformers import Trainer

from hf_l2 import L2Trainer


def train_gpt2(tmp_path, dataset=None, model=None, **overrides):
    model = model or tiny_gpt2()
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, **overrides), train_dataset=dataset or TokenDataset())
    trainer.train()
    return params_of(model), trainer


@pytest.mark.parametrize("mode", ["l2_sp", "l2"])
def test_closed_form_ridge(tmp_path, mode):
    """Full-batch gradient descent converges to the solution of a linear system solved independently."""
    g = torch.Generator().manual_seed(1)
    x, y, w0 = torch.randn(16, 3, generator=g), torch.randn(16, generator=g), torch.randn(3, generator=g)
    alpha, beta = 0.5, 0.2
    # Minimize ½·mean((Xw + b − y)²) + Ω: (AᵀA/n + D)·z = Aᵀy/n + D·z₀ with z = (w, b), A = [X, 1].
    a = torch.cat([x, torch.ones(16, 1)], dim=1).double()
    if mode == "l2_sp":
        d, z0 = torch.tensor([alpha] * 3 + [beta]), torch.cat([w0, torch.zeros(1)])
        extra = dict(l2_head_params=["^head$"], l2_head_coef=beta)
    else:
        d, z0, extra = torch.full((4,), alpha), torch.zeros(4), {}
    d, z0 = torch.diag(d.double()), z0.double()
    expected = torch.linalg.solve(a.T @ a / 16 + d, a.T @ y.double() / 16 + d @ z0)

    for impl in ("grad", "loss"):
        model = Regression(3, w0)
        args = l2_args(
            tmp_path, optim="sgd", learning_rate=0.5, max_steps=300, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=0.0, logging_steps=300,
            l2_mode=mode, l2_coef=alpha, l2_impl=impl, **extra,
        )
        L2Trainer(model=model, args=args, train_dataset=RegressionData(x, y)).train()
        got = torch.cat([model.w.detach(), model.head.detach().reshape(1)]).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_kind", ["gpt2", "regression"])
def test_grad_and_loss_impls_agree_with_accumulation_and_clipping(tmp_path, model_kind):
    """GPT-2 takes the loss-kwargs path (Trainer does not divide by GA); the regression model the other one."""
    common = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0.3,
                  max_steps=4, l2_coef=0.5, l2_head_coef=0.1)
    results = {}
    for impl in ("grad", "loss"):
        if model_kind == "gpt2":
            results[impl], trainer = train_gpt2(tmp_path, l2_impl=impl, **common)
        else:
            g = torch.Generator().manual_seed(0)
            model = Regression(3, torch.randn(3, generator=g))
            data = RegressionData(torch.randn(12, 3, generator=g), torch.randn(12, generator=g))
            trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_impl=impl, l2_head_params=["head"], **common),
                                train_dataset=data)
            trainer.train()
            results[impl] = params_of(model)
        grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        assert max(grad_norms) > 0.3, "clipping must be active for this test to mean anything"
    assert max_rel_diff(results["loss"], results["grad"]) < 1e-6


@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_micro_batch_8_equals_2_times_accumulation_4(tmp_path, impl):
    data = TokenDataset(n=16)
    one, _ = train_gpt2(tmp_path, data, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                        l2_impl=impl, l2_coef=1.0, max_grad_norm=0.5)
    four, _ = train_gpt2(tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         l2_impl=impl, l2_coef=1.0, max_grad_norm=0.5)
    assert max_rel_diff(four, one) < 1e-5


def test_matches_a_hand_written_training_loop(tmp_path):
    """Reference: SGD on Σ token losses / tokens in the window + Ω summed by a Python loop, clipped, stepped.

    SGD, not Adam: Adam's first step is ≈ lr·sign(g), which turns last-bit differences of near-zero gradients
    into lr-sized ones and would hide what this test checks.
    """
    data, alpha, clip, steps, lr = TokenDataset(n=8), 0.7, 0.5, 3, 0.1
    got, trainer = train_gpt2(tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                              max_steps=steps, optim="sgd", learning_rate=lr, l2_coef=alpha, max_grad_norm=clip)

    model = tiny_gpt2()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalized = [n for n in anchor if not re.search(r"bias|\.ln_", n)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = data[list(range(8))]
    # The task loss is Σ token losses / the Trainer's token count. transformers 5.23 counts GPT-2's labels
    # unshifted (its `loss_type` is None, so `_loss_shifts_labels` is False): one token per sequence too many.
    tokens = trainer._get_num_items_in_batch([batch], "cpu")
    params = dict(model.named_parameters())
    for _ in range(steps):  # one optimizer step sees all 8 sequences, so the sample order does not matter
        opt.zero_grad()
        for i in range(0, 8, 2):
            mb = {k: v[i:i + 2] for k, v in batch.items()}
            mb_tokens = (mb["labels"][:, 1:] != -100).sum()  # the model averages over shifted labels
            (model(**mb).loss * mb_tokens / tokens).backward()
        omega = sum(0.5 * alpha * (params[n] - anchor[n]).pow(2).sum() for n in penalized)
        omega.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    assert max_rel_diff(got, params_of(model)) < 1e-5


def test_mode_none_is_the_stock_trainer_bit_for_bit(tmp_path):
    got, l2_trainer = train_gpt2(tmp_path, l2_mode="none", gradient_accumulation_steps=2)
    model = tiny_gpt2()
    args = l2_args(tmp_path, l2_mode="none", gradient_accumulation_steps=2)
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    stock = params_of(model)
    assert all(torch.equal(got[n], stock[n]) for n in stock)
    assert not any(k.startswith("l2/") for h in l2_trainer.state.log_history for k in h)


def test_penalty_changes_training(tmp_path):
    """Guards the tests above against a penalty that silently does nothing."""
    free, _ = train_gpt2(tmp_path, l2_mode="none")
    pulled, _ = train_gpt2(tmp_path, l2_coef=10.0)
    start = params_of(tiny_gpt2())
    drift = lambda p: sum((p[n] - start[n]).pow(2).sum() for n in start if "wte" in n or "attn" in n)  # noqa: E731
    assert drift(pulled) < 0.9 * drift(free)
