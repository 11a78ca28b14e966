"""LoRA-aware L2-SP (`l2_lora_delta`) and PEFT `modules_to_save` anchors, checked against merged weights."""

import copy
import os

import pytest
import torch
from helpers import TokenDataset, l2_args, max_rel_diff, tiny_gpt2
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_l2 import L2Config, L2Trainer
from hf_l2.anchor import take_anchors
from hf_l2.lora import LoraDeltaPenalty, find_lora_layers
from hf_l2.saved_state import ANCHOR_FILE

ALPHA = 0.7
ADAPTED = ("c_attn", "wte", "up", "down")  # the LoRA-wrapped modules of the models below


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def gpt2_lora(**config):
    config = {"r": 2, "lora_alpha": 3, "target_modules": ["c_attn", "wte"], "fan_in_fan_out": True, **config}
    return get_peft_model(tiny_gpt2(), LoraConfig(**config))


def perturb_lora(model, seed=1):
    """Move every LoRA factor, as training would (B starts at zero, so ΔW would be zero otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def base_weights(model):
    """The adapted layers' own weights, by module name (the merged model keeps the same names)."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(ADAPTED)}


def merged_weights(peft_model, adapters):
    merged = copy.deepcopy(peft_model).base_model.merge_and_unload(adapter_names=adapters)
    return {n: m.weight.detach() for n, m in merged.named_modules() if n.endswith(ADAPTED)}


