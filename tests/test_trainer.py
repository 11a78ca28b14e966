"""L2Trainer around the training loop: resume, logging, evaluation, anchors from disk, bad input."""

import glob
import logging
import os

import pytest
import torch
from helpers import (
    PairDataset,
    RegressionData,
    TokenDataset,
    gpt2_from_checkpoint,
    l2_args,
    max_rel_diff,
    params_of,
    penalized,
    tiny_gpt2,
    tiny_marian,
)
from safetensors.torch import load_file
from transformers import (
    GPT2Model,
    MarianConfig,
    MarianMTModel,
    PretrainedConfig,
    PreTrainedModel,
    Seq2SeqTrainer,
    Trainer,
)

from hf_l2 import L2Config, L2Seq2SeqConfig, L2Seq2SeqTrainer, L2Trainer, WeightNormCallback
from hf_l2.saved_state import ANCHOR_FILE


def omega_by_hand(model, anchor, alpha):
    return sum(
        0.5 * alpha * (p.detach() - anchor[n]).pow(2).sum().item() for n, p in model.named_parameters() if penalized(n)
    )


# ---- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_resume_restores_the_anchor_and_matches_an_uninterrupted_run(tmp_path, impl):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_coef=2.0, l2_impl=impl,
                  gradient_accumulation_steps=2, per_device_train_batch_size=2)
    full = tiny_gpt2()
    L2Trainer(model=full, args=l2_args(tmp_path / "full", **common), train_dataset=TokenDataset()).train()

    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / ANCHOR_FILE).is_file()
    saved = load_file(str(checkpoint / ANCHOR_FILE))
    start = params_of(tiny_gpt2())
    assert torch.equal(saved["transformer.wte.weight"], start["transformer.wte.weight"])

    # The natural mistake: rebuild the trainer from the checkpoint's weights. Its anchor must come from the file.
    resumed = gpt2_from_checkpoint(checkpoint)
    trainer = L2Trainer(model=resumed, args=l2_args(tmp_path / "full", **common), train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert max_rel_diff(params_of(resumed), params_of(full)) < 1e-6

    # Without the anchor file the same resume anchors to the step-3 weights and ends elsewhere.
    os.remove(checkpoint / ANCHOR_FILE)
    wrong = gpt2_from_checkpoint(checkpoint)
    L2Trainer(model=wrong, args=l2_args(tmp_path / "full", **common),
              train_dataset=TokenDataset()).train(resume_from_checkpoint=str(checkpoint))
    assert max_rel_diff(params_of(wrong), params_of(full)) > 1e-4


class TinyRegressor(PreTrainedModel):
    """A `PreTrainedModel` with no input embeddings (as a regression head or many vision / audio models): its
    `get_input_embeddings` raises `NotImplementedError` in transformers 5 instead of returning None."""

    config_class = PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)
        self.post_init()

    def forward(self, x, y):
        pred = self.head(torch.tanh(self.body(x))).squeeze(-1)
        return {"loss": 0.5 * ((pred - y) ** 2).mean()}


def tiny_regressor() -> TinyRegressor:
    torch.manual_seed(0)
    return TinyRegressor(PretrainedConfig())


