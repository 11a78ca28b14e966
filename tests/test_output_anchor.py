"""`l2_kl_coef`: the KL to θ₀'s predictions, against references that keep a frozen deep copy of the starting model."""

import copy
import logging
import os

import pytest
import torch
from helpers import TokenDataset, gpt2_from_checkpoint, l2_args, max_rel_diff, params_of, penalized, tiny_gpt2
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_trainer import MaskedPairDataset, tiny_generating_marian
from transformers import Seq2SeqTrainer, Trainer

from hf_l2 import L2Config, L2Seq2SeqConfig, L2Seq2SeqTrainer, L2Trainer
from hf_l2.output_anchor import OutputAnchor
from hf_l2.saved_state import ANCHOR_FILE, KL_ANCHOR_FILES

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


class MarianReference(DeepCopyReference, L2Seq2SeqTrainer):
    pass


def sgd_args(tmp_path, **overrides):
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, optim="sgd",
                    learning_rate=0.3, max_grad_norm=0.5, l2_coef=2.0)
    return l2_args(tmp_path, **{**settings, **overrides})


def grad_norms(trainer):
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("mode, impl", [("l2_sp", "grad"), ("l2_sp", "loss"), ("none", "grad")])
def test_gpt2_matches_a_frozen_deep_copy_reference(tmp_path, mode, impl):
    data = TokenDataset(n=8)
    model = tiny_gpt2()
    ours = L2Trainer(model=model, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl, l2_kl_coef=LAMBDA,
                                                l2_kl_temperature=TAU), train_dataset=data)
    batches = []
    collate = ours.data_collator
    ours.data_collator = lambda rows: batches.append(collate(rows)) or batches[-1]
    ours.train()
    reference_model = tiny_gpt2()
    reference = GPT2Reference(model=reference_model, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl),
                              train_dataset=data)
    reference.train()
    assert min(grad_norms(ours)) > 0.5, "clipping is active"
    assert max_rel_diff(params_of(model), params_of(reference_model)) < 1e-6
    if impl == "grad":
        without = tiny_gpt2()
        L2Trainer(model=without, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl), train_dataset=data).train()
        assert max_rel_diff(params_of(model), params_of(without)) > 1e-4, "the KL moves the parameters"
    # The logged loss is the task loss: the reference's minus its λ·Σ KL / num_items_in_batch, where `l2/kl` is
    # Σ KL / the window's target tokens (0 at θ₀, step 1).
    logs = [h for h in ours.state.log_history if "l2/kl" in h]
    assert logs[0]["l2/kl"] == 0.0 and all(h["l2/kl"] > 0 for h in logs[1:])
    reference_logs = [h for h in reference.state.log_history if "loss" in h and "train_loss" not in h]
    assert "l2/kl" not in reference_logs[0] and len(logs) == len(reference_logs) == 3
    for step, (mine, theirs) in enumerate(zip(logs, reference_logs)):
        window = batches[2 * step:2 * step + 2]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        kl_in_loss = LAMBDA * mine["l2/kl"] * tokens / float(ours._get_num_items_in_batch(window, "cpu"))
        assert mine["loss"] == pytest.approx(theirs["loss"] - kl_in_loss, rel=1e-4, abs=1e-6)


def test_reference_takes_theta0_of_parameters_the_penalty_excludes(tmp_path):
    """Biases and LayerNorms are outside L2-SP but trained: the reference must use their θ₀, the rest is shared."""
    model = tiny_gpt2()
    trainer = L2Trainer(model=model, args=sgd_args(tmp_path, l2_kl_coef=1.0), train_dataset=TokenDataset(n=8))
    anchor = trainer._l2_kl
    assert set(anchor.own) == {n for n, _ in model.named_parameters() if not penalized(n)}
    assert set(anchor.shared) == {n for n, _ in model.named_parameters() if penalized(n)}
    start = copy.deepcopy(model).eval()
    trainer.train()
    shared = anchor.anchors()
    anchors = trainer.l2_terms.penalty.anchors
    assert all(shared[n].data_ptr() == anchors[n].data_ptr() for n in anchor.shared), "no second copy"
    batch = TokenDataset(n=4)[list(range(4))]
    with torch.no_grad():
        expected = start(input_ids=batch["input_ids"]).logits
        now = model(input_ids=batch["input_ids"]).logits
    got = anchor.reference_outputs(model, {"input_ids": batch["input_ids"]}).logits
    assert not torch.allclose(now, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["grad"])
def test_micro_batch_8_equals_2_times_accumulation_4(tmp_path, impl):
    data = TokenDataset(n=16)  # padded rows: the micro-batches hold different numbers of tokens
    runs = []
    for batch, steps in ((8, 1), (2, 4)):
        model = tiny_gpt2()
        args = l2_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=steps, l2_impl=impl,
                       l2_coef=1.0, max_grad_norm=0.5, l2_kl_coef=5.0, max_steps=3)
        L2Trainer(model=model, args=args, train_dataset=data).train()
        runs.append(params_of(model))
    assert max_rel_diff(runs[1], runs[0]) < 1e-5