def trainable_of(model):
    """The parameters training changes: comparing whole models would drown them in the frozen base weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def penalty_for(model):
    layers = find_lora_layers(model)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    penalty = LoraDeltaPenalty(ALPHA, layers, anchors)
    return penalty, layers


def strip(name):
    """A PEFT module name as it is after `merge_and_unload`."""
    return name.removeprefix("base_model.model.")


def two_active_adapters():
    model = gpt2_lora()
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True))
    model.base_model.set_adapter(["default", "second"], inference_mode=False)
    return model, ["default", "second"]


CASES = {
    # GPT-2's Conv1D (fan_in_fan_out) and its embedding, PEFT's default init: ΔW₀ = 0.
    "conv1d_and_embedding": lambda: (gpt2_lora(), ["default"]),
    # Two adapters active together: ΔW = s₁B₁A₁ + s₂B₂A₂, with cross terms in ‖ΔW‖².
    "two_active_adapters": two_active_adapters,
    # PiSSA moves the principal part of W into B₀A₀ (ΔW₀ ≠ 0): Ω measures the change from the pretrained W.
    "pissa_init": lambda: (
        get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"], init_lora_weights="pissa")),
        ["default"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_penalty_and_gradient_equal_the_closed_form_on_merged_weights(case):
    """Ω = (α/2)·Σ‖W_merged − W_pretrained‖²: its value, its gradient (grad, loss and decoupled forms)."""
    if case == "pissa_init":
        pretrained = base_weights(MLP())
    else:
        pretrained = base_weights(tiny_gpt2())
    model, adapters = CASES[case]()
    penalty, layers = penalty_for(model)
    assert len(layers) == (2 if case == "pissa_init" else 3)  # up, down; or wte and two c_attn
    perturb_lora(model)
    penalty.bind(dict(model.named_parameters()))

    merged = merged_weights(model, adapters)
    expected = sum(0.5 * ALPHA * (merged[n] - pretrained[n]).double().pow(2).sum() for n in merged)
    assert expected > 0
    assert penalty.value().item() == pytest.approx(expected.item(), rel=1e-5)

    # Reference gradient: autograd through PEFT's own ΔW (`get_delta_weight`, an out×in matrix), minus ΔW₀.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchor_delta = {}
    for spec in layers:
        with torch.no_grad():
            anchor_delta[spec.module_name] = pretrained[strip(spec.module_name)] - spec.module.get_base_layer().weight
    reference = sum(
        0.5 * ALPHA * (sum(spec.module.get_delta_weight(a) for a in spec.adapters) - anchor_delta[spec.module_name])
        .pow(2).sum()
        for spec in layers
    )
    expected_grads = dict(zip(params, torch.autograd.grad(reference, list(params.values()))))

    penalty.add_to_grads_()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6)
        p.grad = None
    penalty.loss_term().backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6)

    before = {n: p.detach().clone() for n, p in params.items()}
    lr = 0.05
    penalty.pull_(lambda p: lr)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n] - lr * expected_grads[n], rtol=1e-5, atol=1e-7)


def test_default_init_is_the_r_by_r_form_of_the_lora_product():
    """With B₀ = 0 nothing of the anchor enters: Ω = (α/2)·s²·tr((BᵀB)(AAᵀ)) per layer."""
    model = gpt2_lora(target_modules=["c_attn"])
    penalty, layers = penalty_for(model)
    perturb_lora(model)
    penalty.bind(dict(model.named_parameters()))
    assert all(layer.a0 is None for layer in penalty._layers)
    expected = 0.0
    for spec in layers:
        a, b = spec.module.lora_A["default"].weight, spec.module.lora_B["default"].weight
        s = spec.module.scaling["default"]
        expected += 0.5 * ALPHA * s**2 * torch.trace((b.T @ b) @ (a @ a.T)).item()
    assert penalty.value().item() == pytest.approx(expected, rel=1e-5)


# ---- in the trainer --------------------------------------------------------------------------------------------
def lora_with_saved_module():
    """GPT-2 + LoRA on c_attn and wte, and a trainable copy of the position embedding (`modules_to_save`)."""
    return gpt2_lora(modules_to_save=["wpe"])


def test_impls_agree_and_decoupled_sgd_equals_the_gradient_step(tmp_path):
    """grad = loss (accumulation, clipping active); with SGD and no clipping, decoupled = grad as well."""
    common = dict(l2_lora_delta=True, l2_coef=5.0, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                  max_steps=3, learning_rate=0.05)
    results = {}
    for impl, extra in (("grad", {"max_grad_norm": 0.3}), ("loss", {"max_grad_norm": 0.3}),
                        ("grad_sgd", {"optim": "sgd", "max_grad_norm": 0.0}),
                        ("decoupled", {"optim": "sgd", "max_grad_norm": 0.0})):
        model = lora_with_saved_module()
        args = l2_args(tmp_path, l2_impl=impl.removesuffix("_sgd"), **common, **extra)
        trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
        assert trainer.l2_terms.lora is not None
        assert trainer.l2_terms.penalty.anchored_names == [
            "base_model.model.transformer.wpe.modules_to_save.default.weight"
        ]
        trainer.train()
        results[impl] = trainable_of(model)
        if impl == "grad":
            assert max(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h) > 0.3
            log = [h for h in trainer.state.log_history if "loss" in h][-1]
            wpe = model.base_model.model.transformer.wpe
            saved = (wpe.modules_to_save["default"].weight - wpe.original_module.weight).pow(2).sum().item()
            merged = merged_weights(model, ["default"])
            pretrained = base_weights(tiny_gpt2())
            delta = sum((merged[n] - pretrained[n]).pow(2).sum().item() for n in merged)
            assert log["l2/lora_delta"] == pytest.approx(delta**0.5, rel=1e-4)
            assert log["l2/penalty"] == pytest.approx(0.5 * 5.0 * (delta + saved), rel=1e-4)
    assert max_rel_diff(results["loss"], results["grad"]) < 1e-6
    assert max_rel_diff(results["decoupled"], results["grad_sgd"]) < 1e-6
    free = lora_with_saved_module()  # the penalty must matter for these comparisons to mean anything
    L2Trainer(model=free, args=l2_args(tmp_path, l2_mode="none", optim="sgd", **{k: v for k, v in common.items()
              if not k.startswith("l2_")}), train_dataset=TokenDataset()).train()
    assert max_rel_diff(trainable_of(free), results["grad_sgd"]) > 1e-3


def test_modules_to_save_copy_is_anchored_to_the_original_module():
    model = lora_with_saved_module()
    wpe = model.base_model.model.transformer.wpe
    with torch.no_grad():  # as if the model had been loaded with an already trained copy
        wpe.modules_to_save["default"].weight.add_(1.0)
    parameters = dict(model.named_parameters())
    name = "base_model.model.transformer.wpe.modules_to_save.default.weight"
    anchors, absent, _ = take_anchors(model, parameters, [name])
    assert absent == [] and torch.equal(anchors[name], wpe.original_module.weight)
    assert anchors[name].data_ptr() != wpe.original_module.weight.data_ptr()


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


# ---- bad input -------------------------------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tiny_gpt2(), "no trainable LoRA layer"),
        (lambda: get_peft_model(Conv(), LoraConfig(r=2, target_modules=["conv"])), "Conv2d"),
        (lambda: gpt2_lora(use_dora=True), r"is a Dora\w*Variant"),
    ],
    ids=["no_lora", "conv", "dora"],
)
def test_unsupported_models_raise_a_clear_error(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):
        L2Trainer(model=build(), args=l2_args(tmp_path, l2_lora_delta=True))


def test_inactive_trainable_adapter_and_l2_mode_are_refused(tmp_path):
    model = gpt2_lora()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    for name, p in model.named_parameters():  # "other" stays inactive but is made trainable by hand
        if ".other." in name:
            p.requires_grad_(True)
    with pytest.raises(ValueError, match="adapter 'other' .* is trainable but not active"):
        L2Trainer(model=model, args=l2_args(tmp_path, l2_lora_delta=True))
    with pytest.raises(ValueError, match="`l2_lora_delta=True` .* set `l2_mode='l2_sp'`"):
        L2Config(output_dir=str(tmp_path), l2_mode="l2", l2_lora_delta=True)


def test_an_anchor_path_anchors_the_adapters_to_their_own_start(tmp_path):
    """The base checkpoint holds no LoRA factor: they keep their starting values as θ₀ (not β = 0 "new" ones), so
    the run is the one without `l2_anchor_path`."""
    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base)
    results = {}
    for path in (None, str(base)):
        model = lora_with_saved_module()
        start = trainable_of(model)
        trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_coef=5.0, l2_anchor_path=path, max_steps=3),
                            train_dataset=TokenDataset())
        penalty = trainer.l2_terms.penalty
        lora = [n for n in penalty.anchored_names if "lora_" in n]
        assert penalty.new_names == [] and lora and all(torch.equal(penalty.anchors[n], start[n]) for n in lora)
        trainer.train()
        results[path] = trainable_of(model)
    assert all(torch.equal(results[None][n], results[str(base)][n]) for n in results[None])