def test_resume_of_a_model_without_input_embeddings_matches_an_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    data = RegressionData(x, x.sum(1))
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_coef=2.0, per_device_train_batch_size=4)
    with pytest.raises(NotImplementedError):
        tiny_regressor().get_input_embeddings()
    full = tiny_regressor()
    L2Trainer(model=full, args=l2_args(tmp_path / "full", **common), train_dataset=data).train()

    resumed = tiny_regressor()
    L2Trainer(model=resumed, args=l2_args(tmp_path / "resumed", **common),
              train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert max_rel_diff(params_of(resumed), params_of(full)) < 1e-6
    assert max_rel_diff(params_of(full), params_of(tiny_regressor())) > 1e-3  # it trained


# ---- a model whose loss ignores `num_items_in_batch` ----------------------------------------------------------------
def marian_penalized(name: str) -> bool:
    """Marian's decayed weights, the Trainer's no-decay rule written out: no biases, no LayerNorms."""
    return "bias" not in name and "layer_norm" not in name


class HandOmegaSeq2Seq(Seq2SeqTrainer):
    """The stock Seq2SeqTrainer whose loss adds Ω = (α/2)·Σ‖θ − θ₀‖², written out (one micro-batch per step)."""

    def __init__(self, *args, alpha, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()
                      if p.requires_grad and marian_penalized(n)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss + 0.5 * self.alpha * sum((self.model.get_parameter(n) - t).pow(2).sum()
                                             for n, t in self.start.items())


def test_a_loss_that_ignores_num_items_in_batch_is_divided_by_the_accumulation_steps(tmp_path):
    """MarianMT's forward takes `**kwargs`, so the Trainer takes its loss for one normalized over the accumulated
    batch and does not divide it by GA: its task gradient would count GA times against Ω. Reference: the stock
    Seq2SeqTrainer without accumulation (where that cannot happen), Ω added by hand, the same 8 pairs per step."""
    common = dict(max_steps=3, l2_coef=10.0, max_grad_norm=0.5)
    model = tiny_marian()
    trainer = L2Seq2SeqTrainer(model=model, train_dataset=PairDataset(), args=L2Seq2SeqConfig.from_training_args(
        l2_args(tmp_path / "l2", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)))
    trainer.train()
    reference = tiny_marian()
    stock = HandOmegaSeq2Seq(model=reference, train_dataset=PairDataset(), alpha=10.0, args=L2Seq2SeqConfig(
        **{**l2_args(tmp_path / "stock").to_dict(), "l2_mode": "none", "per_device_train_batch_size": 8,
           "max_steps": 3, "max_grad_norm": 0.5}))
    stock.train()
    assert max_rel_diff(params_of(model), params_of(reference)) < 1e-6
    assert max_rel_diff(params_of(reference), params_of(tiny_marian())) > 1e-3  # it trained
    # The first logged loss is the task loss at θ₀ (Ω = 0 there), not GA times it.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(stock.state.log_history[0]["loss"], rel=1e-6)

# ---- logging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_logs_hold_task_loss_and_l2_statistics(tmp_path, impl):
    alpha = 3.0
    model = tiny_gpt2()
    anchor = params_of(model)
    args = l2_args(tmp_path, l2_coef=alpha, l2_impl=impl, logging_steps=2, report_to=["tensorboard"])
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    last = logs[-1]
    assert last["l2/penalty"] == pytest.approx(omega_by_hand(model, anchor, alpha), rel=1e-4)
    drift_sq = 2 * omega_by_hand(model, anchor, 1.0)
    anchor_sq = sum(t.pow(2).sum().item() for n, t in anchor.items() if penalized(n))
    assert last["l2/drift"] == pytest.approx(drift_sq ** 0.5, rel=1e-4)
    assert last["l2/rel_drift"] == pytest.approx((drift_sq / anchor_sq) ** 0.5, rel=1e-4)
    weight_sq = sum(p.detach().pow(2).sum().item() for n, p in model.named_parameters()
                    if penalized(n))
    assert last["l2/weight_norm"] == pytest.approx(weight_sq ** 0.5, rel=1e-4)

    # The first logged loss (step 1, before any update) must be the task loss that a stock Trainer logs.
    first = dict(l2_coef=alpha, l2_impl=impl, logging_steps=1, max_steps=1)
    stock = Trainer(model=tiny_gpt2(), args=l2_args(tmp_path / "stock", **first), train_dataset=TokenDataset())
    stock.train()
    mine_first = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path / "one", **first), train_dataset=TokenDataset())
    mine_first.train()
    assert mine_first.state.log_history[0]["loss"] == pytest.approx(stock.state.log_history[0]["loss"], rel=1e-6)
    assert mine_first.state.log_history[0]["l2/penalty"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/l2/penalty", "train/l2/drift", "train/l2/rel_drift", "train/l2/weight_norm"} <= tags
    assert events.Scalars("train/l2/penalty")[-1].value == pytest.approx(last["l2/penalty"], rel=1e-6)


def test_eval_loss_never_includes_the_penalty(tmp_path):
    model = tiny_gpt2()
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_coef=100.0, l2_impl="loss"),
                        train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4, seed=3))
    trainer.train()
    assert trainer.state.log_history[-2]["l2/penalty"] > 1.0
    stock = Trainer(model=model, args=l2_args(tmp_path, l2_mode="none"), eval_dataset=TokenDataset(n=4, seed=3))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-6)


