"""The private pieces of transformers, accelerate, torch and peft that hf_l2 overrides or reads, as the installed
releases have them.

None of these is a public API; a release that renames one would otherwise leave a method of `L2Trainer` that is
never called (θ₀ not saved on checkpoints, Ω counted GA times) instead of an error. Each check here names the piece
and the hf_l2 code that depends on it.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from helpers import TokenDataset, l2_args, tiny_gpt2
from transformers import GPT2LMHeadModel, MarianMTModel, Trainer, TrainingArguments

from hf_l2 import L2Trainer
from hf_l2.loss_kwargs import loss_reads_num_items


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# Trainer methods L2PenaltyMixin overrides and calls through `super()`: name and parameters must match, or the
# override is dead code (a hook under another name) or breaks the Trainer's own call.
OVERRIDDEN = {
    "_save_optimizer_and_scheduler": ["self", "output_dir"],  # θ₀ saved next to the optimizer (also under DeepSpeed)
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],  # ... and restored on resume
    "_hp_search_setup": ["self", "trial"],  # per trial: args change, the penalty terms must follow
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "log": ["self", "logs", "start_time"],
    "save_model": ["self", "output_dir", "_internal_call"],
    "_finish_current_push": ["self"],  # called before hf_l2's own upload
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_trainer_has_the_methods_hf_l2_overrides(name):
    assert hasattr(Trainer, name), f"transformers' Trainer no longer has `{name}`: hf_l2.trainer overrides it"
    assert parameters(getattr(Trainer, name)) == OVERRIDDEN[name], f"Trainer.{name} changed its parameters"


def test_init_hf_repo_takes_the_token_first():
    assert parameters(Trainer.init_hf_repo)[:2] == ["self", "token"]


@pytest.mark.parametrize(
    "accepts_loss_kwargs, num_items, loss_func, expected",
    [(False, None, None, 4), (True, None, None, 4), (True, 7, None, 1), (False, 7, lambda *a, **k: None, 1)],
)
def test_loss_divisor_is_what_training_step_divides_by(tmp_path, accepts_loss_kwargs, num_items, loss_func,
                                                       expected):
    """`_loss_divisor` mirrors `Trainer.training_step`'s test of whether the loss is already scaled for GA
    (`loss_is_scaled_for_ga`, or the older expression without it): Ω is pre-multiplied by it."""
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, gradient_accumulation_steps=4, l2_mode="none"))
    trainer.model_accepts_loss_kwargs, trainer.compute_loss_func = accepts_loss_kwargs, loss_func
    trainer.current_gradient_accumulation_steps = 4  # what the training loop sets for a full window
    task_loss = torch.tensor(12.0, requires_grad=True)
    trainer.compute_loss = lambda model, inputs, return_outputs=False, num_items_in_batch=None: task_loss
    batch = {k: v.unsqueeze(0) for k, v in TokenDataset(n=1)[0].items()}
    returned = trainer.training_step(trainer.model, batch, num_items)
    assert trainer._loss_divisor(num_items) == expected == pytest.approx(12.0 / returned.item())


def test_loss_is_scaled_for_ga_overrides_the_test_where_the_trainer_has_it(tmp_path):
    if "loss_is_scaled_for_ga" not in vars(Trainer):
        pytest.skip("this transformers predates `Trainer.loss_is_scaled_for_ga`")
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, gradient_accumulation_steps=4, l2_mode="none"))
    trainer.current_gradient_accumulation_steps = 4
    trainer.loss_is_scaled_for_ga = True
    assert trainer._loss_divisor(None) == 1
    trainer.loss_is_scaled_for_ga = False
    assert trainer._loss_divisor(7) == 4


def test_grad_scaler_gives_its_scale_without_a_host_sync():
    """fp16: `L2Trainer._amp_loss_scale` multiplies ∇Ω by `GradScaler._get_scale_async()`."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert parameters(torch.amp.GradScaler._get_scale_async) == ["self"]
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    assert scaler.is_enabled() and scaler._get_scale_async().item() == 8.0


def test_fsdp1_flat_parameters_keep_their_shard_bookkeeping():
    """`hf_l2.sharding._fsdp1_offsets` reads these to find each parameter's piece on this rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel, _flat_param

    assert {"in_shard", "intra_param_start_idx"} <= set(_flat_param._ShardParamInfo._fields)
    source = inspect.getsource(_flat_param)
    for owner, name in [("flat_param", "_shard_param_infos"), ("self", "_params"), ("self", "_shapes"),
                        ("self", "_use_orig_params"), ("self", "flat_param")]:
        assigned = re.search(rf"\b{owner}\.{name}\s*(:[^=\n]*)?=", source)  # `x.name = ...` or `x.name: T = ...`
        assert assigned, f"torch's FSDP1 flat parameter handle no longer sets `{name}`"
    assert callable(FullyShardedDataParallel.fsdp_modules)
    assert "self._handle" in inspect.getsource(FullyShardedDataParallel)


def test_deepspeed_is_seen_on_the_training_arguments():
    """`DecoupledL2SPCallback` refuses DeepSpeed by `args.deepspeed_plugin`, which TrainingArguments sets."""
    assert TrainingArguments(output_dir="unused", use_cpu=True).deepspeed_plugin is None


def test_the_private_helpers_hf_l2_imports_exist():
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper  # hf_l2.lora: which modules are LoRA layers
    from peft.tuners.lora.tp_layer import LoraParallelLinear
    from peft.utils.other import ModulesToSaveWrapper
    from transformers.trainer_utils import _is_peft_model  # hf_l2.publishing.card

    assert all(isinstance(c, type) for c in (LoraLayer, ParamWrapper, LoraParallelLinear, ModulesToSaveWrapper))
    assert parameters(_is_peft_model) == ["model"]


def test_model_accepts_loss_kwargs_decides_the_trainers_loss_scaling():
    """`L2PenaltyMixin._treat_mean_loss_as_mean` sets it to False for a loss that ignores `num_items_in_batch`: the
    Trainer must read it where it counts the items, multiplies by the processes and divides by GA."""
    for method in (Trainer._get_num_items_in_batch, Trainer.compute_loss, Trainer.training_step):
        assert "self.model_accepts_loss_kwargs" in inspect.getsource(method), method.__name__


class MarianByParent(MarianMTModel):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class GPT2ByParent(GPT2LMHeadModel):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class OwnLoss(torch.nn.Module):
    def forward(self, x, **kwargs):
        return {"loss": x.sum() / kwargs.get("num_items_in_batch", 1)}


class SaysNo(GPT2LMHeadModel):
    accepts_loss_kwargs = False


@pytest.mark.parametrize("cls, reads", [
    (GPT2LMHeadModel, True), (GPT2ByParent, True), (OwnLoss, True), (MarianMTModel, False), (MarianByParent, False),
    (SaysNo, False),
])
def test_which_losses_read_num_items_in_batch(cls, reads):
    model = cls.__new__(cls)  # the class decides; nothing of the instance is read
    assert loss_reads_num_items(model) is reads
