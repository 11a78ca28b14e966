"""Callbacks for the stock `transformers.Trainer`: `WeightNormCallback` (weight norms and drift at each logging
step) and `DecoupledL2SPCallback` (the decoupled L2-SP pull, for code that cannot swap its Trainer)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from hf_l2.argument_checks import check_number
from hf_l2.builder import build_penalty
from hf_l2.decoupled import DecoupledPull
from hf_l2.layer_groups import GROUPINGS, parameter_group
from hf_l2.optimizers import in_backward_optimizer
from hf_l2.penalty import L2Penalty, snapshot
from hf_l2.schedule import CoefSchedule
from hf_l2.sharding import local_pieces

logger = logging.get_logger(__name__)


class WeightNormCallback(TrainerCallback):
    """Adds `weights/norm[/<group>]` (and `weights/drift[/<group>]`, `weights/rel_drift`) to each training log.

    Works with the stock `transformers.Trainer`. Reporting integrations (TensorBoard, W&B) only see keys added
    by callbacks that run before them: `L2Trainer` puts this callback first by itself; with the stock Trainer
    call `callback.attach(trainer)` instead of `add_callback`. `log_history` gets the keys either way.
    The numbers come from `L2Penalty.group_statistics` over all trainable weights (the snapshot as θ₀), the same
    path as the `l2/*` logs and the model card's drift table.

    Args:
        group_by: `"type"` (embeddings, attention, mlp, layer_norm, head, other) or `"layer"` (per block index).
        track_drift: keep a snapshot of the trainable weights and log the distance to it.
        reference: the weights to measure drift from (a model or a state dict); by default the weights at the
            start of training. Pass it when resuming, or drift is measured from the resumed weights.
        snapshot_dtype / snapshot_device: storage of the snapshot.
    """

    def __init__(
        self,
        group_by: str = "type",
        track_drift: bool = False,
        reference: nn.Module | dict[str, torch.Tensor] | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        snapshot_device: str | None = None,
    ):
        if group_by not in GROUPINGS:
            raise ValueError(f"`group_by` must be 'type' or 'layer', got {group_by!r}.")
        self.group_by = group_by
        self.track_drift = track_drift or reference is not None
        self.snapshot_dtype = snapshot_dtype
        self.snapshot_device = snapshot_device
        self._snapshot: dict[str, torch.Tensor] | None = None
        # Where each snapshot tensor sits in its full parameter: whole for `reference`, this rank's piece otherwise.
        self._layout: dict[str, tuple[int, torch.Size]] = {}
        self._drift_meter: L2Penalty | None = None  # over the trainable weights
        self._metered_names: list[str] = []  # the names it was built for
        if reference is not None:
            state = reference.state_dict() if isinstance(reference, nn.Module) else reference
            self._snapshot = snapshot(state, list(state), snapshot_dtype, snapshot_device)

    def attach(self, trainer) -> WeightNormCallback:
        """Register on a trainer ahead of its reporting callbacks, so TensorBoard and W&B get the norms."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.track_drift and self._snapshot is None:
            if state.global_step > 0:
                logger.warning("WeightNormCallback: resumed run without `reference`; drift is from resumed weights.")
            trainable = {n: p for n, p in local_pieces(model).items() if p.param.requires_grad}
            self._snapshot = snapshot(trainable, list(trainable), self.snapshot_dtype, self.snapshot_device)
            self._layout = {n: (p.start, p.shape) for n, p in trainable.items()}
            self._drift_meter = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        values = self.measure(model)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Norms (and drift) of the trainable weights, globally and per group; one host sync.

        Under FSDP or ZeRO-3 each rank measures its own pieces and one all-reduce adds them up, so every rank
        must call this at the same step (the Trainer logs on every rank).
        """
        pieces = {n: p for n, p in local_pieces(model).items() if p.param.requires_grad and math.prod(p.shape)}
        if not pieces:
            return {}
        names = list(pieces)
        if self._drift_meter is None or self._metered_names != names:
            known = self._snapshot or {}
            self._drift_meter = L2Penalty.drift_meter(
                [n for n in pieces if n in known], [n for n in pieces if n not in known], known,
                # a snapshot in host memory stays there (copied per measurement), as the penalty's θ₀ can
                anchors_on_cpu=all(t.device.type == "cpu" for t in known.values()), anchor_layout=self._layout,
            )
            # The penalty cuts a full `reference` to this rank's pieces once, and keeps where they sit.
            self._layout, self._metered_names = self._drift_meter.anchor_layout, names
        self._drift_meter.bind(pieces)
        groups = self._drift_meter.group_statistics(lambda name: parameter_group(name, self.group_by))
        everything = groups.pop("all")
        out = {"weights/norm": math.sqrt(everything["weight_sq"])}
        out |= {f"weights/norm/{group}": math.sqrt(sums["weight_sq"]) for group, sums in groups.items()}
        if self._snapshot is not None:  # a group (or all) without a snapshot has no drift: 0
            drift = math.sqrt(everything.get("drift_sq", 0.0))
            out["weights/drift"] = drift
            out |= {f"weights/drift/{group}": math.sqrt(sums.get("drift_sq", 0.0)) for group, sums in groups.items()}
            reference = math.sqrt(everything.get("anchor_sq", 0.0))
            if reference > 0:
                out["weights/rel_drift"] = drift / reference
        return out


class DecoupledL2SPCallback(TrainerCallback):
    """Decoupled L2-SP on the stock `Trainer`: before each optimizer update, θ ← θ − lr·α·(θ − θ₀) on anchored
    parameters and θ ← θ − lr·β·θ on new ones, with the learning rate of each parameter's param group.

    The same pull as `L2Trainer` with `l2_impl="decoupled"` (see `hf_l2.decoupled`), hooked into the optimizer
    at `on_train_begin`. θ₀ is taken when the callback is built: from `model`, or from `reference`. When
    resuming, build it from the pretrained model again (the Trainer loads the checkpoint's weights later, inside
    `train`), or pass `reference`; a callback whose anchor equals the resumed weights warns.

    Args:
        model: the model the Trainer will train; its trainable parameters are selected now.
        coef: α ≥ 0, the pull toward θ₀.
        head_coef: β ≥ 0, the decay of new parameters (those matching `head_params` or absent from `reference`).
        head_params / exclude: regexes (`re.search` on parameter names), as `l2_head_params` / `l2_exclude`.
        exclude_bias_and_norm: leave biases and norm weights out (the Trainer's weight-decay rule).
        reference: θ₀ as a model or a state dict; a base model's names match a model with a head. PEFT
            `modules_to_save` copies default to their frozen original module.
        schedule: a `CoefSchedule` for α and β over the steps (default: constant).
    """

    def __init__(
        self,
        model: nn.Module,
        coef: float,
        head_coef: float = 0.0,
        head_params: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_bias_and_norm: bool = True,
        reference: nn.Module | dict[str, torch.Tensor] | None = None,
        schedule: CoefSchedule | None = None,
    ):
        check_number("coef", coef)
        check_number("head_coef", head_coef)
        self.penalty = build_penalty(
            model,
            mode="l2_sp",
            coef=coef,
            head_coef=head_coef,
            head_params=head_params,
            exclude=exclude,
            # The Trainer's own no-decay rule; `get_decay_parameter_names` does not use its `self`.
            decay_names=Trainer.get_decay_parameter_names(None, model) if exclude_bias_and_norm else None,
            anchor_weights=reference.state_dict() if isinstance(reference, nn.Module) else reference,
            fields=("head_params", "exclude", "reference", "coef", "head_coef"),
            who="DecoupledL2SPCallback",
        )
        self.schedule = schedule or CoefSchedule()
        self._pull = DecoupledPull([self.penalty], self.schedule.max_factor)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed_plugin", None) is not None:
            raise ValueError(
                "DecoupledL2SPCallback cannot hook DeepSpeed's optimizer (the engine steps inside `backward`); "
                "use `L2Trainer` with `l2_impl='loss'`."
            )
        stepper = in_backward_optimizer(args.optim, optimizer)
        if stepper is not None:
            raise ValueError(
                f"DecoupledL2SPCallback cannot pull the weights with {stepper}: it updates them inside `backward`, "
                "and its `step()` does nothing. Use `L2Trainer` with `l2_impl='loss'`."
            )
        self.penalty.bind(dict(model.named_parameters()))
        if state.global_step > 0 and self.penalty.anchored_names and self.penalty.statistics()["drift_sq"] == 0:
            logger.warning(
                "DecoupledL2SPCallback: θ₀ equals the resumed weights, so the pull is toward the checkpoint, not "
                "the pretrained model. Build the callback from the pretrained model or pass `reference=`."
            )
        self._pull.attach(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.penalty.set_factor(self.schedule(state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        self._pull.detach()
