"""Runs that must stop instead of training garbage: a decoupled pull that overshoots, non-finite statistics, mixed
precision that did not run, parameters unfrozen too late. Damaged θ₀ files and a conflicting anchor on resume (items
1 and 3) are in test_resume.py."""

import logging
import math

import pytest
import torch
from helpers import QKV, TokenDataset, gpt2_from_checkpoint, l2_args, tiny_gpt2
from transformers import TrainerCallback

from hf_l2 import L2Trainer
from hf_l2.saved_state import save_anchor


# ---- item 2: a decoupled pull that overshoots; non-finite statistics ----------------------------------------------
def test_decoupled_pull_of_rate_one_or_more_is_refused_when_built(tmp_path):
    # lr·α = 1e-3 × 2500 = 2.5: the pull would diverge (drift 1.2e6 after a few steps before this check).
    with pytest.raises(ValueError, match=r"lr·α = 0\.001 × 2500 = 2\.5 \(`learning_rate` × `l2_coef`\) is ≥ 1"):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_impl="decoupled", l2_coef=2500, learning_rate=1e-3))
    # A schedule that grows α to 3× reaches 1.5 at its peak.
    with pytest.raises(ValueError, match=r"lr·α = 0\.001 × 500 × 3 \(the schedule's peak\) = 1\.5"):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_impl="decoupled", l2_coef=500, learning_rate=1e-3,
                                                  l2_coef_schedule="linear", l2_coef_end_factor=3.0))
    with pytest.raises(ValueError, match=r"lr·β = 0\.01 × 100 = 1 "):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_impl="decoupled", l2_head_coef=100,
                                                  l2_head_params=["wte"]))
    # lr·α = 0.9 is allowed (it converges), and the same α with `l2_impl="grad"` is not the decoupled pull's concern.
    L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_impl="decoupled", l2_coef=900, learning_rate=1e-3))
    L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_impl="grad", l2_coef=2500, learning_rate=1e-3))


def test_decoupled_pull_checks_a_user_optimizers_learning_rate_at_the_first_step(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # args say 1e-4, the optimizer steps at 0.05
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_impl="decoupled", l2_coef=40, learning_rate=1e-4),
                        train_dataset=TokenDataset(), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match=r"lr·α = 0\.05 × 40 = 2 \(the optimizer's learning rate\)"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any update


def test_decoupled_pull_is_checked_at_every_step_against_a_rising_learning_rate(tmp_path):
    """`cosine_with_min_lr` with `min_lr` 5× `learning_rate` raises the lr from 1e-3 to 5e-3: lr·α starts at 0.5
    (accepted when built) and passes 1 at step 4. Before, the run went on and diverged, exit 0."""
    lr, min_lr, alpha, steps = 1e-3, 5e-3, 500.0, 10
    # The schedule written out (torch's cosine from lr to min_lr over `steps`): the first step whose lr·α ≥ 1.
    lr_at = [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    first = next(t for t in range(steps) if lr_at[t] * alpha >= 1)
    assert first == 4
    model = tiny_gpt2()
    args = l2_args(tmp_path, l2_impl="decoupled", l2_coef=alpha, learning_rate=lr, optim="sgd", max_steps=steps,
                   lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": min_lr})
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=rf"lr·α = {lr_at[first]:g} × 500 = {lr_at[first] * alpha:g} \(the learning "
                                         r"rate the scheduler set for this step\) is ≥ 1"):
        trainer.train()
    assert trainer.state.global_step == first  # refused before that step's pull and update
    start = tiny_gpt2().state_dict()
    drift = math.sqrt(sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters()))
    assert drift < 1.0


