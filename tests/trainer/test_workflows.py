"""Trainer workflows beyond `train()` on a fixed model: each gets the penalty it asked for, or a clear error.

Every comparison is with an independent run: a standalone trainer with the same settings, the stock Trainer, or
the stock Trainer on a model whose own loss adds Ω written out by hand.
"""

import dataclasses
import logging

import pytest
import torch
from helpers import FinalParameters, TokenDataset, gpt2_from_checkpoint, l2_args, max_rel_diff, params_of, tiny_gpt2
from torch import nn
from transformers import Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_l2 import L2Config, L2Seq2SeqConfig, L2Seq2SeqTrainer, L2Trainer

TRIALS = [  # per trial: the checkpoint `model_init` starts from, and the searched fields besides `l2_coef`
    ("a", {"l2_mode": "l2_sp", "l2_coef_schedule": "constant"}),
    ("b", {"l2_mode": "l2_sp", "l2_coef_schedule": "linear"}),
    ("b", {"l2_mode": "none", "l2_coef_schedule": "constant"}),
]


def test_hyperparameter_search_trains_each_trial_with_its_own_penalty_and_anchor(tmp_path):
    pytest.importorskip("optuna")
    for name, seed in (("a", 0), ("b", 1)):  # two different "pretrained" models
        tiny_gpt2(seed).save_pretrained(tmp_path / name)

    def model_init(trial):
        start = "a" if trial is None else TRIALS[trial.number][0]
        return gpt2_from_checkpoint(tmp_path / start)

    def hp_space(trial):
        return {"l2_coef": trial.suggest_float("l2_coef", 0.1, 10.0, log=True), **TRIALS[trial.number][1]}

    common = dict(max_steps=3, eval_strategy="no", l2_coef=0.01)
    record = FinalParameters()
    trainer = L2Trainer(model_init=model_init, args=l2_args(tmp_path / "search", **common),
                        train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4, seed=1), callbacks=[record])
    trainer.hyperparameter_search(backend="optuna", hp_space=hp_space, n_trials=len(TRIALS), direction="minimize")
    study_params = record.runs
    assert len(study_params) == len(TRIALS)

    coefs = []
    for i, ((start, fields), searched) in enumerate(zip(TRIALS, study_params)):
        coef = trainer._trial.study.trials[i].params["l2_coef"]
        coefs.append(coef)
        alone = gpt2_from_checkpoint(tmp_path / start)
        L2Trainer(model=alone, args=l2_args(tmp_path / f"alone{i}", **{**common, "l2_coef": coef, **fields}),
                  train_dataset=TokenDataset()).train()
        expected = params_of(alone)
        assert all(torch.equal(searched[n], expected[n]) for n in expected), f"trial {i} ({fields}) differs"
    assert len(set(coefs)) == len(coefs)  # the trials did differ in α

    # The same trial pulled toward the other checkpoint ends elsewhere: the anchor matters here.
    wrong = gpt2_from_checkpoint(tmp_path / "b")
    trainer_wrong = L2Trainer(model=wrong, args=l2_args(tmp_path / "wrong", **{**common, "l2_coef": coefs[1],
                              **TRIALS[1][1], "l2_anchor_path": str(tmp_path / "a")}), train_dataset=TokenDataset())
    trainer_wrong.train()
    assert max_rel_diff(params_of(wrong), study_params[1]) > 1e-4


def test_a_dict_trial_as_ray_tune_passes_it_rebuilds_the_penalty(tmp_path, monkeypatch):
    """Ray Tune hands `train` a dict; ray is not installed here, so its backend's `_hp_search_setup` branch is
    driven directly, with a stand-in for the one `ray.tune` call the Trainer makes (the trial's id)."""
    import sys
    import types

    from transformers.integrations import integration_utils
    from transformers.trainer_utils import HPSearchBackend

    tune = types.SimpleNamespace(get_context=lambda: types.SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(tune=tune))
    monkeypatch.setitem(sys.modules, "ray.tune", tune)
    monkeypatch.setattr(integration_utils, "is_ray_tune_available", lambda: True)

    common = dict(max_steps=3, l2_coef=0.01)
    trainer = L2Trainer(model_init=lambda: tiny_gpt2(), args=l2_args(tmp_path / "ray", **common),
                        train_dataset=TokenDataset())
    trainer.hp_search_backend = HPSearchBackend.RAY
    trainer.train(trial={"l2_coef": 3.0, "l2_coef_schedule": "cosine"})
    alone = tiny_gpt2()
    L2Trainer(model=alone, args=l2_args(tmp_path / "alone", max_steps=3, l2_coef=3.0, l2_coef_schedule="cosine"),
              train_dataset=TokenDataset()).train()
    assert all(torch.equal(p, alone.get_parameter(n)) for n, p in trainer.model.named_parameters())


