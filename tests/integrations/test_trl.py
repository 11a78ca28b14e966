"""`hf_l2.integrations.trl`: TRL's SFT and DPO trainers with the penalty, checked against hand-written training loops.

The reference loops see the very micro-batches the trainer trained on (recorded at its collator), compute the task
loss from the plain model's logits as TRL defines it, Ω by a loop over named parameters, then clip and take an SGD
step. SGD, not Adam: Adam's first step ≈ lr·sign(g) turns last-bit differences of near-zero gradients into lr-sized
ones. α is large enough that an Ω counted twice or halved moves the parameters by > 1e-4 (relative), 100× the
tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from helpers import max_rel_diff, params_of, tiny_gpt2  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, TrlParser  # noqa: E402

from hf_l2 import L2Config  # noqa: E402
from hf_l2.integrations.trl import L2DPOConfig, L2DPOTrainer, L2SFTConfig, L2SFTTrainer, L2TRLMixin  # noqa: E402
from hf_l2.saved_state import ANCHOR_FILE  # noqa: E402
from hf_l2.tools.local_tokenizers import train_chat_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ("hello how are you", "i am fine thank you"),
    ("where is the cat", "the cat sat on the mat"),
    ("what did the dog do", "a dog ran in the park"),
    ("is it raining", "no the sun is out"),
]
MAX_LENGTH = 32  # tiny_gpt2's context
ALPHA, CLIP, LR, STEPS = 5.0, 0.3, 0.1, 3
LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"<|user|> {q}<|endoftext|><|assistant|> {a}<|endoftext|>" for q, a in PAIRS] * 20
    return train_chat_tokenizer(texts, vocab_size=400, model_max_length=MAX_LENGTH)  # whole words: 3-7 per text


def model_for(tokenizer, seed: int = 0):
    return tiny_gpt2(seed, vocab_size=len(tokenizer))


def conversations(kind: str) -> Dataset:
    if kind == "messages":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    elif kind == "prompt_completion":
        rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                for q, a in PAIRS]
    else:  # 8 short texts, which packing (to 16 tokens) puts into 4 rows
        rows = [{"text": text} for pair in PAIRS for text in pair]
    return Dataset.from_list(rows)


def preferences() -> Dataset:
    rows = [
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
         "rejected": [{"role": "assistant", "content": PAIRS[(i + 1) % len(PAIRS)][1]}]}
        for i, (q, a) in enumerate(PAIRS)
    ]
    return Dataset.from_list(rows)


def config(cls, tmp_path, **overrides):
    """Test settings that make runs comparable; everything else is the config class's own default."""
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=CLIP,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
        gradient_checkpointing=False,  # not under test here; it doubles the time
        max_length=MAX_LENGTH,
    )
    return cls(**{**defaults, **overrides})