def test_zero_coef_is_bit_identical(tmp_path):
    data = TokenDataset()
    a, b = tiny_gpt2(), tiny_gpt2()
    L2Trainer(model=a, args=l2_args(tmp_path, gradient_accumulation_steps=2), train_dataset=data).train()
    trainer = L2Trainer(model=b, args=l2_args(tmp_path, gradient_accumulation_steps=2, l2_kl_coef=0.0,
                                              l2_kl_temperature=3.0), train_dataset=data)
    trainer.train()
    assert trainer._l2_kl is None
    assert all(torch.equal(x, y) for x, y in zip(params_of(a).values(), params_of(b).values()))
    assert not any("l2/kl" in h for h in trainer.state.log_history)
    # and with `l2_mode="none"`, the stock Trainer
    a2, b2 = tiny_gpt2(), tiny_gpt2()
    L2Trainer(model=a2, args=l2_args(tmp_path, l2_mode="none", l2_kl_coef=0.0), train_dataset=data).train()
    Trainer(model=b2, args=l2_args(tmp_path, l2_mode="none"), train_dataset=data).train()
    assert all(torch.equal(x, y) for x, y in zip(params_of(a2).values(), params_of(b2).values()))


def test_lora_reference_is_the_start_model(tmp_path):
    """With PEFT's default init (B₀ = 0) the reference equals the base with adapters disabled and the merged base;
    with adapters that do not start at zero it is still θ₀, which disabling them would not give."""
    batch = TokenDataset(n=4)[list(range(4))]
    inputs = {"input_ids": batch["input_ids"]}
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(**lora))
    trainer = L2Trainer(model=model, args=sgd_args(tmp_path, l2_kl_coef=1.0, max_steps=2), train_dataset=TokenDataset())
    trainer.train()
    got = trainer._l2_kl.reference_outputs(model, inputs).logits
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**inputs).logits
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        trained = model(**inputs).logits
        base = tiny_gpt2()(**inputs).logits
    assert not torch.allclose(trained, base, atol=1e-4)
    torch.testing.assert_close(got, disabled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(merged(**inputs).logits, base, atol=1e-4)  # merging the trained adapters is not θ₀

    torch.manual_seed(1)
    nonzero = get_peft_model(tiny_gpt2(), LoraConfig(**lora, init_lora_weights=False))
    with torch.no_grad():
        start = nonzero(**inputs).logits
    anchor = OutputAnchor(nonzero, 1.0, 1.0)
    with torch.no_grad():
        for p in nonzero.parameters():
            if p.requires_grad:
                p.add_(0.1)
    torch.testing.assert_close(anchor.reference_outputs(nonzero, inputs).logits, start, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["loss"])
def test_seq2seq_matches_the_reference_and_generate_eval_is_unaffected(tmp_path, impl):
    def args(**kw):
        return L2Seq2SeqConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, report_to="none", use_cpu=True, l2_coef=2.0,
                               l2_impl=impl, optim="sgd", learning_rate=0.5, max_grad_norm=0.5, logging_steps=1,
                               predict_with_generate=True, generation_max_length=8, disable_tqdm=True, **kw)

    model, reference_model = tiny_generating_marian(), tiny_generating_marian()
    ours = L2Seq2SeqTrainer(model=model, args=args(l2_kl_coef=LAMBDA, l2_kl_temperature=TAU),
                            train_dataset=MaskedPairDataset(), eval_dataset=MaskedPairDataset(4))
    ours.train()
    MarianReference(model=reference_model, args=args(), train_dataset=MaskedPairDataset()).train()
    assert max_rel_diff(params_of(model), params_of(reference_model)) < 1e-6
    got = ours.evaluate()
    stock = Seq2SeqTrainer(model=model, args=L2Seq2SeqConfig(output_dir=str(tmp_path), report_to="none",
                                                             use_cpu=True, predict_with_generate=True,
                                                             generation_max_length=8),
                           eval_dataset=MaskedPairDataset(4)).evaluate()
    assert got["eval_loss"] == pytest.approx(stock["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("l2_kl_coef", -1.0, "`l2_kl_coef` must be a number ≥ 0"),
    ("l2_kl_temperature", 0.0, "`l2_kl_temperature` must be a number > 0"),
])
def test_bad_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        L2Config(output_dir=str(tmp_path), **{field: value})


KL_FILE = KL_ANCHOR_FILES[0]