def tiny_generating_marian():
    """A Marian whose generation stops at 8 tokens (pad 39), for the predict_with_generate tests."""
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=39, eos_token_id=0, decoder_start_token_id=39, dropout=0.0, max_length=8,
    )
    return MarianMTModel(config)


class MaskedPairDataset(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.src = torch.randint(1, 39, (n, 6), generator=g)
        self.tgt = torch.randint(1, 39, (n, 5), generator=g)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return {"input_ids": self.src[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.tgt[i]}


@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_seq2seq_trains_with_penalty_and_generate_eval_excludes_it(tmp_path, impl):
    model = tiny_generating_marian()
    args = L2Seq2SeqConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none",
                           use_cpu=True, l2_coef=50.0, l2_impl=impl, predict_with_generate=True,
                           generation_max_length=8, logging_steps=1, learning_rate=1e-2, disable_tqdm=True)
    trainer = L2Seq2SeqTrainer(model=model, args=args, train_dataset=MaskedPairDataset(),
                               eval_dataset=MaskedPairDataset(4))
    trainer.train()
    assert trainer.state.log_history[-2]["l2/drift"] > 0
    got = trainer.evaluate()["eval_loss"]
    stock_args = L2Seq2SeqConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, l2_mode="none",
                                 predict_with_generate=True, generation_max_length=8)
    stock = Seq2SeqTrainer(model=model, args=stock_args, eval_dataset=MaskedPairDataset(4))
    assert got == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-6)


# ---- WeightNormCallback ---------------------------------------------------------------------------------------
def test_weight_norm_callback_on_the_stock_trainer(tmp_path):
    model = tiny_gpt2()
    start = params_of(model)
    args = l2_args(tmp_path, l2_mode="none", logging_steps=4, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
    WeightNormCallback(track_drift=True).attach(trainer)
    trainer.train()
    log = trainer.state.log_history[0]
    now = params_of(model)
    total = sum(t.pow(2).sum().item() for t in now.values()) ** 0.5
    assert log["weights/norm"] == pytest.approx(total, rel=1e-5)
    attn = sum(t.pow(2).sum().item() for n, t in now.items() if ".attn." in n) ** 0.5
    assert log["weights/norm/attention"] == pytest.approx(attn, rel=1e-5)
    emb_drift = sum((now[n] - start[n]).pow(2).sum().item() for n in now if n.endswith(("wte.weight", "wpe.weight")))
    assert log["weights/drift/embeddings"] == pytest.approx(emb_drift ** 0.5, rel=1e-4)
    assert {"weights/norm/mlp", "weights/norm/layer_norm", "weights/drift", "weights/rel_drift"} <= set(log)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(str(tmp_path / "runs" / "**" / "events.*"), recursive=True)[0])
    events.Reload()
    assert "train/weights/norm/attention" in events.Tags()["scalars"]


def test_weight_norm_callback_groups_by_layer(gpt2):
    values = WeightNormCallback(group_by="layer").measure(gpt2)
    assert {"weights/norm/layer_00", "weights/norm/layer_01"} <= set(values)
    layer0 = sum(p.detach().pow(2).sum().item() for n, p in gpt2.named_parameters() if ".h.0." in n) ** 0.5
    assert values["weights/norm/layer_00"] == pytest.approx(layer0, rel=1e-5)