class RecordingCollator:
    """The trainer's collator, keeping a copy of each micro-batch it builds (the trainer adds keys to its own)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch

    def windows(self) -> list[list[dict]]:
        """The micro-batches of each optimizer step (gradient accumulation 2)."""
        assert len(self.batches) == 2 * STEPS
        return [self.batches[i:i + 2] for i in range(0, len(self.batches), 2)]


def recorded(trainer):
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer


# ---- a hand-written reference ----------------------------------------------------------------------------------
def penalty_by_hand(model, anchor: dict[str, torch.Tensor], alpha: float, lora_delta: bool = False):
    """Ω: (α/2)·Σ‖θ − θ₀‖² over trainable weights that are neither biases nor LayerNorms, or with `lora_delta`
    (α/2)·Σ‖s·B·A − s·B₀·A₀‖² over LoRA layers."""
    omega = torch.zeros(())
    if lora_delta:
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a0, b0 = anchor[f"{name}.lora_A.default.weight"], anchor[f"{name}.lora_B.default.weight"]
                s = module.scaling["default"]
                omega = omega + 0.5 * alpha * (s * b @ a - s * b0 @ a0).pow(2).sum()
        return omega
    for name, p in model.named_parameters():
        if p.requires_grad and "bias" not in name and ".ln_" not in name:
            omega = omega + 0.5 * alpha * (p - anchor[name]).pow(2).sum()
    return omega


def clip_and_step(model, omega, optimizer, clip):
    omega.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    optimizer.step()
    optimizer.zero_grad()


def sft_reference(model, trainer, lora_delta=False, kl=None, dft=False) -> dict[str, torch.Tensor]:
    """SFT: Σ −log p(next token) over labelled positions / the window's token count (what SFTTrainer divides by:
    `num_items_in_batch`, counted by the Trainer over the window). With ``kl=(λ, τ)``, plus λ·τ²·Σ KL(q ‖ p) over
    the same positions / the same count, q from a frozen deep copy of the starting model. With ``dft``, each
    token's −log p times p, p detached (DFT)."""
    anchor = params_of(model)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for window in trainer.data_collator.windows():
        tokens = trainer._get_num_items_in_batch(window, "cpu")
        for batch in window:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            # Without a cache, a packed row's position_ids keep its documents apart (transformers' masking_utils).
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none")
            nll = (per_token * torch.exp(-per_token.detach()) if dft else per_token).sum()
            if kl is not None:
                coef, tau = kl
                with torch.no_grad():
                    q = torch.softmax(frozen(**inputs, use_cache=False).logits[:, :-1].double() / tau, -1)
                per_token = (q * (q.log() - torch.log_softmax(logits.double() / tau, -1))).sum(-1)
                nll = nll + coef * tau**2 * (per_token * (batch["labels"][:, 1:] != -100)).sum().float()
            (nll / tokens).backward()
        clip_and_step(model, penalty_by_hand(model, anchor, ALPHA, lora_delta), optimizer, trainer.args.max_grad_norm)
    return params_of(model)


def sequence_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def dpo_reference(model, ref_model, trainer, beta) -> dict[str, torch.Tensor]:
    """DPO's sigmoid loss, −log σ(β·((c − c_ref) − (r − r_ref))), averaged per micro-batch (chosen rows first, then
    rejected), divided by the 2 accumulation steps (DPOTrainer's loss is not scaled for them)."""
    anchor = params_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for window in trainer.data_collator.windows():
        for batch in window:
            chosen, rejected = sequence_logps(model, batch).chunk(2)
            with torch.no_grad():
                ref_chosen, ref_rejected = sequence_logps(ref_model, batch).chunk(2)
            margin = (chosen - ref_chosen) - (rejected - ref_rejected)
            (-F.logsigmoid(beta * margin).mean() / 2).backward()
        clip_and_step(model, penalty_by_hand(model, anchor, ALPHA), optimizer, trainer.args.max_grad_norm)
    return params_of(model)


def grad_norms(trainer) -> list[float]:
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


# ---- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [(L2SFTConfig, SFTConfig), (L2DPOConfig, DPOConfig)])
def test_configs_keep_every_trl_default(ours, theirs):
    def defaults(cls):
        return {f.name: (f.default, f.default_factory() if callable(f.default_factory) else None)
                for f in dataclasses.fields(cls)}

    mine, trl_defaults = defaults(ours), defaults(theirs)
    assert {k: mine[k] for k in trl_defaults} == trl_defaults
    assert set(mine) - set(trl_defaults) == {f.name for f in dataclasses.fields(L2Config) if f.name.startswith("l2_")}
    built = ours(output_dir="x", use_cpu=True)  # and the built objects agree, after each `__post_init__`
    stock = theirs(output_dir="x", use_cpu=True)
    assert {k: getattr(built, k) for k in trl_defaults} == {k: getattr(stock, k) for k in trl_defaults}
    assert built.learning_rate != L2Config(output_dir="x").learning_rate  # TRL's default really differs