def test_a_searched_bad_value_is_refused_naming_the_field(tmp_path):
    pytest.importorskip("optuna")
    trainer = L2Trainer(model_init=lambda: tiny_gpt2(), args=l2_args(tmp_path, max_steps=1),
                        train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4))
    with pytest.raises(ValueError, match="l2_impl"):
        trainer.hyperparameter_search(backend="optuna", n_trials=1,
                                      hp_space=lambda t: {"l2_impl": t.suggest_categorical("l2_impl", ["fast"])})


# ---- optimizers that step inside backward ---------------------------------------------------------------------
class MLP(nn.Module):
    """Two `nn.Linear` layers (GaLore only projects linear weights) and a squared loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x, y):
        return {"loss": 0.5 * (self.fc2(torch.tanh(self.fc1(x))).squeeze(-1) - y).pow(2).mean()}


class MLPWithOmega(MLP):
    """MLP whose loss adds Ω = (α/2)·Σ‖W − W₀‖² over both weight matrices, written out: the reference."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha
        self.start = {n: p.detach().clone() for n, p in self.named_parameters() if n.endswith("weight")}

    def forward(self, x, y):
        omega = sum((self.get_parameter(n) - w0).pow(2).sum() for n, w0 in self.start.items())
        return {"loss": super().forward(x, y)["loss"] + 0.5 * self.alpha * omega}


class Points(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


IN_BACKWARD = [name.value for name in OptimizerNames if name.value.endswith("layerwise")] + ["lomo", "adalomo"]
# Those that run here (galore-torch, lomo-optim installed): `galore_adafactor_layerwise` fails in the stock Trainer
# itself (it passes `lr` with Adafactor's `relative_step=True`), the 8-bit one needs bitsandbytes, APOLLO apollo-torch.
RUNNABLE = {
    "galore_adamw_layerwise": dict(optim_target_modules=["fc1", "fc2"], optim_args="rank=2, update_proj_gap=2"),
    "lomo": {},
    "adalomo": {},
}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="AdaLomo allocates its state on CUDA")


@pytest.mark.parametrize("optim", IN_BACKWARD)
@pytest.mark.parametrize("impl", ["grad", "decoupled"])
def test_in_backward_optimizers_refuse_the_impls_that_cannot_reach_them(tmp_path, optim, impl):
    with pytest.raises(ValueError, match=rf"l2_impl='{impl}'.*{optim}.*l2_impl='loss'"):
        L2Trainer(model=MLP(), args=l2_args(tmp_path, optim=optim, l2_impl=impl), train_dataset=Points())


@pytest.mark.parametrize("optim", [pytest.param(o, marks=NEEDS_CUDA) if o == "adalomo" else o for o in RUNNABLE])
def test_in_backward_optimizers_get_the_exact_penalty_through_the_loss(tmp_path, optim):
    pytest.importorskip("galore_torch" if "galore" in optim else "lomo_optim")
    alpha = 2.0
    common = dict(optim=optim, max_steps=4, max_grad_norm=0.0, learning_rate=0.05, **RUNNABLE[optim])
    mine = MLP()
    L2Trainer(model=mine, args=l2_args(tmp_path, l2_coef=alpha, l2_impl="loss", **common),
              train_dataset=Points()).train()
    reference = MLPWithOmega(alpha)
    Trainer(model=reference, args=l2_args(tmp_path, **common), train_dataset=Points()).train()
    free = MLP()
    Trainer(model=free, args=l2_args(tmp_path, **common), train_dataset=Points()).train()
    assert max_rel_diff(params_of(mine), params_of(reference)) < 1e-5
    assert max_rel_diff(params_of(free), params_of(reference)) > 1e-3  # the penalty mattered