# ---- anchors from disk ----------------------------------------------------------------------------------------
def test_anchor_path_from_a_base_model_with_resized_embeddings(tmp_path):
    base = GPT2Model(tiny_gpt2().config)
    base.save_pretrained(tmp_path / "base")
    model = tiny_gpt2(seed=5)
    model.resize_token_embeddings(70)
    args = l2_args(tmp_path, l2_anchor_path=str(tmp_path / "base"), l2_coef=0.4, l2_head_coef=0.1)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    penalty = trainer.l2_terms.penalty
    assert "transformer.h.0.attn.c_attn.weight" in penalty.anchored_names
    wte = model.transformer.wte.weight.detach()
    base_sd = base.state_dict()
    expected = 0.2 * (wte[:64] - base_sd["wte.weight"]).pow(2).sum() + 0.05 * wte[64:].pow(2).sum()
    expected += sum(0.2 * (p.detach() - base_sd[n.removeprefix("transformer.")]).pow(2).sum()
                    for n, p in model.named_parameters()
                    if penalized(n) and n != "transformer.wte.weight")
    assert penalty.value().item() == pytest.approx(expected.item(), rel=1e-5)


def test_anchor_shape_mismatch_lists_offenders(tmp_path):
    other = tiny_gpt2()
    other.config.n_inner = 8
    GPT2Model(type(other.config)(**{**other.config.to_dict(), "n_inner": 8})).save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"l2_anchor_path.*mlp\.c_fc\.weight: model \(16, 64\) vs anchor \(16, 8\)"):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_anchor_path=str(tmp_path / "bad")))


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("l2_coef", -1.0, "`l2_coef` must be a number ≥ 0"),
        ("l2_head_coef", float("nan"), "`l2_head_coef` must be a number ≥ 0"),
        ("l2_mode", "l3", "`l2_mode`='l3' is not one of"),
        ("l2_impl", "fast", "`l2_impl`='fast' is not one of"),
        ("l2_exclude", ["(unclosed"], "`l2_exclude`: '\\(unclosed' is not a valid regular expression"),
        ("l2_anchor_dtype", "int8", "`l2_anchor_dtype`='int8' is not one of"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        L2Config(output_dir=str(tmp_path), **{field: value})


def test_warnings_for_double_decay_and_unmatched_patterns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        L2Config(output_dir=str(tmp_path), l2_mode="l2", weight_decay=0.1)
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_exclude=["nothing_like_this"]))
    assert "decays the weights twice" in caplog.text
    assert "'nothing_like_this' matches no trainable parameter" in caplog.text


def test_plain_training_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="hf_l2.L2Config"):
        L2Trainer(model=tiny_gpt2(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_cli_flags_through_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(L2Config).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--l2_mode", "l2_sp", "--l2_coef", "0.3", "--l2_exclude", "wpe", "lm_head",
         "--l2_exclude_bias_and_norm", "false", "--l2_impl", "loss"]
    )
    assert (config.l2_coef, config.l2_exclude, config.l2_exclude_bias_and_norm, config.l2_impl) == (
        0.3, ["wpe", "lm_head"], False, "loss")
    assert "l2_coef" in HfArgumentParser(L2Config).format_help()


def test_peft_lora_penalizes_only_trainable_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_coef=1.0), train_dataset=TokenDataset())
    names = trainer.l2_terms.penalty.anchored_names + trainer.l2_terms.penalty.new_names
    assert names and all("lora_" in n for n in names)
    frozen_before = model.base_model.model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    trainer.train()
    assert torch.equal(model.base_model.model.transformer.h[0].mlp.c_fc.weight, frozen_before)
    assert [h for h in trainer.state.log_history if "loss" in h][-1]["l2/drift"] > 0


def test_bf16_anchor_on_cpu_stays_close_to_fp32(tmp_path):
    results = {}
    for dtype, device in (("float32", "param"), ("bfloat16", "cpu")):
        model = tiny_gpt2()
        trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_coef=1.0, optim="sgd", learning_rate=0.1,
                                                      l2_anchor_dtype=dtype, l2_anchor_device=device),
                            train_dataset=TokenDataset())
        assert {t.dtype for t in trainer.l2_terms.penalty.anchors.values()} == {getattr(torch, dtype)}
        trainer.train()
        results[dtype] = params_of(model)
    # bf16 keeps 8 bits of mantissa: θ₀ is off by ≤ 2⁻⁹ relative, and so is the pull, scaled by lr·α·steps.
    assert 0 < max_rel_diff(results["bfloat16"], results["float32"]) < 1e-3