def test_l2_flags_parse_through_hf_and_trl_parsers(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "--l2_coef", "0.3", "--l2_mode", "l2_sp", "--l2_lora_delta",
             "--l2_exclude", "wte", "lm_head", "--l2_impl", "loss", "--packing"]
    (hf,) = HfArgumentParser(L2SFTConfig).parse_args_into_dataclasses(flags)
    (trl_args,) = TrlParser(L2SFTConfig).parse_args_and_config(flags)
    yaml = tmp_path / "config.yaml"  # TRL's `--config` file sets l2_* fields too
    yaml.write_text("l2_coef: 0.05\nl2_head_coef: 0.2\nbeta: 0.3\n")
    (from_file,) = TrlParser(L2DPOConfig).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "--config", str(yaml)])
    for parsed in (hf, trl_args):
        assert (parsed.l2_coef, parsed.l2_mode, parsed.l2_lora_delta, parsed.l2_impl, parsed.packing) == (
            0.3, "l2_sp", True, "loss", True)
        assert parsed.l2_exclude == ["wte", "lm_head"]
        assert parsed.learning_rate == SFTConfig(output_dir="x", use_cpu=True).learning_rate
    assert (from_file.l2_coef, from_file.l2_head_coef, from_file.beta) == (0.05, 0.2, 0.3)
    with pytest.raises(SystemExit):  # a bad choice is refused by the parser
        TrlParser(L2SFTConfig).parse_args_and_config(["--output_dir", "x", "--use_cpu", "--l2_mode", "ridge"])


