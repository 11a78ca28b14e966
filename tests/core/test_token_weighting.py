"""`l2_token_weighting="dft"` (DFT; with `l2_kl_coef`, ASFT) against a hand-written loss: each target token's
cross-entropy from an fp64 log-softmax, times its probability with the gradient stopped, plus λ·KL to a frozen
deep copy of the starting model, both divided as the model's own loss is. TRL's SFT is in
integrations/test_trl.py, 2-process DDP in distributed/test_distributed.py."""

import copy

import pytest
import torch
from helpers import (
    LAMBDA,
    TAU,
    MaskedPairDataset,
    TokenDataset,
    kl_by_hand,
    l2_args,
    max_rel_diff,
    params_of,
    sgd_args,
    tiny_generating_marian,
    tiny_gpt2,
)
from transformers import GPT2Config, GPT2ForSequenceClassification, Seq2SeqTrainer, Trainer

from hf_l2 import L2Config, L2Seq2SeqConfig, L2Seq2SeqTrainer, L2Trainer, L2TrainerMixin


def dft_by_hand(logits, labels, shifts):
    """Σ over labelled positions of −log p·sg(p), p the label's probability, in fp64."""
    if shifts:  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    log_p = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask]
    return -(log_p * log_p.detach().exp()).sum()


class DFTLoss:
    """The stock Trainer's task loss replaced by the training loss written out: (`dft_by_hand` + λ·`kl_by_hand` to a
    frozen deep copy of the starting model) / the count the model's own loss divides by (`num_items_in_batch`, else
    the micro-batch's labelled tokens)."""

    def __init__(self, *args, coef=0.0, tau=TAU, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.coef, self.tau = coef, tau
        self.shifts = not self.model.config.is_encoder_decoder

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        count = num_items_in_batch
        if count is None:
            count = ((labels[:, 1:] if self.shifts else labels) != -100).sum()
        logits = model(**inputs).logits
        loss = dft_by_hand(logits, labels, self.shifts)
        if self.coef:
            with torch.no_grad():
                reference = self.frozen(**inputs).logits
            loss = loss + self.coef * kl_by_hand(logits, reference, labels, self.shifts, self.tau)
        return loss.float() / count


class GPT2DFTReference(L2TrainerMixin, DFTLoss, Trainer):  # hf_l2's Ω on top of the hand-written loss
    pass


class MarianDFTReference(L2TrainerMixin, DFTLoss, Seq2SeqTrainer):
    default_config = L2Seq2SeqConfig


def grad_norms(trainer):
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("mode, impl, kl", [
    ("l2_sp", "grad", LAMBDA), ("l2_sp", "loss", LAMBDA), ("none", "grad", 0.0),
])
def test_gpt2_matches_a_hand_written_asft_loss(tmp_path, mode, impl, kl):
    """Accumulation 2, clipping active, both `l2_impl`s; DFT alone (`l2_mode none`, λ = 0) too. The DFT gradient
    is small at a random start (each weight p ≈ 1/64), so the clipping threshold is too."""
    data = TokenDataset(n=8)  # padded rows: the micro-batches hold different numbers of tokens
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    clip = dict(max_grad_norm=0.01, learning_rate=3.0)
    ours = L2Trainer(model=model, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl, l2_kl_coef=kl, **clip,
                                                l2_kl_temperature=TAU, l2_token_weighting="dft"), train_dataset=data)
    batches = []
    collate = ours.data_collator
    ours.data_collator = lambda rows: batches.append(collate(rows)) or batches[-1]
    ours.train()
    reference_model = tiny_gpt2()
    GPT2DFTReference(model=reference_model, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl, **clip),
                     train_dataset=data, coef=kl).train()
    assert min(grad_norms(ours)) > 0.01, "clipping is active"
    assert max_rel_diff(params_of(model), params_of(reference_model)) < 1e-6
    plain = tiny_gpt2()
    L2Trainer(model=plain, args=sgd_args(tmp_path, l2_mode=mode, l2_impl=impl, l2_kl_coef=kl, **clip,
                                         l2_kl_temperature=TAU), train_dataset=data).train()
    assert max_rel_diff(params_of(model), params_of(plain)) > 1e-4, "the weighting moves the parameters"

    # The logged loss is the DFT loss; `l2/ce` the plain cross-entropy of the same tokens: at step 1 (θ₀), the
    # starting model's over the window's two micro-batches.
    logs = [h for h in ours.state.log_history if "loss" in h and "train_loss" not in h]
    assert all("l2/ce" in h and ("l2/kl" in h) == bool(kl) for h in logs)
    with torch.no_grad():
        window = batches[:2]
        ce = sum(start(**b).loss * (b["labels"][:, 1:] != -100).sum() for b in window)
        tokens = sum((b["labels"][:, 1:] != -100).sum() for b in window)
        dft = sum(dft_by_hand(start(**b).logits, b["labels"], True) for b in window)
    assert logs[0]["l2/ce"] == pytest.approx((ce / tokens).item(), rel=1e-5)
    assert logs[0]["loss"] == pytest.approx((dft / ours._get_num_items_in_batch(window, "cpu")).item(), rel=1e-5)
    assert logs[0]["loss"] < logs[0]["l2/ce"], "every weight is a probability < 1"