class PoisonWeights(TrainerCallback):
    """Set one weight to NaN at the end of optimizer step `at`, as a blown-up update would."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")


@pytest.mark.parametrize("impl", ["grad", "decoupled"])
def test_non_finite_statistics_stop_training_naming_the_step_and_the_last_checkpoint(tmp_path, impl):
    args = l2_args(tmp_path, l2_impl=impl, max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1)
    trainer = L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[PoisonWeights(3)])
    assert_stops_at_step_3(trainer, tmp_path, r"stopped at step 3: l2/penalty = nan, l2/drift = nan")


def assert_stops_at_step_3(trainer, tmp_path, message):
    """The run (logging every step, a checkpoint every 2) stops at step 3, naming step 2 and checkpoint-2."""
    with pytest.raises(FloatingPointError, match=message) as err:
        trainer.train()
    assert "The last finite statistics were logged at step 2" in str(err.value)
    assert f"The last checkpoint is {tmp_path / 'checkpoint-2'}" in str(err.value)
    assert trainer.state.global_step == 3 and not (tmp_path / "checkpoint-4").exists()


class InfiniteReference(TrainerCallback):
    """From optimizer step `at` on, GPT-2's logits are +inf in eval mode, where only θ₀'s reference forward runs:
    the KL turns NaN although the weights are finite (its NaN reaches them with that step's update)."""

    def __init__(self, model, at):
        self.at, self.on = at, False
        model.lm_head.register_forward_hook(
            lambda module, args, out: out + float("inf") if self.on and not module.training else None)

    def on_step_end(self, args, state, control, **kwargs):
        self.on = state.global_step + 1 >= self.at


def test_non_finite_kl_stops_training_naming_it_and_the_step(tmp_path):
    """`l2_mode="none"`: no penalty statistics, the KL alone must stop the run: its NaN reaches the gradient of
    step 3, whose norm stops the run before that step's update."""
    model = tiny_gpt2()
    args = l2_args(tmp_path, l2_mode="none", l2_kl_coef=1.0, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[InfiniteReference(model, 3)])
    with pytest.raises(FloatingPointError, match=r"stopped at step 3, before its update: grad_norm = nan\. .*"
                                                 r"`l2_kl_coef` too large") as err:
        trainer.train()
    assert f"The last checkpoint is {tmp_path / 'checkpoint-2'}" in str(err.value)
    assert trainer.state.global_step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("overrides", "coef", "step"), [(dict(l2_coef=1e30), "`l2_coef`", 2),
                                                      (dict(l2_mode="l2", l2_coef=1e30), "`l2_coef`", 1),
                                                      (dict(l2_mode="none", l2_kl_coef=1e30), "`l2_kl_coef`", 2)],
                         ids=["l2_coef", "l2_toward_zero", "l2_kl_coef"])
def test_an_infinite_gradient_norm_stops_training_before_its_update(tmp_path, overrides, coef, step):
    """L2-SP, α = 1e30: at step 1 θ = θ₀ and ∇Ω = 0; at step 2 α times a drift of about lr gives a gradient whose
    norm overflows fp32. L2 toward zero: ∇Ω = α·θ overflows at step 1. λ = 1e30: at θ₀ the KL's gradient is exactly
    0 (the chunked KL forms softmax(z) − softmax(z₀) from equal logits), at step 2 it overflows. Before, every such
    step had `grad_norm` inf, clipping zeroed the gradients, the model stopped moving, and the run ended with
    exit 0."""
    model = tiny_gpt2()
    args = l2_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=1, max_grad_norm=1.0, **overrides)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    with pytest.raises(FloatingPointError, match=rf"Training stopped at step {step}, before its update: grad_norm = "
                                                 rf"inf\. Likely causes: a learning rate or {coef} too large") as err:
        trainer.train()
    assert "\n" not in str(err.value) and trainer.state.global_step == step - 1
    if step == 1:
        assert "No checkpoint had been saved yet" in str(err.value)
        expected = tiny_gpt2().state_dict()
    else:
        assert f"The last checkpoint is {tmp_path / 'checkpoint-1'}" in str(err.value)
        expected = gpt2_from_checkpoint(tmp_path / "checkpoint-1").state_dict()
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())  # no update after the last step