def test_a_config_composed_in_the_wrong_order_is_refused(tokenizer, tmp_path):
    @dataclasses.dataclass
    class Reversed(L2Config, SFTConfig):
        pass

    class Undecorated(SFTConfig, L2Config):
        pass

    assert Reversed(output_dir="x").learning_rate == 5e-5  # the silent trap: the stock Trainer's defaults
    for cls, words in ((Reversed, "list the TRL config first"), (Undecorated, "@dataclasses.dataclass")):
        args = cls(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        with pytest.raises(TypeError, match=words):
            L2SFTTrainer(model=model_for(tokenizer), args=args, train_dataset=conversations("messages"),
                         processing_class=tokenizer)
    with pytest.raises(TypeError, match="unexpected keyword argument 'l2_coef'"):
        Undecorated(output_dir="x", l2_coef=0.1)


# ---- exactness -------------------------------------------------------------------------------------------------
def run_sft(tokenizer, tmp_path, data, cls=L2SFTTrainer, config_cls=L2SFTConfig, peft=None, **overrides):
    model = model_for(tokenizer)
    trainer = recorded(cls(model=model, args=config(config_cls, tmp_path, **overrides), train_dataset=data,
                           processing_class=tokenizer, peft_config=LoraConfig(**LORA) if peft else None))
    start = params_of(trainer.model)
    trainer.train()
    return trainer, start


@pytest.mark.parametrize("kind", ["messages", "prompt_completion", "packed"])
def test_sft_grad_and_loss_match_a_hand_written_loop(tokenizer, tmp_path, kind):
    extra = dict(packing=True, max_length=16) if kind == "packed" else {}
    results = {}
    for impl in ("grad", "loss"):
        trainer, _ = run_sft(tokenizer, tmp_path, conversations(kind), l2_impl=impl, l2_coef=ALPHA, **extra)
        results[impl] = params_of(trainer.model)
        assert min(grad_norms(trainer)) > CLIP, "clipping must be active for this test to mean anything"
    batches = trainer.data_collator.batches
    if kind == "packed":
        assert all(int((b["position_ids"] == 0).sum()) > 2 for b in batches), "several documents share a row"
    if kind == "prompt_completion":
        assert (batches[0]["labels"][:, :3] == -100).all(), "the prompt is not trained on"
    expected = sft_reference(model_for(tokenizer), trainer)
    assert max_rel_diff(results["grad"], expected) < 1e-6
    assert max_rel_diff(results["loss"], expected) < 1e-6
    logged = trainer.state.log_history[0]
    assert {"l2/penalty", "l2/drift", "entropy", "mean_token_accuracy"} <= set(logged)  # ours and TRL's metrics


def test_sft_with_the_output_anchor_matches_a_hand_written_loop(tokenizer, tmp_path):
    """`l2_kl_coef` reaches TRL's fused-head SFT loss, counted over the completion tokens like the task loss."""
    trainer, _ = run_sft(tokenizer, tmp_path, conversations("prompt_completion"), l2_coef=ALPHA, l2_kl_coef=4.0,
                         l2_kl_temperature=2.0)
    assert (trainer.data_collator.batches[0]["labels"][:, :3] == -100).all(), "the prompt is not trained on"
    got = params_of(trainer.model)
    expected = sft_reference(model_for(tokenizer), trainer, kl=(4.0, 2.0))
    assert max_rel_diff(got, expected) < 1e-6
    assert max_rel_diff(got, sft_reference(model_for(tokenizer), trainer)) > 1e-4, "the KL moves the parameters"
    logged = [h for h in trainer.state.log_history if "l2/kl" in h]
    assert logged[0]["l2/kl"] == 0.0 and logged[-1]["l2/kl"] > 0 and "entropy" in logged[0]


def test_sft_asft_is_trls_dft_loss_plus_the_output_anchor(tokenizer, tmp_path):
    """`l2_token_weighting="dft"` is TRL's own `loss_type="dft"` (each sets the other); with `l2_kl_coef` it is
    ASFT, against the hand-written loop."""
    assert config(L2SFTConfig, tmp_path, l2_token_weighting="dft").loss_type == "dft"
    assert config(L2SFTConfig, tmp_path, loss_type="dft").l2_token_weighting == "dft"
    with pytest.raises(ValueError, match="`loss_type='chunked_nll'` is another loss"):
        config(L2SFTConfig, tmp_path, loss_type="chunked_nll", l2_token_weighting="dft")
    trainer, _ = run_sft(tokenizer, tmp_path, conversations("prompt_completion"), l2_coef=ALPHA, l2_kl_coef=4.0,
                         l2_kl_temperature=2.0, l2_token_weighting="dft")
    got = params_of(trainer.model)
    assert max_rel_diff(got, sft_reference(model_for(tokenizer), trainer, kl=(4.0, 2.0), dft=True)) < 1e-6
    assert max_rel_diff(got, sft_reference(model_for(tokenizer), trainer, kl=(4.0, 2.0))) > 1e-4, "DFT counts"


def test_other_trl_trainers_refuse_the_output_anchor_and_dft(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`l2_kl_coef` > 0 is not supported by L2DPOTrainer"):
        run_dpo(tokenizer, tmp_path, l2_kl_coef=1.0)
    with pytest.raises(ValueError, match="L2DPOTrainer's loss is not one"):
        run_dpo(tokenizer, tmp_path, l2_token_weighting="dft")


@pytest.mark.parametrize("lora_delta", [False, True])
def test_sft_with_peft_config_lora_matches_a_hand_written_loop(tokenizer, tmp_path, lora_delta):
    results = {}
    for impl in ("grad", "loss"):
        trainer, start = run_sft(tokenizer, tmp_path, conversations("messages"), peft=True, l2_impl=impl,
                                 l2_coef=ALPHA, l2_lora_delta=lora_delta, max_grad_norm=0.005)
        results[impl] = {n: p for n, p in params_of(trainer.model).items() if "lora_" in n}
        assert min(grad_norms(trainer)) > 0.005, "clipping is active"
    assert (trainer.l2_terms.lora is not None) == lora_delta
    reference = get_peft_model(model_for(tokenizer), LoraConfig(**LORA))
    missing, unexpected = reference.load_state_dict(start, strict=False)  # the trainer's LoRA initialization
    assert not unexpected and missing == ["base_model.model.lm_head.weight"]  # tied to the embedding
    expected = {n: p for n, p in sft_reference(reference, trainer, lora_delta).items() if "lora_" in n}
    assert expected and all(n in results["grad"] for n in expected)
    assert max_rel_diff(results["grad"], expected) < 1e-6
    assert max_rel_diff(results["loss"], expected) < 1e-6
    assert not torch.equal(expected["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"],
                           start["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"])


def run_dpo(tokenizer, tmp_path, cls=L2DPOTrainer, config_cls=L2DPOConfig, **overrides):
    model, ref_model = model_for(tokenizer), model_for(tokenizer)
    trainer = recorded(cls(model=model, ref_model=ref_model, args=config(config_cls, tmp_path, **overrides),
                           train_dataset=preferences(), processing_class=tokenizer))
    trainer.train()
    return trainer, model, ref_model


def test_dpo_penalizes_the_policy_only_and_matches_a_hand_written_loop(tokenizer, tmp_path):
    results = {}
    for impl in ("grad", "loss"):
        trainer, model, ref_model = run_dpo(tokenizer, tmp_path, l2_impl=impl, l2_coef=ALPHA, beta=0.5)
        results[impl] = params_of(model)
        assert min(grad_norms(trainer)) > CLIP
        untouched = params_of(model_for(tokenizer))
        assert all(torch.equal(p, untouched[n]) for n, p in params_of(ref_model).items())
    ref_names = {id(p) for p in ref_model.parameters()}
    penalized = trainer.l2_terms.penalty.parameters.values()
    assert not any(id(p) in ref_names for p in penalized), "the reference is not penalized"
    expected = dpo_reference(model_for(tokenizer), ref_model, trainer, beta=0.5)
    assert max_rel_diff(results["grad"], expected) < 1e-6
    assert max_rel_diff(results["loss"], expected) < 1e-6
    assert {"l2/penalty", "rewards/margins"} <= set(trainer.state.log_history[0])


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_mode_none_is_the_stock_trl_trainer_bit_for_bit(tokenizer, tmp_path, algorithm):
    common = dict(optim="adamw_torch", learning_rate=1e-2)
    if algorithm == "sft":
        ours, _ = run_sft(tokenizer, tmp_path, conversations("messages"), l2_mode="none", **common)
        stock, _ = run_sft(tokenizer, tmp_path, conversations("messages"), SFTTrainer, SFTConfig, **common)
    else:
        ours, _, _ = run_dpo(tokenizer, tmp_path, l2_mode="none", **common)
        stock, _, _ = run_dpo(tokenizer, tmp_path, DPOTrainer, DPOConfig, **common)
    mine, theirs = params_of(ours.model), params_of(stock.model)
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
    assert not any(k.startswith("l2/") for h in ours.state.log_history for k in h)
    start = params_of(model_for(tokenizer))
    assert not torch.equal(theirs["transformer.wte.weight"], start["transformer.wte.weight"]), "it trained"


# ---- resume and card -------------------------------------------------------------------------------------------
def test_resume_restores_the_anchor_and_the_card_keeps_trl_tags(tokenizer, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, l2_coef=1.0, optim="adamw_torch",
                  learning_rate=1e-2)
    whole, _ = run_sft(tokenizer, tmp_path / "whole", conversations("messages"), **common)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / ANCHOR_FILE).is_file()

    # Built from other weights: θ₀ taken at construction is wrong until the checkpoint's anchor replaces it.
    resumed = L2SFTTrainer(model=model_for(tokenizer, seed=1), args=config(L2SFTConfig, tmp_path / "resumed", **common),
                           train_dataset=conversations("messages"), processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    start = params_of(model_for(tokenizer))
    penalty = resumed.l2_terms.penalty
    assert all(torch.equal(penalty.anchors[n], start[n]) for n in penalty.anchored_names)
    assert max_rel_diff(params_of(resumed.model), params_of(whole.model)) < 1e-6

    # TRL writes the card at each checkpoint (through hf_l2's `create_model_card`); a user's call adds the dataset.
    assert "## Trained with TRL" in (tmp_path / "whole" / "README.md").read_text()
    whole.create_model_card(dataset_name="trl-lib/Capybara")
    card = ModelCard.load(tmp_path / "whole" / "README.md")
    assert {"trl", "sft", "hf_l2", "l2-sp", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.datasets == ["trl-lib/Capybara"]
    text = card.text
    assert "## Regularization" in text and "| α (`l2_coef`) | 1 |" in text
    assert f"'s SFT trainer (TRL {__import__('trl').__version__})" in text and text.count("## Trained with TRL") == 1
    assert "@software{vonwerra2020trl" in text and "@inproceedings{li2018explicit" in text


def test_dpo_card_cites_dpo(tokenizer, tmp_path):
    trainer, _, _ = run_dpo(tokenizer, tmp_path, max_steps=1, l2_coef=ALPHA)
    trainer.save_model()
    card = ModelCard.load(tmp_path / "README.md")
    assert {"trl", "dpo", "hf_l2"} <= set(card.data.tags)
    assert "Direct Preference Optimization" in card.text and "@inproceedings{rafailov2023direct" in card.text


def test_any_trl_trainer_composes_with_the_mixin(tokenizer, tmp_path):
    """The documented two-line recipe, on TRL's RewardTrainer (a sequence-classification model, its own loss)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    @dataclasses.dataclass
    class L2RewardConfig(RewardConfig, L2Config):
        pass

    class L2RewardTrainer(L2TRLMixin, RewardTrainer):
        pass

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=2,
                                                     n_head=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    args = config(L2RewardConfig, tmp_path, l2_coef=ALPHA, l2_head_params=["score"], max_steps=2)
    assert args.learning_rate == LR and L2RewardConfig(output_dir="x", use_cpu=True).logging_steps == RewardConfig(
        output_dir="x", use_cpu=True).logging_steps
    trainer = L2RewardTrainer(model=model, args=args, train_dataset=preferences(), processing_class=tokenizer)
    trainer.train()
    assert "score.weight" in trainer.l2_terms.penalty.new_names
    assert trainer.state.log_history[0]["l2/penalty"] > 0


def unpaired_preferences() -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
             "label": i % 2 == 0} for i, (q, a) in enumerate(PAIRS)]
    return Dataset.from_list(rows)


def reward_model(tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=2,
                                                    n_head=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))


@pytest.mark.parametrize("algorithm", ["SFT", "DPO", "Reward", "KTO"])
def test_trainers_built_without_args_take_the_trl_defaults_plus_the_l2_fields(tokenizer, tmp_path, monkeypatch,
                                                                               algorithm):
    """As TRL's own trainers do: `args=None` is the TRL config with its defaults (output folder `<model>-<name>`),
    here with the L2 fields; a trainer composed with `L2TRLMixin` gets a config class `(XConfig, L2Config)` made
    for it, which pickles (`training_args.bin`) and unpickles in a fresh process."""
    import trl

    monkeypatch.chdir(tmp_path)
    # TRL's configs default to bf16, which `TrainingArguments` refuses without a GPU unless `use_cpu` is set.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    stock_cls, trl_config = getattr(trl, f"{algorithm}Trainer"), getattr(trl, f"{algorithm}Config")
    ours_cls = {"SFT": L2SFTTrainer, "DPO": L2DPOTrainer}.get(algorithm) or type(
        f"L2{algorithm}Trainer", (L2TRLMixin, stock_cls), {})
    data = {"SFT": conversations("messages"), "DPO": preferences(), "Reward": preferences(),
            "KTO": unpaired_preferences()}[algorithm]
    (reward_model if algorithm == "Reward" else model_for)(tokenizer).save_pretrained(tmp_path / "tiny")
    model_class = type(reward_model(tokenizer) if algorithm == "Reward" else model_for(tokenizer))
    # DPO and KTO load their reference model from the model's folder.
    ours = ours_cls(model=model_class.from_pretrained(tmp_path / "tiny"), train_dataset=data,
                    processing_class=tokenizer).args
    # TRL's trainer given the config it builds without `args`, `<model name>-<trainer>` (TRL 1.0's KTO builds
    # none): the trainer edits some fields (e.g. KTO's `remove_unused_columns`), as it edits ours.
    stock = stock_cls(model=model_class.from_pretrained(tmp_path / "tiny"), args=trl_config(f"tiny-{algorithm}"),
                      train_dataset=data, processing_class=tokenizer).args
    # (TRL 1.0's `trl.KTOConfig` is a deprecation subclass of the `trl.experimental` config its trainer takes.)
    assert {c.__name__ for c in type(ours).__mro__} >= {f"{algorithm}Config", "L2Config"}
    assert type(ours).__name__ == f"L2{algorithm}Config"
    assert (ours.l2_mode, ours.l2_coef) == ("l2_sp", 0.01)
    trl_fields = [f.name for f in dataclasses.fields(trl_config)]
    assert {k: getattr(ours, k) for k in trl_fields} == {k: getattr(stock, k) for k in trl_fields}

    torch.save(ours, tmp_path / "training_args.bin")
    load = "import torch; print(type(torch.load('training_args.bin', weights_only=False)).__qualname__)"
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.stdout.strip() == f"L2{algorithm}Config", loaded.stderr[-2000:]


def test_trl_configs_convert_with_every_field_and_the_token(tokenizer, tmp_path):
    sft = SFTConfig(output_dir=str(tmp_path), use_cpu=True, hub_token="hf_secret", packing=True, max_length=24,
                    learning_rate=3e-4)
    converted = L2SFTConfig.from_training_args(sft, l2_coef=0.5)
    assert type(converted) is L2SFTConfig and converted.l2_coef == 0.5
    assert {f.name: getattr(converted, f.name) for f in dataclasses.fields(SFTConfig) if f.init} == {
        f.name: getattr(sft, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    said = r"`SFTConfig` has fields `L2Config` lacks.*from hf_l2.integrations.trl import L2SFTConfig"
    with pytest.raises(TypeError, match=said):
        L2Config.from_training_args(sft)
    with pytest.raises(TypeError, match=r"L2SFTConfig.from_training_args\(args, l2_coef="):
        L2SFTTrainer(model=model_for(tokenizer), args=sft, train_dataset=conversations("messages"),
                     processing_class=tokenizer)


def test_a_trainer_that_does_not_say_its_config_is_refused_without_args_naming_the_class_to_write(tokenizer):
    class Unannotated(SFTTrainer):
        def __init__(self, model, args=None, **kwargs):
            super().__init__(model, args, **kwargs)

    class L2Unannotated(L2TRLMixin, Unannotated):
        pass

    with pytest.raises(TypeError, match=r"`L2Unannotated` got no `args`.*class L2XConfig\(XConfig, L2Config\)"):
        L2Unannotated(model_for(tokenizer), train_dataset=conversations("messages"), processing_class=tokenizer)


def test_importing_hf_l2_does_not_need_trl(monkeypatch):
    for name in [n for n in sys.modules if n == "hf_l2" or n.startswith("hf_l2.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails as if TRL were not installed
    import hf_l2  # noqa: F401

    assert "hf_l2.integrations.trl" not in sys.modules
    with pytest.raises(ImportError, match=r"pip install 'hf_l2\[trl\]'"):
        import hf_l2.integrations.trl  # noqa: F401


def test_example_script_runs_offline(tmp_path, monkeypatch, capsys):
    argv = ["trl_sft.py", "--output_dir", str(tmp_path), "--max_steps", "2", "--logging_steps", "1",
            "--report_to", "none"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / "trl_sft.py"), run_name="__main__")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"trl", "sft", "l2-sp"} <= set(card.data.tags) and "## Regularization" in card.text
    assert "step 2: loss" in capsys.readouterr().out
