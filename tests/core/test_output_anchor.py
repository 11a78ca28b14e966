"""`l2_kl_coef`: the KL to θ₀'s predictions, against references that keep a frozen deep copy of the starting model
(`DeepCopyReference` in helpers.py). Resume and the saved reference's checks are in trainer/test_resume.py."""

import copy
import types

import pytest
import torch
from helpers import (
    LAMBDA,
    TAU,
    DeepCopyReference,
    FinalParameters,
    GPT2Reference,
    MaskedPairDataset,
    TokenDataset,
    gpt2_from_checkpoint,
    l2_args,
    max_rel_diff,
    params_of,
    penalized,
    sgd_args,
    tiny_generating_marian,
    tiny_gpt2,
)
from peft import LoraConfig, get_peft_model
from transformers import Seq2SeqTrainer, Trainer

from hf_l2 import L2Config, L2Seq2SeqConfig, L2Seq2SeqTrainer, L2Trainer
from hf_l2.output_anchor import OutputAnchor


class MarianReference(DeepCopyReference, L2Seq2SeqTrainer):
    pass


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


def test_fsdp1_and_deepspeed_runs_are_refused_fsdp2_is_not(tmp_path, monkeypatch):
    """FSDP1 and DeepSpeed hide the parameters the forward gathers: refused, naming what works. FSDP2 builds (its
    training is in tests/distributed/test_fsdp_trainer.py)."""
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_kl_coef=1.0), train_dataset=TokenDataset())
    for flag, name in (("is_fsdp_enabled", "FSDP1"), ("is_deepspeed_enabled", "DeepSpeed")):
        setattr(trainer, flag, True)
        with pytest.raises(ValueError, match=f"not supported under {name}: .* Use FSDP2 .*`fsdp_version: 2`.* or DDP"):
            trainer._build_output_anchor()
        setattr(trainer, flag, False)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", types.SimpleNamespace(fsdp_version=2),
                        raising=False)
    trainer.is_fsdp_enabled = True
    assert set(trainer._build_output_anchor().own) == set(trainer._l2_kl.own)


def test_hyperparameter_search_takes_each_trials_coef_and_start(tmp_path):
    """Per trial, `model_init` builds another starting model: the KL's θ₀ and λ are that trial's."""
    pytest.importorskip("optuna")
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


def test_fsdp2_kl_swap_gives_theta0_and_restores_theta_bit_for_bit_even_from_a_narrower_theta0():
    """The swap `hf_l2.sharded_reference` runs the reference forward in (here with no FSDP module to reshard): θ₀
    of the parameter's dtype trades places with θ; a bf16 θ₀ of an fp32 parameter (accelerate's upcast under FSDP2
    mixed precision) cannot hold θ, which is kept aside. Both come back bit for bit, also after an error."""
    from hf_l2.sharded_reference import swapped_in

    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    theta0 = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).bfloat16()]
    params, anchors = [t.clone() for t in theta], [t.clone() for t in theta0]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="inside"), swapped_in([], lambda: list(zip(params, anchors))):
            assert all(torch.equal(p, a.float()) for p, a in zip(params, theta0))
            raise RuntimeError("inside")
        assert all(torch.equal(p, t) for p, t in zip(params, theta))
        assert all(torch.equal(a, t) for a, t in zip(anchors, theta0))