@pytest.mark.parametrize("mode", ["none", "l2_sp"])
def test_resume_on_the_checkpoints_weights_keeps_the_runs_reference(tmp_path, caplog, mode):
    """A trainer built from a checkpoint's weights snapshots them as θ₀; resumed, it must use the run's θ₀ (saved
    in the checkpoint) and end where the uninterrupted run ends. `none`: every trainable parameter is the KL's own;
    `l2_sp`: biases and LayerNorms are, the rest is the penalty's θ₀ (restored by the penalty)."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_mode=mode, l2_coef=1.0, l2_kl_coef=LAMBDA,
                  gradient_accumulation_steps=2, per_device_train_batch_size=2)
    full = tiny_gpt2()
    trainer = L2Trainer(model=full, args=l2_args(tmp_path / "full", **common), train_dataset=TokenDataset())
    own, shared = set(trainer._l2_kl.own), set(trainer._l2_kl.shared)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    start = params_of(tiny_gpt2())
    assert own == ({n for n in start if not penalized(n)} if mode == "l2_sp" else set(start))
    assert own.isdisjoint(shared) and own | shared == set(start) and (mode == "none") == (not shared)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(str(checkpoint / KL_FILE))
    assert saved.keys() == own and all(torch.equal(saved[n], start[n]) for n in own)
    # Beside the final weights only with the penalty's θ₀ (then θ₀ of every trainable parameter is there).
    assert (tmp_path / "final" / KL_FILE).is_file() == (tmp_path / "final" / ANCHOR_FILE).is_file() == bool(shared)

    def resume():
        model = gpt2_from_checkpoint(checkpoint)
        L2Trainer(model=model, args=l2_args(tmp_path / "full", **common),
                  train_dataset=TokenDataset()).train(resume_from_checkpoint=str(checkpoint))
        return params_of(model)

    with caplog.at_level(logging.WARNING):
        resumed = resume()
    # Before the snapshot was saved, this resume ended 2.7e-2 (`none`) and 7.9e-3 (`l2_sp`) away.
    assert max_rel_diff(resumed, params_of(full)) < 1e-6
    assert f"θ₀ in force: the one saved in {checkpoint}" in caplog.text

    # Without the file the same resume takes the step-3 weights as the reference, ends elsewhere, and says so.
    os.remove(checkpoint / KL_FILE)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        wrong = resume()
    assert f"{checkpoint} has no {KL_FILE}" in caplog.text
    assert max_rel_diff(wrong, params_of(full)) > 1e-4


def test_a_damaged_or_partial_reference_snapshot_is_refused_on_resume(tmp_path):
    """The KL's file is checked as the penalty's θ₀ file is (checksums, shapes, finite values), and must hold θ₀ of
    every parameter the resumed trainer's reference needs."""
    def args(mode):
        return l2_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, l2_mode=mode, l2_kl_coef=1.0)

    L2Trainer(model=tiny_gpt2(), args=args("l2_sp"), train_dataset=TokenDataset()).train()
    checkpoint = tmp_path / "checkpoint-1"
    # `l2_mode="none"` leaves the weights to the KL's own snapshot; the L2-SP run saved only biases and norms.
    trainer = L2Trainer(model=gpt2_from_checkpoint(checkpoint), args=args("none"), train_dataset=TokenDataset())
    weights = sum(penalized(n) for n in params_of(tiny_gpt2()))
    with pytest.raises(ValueError, match=rf"{KL_FILE} lacks θ₀ for {weights} parameter\(s\) of the KL's reference"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    path = str(checkpoint / KL_FILE)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + 1.0
    save_file(tensors, path, metadata=metadata)
    trainer = L2Trainer(model=gpt2_from_checkpoint(checkpoint), args=args("l2_sp"), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=rf"{KL_FILE} is damaged .*transformer\.ln_f\.bias: its bytes differ from"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_sharded_and_deepspeed_runs_are_refused(tmp_path):
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_kl_coef=1.0), train_dataset=TokenDataset())
    for flag, name in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
        setattr(trainer, flag, True)
        with pytest.raises(ValueError, match=f"not supported under {name}"):
            trainer._build_output_anchor()
        setattr(trainer, flag, False)


def test_hyperparameter_search_takes_each_trials_coef_and_start(tmp_path):
    """Per trial, `model_init` builds another starting model: the KL's θ₀ and λ are that trial's."""
    pytest.importorskip("optuna")
    from test_workflows import FinalParameters

    for name, seed in (("a", 0), ("b", 1)):
        tiny_gpt2(seed).save_pretrained(tmp_path / name)
    trials = [("a", 2.0), ("b", 5.0)]

    def model_init(trial):
        return gpt2_from_checkpoint(tmp_path / ("a" if trial is None else trials[trial.number][0]))

    common = dict(max_steps=3, eval_strategy="no", l2_mode="none")
    record = FinalParameters()
    trainer = L2Trainer(model_init=model_init, args=l2_args(tmp_path / "search", **common),
                        train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4, seed=1), callbacks=[record])
    trainer.hyperparameter_search(backend="optuna", n_trials=2, direction="minimize",
                                  hp_space=lambda trial: {"l2_kl_coef": trials[trial.number][1]})
    for i, ((start, coef), searched) in enumerate(zip(trials, record.runs)):
        alone = gpt2_from_checkpoint(tmp_path / start)
        L2Trainer(model=alone, args=l2_args(tmp_path / f"alone{i}", **common, l2_kl_coef=coef),
                  train_dataset=TokenDataset()).train()
        expected = params_of(alone)
        assert all(torch.equal(searched[n], expected[n]) for n in expected), f"trial {i} differs"
