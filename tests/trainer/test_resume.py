"""Resume and checkpoints in one place: a run resumed from a checkpoint ends where the uninterrupted run ends (θ₀,
F, the KL's reference, LoRA anchors, the coefficient schedule, the stock-Trainer callback, the model card), damaged
or conflicting checkpoint files are refused naming the file and what is wrong, and the recipes' reruns in a folder
holding checkpoints resume from the latest complete one (after a kill, a cut save or a full disk)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from helpers import (
    LAMBDA,
    QKV,
    RegressionData,
    TokenDataset,
    fisher_trainer,
    gpt2_args,
    gpt2_from_checkpoint,
    l2_args,
    lora_with_saved_module,
    max_rel_diff,
    params_of,
    penalized,
    perturb_lora,
    tiny_gpt2,
    trainable_of,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, PreTrainedModel, Trainer

import hf_l2.trainer
from hf_l2 import DecoupledL2SPCallback, L2Trainer
from hf_l2.saved_state import (
    ANCHOR_FILE,
    FISHER_FILE,
    KL_ANCHOR_FILES,
    RANK_ANCHOR_FILE,
    load_anchor,
    save_anchor,
    save_fisher,
)
from hf_l2.tools.recipe_common import RecipeInputError, load_recipe
from hf_l2.tools.saved_folders import missing_from_checkpoint

generation = load_recipe("gpt2_generation")


# ---- the Trainer: a resumed run ends where the uninterrupted run ends (from test_trainer.py) -------------------------
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


# ---- the coefficient schedule (from test_schedule.py) ----------------------------------------------------------------
def test_resume_continues_the_schedule(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_coef=2.0, l2_coef_schedule="linear",
                  l2_coef_end_factor=0.25)
    full = tiny_gpt2()
    trainer = L2Trainer(model=full, args=l2_args(tmp_path, **common), train_dataset=TokenDataset())
    trainer.train()
    full_logs = [h["l2/coef"] for h in trainer.state.log_history if "l2/coef" in h]
    assert full_logs == pytest.approx([2.0 * (1 - 0.75 * t / 6) for t in range(6)], rel=1e-12)

    resumed = gpt2_from_checkpoint(tmp_path / "checkpoint-3")
    trainer = L2Trainer(model=resumed, args=l2_args(tmp_path, **common), train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    resumed_logs = [h["l2/coef"] for h in trainer.state.log_history if "l2/coef" in h]
    assert resumed_logs == pytest.approx(full_logs, rel=1e-12)  # steps 1–3 come from trainer_state.json
    assert max_rel_diff(params_of(resumed), params_of(full)) < 1e-6


# ---- the Fisher: restored, not computed again (from test_fisher.py) --------------------------------------------------
def test_resume_restores_the_fisher_instead_of_recomputing_it(tmp_path, monkeypatch):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_coef=2.0, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2)
    full = tiny_gpt2()
    first = fisher_trainer(tmp_path / "full", full, **common)
    first.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(str(checkpoint / FISHER_FILE))
    for n, f in first.l2_terms.penalty.fisher.items():
        assert torch.equal(saved[n], f)

    def refuse(*args, **kwargs):
        raise AssertionError("resume must restore F from the checkpoint, not compute it again")

    monkeypatch.setattr(hf_l2.trainer, "trainer_fisher", refuse)
    # Built from the checkpoint's weights and with other training data: an F computed now would differ.
    resumed = gpt2_from_checkpoint(checkpoint)
    trainer = fisher_trainer(tmp_path / "full", resumed, TokenDataset(seed=5), **common)
    trainer.fisher_dataset = TokenDataset(seed=7)
    trainer.train_dataset = TokenDataset()
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for n, f in trainer.l2_terms.penalty.fisher.items():
        assert torch.equal(f, saved[n])
    assert trainer.l2_fisher_source == first.l2_fisher_source
    assert max_rel_diff(params_of(resumed), params_of(full)) < 1e-6


# ---- LoRA and modules_to_save anchors (from test_lora.py) ------------------------------------------------------------
def test_resume_restores_lora_and_saved_module_anchors(tmp_path):
    """Decoupled + cosine schedule + LoRA delta + modules_to_save: a resumed run ends where the full one does,
    even when the trainer is rebuilt from a model whose adapters already moved."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, l2_coef=3.0, l2_impl="decoupled",
                  l2_lora_delta=True, l2_coef_schedule="cosine", per_device_train_batch_size=4)
    full = lora_with_saved_module()
    L2Trainer(model=full, args=l2_args(tmp_path / "full", **common), train_dataset=TokenDataset()).train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / ANCHOR_FILE))
    assert any("lora_B" in n for n in saved) and any("modules_to_save" in n for n in saved)

    resumed = lora_with_saved_module()
    perturb_lora(resumed, seed=7)  # the natural mistake: a trainer built after the adapters moved
    trainer = L2Trainer(model=resumed, args=l2_args(tmp_path / "full", **common), train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert max_rel_diff(trainable_of(resumed), trainable_of(full)) < 1e-6

    os.remove(checkpoint / ANCHOR_FILE)  # without the file the moved adapters become θ₀, and the run ends elsewhere
    wrong = lora_with_saved_module()
    perturb_lora(wrong, seed=7)
    L2Trainer(model=wrong, args=l2_args(tmp_path / "full", **common),
              train_dataset=TokenDataset()).train(resume_from_checkpoint=str(checkpoint))
    assert max_rel_diff(trainable_of(wrong), trainable_of(full)) > 1e-3


# ---- the output anchor's reference (from test_output_anchor.py) ------------------------------------------------------
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


# ---- DecoupledL2SPCallback on the stock Trainer (from test_decoupled.py) ---------------------------------------------
def test_callback_resume_needs_the_pretrained_anchor(tmp_path, caplog):
    common = dict(l2_mode="none", max_steps=6, save_strategy="steps", save_steps=3)
    full = tiny_gpt2()
    Trainer(model=full, args=l2_args(tmp_path, **common), train_dataset=TokenDataset(),
            callbacks=[DecoupledL2SPCallback(full, coef=5.0)]).train()
    checkpoint = tmp_path / "checkpoint-3"
    # Built from the checkpoint's weights, with the pretrained weights as reference: the uninterrupted result.
    resumed = gpt2_from_checkpoint(checkpoint)
    callback = DecoupledL2SPCallback(resumed, coef=5.0, reference=tiny_gpt2())
    Trainer(model=resumed, args=l2_args(tmp_path, **common), train_dataset=TokenDataset(),
            callbacks=[callback]).train(resume_from_checkpoint=str(checkpoint))
    assert max_rel_diff(params_of(resumed), params_of(full)) < 1e-6

    # Without a reference its θ₀ is the checkpoint: that is almost surely a mistake, and it says so.
    wrong = gpt2_from_checkpoint(checkpoint)
    with caplog.at_level(logging.WARNING):
        Trainer(model=wrong, args=l2_args(tmp_path, **{**common, "max_steps": 4}), train_dataset=TokenDataset(),
                callbacks=[DecoupledL2SPCallback(wrong, coef=5.0)]).train(resume_from_checkpoint=str(checkpoint))
    assert "θ₀ equals the resumed weights" in caplog.text


# ---- the card of a resumed run (from test_workflows.py) --------------------------------------------------------------
def test_the_card_of_a_resumed_run_names_the_pretrained_model_not_the_checkpoint(tmp_path):
    pretrained = tmp_path / "pretrained"
    tiny_gpt2().save_pretrained(pretrained)
    from transformers import GPT2LMHeadModel

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, l2_coef=1.0)
    L2Trainer(model=GPT2LMHeadModel.from_pretrained(pretrained), args=l2_args(tmp_path / "run", **common),
              train_dataset=TokenDataset()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = L2Trainer(model=GPT2LMHeadModel.from_pretrained(checkpoint), args=l2_args(tmp_path / "run", **common),
                        train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.create_model_card()
    text = (tmp_path / "run" / "README.md").read_text()
    assert f"the weights of `{pretrained}` when fine-tuning started" in text
    assert "checkpoint-2" not in text


# ---- damaged checkpoint files (from test_training_safety.py, issue 14) -----------------------------------------------
COMMON = dict(max_steps=4, save_strategy="steps", save_steps=2, l2_coef=1.0)


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


# item 1: a damaged anchor file is refused, naming the file, the tensor and what is wrong
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


# item 3: another anchor on resume
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


# ---- a checkpoint's F and the KL's θ₀ file are checked like θ₀ (from test_fisher.py, test_output_anchor.py) ----------
def test_a_negative_fisher_in_a_checkpoint_is_refused_on_resume(tmp_path):
    """A checkpoint's F with valid checksums but negative values (written so, not damaged in transit)."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, l2_coef=1.0)
    fisher_trainer(tmp_path, **common).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = load_file(str(checkpoint / FISHER_FILE))
    saved[QKV] = -saved[QKV]
    save_fisher(saved, {}, str(checkpoint), {"data": "the training set", "examples": 16})
    trainer = fisher_trainer(tmp_path, gpt2_from_checkpoint(checkpoint), **common)
    expected = int((saved[QKV] < 0).sum())
    with pytest.raises(ValueError, match=rf"{FISHER_FILE} is damaged .*{QKV}: {expected} negative value\(s\) of 768"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


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


# ---- the recipes' reruns in a folder holding checkpoints (from test_hostile_input.py) --------------------------------
SAVING = ["--save_strategy", "steps", "--save_steps", "2", "--l2_mode", "l2_sp", "--l2_coef", "0.1",
          "--num_samples", "0", "--do_eval", "false"]


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def count_steps(monkeypatch):
    """How many optimizer steps (GA 1: training_step calls) the recipe runs in this process."""
    calls = []
    original = generation.L2Trainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(generation.L2Trainer, "training_step", counted)
    return calls


@pytest.fixture(scope="module")
def crashed_run(workdir, tmp_path_factory):
    """A run "killed" after step 4 of 6: checkpoint-2 and checkpoint-4 saved, the final save never reached."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    generation.main(gpt2_args(workdir, out, *SAVING))
    for name in os.listdir(out):
        if not name.startswith("checkpoint-"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    return out


def copy_of(crashed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(crashed_run, out)
    return out


# 6. a rerun in a folder holding checkpoints
@pytest.mark.parametrize("resume", [[], ["--resume_from_checkpoint", "true"]])
def test_a_rerun_resumes_from_the_latest_checkpoint(workdir, crashed_run, tmp_path, capsys, count_steps, resume):
    out = copy_of(crashed_run, tmp_path)
    argv = gpt2_args(workdir, out, *SAVING, *resume)
    argv[argv.index("--max_steps") + 1] = "6"
    generation.main(argv)
    assert f"Resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert count_steps == [4, 5]  # only the two steps the crashed run had not done
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_overwrite_output_dir_deletes_the_old_checkpoints_and_starts_afresh(workdir, crashed_run, tmp_path, capsys,
                                                                            count_steps):
    out = copy_of(crashed_run, tmp_path)
    stale = out / "checkpoint-4" / "optimizer.pt"
    generation.main(gpt2_args(workdir, out, *SAVING, "--max_steps", "2", "--overwrite_output_dir", "true"))
    assert "deleted 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert count_steps == [0, 1]
    assert not stale.exists() and sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]


def test_resume_true_without_checkpoints_is_refused(workdir, tmp_path):
    with pytest.raises(RecipeInputError, match=r"--resume_from_checkpoint true`: .* holds no checkpoint-N folder"):
        generation.main(gpt2_args(workdir, tmp_path / "fresh", "--resume_from_checkpoint", "true"))


def test_resume_false_in_a_folder_with_checkpoints_is_refused(workdir, crashed_run, tmp_path):
    out = copy_of(crashed_run, tmp_path)
    with pytest.raises(RecipeInputError, match=r"--resume_from_checkpoint false`, but .* holds checkpoints of an "
                                               r"earlier run: pass `--overwrite_output_dir true`"):
        generation.main(gpt2_args(workdir, out, "--resume_from_checkpoint", "false"))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]


# 7. checkpoints cut short by a kill
def test_latest_checkpoint_selection_skips_an_incomplete_one(workdir, crashed_run, tmp_path, capsys, count_steps):
    out = copy_of(crashed_run, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # the Trainer writes it last
    argv = gpt2_args(workdir, out, *SAVING, "--max_steps", "6")
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}: it lacks trainer_state.json (missing)" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said
    assert count_steps == [2, 3, 4, 5]


def test_an_explicit_incomplete_checkpoint_gets_one_line_listing_what_is_missing(workdir, crashed_run, tmp_path):
    out = copy_of(crashed_run, tmp_path)
    checkpoint = out / "checkpoint-4"
    (checkpoint / "optimizer.pt").unlink()
    truncate(checkpoint / ANCHOR_FILE)
    argv = gpt2_args(workdir, out, *SAVING, "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(RecipeInputError) as caught:
        generation.main(argv)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"`--resume_from_checkpoint {checkpoint}` is incomplete")
    assert "optimizer.pt (missing)" in message and f"{ANCHOR_FILE} (unreadable, truncated" in message
    assert "scheduler.pt" not in message and "trainer_state.json" not in message


def test_what_a_complete_checkpoint_holds_depends_on_the_save_settings(crashed_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True) == []
    # With the output anchor (`l2_kl_coef`), also the KL's θ₀ file (the run had none).
    assert missing_from_checkpoint(str(checkpoint), l2_kl=True) == [f"{KL_ANCHOR_FILES[0]} (missing)"]
    save_anchor({"w": torch.zeros(2)}, {}, str(checkpoint), files=KL_ANCHOR_FILES)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, l2_kl=True) == []
    truncate(checkpoint / KL_ANCHOR_FILES[0])
    assert missing_from_checkpoint(str(checkpoint), l2_kl=True)[0].startswith(f"{KL_ANCHOR_FILES[0]} (unreadable")
    truncate(checkpoint / "trainer_state.json")
    assert missing_from_checkpoint(str(checkpoint))[0].startswith("trainer_state.json (unreadable JSON")
    (checkpoint / ANCHOR_FILE).unlink()
    (checkpoint / "scheduler.pt").unlink()
    (checkpoint / "trainer_state.json").write_text("{}")
    assert missing_from_checkpoint(str(checkpoint), l2_sp=False) == ["scheduler.pt (missing)"]
    assert missing_from_checkpoint(str(checkpoint), save_only_model=True, l2_sp=True) == []  # weights + state only
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True) == ["scheduler.pt (missing)",
                                                                     f"{ANCHOR_FILE} (missing)"]
    truncate(checkpoint / "model.safetensors", 0.9)
    assert missing_from_checkpoint(str(checkpoint), save_only_model=True)[0].startswith(
        "model.safetensors (unreadable, truncated")
    # A sharded run saves θ₀ as one file per rank: one of two is not enough.
    save_anchor({"w": torch.zeros(2)}, {}, str(checkpoint), rank=0, world=2)
    assert missing_from_checkpoint(str(checkpoint), save_only_model=False, l2_sp=True)[-1] == (
        f"{RANK_ANCHOR_FILE.format(rank=1, world=2)} (missing)")


