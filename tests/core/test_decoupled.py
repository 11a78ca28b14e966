"""The decoupled pull θ ← θ − lr·α·(θ − θ₀): by hand, inside the Trainer, and as a stock-Trainer callback."""

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
from torch import nn
from transformers import Trainer, get_linear_schedule_with_warmup

from hf_l2 import CoefSchedule, DecoupledL2SPCallback, L2Trainer
from hf_l2.decoupled import DecoupledPull
from hf_l2.penalty import L2Penalty


def two_layers():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 2, bias=False), "b": nn.Linear(2, 2, bias=False)})
    return model, dict(model.named_parameters())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pull_is_the_formula_with_each_param_groups_lr(optimizer):
    """Zero task gradients, so the optimizer's own update is zero and only the pull moves the weights."""
    model, params = two_layers()
    anchor = params["a.weight"].detach() + 0.5
    penalty = L2Penalty(0.4, 0.3, ["a.weight"], ["b.weight"], {"a.weight": anchor.clone()})
    penalty.bind(params)
    groups = [{"params": [params["a.weight"]], "lr": 0.1}, {"params": [params["b.weight"]], "lr": 0.02}]
    opt = torch.optim.SGD(groups) if optimizer == "sgd" else torch.optim.AdamW(groups, weight_decay=0.0)
    pull = DecoupledPull([penalty]).attach(opt)
    a0, b0 = params["a.weight"].detach().clone(), params["b.weight"].detach().clone()
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(params["a.weight"].detach(), a0 - 0.1 * 0.4 * (a0 - anchor))
    torch.testing.assert_close(params["b.weight"].detach(), b0 - 0.02 * 0.3 * b0)

    pull.detach()
    after = params_of(model)
    opt.step()
    assert all(torch.equal(after[n], p) for n, p in params.items())


def test_a_step_the_grad_scaler_skips_skips_the_pull():
    _, params = two_layers()
    penalty = L2Penalty(0.0, 0.5, [], list(params))
    penalty.bind(params)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    DecoupledPull([penalty]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    before = {n: p.detach().clone() for n, p in params.items()}
    scaler.scale(torch.tensor(1.0))
    for p in params.values():
        p.grad = torch.full_like(p, float("inf"))  # fp16 overflow: the scaler never calls the optimizer's step
    scaler.step(opt)
    assert all(torch.equal(before[n], p) for n, p in params.items())


def test_trainer_matches_a_hand_written_adamw_loop(tmp_path):
    """Two param groups with their own lr, a linear lr schedule, accumulation and active clipping.

    The reference: clip the task gradient, then w ← w − lr_w·α·(w − w₀) and head ← head − lr_h·β·head, then
    AdamW without weight decay; the pull never enters Adam's moments.
    """
    g = torch.Generator().manual_seed(0)
    w0, x, y = torch.randn(3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    alpha, beta, lrs, clip, steps = 0.5, 0.3, (0.05, 0.02), 0.1, 4

    def build():
        model = Regression(3, w0)
        opt = torch.optim.AdamW([{"params": [model.w], "lr": lrs[0]}, {"params": [model.head], "lr": lrs[1]}],
                                weight_decay=0.0)
        return model, opt

    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
                  lr_scheduler_type="linear", max_grad_norm=clip)
    model, opt = build()
    args = l2_args(tmp_path, l2_impl="decoupled", l2_coef=alpha, l2_head_coef=beta, l2_head_params=["^head$"], **common)
    trainer = L2Trainer(model=model, args=args, train_dataset=RegressionData(x, y), optimizers=(opt, None))
    trainer.train()
    assert max(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h) > clip

    ref, ref_opt = build()
    schedule = get_linear_schedule_with_warmup(ref_opt, 0, steps)
    for _ in range(steps):  # each optimizer step sees all 4 samples, so the sample order does not matter
        ref_opt.zero_grad()
        for i in (0, 2):
            (ref(x[i:i + 2], y[i:i + 2])["loss"] / 2).backward()  # the Trainer divides by the 2 accumulation steps
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        with torch.no_grad():
            lr_w, lr_h = (group["lr"] for group in ref_opt.param_groups)
            ref.w -= lr_w * alpha * (ref.w - w0)
            ref.head -= lr_h * beta * ref.head
        ref_opt.step()
        schedule.step()
    torch.testing.assert_close(model.w.detach(), ref.w.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.head.detach(), ref.head.detach(), rtol=1e-6, atol=1e-7)
    free, free_opt = build()  # the pull must matter for the comparison to mean anything
    Trainer(model=free, args=l2_args(tmp_path, l2_mode="none", **common), train_dataset=RegressionData(x, y),
            optimizers=(free_opt, None)).train()
    assert (free.w - ref.w).abs().max() > 1e-3


# ---- DecoupledL2SPCallback on the stock Trainer ----------------------------------------------------------------
def test_callback_equals_l2_trainer_decoupled(tmp_path):
    common = dict(max_steps=4, l2_coef_schedule="cosine", l2_coef_end_factor=0.2)
    mine = tiny_gpt2()
    L2Trainer(model=mine, args=l2_args(tmp_path, l2_impl="decoupled", l2_coef=2.0, **common),
              train_dataset=TokenDataset()).train()

    stock = tiny_gpt2()
    callback = DecoupledL2SPCallback(stock, coef=2.0, schedule=CoefSchedule("cosine", end_factor=0.2))
    Trainer(model=stock, args=l2_args(tmp_path, l2_mode="none", **common), train_dataset=TokenDataset(),
            callbacks=[callback]).train()
    assert max_rel_diff(params_of(stock), params_of(mine)) < 1e-7

    free = tiny_gpt2()
    Trainer(model=free, args=l2_args(tmp_path, l2_mode="none", **common), train_dataset=TokenDataset()).train()
    assert max_rel_diff(params_of(free), params_of(mine)) > 1e-4


def test_callback_bad_input():
    with pytest.raises(ValueError, match="`coef` must be a number ≥ 0"):
        DecoupledL2SPCallback(tiny_gpt2(), coef=-1.0)
    with pytest.raises(ValueError, match="`exclude`: '\\(' is not a valid regular expression"):
        DecoupledL2SPCallback(tiny_gpt2(), coef=1.0, exclude=["("])
    with pytest.raises(ValueError, match="The decoupled penalty covers parameters the optimizer does not update"):
        model = tiny_gpt2()
        callback = DecoupledL2SPCallback(model, coef=1.0)
        callback.penalty.bind(dict(model.named_parameters()))
        DecoupledPull([callback.penalty]).attach(torch.optim.SGD(list(model.parameters())[:1], lr=0.1))
