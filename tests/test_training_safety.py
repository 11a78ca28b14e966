"""Runs that must stop instead of training garbage: damaged θ₀ files, a conflicting anchor on resume, a decoupled
pull that overshoots, non-finite statistics, mixed precision that did not run, parameters unfrozen too late."""

import json
import logging
import math
import shutil

import pytest
import torch
from helpers import TokenDataset, gpt2_from_checkpoint, l2_args, tiny_gpt2
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from hf_l2 import L2Trainer
from hf_l2.saved_state import ANCHOR_FILE, save_anchor

COMMON = dict(max_steps=4, save_strategy="steps", save_steps=2, l2_coef=1.0)
QKV = "transformer.h.0.attn.c_attn.weight"  # (16, 48)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step L2-SP run saved at steps 2 and 4, trained once for the module."""
    folder = tmp_path_factory.mktemp("run")
    L2Trainer(model=tiny_gpt2(), args=l2_args(folder, **COMMON), train_dataset=TokenDataset()).train()
    return folder


@pytest.fixture
def checkpoint(trained_run, tmp_path):
    """A fresh copy of the run's checkpoint-2 (with its anchor file), for a test to damage."""
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(trained_run / "checkpoint-2", copy)
    return copy


def resume(checkpoint, **overrides):
    trainer = L2Trainer(model=gpt2_from_checkpoint(checkpoint), args=l2_args(checkpoint.parent, **COMMON | overrides),
                        train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def rewrite_anchor(checkpoint, edit, keep_checksums=True):
    """Replace the anchor file's tensors by `edit(tensors)`, keeping its metadata (or only its layout)."""
    path = str(checkpoint / ANCHOR_FILE)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata if keep_checksums else {"layout": metadata["layout"]})


def set_item(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    return edit


def flip_exponent_bits(t):
    bits = t.clone().view(torch.int32)
    bits[0, :4] ^= 1 << 30  # the exponent's top bit: values near 0.02 become ~1e37, still finite
    return bits.view(torch.float32)


def with_nan(t):
    t = t.clone()
    t[1, 2] = float("nan")
    t[0, 0] = float("inf")
    return t


# ---- item 1: a damaged anchor file is refused, naming the file, the tensor and what is wrong ----------------------
@pytest.mark.parametrize(
    "name, damage, message",
    [
        (QKV, with_nan, rf"{QKV}: 1 NaN and 1 infinite value\(s\) of 768"),
        (QKV, flip_exponent_bits, rf"{QKV}: its bytes differ from the checksum"),
        ("transformer.wte.weight", torch.zeros_like, r"transformer\.wte\.weight: its bytes differ from the checksum"),
        (QKV, lambda t: t.T.contiguous(), rf"{QKV}: shape \(48, 16\), expected \(16, 48\)"),
        (QKV, lambda t: t[:8].contiguous(), rf"{QKV}: shape \(8, 48\), expected \(16, 48\)"),
        (QKV, lambda t: torch.cat([t, t]), rf"{QKV}: shape \(32, 48\), expected \(16, 48\)"),
        (QKV, lambda t: t.to(torch.int8), rf"{QKV}: dtype torch.int8, not a floating-point type"),
    ],
    ids=["nan-inf", "flipped-exponent", "zeros", "transposed", "smaller", "bigger", "int8"],
)
def test_damaged_anchor_file_is_refused_on_resume(checkpoint, name, damage, message):
    rewrite_anchor(checkpoint, set_item(name, damage))
    with pytest.raises(ValueError, match=rf"{ANCHOR_FILE} is damaged .*{message}"):
        resume(checkpoint)


def test_torn_write_is_caught_by_the_checksum(checkpoint):
    path = checkpoint / ANCHOR_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the tail of the data never reached the disk: zeros, the size unchanged
        f.seek(size - 256)
        f.write(bytes(256))
    with pytest.raises(ValueError, match="its bytes differ from the checksum written with it"):
        resume(checkpoint)


def test_anchor_file_carries_a_checksum_per_tensor(checkpoint):
    import hashlib

    path = str(checkpoint / ANCHOR_FILE)
    with safe_open(path, "pt") as f:
        recorded = json.loads(f.metadata()["sha256"])
    tensors = load_file(path)
    assert set(recorded) == set(tensors)
    t = tensors[QKV]  # written independently of hf_l2's helper: dtype, shape, then the raw bytes
    by_hand = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()
    assert recorded[QKV] == by_hand


def test_anchor_file_without_checksums_still_loads_and_warns_about_zeros(checkpoint, caplog):
    rewrite_anchor(checkpoint, set_item(QKV, torch.zeros_like), keep_checksums=False)
    with caplog.at_level(logging.WARNING):
        trainer = resume(checkpoint)
    assert "has no checksums" in caplog.text
    assert f"θ₀ is all zeros for 1 tensor(s), e.g. ['{QKV}']" in caplog.text
    assert trainer.state.global_step == 4
    # A legitimately zero tensor with a valid checksum is trusted: no warning.
    caplog.clear()
    save_anchor(load_file(str(checkpoint / ANCHOR_FILE)), {}, str(checkpoint))  # the same zeros, with checksums
    with caplog.at_level(logging.WARNING):
        resume(checkpoint)
    assert "all zeros" not in caplog.text and "has no checksums" not in caplog.text


# ---- item 3: another anchor on resume -----------------------------------------------------------------------------
def test_a_different_anchor_path_on_resume_is_refused(tmp_path):
    tiny_gpt2(seed=0).save_pretrained(tmp_path / "pretrained")
    tiny_gpt2(seed=7).save_pretrained(tmp_path / "other")
    first = dict(l2_anchor_path=str(tmp_path / "pretrained"))
    L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path / "run", **COMMON, **first),
              train_dataset=TokenDataset()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match=r"`l2_anchor_path`=.*other' differs from the θ₀ that .*checkpoint-2 was"):
        resume(checkpoint, l2_anchor_path=str(tmp_path / "other"))
    assert resume(checkpoint, **first).state.global_step == 4  # the same anchor resumes


def test_resume_says_which_anchor_is_in_force(checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        resume(checkpoint)  # built from the checkpoint's weights: the θ₀ it would take is not the run's
    assert "θ₀ in force: the one saved in" in caplog.text
    caplog.clear()
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(checkpoint.parent, **COMMON), train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(checkpoint))  # built from the pretrained model: nothing to say
    assert "θ₀ in force" not in caplog.text


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
                                                      (dict(l2_mode="none", l2_kl_coef=1e30), "`l2_kl_coef`", 1)],
                         ids=["l2_coef", "l2_kl_coef"])
def test_an_infinite_gradient_norm_stops_training_before_its_update(tmp_path, overrides, coef, step):
    """α = 1e30: at step 1 θ = θ₀ and ∇Ω = 0; at step 2 α times a drift of about lr gives a gradient whose norm
    overflows fp32. λ = 1e30: the KL's gradient at θ₀ is rounding noise (~1e-8), times λ it overflows at step 1.
    Before, every such step had `grad_norm` inf, clipping zeroed the gradients, the model stopped moving, and the
    run ended with exit 0."""
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