def test_an_infinite_gradient_norm_without_a_penalty_is_the_stock_trainers_business(tmp_path):
    """`l2_mode="none"` without the KL is exactly the stock Trainer, which trains on through an infinite norm."""
    from transformers import Trainer

    def huge_loss(outputs, labels, num_items_in_batch=None):  # gradients ~1e30: their norm overflows fp32
        logits = outputs["logits"][:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100) * 1e30

    histories = []
    for cls in (Trainer, L2Trainer):  # the stock Trainer takes the same config (a `TrainingArguments`)
        args = l2_args(tmp_path / cls.__name__, l2_mode="none", max_grad_norm=1.0)
        trainer = cls(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), compute_loss_func=huge_loss)
        trainer.train()
        histories.append([h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h])
    assert histories[0] == histories[1] and len(histories[0]) == 4 and math.inf in histories[0]


# ---- item 4: the card and the logs say which precision ran ------------------------------------------------------
def hyperparameter_rows(card_text):
    return {line.split(":")[0].strip("- "): line.split(":", 1)[1].strip()
            for line in card_text.splitlines() if line.startswith("- ") and ":" in line}


def test_fp16_on_cpu_is_reported_as_fp32(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, fp16=True, max_steps=1),
                            train_dataset=TokenDataset())
    assert "Mixed precision is off: fp16 was asked for, but accelerate runs it only on a GPU" in caplog.text
    trainer.train()
    assert trainer.accelerator.scaler is None  # what accelerate did: no GradScaler, no autocast
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "Native AMP" not in card
    assert hyperparameter_rows(card)["mixed_precision_training"].startswith("none: fp16 was asked for")


def test_bf16_on_cpu_runs_and_is_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, bf16=True, max_steps=1),
                            train_dataset=TokenDataset())
    assert "Mixed precision is off" not in caplog.text
    trainer.train()
    trainer.create_model_card()
    assert hyperparameter_rows((tmp_path / "README.md").read_text())["mixed_precision_training"] == "Native AMP (bf16)"


# ---- item 5: parameters unfrozen after the trainer is built -------------------------------------------------------
def test_parameters_unfrozen_after_building_train_unpenalized_with_a_warning(tmp_path, caplog):
    model = tiny_gpt2()
    block = [p for n, p in model.named_parameters() if ".h.1." in n]
    for p in block:
        p.requires_grad_(False)
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, max_steps=1), train_dataset=TokenDataset())
    for p in block:
        p.requires_grad_(True)  # too late: the penalty was chosen without them
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "12 parameter(s) became trainable after the trainer was built, e.g. ['transformer.h.1.ln_1.weight'" \
        in caplog.text
    assert not any(".h.1." in n for n in trainer.l2_terms.penalty.anchored_names)
    caplog.clear()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert f"1 penalized parameter(s) were frozen after the trainer was built, e.g. ['{QKV}']" in caplog.text


def test_per_rank_pieces_are_checked_against_their_place_in_the_parameter(tmp_path):
    from hf_l2.saved_state import ExpectedAnchor, load_anchor

    full = torch.arange(12.0).reshape(3, 4)
    expected = {"w": ExpectedAnchor((3, 4))}
    # Rank 1 of 2 holds elements [8, 12) of w: fits.
    save_anchor({"w": full.reshape(-1)[8:]}, {"w": (8, torch.Size([3, 4]))}, str(tmp_path), rank=1, world=2)
    saved, layout = load_anchor(str(tmp_path), rank=1, world=2, expected=expected)
    assert torch.equal(saved["w"], full.reshape(-1)[8:]) and layout["w"] == (8, torch.Size([3, 4]))
    # A piece claiming elements past the end, or a θ₀ of another parameter's shape, is refused.
    save_anchor({"w": full.reshape(-1)[6:]}, {"w": (8, torch.Size([3, 4]))}, str(tmp_path), rank=1, world=2)
    with pytest.raises(ValueError, match=r"rank00001-of-00002\.safetensors is damaged .*w: a piece of 6 values at 8, "
                                         r"outside the 12 of the parameter"):
        load_anchor(str(tmp_path), rank=1, world=2, expected=expected)
    save_anchor({"w": full.reshape(-1)[8:]}, {"w": (8, torch.Size([4, 3]))}, str(tmp_path), rank=1, world=2)
    with pytest.raises(ValueError, match=r"w: θ₀ of shape \(4, 3\), the parameter has \(3, 4\)"):
        load_anchor(str(tmp_path), rank=1, world=2, expected=expected)