def test_an_l2_sp_fisher_checkpoint_is_complete_only_with_its_fisher(crashed_run, tmp_path):
    from hf_l2.saved_state import FISHER_FILE, RANK_FISHER_FILE

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == [f"{FISHER_FILE} (missing)"]
    save_anchor({"w": torch.ones(2)}, {}, str(checkpoint), files=(FISHER_FILE, RANK_FISHER_FILE))
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == []
    (checkpoint / FISHER_FILE).unlink()
    save_anchor({"w": torch.ones(2)}, {}, str(checkpoint), rank=1, world=2, files=(FISHER_FILE, RANK_FISHER_FILE))
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == [
        f"{RANK_FISHER_FILE.format(rank=0, world=2)} (missing)"]


def test_an_l2_sp_fisher_rerun_skips_a_checkpoint_without_its_fisher(workdir, crashed_run, tmp_path, capsys):
    """Resuming from a checkpoint without F would compute F again at the checkpoint's weights, not at θ₀."""
    from safetensors.torch import load_file

    from hf_l2.saved_state import FISHER_FILES

    out = copy_of(crashed_run, tmp_path)
    anchor = load_file(str(out / "checkpoint-2" / ANCHOR_FILE))
    save_anchor({n: torch.ones_like(t) for n, t in anchor.items()}, {}, str(out / "checkpoint-2"), files=FISHER_FILES)
    argv = gpt2_args(workdir, out, *SAVING, "--l2_mode", "l2_sp_fisher")
    argv[argv.index("--max_steps") + 1] = "6"
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}: it lacks {FISHER_FILES[0]} (missing)" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said