def test_micro_batch_8_equals_2_times_accumulation_4(tmp_path):
    data = TokenDataset(n=16)  # padded rows: the micro-batches hold different numbers of tokens
    runs = []
    for batch, steps in ((8, 1), (2, 4)):
        model = tiny_gpt2()
        args = l2_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=steps, l2_coef=1.0,
                       max_grad_norm=0.5, l2_kl_coef=5.0, l2_token_weighting="dft", max_steps=3)
        L2Trainer(model=model, args=args, train_dataset=data).train()
        runs.append(params_of(model))
    assert max_rel_diff(runs[1], runs[0]) < 1e-5


def test_seq2seq_weights_the_target_tokens_and_keeps_its_eval_loss(tmp_path):
    """Marian: the decoder's positions predict their own labels (no shift), and its loss is a per-micro-batch mean
    (it ignores `num_items_in_batch`); the eval loss stays the model's own cross-entropy."""
    def args(**kw):
        return L2Seq2SeqConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, report_to="none", use_cpu=True, l2_coef=2.0,
                               optim="sgd", learning_rate=0.5, max_grad_norm=0.5, logging_steps=1,
                               disable_tqdm=True, **kw)

    model, reference_model = tiny_generating_marian(), tiny_generating_marian()
    ours = L2Seq2SeqTrainer(model=model, args=args(l2_kl_coef=LAMBDA, l2_kl_temperature=TAU,
                                                   l2_token_weighting="dft"),
                            train_dataset=MaskedPairDataset(), eval_dataset=MaskedPairDataset(4))
    ours.train()
    MarianDFTReference(model=reference_model, args=args(), train_dataset=MaskedPairDataset(), coef=LAMBDA).train()
    assert max_rel_diff(params_of(model), params_of(reference_model)) < 1e-6
    stock = Trainer(model=model, args=args(l2_mode="none"), eval_dataset=MaskedPairDataset(4)).evaluate()
    assert ours.evaluate()["eval_loss"] == pytest.approx(stock["eval_loss"], rel=1e-6)


def test_none_is_the_code_path_of_before(tmp_path):
    """`l2_token_weighting="none"` (the default) never enters the token-level loss: with `l2_mode none` and no KL,
    bit for bit the stock Trainer."""
    data = TokenDataset()
    a, b = tiny_gpt2(), tiny_gpt2()
    trainer = L2Trainer(model=a, args=l2_args(tmp_path, l2_mode="none", l2_token_weighting="none",
                                              gradient_accumulation_steps=2), train_dataset=data)
    trainer.train()
    Trainer(model=b, args=l2_args(tmp_path, l2_mode="none", gradient_accumulation_steps=2), train_dataset=data).train()
    assert all(torch.equal(x, y) for x, y in zip(params_of(a).values(), params_of(b).values()))
    assert not any("l2/ce" in h for h in trainer.state.log_history)


def test_a_bad_value_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="`l2_token_weighting`='DFT' is not one of"):
        L2Config(output_dir=str(tmp_path), l2_token_weighting="DFT")


@pytest.mark.parametrize("setting, message", [
    (dict(label_smoothing_factor=0.1), "no room for `label_smoothing_factor`"),
    (dict(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss),
     "no room for `compute_loss_func`"),
])
def test_what_would_replace_the_weighted_loss_is_refused(tmp_path, setting, message):
    func = setting.pop("compute_loss_func", None)
    args = l2_args(tmp_path, l2_token_weighting="dft", **setting)
    with pytest.raises(ValueError, match=message):
        L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), compute_loss_func=func)


def test_a_model_without_token_logits_is_refused_before_its_first_step(tmp_path):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3,
                        pad_token_id=0)
    model = GPT2ForSequenceClassification(config)
    rows = [{"input_ids": torch.arange(1, 9), "labels": torch.tensor(i % 3)} for i in range(8)]
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_token_weighting="dft"), train_dataset=rows)
    before = params_of(model)
    with pytest.raises(ValueError, match=r"logits \(batch, positions, vocab\) matching its labels"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in params_of(model).items())