def test_an_in_backward_optimizer_passed_by_hand_is_refused(tmp_path):
    pytest.importorskip("lomo_optim")
    from lomo_optim import Lomo

    model = MLP()
    with pytest.raises(ValueError, match="the optimizer `Lomo`"):
        L2Trainer(model=model, args=l2_args(tmp_path), train_dataset=Points(), optimizers=(Lomo(model), None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs` \\(Lomo\\)"):
        L2Trainer(model=model, args=l2_args(tmp_path, l2_impl="decoupled"), train_dataset=Points(),
                  optimizer_cls_and_kwargs=(Lomo, {"model": model}))


def test_the_decoupled_callback_refuses_an_in_backward_optimizer_before_any_update(tmp_path):
    pytest.importorskip("lomo_optim")
    from hf_l2 import DecoupledL2SPCallback

    model = MLP()
    before = params_of(model)
    trainer = Trainer(model=model, args=l2_args(tmp_path, optim="lomo"), train_dataset=Points(),
                      callbacks=[DecoupledL2SPCallback(model, coef=1.0)])
    with pytest.raises(ValueError, match="DecoupledL2SPCallback cannot pull the weights with the optimizer `Lomo`"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- parameters with no gradient -------------------------------------------------------------------------------
class WithUnused(MLP):
    """MLP plus a weight that its loss never uses (an MoE expert that got no token)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(6, 3)


@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_a_zero_coefficient_leaves_a_parameter_without_gradient_alone_as_the_stock_trainer(tmp_path, impl):
    common = dict(weight_decay=0.1, max_steps=5, l2_head_params=["^fc2"], l2_coef_schedule="linear")
    stock = WithUnused()
    Trainer(model=stock, args=l2_args(tmp_path, **common), train_dataset=Points()).train()
    for coefs in ({"l2_coef": 0.0, "l2_head_coef": 0.0}, {"l2_coef": 0.0, "l2_head_coef": 0.5}):
        mine = WithUnused()
        L2Trainer(model=mine, args=l2_args(tmp_path, l2_impl=impl, **common, **coefs), train_dataset=Points()).train()
        assert torch.equal(mine.unused.weight, stock.unused.weight)  # AdamW skipped it: `.grad` stayed None
        if not coefs["l2_head_coef"]:
            assert all(torch.equal(p, stock.get_parameter(n)) for n, p in mine.named_parameters())


def test_a_nonzero_coefficient_gives_a_parameter_without_task_gradient_the_penalty_gradient(tmp_path):
    """As autograd gives it for task + Ω: compare with the unused weight inside a hand-written Ω (plain SGD, so
    the step is exactly −lr·α·W for that weight under `l2_mode="l2"`)."""
    alpha, lr = 0.5, 0.1
    common = dict(optim="sgd", learning_rate=lr, max_grad_norm=0.0, max_steps=3)
    start = WithUnused().unused.weight.detach().clone()
    for impl in ("grad", "loss"):
        mine = WithUnused()
        L2Trainer(model=mine, args=l2_args(tmp_path, l2_mode="l2", l2_coef=alpha, l2_impl=impl, **common),
                  train_dataset=Points()).train()
        torch.testing.assert_close(mine.unused.weight.detach(), start * (1 - lr * alpha) ** 3, rtol=1e-6, atol=0)


# ---- l2_mode="none" is the stock Trainer, files included -------------------------------------------------------
def test_mode_none_saves_what_the_stock_trainer_saves(tmp_path):
    outputs = {}
    for name, cls, extra in (("stock", Trainer, {}), ("mine", L2Trainer, {"l2_mode": "none"})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "README.md").write_text("my own notes\n")
        trainer = cls(model=tiny_gpt2(), args=l2_args(folder, max_steps=2, save_strategy="steps", save_steps=2,
                                                       **extra), train_dataset=TokenDataset())
        trainer.train()
        trainer.save_model()
        outputs[name] = ({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()},
                         (folder / "README.md").read_text())
    stock_files, stock_readme = outputs["stock"]
    assert outputs["mine"] == (stock_files, stock_readme) and stock_readme == "my own notes\n"

    trainer.create_model_card()  # asked for: now hf_l2's card, saying no penalty was added
    assert "No penalty was added" in (tmp_path / "mine" / "README.md").read_text()


# ---- stock TrainingArguments -----------------------------------------------------------------------------------
def test_stock_training_arguments_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for positional in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", hub_token="hf_x")
        with pytest.raises(TypeError, match=r"L2Config.from_training_args\(args, l2_coef="):
            L2Trainer(tiny_gpt2(), args) if positional else L2Trainer(model=tiny_gpt2(), args=args)
    with pytest.raises(TypeError, match=r"L2Seq2SeqConfig.from_training_args\(args, l2_coef="):
        L2Seq2SeqTrainer(tiny_gpt2(), Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True))
    assert list(tmp_path.iterdir()) == []
    # The one-line fix from the message works, and keeps the token.
    fixed = L2Config.from_training_args(args, l2_coef=0.5)
    trainer = L2Trainer(tiny_gpt2(), fixed)
    assert trainer.args.l2_coef == 0.5 and trainer.args.hub_token == "hf_x"
    assert isinstance(L2Trainer(tiny_gpt2()).args, L2Config)  # no `args`: the stock default, with the L2 fields


def init_fields(config) -> dict:
    """Every field a config was built from, read directly (`to_dict()` masks the tokens)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def test_from_training_args_keeps_every_field_the_token_included(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), hub_token="hf_secret", learning_rate=3e-4, lr_scheduler_type="cosine",
        eval_strategy="steps", eval_steps=7, report_to=["tensorboard"], gradient_accumulation_steps=3,
        lr_scheduler_kwargs={"num_cycles": 2}, push_to_hub=True, hub_model_id="me/model", use_cpu=True, seed=11,
    )
    config = L2Config.from_training_args(args, l2_coef=0.5, l2_mode="l2")
    assert type(config) is L2Config and (config.l2_coef, config.l2_mode) == (0.5, "l2")
    assert init_fields(config) == {**init_fields(L2Config(output_dir="x")), **init_fields(args),
                                   "l2_coef": 0.5, "l2_mode": "l2"}
    assert config.hub_token == "hf_secret"

    seq2seq = Seq2SeqTrainingArguments(output_dir=str(tmp_path), hub_token="hf_secret", predict_with_generate=True,
                                       generation_num_beams=3, use_cpu=True)
    converted = L2Config.from_training_args(seq2seq, l2_coef=0.5)
    assert type(converted) is L2Seq2SeqConfig
    assert (converted.predict_with_generate, converted.generation_num_beams, converted.hub_token) == (
        True, 3, "hf_secret")


def test_from_training_args_refuses_a_config_with_fields_the_class_lacks_naming_them(tmp_path):
    @dataclasses.dataclass
    class MyArgs(TrainingArguments):
        my_field: int = 3

    with pytest.raises(TypeError, match=r"`MyArgs` has fields `L2Config` lacks, e\.g\. \['my_field'\].*"
                                        r"class L2MyArgs\(MyArgs, L2Config\)"):
        L2Config.from_training_args(MyArgs(output_dir=str(tmp_path)), l2_coef=0.5)


# ---- set-ups that penalize nothing -----------------------------------------------------------------------------
def test_a_penalty_that_is_zero_everywhere_warns_naming_the_fields(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, l2_head_params=[".*"], l2_head_coef=0.0))
    assert "`l2_coef`=0.01 on 0 anchored and `l2_head_coef`=0.0 on" in caplog.text
    assert "raise `l2_coef`/`l2_head_coef`" in caplog.text


# ---- the rest of the Trainer's paths (docs/supported.md) -------------------------------------------------------
class LabelledPoints(Points):
    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Predictor(MLP):
    """MLP that returns predictions only: the loss comes from `compute_loss_func`."""

    def forward(self, x, labels=None):
        return {"logits": self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)}


def squared_error(outputs, labels, num_items_in_batch=None):
    return 0.5 * (outputs["logits"] - labels).pow(2).sum() / num_items_in_batch


def omega_by_hand(model, start, alpha):
    return 0.5 * alpha * sum((model.get_parameter(n) - w0).pow(2).sum() for n, w0 in start.items())


def weights_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


def test_compute_loss_func_gets_omega_once_per_step(tmp_path):
    """The Trainer treats a `compute_loss_func` loss as already scaled for accumulation: Ω must not count GA
    times. The reference adds Ω/GA to each micro-batch's loss by hand (θ is fixed within the window)."""
    alpha, ga = 2.0, 2
    common = dict(gradient_accumulation_steps=ga, per_device_train_batch_size=4, max_steps=3, max_grad_norm=0.5)
    reference = Predictor()
    start = weights_of(reference)
    hand = lambda out, labels, num_items_in_batch: (  # noqa: E731
        squared_error(out, labels, num_items_in_batch) + omega_by_hand(reference, start, alpha) / ga)
    Trainer(model=reference, args=l2_args(tmp_path, **common), train_dataset=LabelledPoints(),
            compute_loss_func=hand).train()
    for impl in ("grad", "loss"):
        mine = Predictor()
        L2Trainer(model=mine, args=l2_args(tmp_path, l2_coef=alpha, l2_impl=impl, **common),
                  train_dataset=LabelledPoints(), compute_loss_func=squared_error).train()
        assert max_rel_diff(params_of(mine), params_of(reference)) < 1e-6, impl
    free = Predictor()
    Trainer(model=free, args=l2_args(tmp_path, **common), train_dataset=LabelledPoints(),
            compute_loss_func=squared_error).train()
    assert max_rel_diff(params_of(free), params_of(reference)) > 1e-3


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_optimizers_given_by_hand(tmp_path, how):
    """The same torch optimizer, given by hand, on the stock Trainer with Ω in the model's loss."""
    alpha = 2.0
    common = dict(max_steps=4, max_grad_norm=0.0)

    def given(model):
        if how == "optimizers":
            return {"optimizers": (torch.optim.Adam(model.parameters(), lr=0.05), None)}
        return {"optimizer_cls_and_kwargs": (torch.optim.Adam, {"lr": 0.05})}

    reference = MLPWithOmega(alpha)
    Trainer(model=reference, args=l2_args(tmp_path, **common), train_dataset=Points(), **given(reference)).train()
    for impl in ("grad", "loss"):
        mine = MLP()
        L2Trainer(model=mine, args=l2_args(tmp_path, l2_coef=alpha, l2_impl=impl, **common), train_dataset=Points(),
                  **given(mine)).train()
        assert max_rel_diff(params_of(mine), params_of(reference)) < 1e-6, impl


def test_decoupled_with_an_optimizer_that_misses_penalized_parameters_is_refused(tmp_path):
    model = MLP()
    optimizer = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_impl="decoupled"), train_dataset=Points(),
                        optimizers=(optimizer, None))
    before = params_of(model)
    with pytest.raises(ValueError, match="does not update.*fc2.weight"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any update


SETTINGS_THAT_LEAVE_THE_UPDATE_ALONE = [
    {"gradient_checkpointing": True},
    {"include_num_input_tokens_seen": "all"},
    {"average_tokens_across_devices": False},
    {"eval_strategy": "steps", "eval_steps": 1},
]


@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_settings_that_leave_the_update_alone(tmp_path, impl):
    """Each of these changes how the Trainer computes or reports, not the update: the parameters equal those of
    the run without it (which the other tests check against hand references)."""
    common = dict(l2_coef=1.0, l2_impl=impl, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                  max_steps=3)
    runs = []
    for extra in ({}, *SETTINGS_THAT_LEAVE_THE_UPDATE_ALONE):
        model = tiny_gpt2()
        L2Trainer(model=model, args=l2_args(tmp_path, **common, **extra), train_dataset=TokenDataset(),
                  eval_dataset=TokenDataset(n=4, seed=1)).train()
        runs.append(params_of(model))
    for setting, run in zip(SETTINGS_THAT_LEAVE_THE_UPDATE_ALONE, runs[1:]):
        assert max_rel_diff(run, runs[0]) < 1e-6, setting


def test_train_twice_keeps_the_anchor_of_construction(tmp_path):
    """A second `train()` on the same trainer continues from the trained weights (and, as in the stock Trainer,
    with the same optimizer) and still pulls toward θ₀ taken at construction: the stock Trainer run twice on a
    model whose loss holds that Ω by hand ends at the same parameters."""
    alpha = 2.0
    common = dict(max_steps=3, max_grad_norm=0.0, learning_rate=0.05)
    reference = MLPWithOmega(alpha)
    stock = Trainer(model=reference, args=l2_args(tmp_path, **common), train_dataset=Points())
    stock.train()
    stock.train()
    mine = MLP()
    trainer = L2Trainer(model=mine, args=l2_args(tmp_path, l2_coef=alpha, **common), train_dataset=Points())
    trainer.train()
    trainer.train()
    assert max_rel_diff(params_of(mine), params_of(reference)) < 1e-6


@pytest.mark.slow
def test_torch_compile_trains_with_the_penalty(tmp_path):
    """Compiled kernels round differently: the compiled run ends within 1e-5 of the eager one, while the penalty
    moves the parameters far more than that."""
    common = dict(l2_coef=1.0, max_steps=3)
    for impl in ("grad", "loss"):
        runs = {}
        for name, extra in (("eager", {}), ("compiled", {"torch_compile": True}), ("free", {"l2_mode": "none"})):
            model = tiny_gpt2()
            L2Trainer(model=model, args=l2_args(tmp_path, l2_impl=impl, **common, **extra),
                      train_dataset=TokenDataset()).train()
            runs[name] = params_of(model)
        assert max_rel_diff(runs["compiled"], runs["eager"]) < 1e-5
        assert max_rel_diff(runs["free"], runs["eager"]) > 1e-3