# 11. damaged θ₀ files, messages that say what to do
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_anchor_file_is_named(crashed_run, tmp_path, damage):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    truncate(checkpoint / ANCHOR_FILE, 0.5 if damage == "truncated" else 0.0)
    with pytest.raises(ValueError, match=f"{checkpoint / ANCHOR_FILE} cannot be read .*truncated or corrupted"):
        load_anchor(str(checkpoint))


def test_resuming_with_a_changed_penalized_set_names_the_settings(tmp_path):
    args = l2_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2, l2_coef=1.0)
    L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset()).train()
    # The checkpoint's θ₀ covers the weights only; biases and LayerNorms are now penalized too.
    wider = l2_args(tmp_path, max_steps=4, l2_coef=1.0, l2_exclude_bias_and_norm=False)
    trainer = L2Trainer(model=tiny_gpt2(), args=wider, train_dataset=TokenDataset())
    with pytest.raises(ValueError) as caught:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    message = str(caught.value)
    assert "the penalized set differs from the checkpoint's (`l2_exclude`, `l2_exclude_bias_and_norm`" in message
    assert "was the model changed" not in message and "Resume with the settings of that run" in message


# 12. a full disk during a save (issue 24)
# What safetensors raises when a write fails with ENOSPC (its Rust io::Error, wrapped).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(workdir, tmp_path, capsys, count_steps,
                                                                     monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from hf_l2.tools.recipe_common import run

    real, full = transformers.modeling_utils.safe_save_file, [True]

    def writer(tensors, filename, metadata=None):  # the disk fills while checkpoint-4's weights are written
        if full[0] and f"{os.sep}checkpoint-4{os.sep}" in filename:
            with open(filename, "wb") as f:
                f.write(bytes(100))  # what reached the disk before it was full
            raise SafetensorError(DISK_FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", writer)
    out = tmp_path / "run"
    argv = gpt2_args(workdir, out, *SAVING, "--max_steps", "6")
    with pytest.raises(SystemExit) as exit_:
        run(lambda: generation.main(argv))
    said = str(exit_.value.code)
    assert "\n" not in said
    assert said.startswith(f"error: [Errno 28] The disk is full: saving {out / 'checkpoint-4'} stopped at "
                           f"{out / 'checkpoint-4' / 'model.safetensors'} ({DISK_FULL}); this checkpoint is "
                           "incomplete and a rerun skips it")
    assert not (out / "_hf_l2.lock").exists()  # the failed run let go of the folder
    # Space freed: the rerun skips the cut checkpoint and resumes from checkpoint-2.
    full[0] = False
    del count_steps[:]
    capsys.readouterr()
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said
    assert count_steps == [2, 3, 4, 5]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
