"""The Trainer layer: `L2PenaltyMixin` (the penalty in the step, its logging, θ₀ in checkpoints) and
`L2OutputAnchorMixin` (that plus the KL anchor). `hf_l2.trainers` adds publishing and builds `L2Trainer`."""

from __future__ import annotations

import glob
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, unwrap_peft_model
from transformers.utils import logging

from hf_l2.anchor import (
    ANCHOR_FILE,
    KL_ANCHOR_FILES,
    anchor_source,
    expected_anchors,
    load_anchor,
    read_weights,
    save_anchor,
)
from hf_l2.anchor_checks import ExpectedAnchor, differing_anchors
from hf_l2.builder import build_lora_penalty, build_penalty
from hf_l2.callbacks import WeightNormCallback
from hf_l2.config import ANCHOR_DTYPES, ANCHORED_MODES, L2Config, validate_l2_fields
from hf_l2.decoupled import DecoupledPull, check_pull_rate
from hf_l2.disk_full import naming_a_full_disk
from hf_l2.fisher import FISHER_FILE, load_fisher, normalize_fisher, save_fisher, trainer_fisher
from hf_l2.lora import LoraDeltaPenalty
from hf_l2.loss_kwargs import loss_reads_num_items
from hf_l2.optimizers import in_backward_optimizer
from hf_l2.output_anchor import BackboneCapture, OutputAnchor, target_logits, token_kl_sum
from hf_l2.output_lock import holding_output_dir
from hf_l2.penalty import L2Penalty
from hf_l2.sharding import local_pieces, world_size

logger = logging.get_logger(__name__)

# What to do about a bad F file: one given as `l2_fisher_path`, one in the checkpoint being resumed.
FISHER_PATH_FIX = ("Pass an F computed for this model as `l2_fisher_path`, or leave `l2_fisher_path` unset to compute "
                   "F from the Fisher data.")
FISHER_CHECKPOINT_FIX = ("Resume from an earlier checkpoint, or delete the file to compute F again from the Fisher "
                         "data (at the weights the trainer was built with: build it from the pretrained model then).")


class L2Terms(NamedTuple):
    """The penalty's terms on a trainer (None where absent): over ordinary parameters, and over the LoRA weight
    change (`l2_lora_delta`)."""

    penalty: L2Penalty | None
    lora: LoraDeltaPenalty | None


class L2PenaltyMixin:
    """Adds Ω to any `Trainer` subclass; `args` must be an [`L2Config`].

    The penalty enters once per optimizer step, on the micro-batch where `accelerator.sync_gradients` is true:
    `l2_impl="grad"` adds ∇Ω to the gradients right after that backward (so clipping and `grad_norm` see it);
    `l2_impl="loss"` adds Ω to that micro-batch's loss, scaled so that the Trainer's own division by the
    accumulation steps leaves exactly Ω; `l2_impl="decoupled"` steps on Ω alone inside `optimizer.step()` (see
    `hf_l2.decoupled`). The coefficient schedule is evaluated there too, from `state.global_step`. The logged
    `loss` is always the task loss.

    Ω has up to two terms, read through `l2_terms`: `penalty` (an `L2Penalty` over ordinary parameters, PEFT
    `modules_to_save` copies included) and, with `l2_lora_delta`, `lora` (a `LoraDeltaPenalty` over the LoRA
    factors). They cover the parameters trainable when the trainer is built (a change by the first step warns).
    Publishing (card, Hub) is `L2PublishingMixin`'s; `L2TrainerMixin` combines both.

    `fisher_dataset` (`l2_mode="l2_sp_fisher"`): the examples the Fisher F is computed on, before the first step;
    default: the training set.
    """

    args: L2Config
    l2_base_model: str | None = None  # the model's `_name_or_path` when built (None: a model built from a config)
    default_config: type[L2Config] = L2Config  # what `args=None` becomes

    def __init__(self, *args, fisher_dataset=None, **kwargs):
        args, kwargs = _with_l2_config(args, kwargs, self)  # before `Trainer.__init__` runs
        super().__init__(*args, **kwargs)
        if self.args.l2_kl_coef and not isinstance(self, L2OutputAnchorMixin):
            raise TypeError(
                f"`l2_kl_coef` needs the output anchor's hooks: build `{type(self).__name__}` on `L2TrainerMixin` "
                "(or `L2OutputAnchorMixin`) instead of `L2PenaltyMixin`."
            )
        self.fisher_dataset = fisher_dataset
        self.l2_fisher_source: dict | None = None  # where F came from (data, examples), for the card
        self._l2: L2Penalty | None = None  # `_l2_build_terms` sets both terms
        self._l2_lora: LoraDeltaPenalty | None = None
        self._l2_pull: DecoupledPull | None = None
        self._l2_factor = 1.0  # the schedule's factor used by the latest optimizer step
        self._l2_add_to_loss = False
        self._l2_in_loss: torch.Tensor | None = None
        self._move_weight_norm_callbacks_first()
        self._treat_mean_loss_as_mean()
        if (precision_off := mixed_precision_turned_off(self)) is not None:
            logger.warning(f"Mixed precision is off: {precision_off} (the model card says so).")
        self._l2_build_terms()

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def l2_config_class(cls) -> type[L2Config]:
        """The config class this trainer takes: what `args=None` becomes, and what a refused `args` converts to."""
        return cls.default_config

    def _l2_default_args(self, model) -> L2Config:
        """`args=None`: the stock Trainer's default (`tmp_trainer`), with the L2 defaults."""
        return self.l2_config_class()(output_dir="tmp_trainer")

    def _treat_mean_loss_as_mean(self) -> None:
        """A forward with `**kwargs` makes the Trainer take the loss for one normalized by `num_items_in_batch`
        (`model_accepts_loss_kwargs`): it then neither divides it by the accumulation steps nor offsets its
        ×num_processes (see `Trainer.compute_loss`). A loss that ignores it (MarianMT's plain mean) would so weigh
        GA × num_processes times too much against Ω. Such a loss is trained as the per-batch mean it is: divided by
        GA, averaged over processes by DDP, as one process gives."""
        model = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        if self.model_accepts_loss_kwargs and not loss_reads_num_items(model):
            self.model_accepts_loss_kwargs = False
            logger.info(
                f"{type(model).__name__}'s loss ignores `num_items_in_batch` (a mean per micro-batch): it is divided "
                "by the accumulation steps and averaged over processes, not scaled by the number of processes."
            )

    def _l2_build_terms(self) -> None:
        """The penalty's terms from `self.args` and θ₀ from `self.model` (or `l2_anchor_path`), after refusing the
        set-ups where `l2_impl` could not reach the weights."""
        self._l2 = self._l2_lora = None
        # The model fine-tuned (θ₀ unless `l2_anchor_path`), named in the card; saved with θ₀ in checkpoints, so
        # that a run resumed on a model loaded from a checkpoint still names the pretrained one.
        self.l2_base_model = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        if not self.args.l2_enabled:
            return
        self._refuse_unreachable_impl()
        if self.args.l2_lora_delta:
            self._l2_lora = build_lora_penalty(
                self.model, self.args.l2_coef, self.args.l2_exclude, ANCHOR_DTYPES[self.args.l2_anchor_dtype]
            )
        self._l2 = self._build_penalty(frozenset(self._l2_lora.anchored_names if self._l2_lora else ()))
        if self.args.l2_impl == "decoupled" and self.optimizer is None:  # a user's optimizer is checked at step 1
            self._l2_check_pull_rate()

    def _refuse_unreachable_impl(self) -> None:
        """`grad` adds ∇Ω after backward and `decoupled` hooks `optimizer.step()`: both come too late where the
        update happens inside backward (DeepSpeed's engine, layer-wise GaLore / APOLLO, LOMO, AdaLomo)."""
        impl = self.args.l2_impl
        if impl == "loss":
            return
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"`l2_impl='{impl}'` cannot work under DeepSpeed: the engine steps inside `backward`, "
                "before a gradient could be added or a step hooked. Use `l2_impl='loss'`."
            )
        stepper = in_backward_optimizer(self.args.optim, self.optimizer, self.optimizer_cls_and_kwargs)
        if stepper is not None:
            raise ValueError(
                f"`l2_impl='{impl}'` cannot work with {stepper}: it updates each parameter inside `backward`, "
                "before ∇Ω could be added or a step hooked, so the penalty would have no effect. Use "
                "`l2_impl='loss'` (exact with it), or an optimizer that steps after backward."
            )

    def _hp_search_setup(self, trial) -> None:
        """A search trial has just set its values on `self.args` and (with `model_init`) built a fresh model:
        rebuild the penalty from both, so each trial trains with its own `l2_*` values and its own θ₀."""
        super()._hp_search_setup(trial)
        if self.model_init is None:
            return
        if trial is not None:
            validate_l2_fields(self.args)
        self._l2_unbind()
        self._l2_build_terms()
        self._l2_prepare_fisher(None)  # the trial's F, at the trial's θ₀

    def _build_penalty(self, skip: frozenset[str]) -> L2Penalty:
        """The L2 / L2-SP term over trainable parameters, except those in `skip` (the LoRA factors, if covered)."""
        args, model = self.args, self.model
        penalty = build_penalty(
            model,
            mode=args.l2_mode,
            coef=args.l2_coef,
            head_coef=args.l2_head_coef,
            head_params=args.l2_head_params,
            exclude=args.l2_exclude,
            decay_names=self.get_decay_parameter_names(model) if args.l2_exclude_bias_and_norm else None,
            skip=skip,
            weights=read_weights(args.l2_anchor_path)
            if args.l2_anchor_path and args.l2_mode in ANCHORED_MODES else None,
            dtype=ANCHOR_DTYPES[args.l2_anchor_dtype],
            device="cpu" if args.l2_anchor_device == "cpu" else None,
        )
        self._l2_trainable_at_build = _trainable_names(model)
        pieces = local_pieces(model)  # ZeRO-3 `zero.Init` placeholders count by their real size
        count = lambda names: sum(math.prod(pieces[n].shape) for n in names)  # noqa: E731
        logger.info(
            f"L2 penalty ({args.l2_mode}, impl={args.l2_impl}): {len(penalty.anchored_names)} anchored tensors "
            f"({count(penalty.anchored_names):,} values), {len(penalty.new_names)} new tensors "
            f"({count(penalty.new_names):,} values)."
        )
        return penalty

    def _l2_check_pull_rate(self) -> None:
        """lr·α < 1 (and lr·β) for the decoupled pull, from `learning_rate`; a scheduler that raises the lr above
        it is caught at that step, before the pull (see `DecoupledPull`)."""
        args = self.args
        fields = ("l2_coef",) if args.l2_mode == "l2" else ("l2_coef", "l2_head_coef")
        for name in fields:
            check_pull_rate(args.learning_rate, getattr(args, name), args.l2_schedule.max_factor,
                            "β" if name == "l2_head_coef" else "α", f"`learning_rate` × `{name}`")

    def _move_weight_norm_callbacks_first(self) -> None:
        """Reporting callbacks (TensorBoard, W&B) only see keys added to `logs` by callbacks that run before them."""
        callbacks = self.callback_handler.callbacks
        norms = [cb for cb in callbacks if isinstance(cb, WeightNormCallback)]
        callbacks[:] = norms + [cb for cb in callbacks if not isinstance(cb, WeightNormCallback)]

    # ---- the terms -------------------------------------------------------------------------------------------
    @property
    def l2_terms(self) -> L2Terms:
        """The penalty's terms (read-only; both None with `l2_mode="none"`)."""
        return L2Terms(self._l2, self._l2_lora)

    def bound_l2_terms(self) -> L2Terms:
        """`l2_terms`, bound to the model's parameters if training has not bound them yet (e.g. a card written
        before training); call it on every process."""
        if self._l2 is not None and not self._l2.bound:
            self._l2_bind_terms()
        return self.l2_terms

    def _active_l2_terms(self) -> list[L2Penalty | LoraDeltaPenalty]:
        return [t for t in self.l2_terms if t is not None]

    # ---- training -------------------------------------------------------------------------------------------
    def _l2_unbind(self) -> None:
        """Forget the live parameters (and the optimizer hook): the next optimizer step binds them afresh."""
        for term in self._active_l2_terms():
            term.unbind()
        if self._l2_pull is not None:
            self._l2_pull.detach()
            self._l2_pull = None

    def _l2_bind(self) -> None:
        self._l2_warn_if_trainable_changed()
        self._l2_bind_terms()
        if self.args.l2_impl == "decoupled":
            pull = DecoupledPull(self._active_l2_terms(), self.args.l2_schedule.max_factor)
            self._l2_pull = pull.attach(self.optimizer)

    def _l2_warn_if_trainable_changed(self) -> None:
        """The penalty covers the parameters trainable when the trainer was built: say so if that set changed."""
        now, then = _trainable_names(self.model), self._l2_trainable_at_build
        covered = {n for t in self._active_l2_terms() for n in t.anchored_names + getattr(t, "new_names", [])}
        unfrozen = [n for n in now if n not in then]
        frozen = [n for n in then if n not in now and n in covered]
        if unfrozen:
            logger.warning(
                f"{len(unfrozen)} parameter(s) became trainable after the trainer was built, e.g. {unfrozen[:3]}: "
                "they train without the penalty, whose parameters are chosen when the trainer is built. Unfreeze "
                "them before building the trainer (or build a new one)."
            )
        if frozen:
            logger.warning(
                f"{len(frozen)} penalized parameter(s) were frozen after the trainer was built, e.g. {frozen[:3]}; "
                "freeze them before building the trainer so that the penalty leaves them out."
            )

    def _l2_bind_terms(self) -> None:
        # After `accelerator.prepare`: under FSDP / ZeRO-3 the pieces are this rank's shards, and θ₀ is cut to match.
        self._l2.bind(local_pieces(self.model))
        if self._l2_lora is not None:
            self._l2_lora.bind(dict(self.model.named_parameters()))

    def train(self, *args, **kwargs):
        # One run per output folder (see `hf_l2.output_lock`), before anything reads or writes in it.
        with holding_output_dir(self.args.output_dir, self.is_world_process_zero()):
            self._l2_prepare_fisher(kwargs.get("resume_from_checkpoint", args[0] if args else None))
            self._l2_unbind()  # `accelerator.prepare` may swap parameter objects: rebind on the first step
            try:
                return super().train(*args, **kwargs)
            finally:
                if self._l2_pull is not None:  # leave no hook on an optimizer the user may step by hand
                    self._l2_pull.detach()

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the task loss is already normalized over the accumulated batch (mirrors `training_step`'s test)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return scaled

    def _loss_divisor(self, num_items_in_batch) -> int:
        """What `Trainer.training_step` will divide this micro-batch's loss by."""
        return 1 if self._loss_is_scaled(num_items_in_batch) else self.current_gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._l2 is None or not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self._l2.bound:
            self._l2_bind()
        # This micro-batch ends the window of the update from `global_step` to `global_step + 1`.
        self._l2_factor = self.args.l2_schedule(self.state.global_step, self.state.max_steps)
        for term in self._active_l2_terms():
            term.set_factor(self._l2_factor)
        if self.args.l2_impl == "decoupled":  # the pull runs inside optimizer.step(), see hf_l2.decoupled
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.l2_impl == "loss":
            self._l2_add_to_loss = True
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._l2_add_to_loss = False
            # The returned loss is (task + d·Ω)/d: report the task part only.
            return loss - self._l2_in_loss.to(loss.device, loss.dtype)
        loss = super().training_step(model, inputs, num_items_in_batch)
        scale = self._amp_loss_scale()
        for term in self._active_l2_terms():
            term.add_to_grads_(scale=scale)
        return loss

    def _amp_loss_scale(self) -> torch.Tensor | None:
        """fp16 gradients are still multiplied by the GradScaler's scale here; ∇Ω must carry it too."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # a device tensor: no host sync

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self._l2_add_to_loss and model.training):
            return out
        loss, outputs = out if return_outputs else (out, None)
        term = sum(t.loss_term().to(loss.device) for t in self._active_l2_terms())
        self._l2_in_loss = term.detach()
        # Added after the Trainer's ×num_processes (else DDP would count it N times) and pre-multiplied by the
        # divisor `training_step` applies next, so Ω counts once per optimizer step.
        loss = loss + term.to(loss.device) * self._loss_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ---- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (`l2/kl`, if any, is in `logs` already: see `L2OutputAnchorMixin.log`)
            if self._l2 is not None and self._l2.bound:
                logs.update(self._l2_metrics())
            self._l2_stop_if_not_finite(logs)
        super().log(logs, start_time)

    def _l2_stop_if_not_finite(self, logs: dict[str, float]) -> None:
        """A NaN or infinite Ω, drift or KL means the weights are garbage: stop now, before the next checkpoint
        saves them (a non-finite KL is in the loss of the step just taken, so its update is non-finite too).

        The Trainer alone would carry on: its `logging_nan_inf_filter` logs a non-finite loss as the running mean.
        """
        keys = ("l2/penalty", "l2/drift", "l2/lora_delta", "l2/kl")
        bad = {k: logs[k] for k in keys if k in logs and not math.isfinite(logs[k])}
        if bad:
            coefs = ["l2_coef", "l2_kl_coef"] if "l2/kl" in bad else ["l2_coef"]
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            self._l2_stop(f"at step {self.state.global_step}: {what}, so the weights are no longer finite", keys, coefs)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of this step; with a penalty or KL, a non-finite one stops training before
        the update: clipping by an infinite norm zeroes the gradients, and the model would silently stop moving.
        Not under fp16 loss scaling, whose scaler skips such a step and lowers its scale."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        coefs = self._l2_coef_fields()
        scaled = self._amp_loss_scale() is not None or (self.is_deepspeed_enabled and self.args.fp16)
        if coefs and grad_norm is not None and not scaled and not math.isfinite(float(grad_norm)):
            self._l2_stop(f"at step {self.state.global_step + 1}, before its update: grad_norm = {float(grad_norm)}",
                          ("grad_norm",), coefs)
        return grad_norm

    def _l2_coef_fields(self) -> list[str]:
        """The coefficient fields of the terms in force (none: the stock Trainer's training)."""
        return ["l2_coef"] if self._l2 is not None else []

    def _l2_stop(self, what: str, keys: tuple[str, ...], coefs: list[str]) -> None:
        """Raise the `FloatingPointError` that ends a run gone non-finite: `what` happened (at which step), the
        last step that logged `keys` finite, the last checkpoint, and which settings (`coefs`) to lower."""
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        finite = [h["step"] for h in self.state.log_history
                  if any(k in h and math.isfinite(h[k]) for k in keys)]
        decoupled = " (with `l2_impl='decoupled'`, lr·α near or above 1)" if self.args.l2_impl == "decoupled" else ""
        coefs = " or ".join(f"`{c}`" for c in coefs)
        raise FloatingPointError(
            f"Training stopped {what}. Likely causes: a learning rate or {coefs} too large{decoupled}, "
            "fp16 overflow, or a non-finite θ₀ or model. The logged `loss` may not show it (`logging_nan_inf_filter`). "
            + (f"The last finite statistics were logged at step {finite[-1]}. " if finite else "")
            + (f"The last checkpoint is {last}: resume from it with a lower learning rate or {coefs}."
               if last else "No checkpoint had been saved yet.")
        )

    def _l2_metrics(self) -> dict[str, float]:
        """`l2/*` values for a training log; one host sync for all of them."""
        stats = self._l2.statistics()
        penalty = 0.5 * self._l2.coef * stats["weighted_drift_sq"] + 0.5 * self._l2.head_coef * stats["new_sq"]
        values = {"l2/penalty": penalty, "l2/weight_norm": (stats["anchored_sq"] + stats["new_sq"]).sqrt()}
        if self._l2.anchored_names:
            drift = stats["drift_sq"].sqrt()
            values["l2/drift"] = drift
            values["l2/rel_drift"] = drift / stats["anchor_sq"].sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        if self._l2_lora is not None:
            delta_sq = self._l2_lora.delta_sq().to(penalty.device)
            values["l2/penalty"] = penalty + 0.5 * self._l2_lora.coef * delta_sq
            values["l2/lora_delta"] = delta_sq.sqrt()
        numbers = torch.stack([v.float() for v in values.values()]).tolist()
        # α of the latest update, as `learning_rate` is that update's lr.
        return {**dict(zip(values, numbers)), "l2/coef": self.args.l2_coef * self._l2_factor}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self._l2_save_anchor_files(output_dir)

    def _l2_save_anchor_files(self, output_dir: str) -> None:
        """θ₀ (and F) into a checkpoint or the output folder; runs on every rank."""
        anchors = {name: t for term in self._active_l2_terms() for name, t in term.anchors.items()}
        if not anchors:
            return
        layout = self._l2.anchor_layout  # where each piece sits; the LoRA factors are always whole
        if self._l2.sharded:  # every rank holds different pieces of θ₀: each saves its own (this runs on all ranks)
            save_anchor(anchors, layout, output_dir, dist.get_rank(), world_size(), self.l2_base_model)
        elif self.args.should_save:
            save_anchor(anchors, layout, output_dir, source=self.l2_base_model)
        self._l2_save_fisher(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        terms = [t for t in self._active_l2_terms() if t.anchored_names]
        if checkpoint is None or not terms:
            return
        names = [n for t in terms for n in t.anchored_names]
        rank = dist.get_rank() if world_size() > 1 else 0
        loaded = load_anchor(checkpoint, rank, world_size(), expected_anchors(self.model, names))
        if loaded is None:
            logger.warning(
                f"{checkpoint} has no {ANCHOR_FILE}; L2-SP keeps the anchor taken when the trainer was built. "
                "Build the trainer from the pretrained model (or set `l2_anchor_path`) so that θ₀ is right."
            )
            return
        saved, layout = loaded
        self.l2_base_model = anchor_source(checkpoint, rank, world_size())
        missing = [n for t in terms for n in t.anchored_names if n not in saved]
        if missing:
            raise ValueError(
                f"{checkpoint}/{ANCHOR_FILE} lacks θ₀ for {len(missing)} penalized parameter(s), first {missing[:5]}: "
                "the penalized set differs from the checkpoint's (`l2_exclude`, `l2_exclude_bias_and_norm`, "
                "`l2_head_params` or the trainable parameters changed since). Resume with the settings of that run, "
                "or start a new run from the pretrained model."
            )
        self._l2_check_resumed_anchor(checkpoint, terms, saved, layout)
        for term in terms:
            for name in term.anchored_names:
                old = term.anchors[name]
                term.anchors[name] = saved[name].to(dtype=old.dtype, device=old.device)
        for name in self._l2.anchored_names:
            self._l2.anchor_layout[name] = layout.get(name, (0, saved[name].shape))
        self._l2_load_fisher(checkpoint)
        self._l2_unbind()  # the next step cuts the restored θ₀ to this rank's pieces

    _l2_saving_checkpoint = False

    # A full disk during any save (a checkpoint, the final weights) is one line naming the file and what to do.
    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with naming_a_full_disk(folder, checkpoint=True):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._l2_saving_checkpoint = _internal_call  # a checkpoint gets θ₀ from `_save_optimizer_and_scheduler`
        try:
            with naming_a_full_disk(output_dir or self.args.output_dir, checkpoint=_internal_call):
                super().save_model(output_dir, _internal_call)
        finally:
            self._l2_saving_checkpoint = False

    def save_weights(self, output_dir: str | None = None) -> None:
        """Also keep θ₀ (and F) beside the final weights, so that `hf-l2 interpolate` and later runs find them."""
        with naming_a_full_disk(output_dir or self.args.output_dir, checkpoint=self._l2_saving_checkpoint):
            super().save_weights(output_dir)
            if not self._l2_saving_checkpoint and self._l2 is not None and self._l2.anchored_names:
                self._l2_save_anchor_files(output_dir or self.args.output_dir)

    # ---- the Fisher weights (l2_sp_fisher) ------------------------------------------------------------------
    def _l2_prepare_fisher(self, resume_from_checkpoint) -> None:
        """Give the penalty its F once, before training: from `l2_fisher_path`, from the checkpoint being resumed
        (restored in `_load_optimizer_and_scheduler`, not recomputed), or computed on the Fisher data now, while
        the model still holds θ₀ and is not yet wrapped."""
        args = self.args
        if args.l2_mode != "l2_sp_fisher" or self._l2 is None or self._l2.fisher is not None:
            return
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
        if resume_from_checkpoint and self._l2_fisher_file(resume_from_checkpoint):
            return
        if args.l2_fisher_path:
            expected = expected_anchors(self.model, self._l2.anchored_names)
            loaded = load_fisher(args.l2_fisher_path, expected=expected, fix=FISHER_PATH_FIX)
            if loaded is None:
                raise ValueError(f"`l2_fisher_path`: no {FISHER_FILE} in {args.l2_fisher_path!r}.")
            fisher, _, source = loaded
            fisher = {n: fisher[n] for n in self._l2.anchored_names if n in fisher}
            source = {**source, "path": args.l2_fisher_path}
        else:
            dataset = self.fisher_dataset if self.fisher_dataset is not None else self.train_dataset
            if dataset is None:
                raise ValueError(
                    "`l2_mode='l2_sp_fisher'` needs data for F: pass `fisher_dataset=` or `train_dataset=`."
                )
            names = self._l2.anchored_names
            fisher, count = trainer_fisher(self, dataset, names, args.l2_fisher_samples, args.seed,
                                           ANCHOR_DTYPES[args.l2_anchor_dtype])
            which = "the training set" if self.fisher_dataset is None else "the `fisher_dataset`"
            source = {"data": getattr(dataset, "l2_fisher_description", which), "examples": count}
        fisher = self._l2_fit_fisher(fisher)
        self._l2.set_fisher(normalize_fisher(fisher) if args.l2_fisher_normalize else fisher)
        self.l2_fisher_source = {**source, "normalized": args.l2_fisher_normalize}

    def _l2_fit_fisher(self, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """F over exactly θ₀'s values: an embedding resized after θ₀ was taken keeps F on its anchored rows."""
        out = {}
        for name in self._l2.anchored_names:
            if name not in fisher:
                raise ValueError(f"`l2_fisher_path`: the saved F lacks {name!r}: was it computed for another model?")
            anchor, f = self._l2.anchors[name], fisher[name]
            if f.numel() < anchor.numel():
                raise ValueError(f"The Fisher of {name!r} has {f.numel()} values, θ₀ has {anchor.numel()}.")
            out[name] = f.reshape(-1)[: anchor.numel()].view(anchor.shape).to(device=anchor.device, dtype=anchor.dtype)
        return out

    @staticmethod
    def _l2_fisher_file(folder: str) -> bool:
        """Whether a checkpoint holds F (whole or per rank): resume restores it instead of recomputing."""
        return bool(glob.glob(os.path.join(folder, "l2_fisher*.safetensors")))

    def _l2_save_fisher(self, folder: str) -> None:
        penalty = self._l2
        if penalty is None or penalty.fisher is None:
            return
        source = self.l2_fisher_source or {}
        if penalty.sharded:
            save_fisher(penalty.fisher, penalty.fisher_layout, folder, source, dist.get_rank(), world_size())
        elif self.args.should_save:
            save_fisher(penalty.fisher, penalty.fisher_layout, folder, source)

    def _l2_load_fisher(self, checkpoint: str) -> None:
        """Restore F from the checkpoint (it is the run's own, already normalized); without one, keep the F
        computed before training."""
        if self.args.l2_mode != "l2_sp_fisher":
            return
        expected = expected_anchors(self.model, self._l2.anchored_names)
        rank = dist.get_rank() if world_size() > 1 else 0
        loaded = load_fisher(checkpoint, rank, world_size(), expected, FISHER_CHECKPOINT_FIX)
        if loaded is None:
            if self._l2.fisher is None:
                raise ValueError(f"{checkpoint} has no {FISHER_FILE} and no F was computed before resuming.")
            return
        fisher, layout, source = loaded
        self._l2.set_fisher({n: f.to(self._l2.anchors[n].device) for n, f in fisher.items()}, layout)
        self.l2_fisher_source = source

    def _l2_check_resumed_anchor(self, checkpoint, terms, saved, layout) -> None:
        """A resumed run keeps the θ₀ it was trained with: refuse an `l2_anchor_path` that says otherwise, and say
        at WARNING when the weights the trainer was built with (the θ₀ it would have taken) differ from it."""
        differ = [
            n for t in terms
            for n in differing_anchors(t.anchors, getattr(t, "anchor_layout", {}), saved, layout)
        ]
        if not differ:
            return
        from_path = [n for n in differ if n in self._l2.anchors] if self.args.l2_anchor_path else []
        if from_path:
            raise ValueError(
                f"`l2_anchor_path`={self.args.l2_anchor_path!r} differs from the θ₀ that {checkpoint} was trained "
                f"with in {len(from_path)} tensor(s), e.g. {from_path[:3]}; a resumed run keeps its own θ₀. To "
                "resume, drop `l2_anchor_path` or point it at the model this run started from; to anchor to the "
                "other model, start a new run from the checkpoint's weights without `resume_from_checkpoint`."
            )
        _warn_saved_anchor_in_force(checkpoint, differ)


def mixed_precision_turned_off(trainer) -> str | None:
    """Why the mixed precision asked for does not run, or None. `fp16=True` without a GPU is no error: accelerate
    silently turns AMP off (while the stock card still says "Native AMP")."""
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled or accelerator.native_amp or accelerator.mixed_precision == "no":
        return None
    return (f"{accelerator.mixed_precision} was asked for, but accelerate runs it only on a GPU; this run trains in "
            f"fp32 on {accelerator.device.type}")


def _warn_saved_anchor_in_force(checkpoint: str, differ: list[str]) -> None:
    logger.warning(
        f"θ₀ in force: the one saved in {checkpoint} (this run's own), not the weights the trainer was built "
        f"with, which differ in {len(differ)} tensor(s), e.g. {differ[:3]}."
    )


def _trainable_names(model) -> list[str]:
    return [n for n, piece in local_pieces(model).items() if piece.param.requires_grad]


class L2OutputAnchorMixin(L2PenaltyMixin):
    """`L2PenaltyMixin` plus the output-space anchor `l2_kl_coef`·KL(p_θ₀ ‖ p_θ) (see `hf_l2.output_anchor`).

    The KL is added to the training loss in `compute_loss` (never to the eval loss), normalized like the task
    loss; the reported `loss` stays the task loss and the mean per-token KL is logged as `l2/kl`. θ₀ that the KL
    holds beyond the penalty's goes into every checkpoint (`KL_ANCHOR_FILES`) and is restored on resume.
    `_l2_kl_logits` says where the policy's logits come from: `"outputs"` (the model's `logits`), `"backbone"`
    (hidden states projected by the output embeddings, for fused-head losses such as TRL's SFT) or None (refused).
    """

    _l2_kl_logits: str | None = "outputs"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._l2_kl: OutputAnchor | None = None
        self._l2_kl_capture: BackboneCapture | None = None
        self._l2_kl_in_loss: torch.Tensor | None = None
        self._l2_kl_window: list[torch.Tensor] = []  # [Σ KL, tokens] since the last log
        if self.args.l2_kl_coef:
            self._l2_kl = self._build_output_anchor()

    def _hp_search_setup(self, trial) -> None:
        """As the penalty (see `L2PenaltyMixin._hp_search_setup`): each trial's λ, τ and θ₀."""
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            self._l2_kl = self._build_output_anchor() if self.args.l2_kl_coef else None

    def _build_output_anchor(self) -> OutputAnchor:
        args = self.args
        where = "FSDP" if self.is_fsdp_enabled else "DeepSpeed" if self.is_deepspeed_enabled else None
        if where:
            raise ValueError(
                f"`l2_kl_coef` > 0 is not supported under {where} yet: the reference forward needs θ₀ whole on "
                "every rank. Train without FSDP/DeepSpeed (DDP works), or set `l2_kl_coef=0`."
            )
        if self._l2_kl_logits is None:
            raise ValueError(f"`l2_kl_coef` > 0 is not supported by {type(self).__name__}: set `l2_kl_coef=0`.")
        if self._l2_kl_logits == "backbone":
            self._l2_kl_capture = BackboneCapture(self.model)
        # Decoder-only models predict the next token; not `_loss_shifts_labels`, which is False for GPT-2 (its
        # `loss_type` is unset) although its loss shifts.
        self._l2_kl_shifts = not getattr(self.model.config, "is_encoder_decoder", False)
        shared = {}
        if args.l2_anchor_path is None:  # anchors taken from the model as it is now: θ₀ of the reference too
            for term in self._active_l2_terms():
                shared.update({n: (lambda t=term, n=n: t.anchors[n]) for n in term.anchored_names})
        anchor = OutputAnchor(self.model, args.l2_kl_coef, args.l2_kl_temperature, shared)
        logger.info(
            f"Output anchor (KL, λ={args.l2_kl_coef}, τ={args.l2_kl_temperature}): θ₀ of {len(anchor.shared)} "
            f"tensors shared with the penalty, {len(anchor.own)} snapshot ({anchor.own_bytes:,} bytes)."
        )
        return anchor

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._l2_kl is None:
            return loss
        # The returned loss is (task + KL)/d: report the task part only.
        return loss - self._l2_kl_in_loss.to(loss.device, loss.dtype) / self._loss_divisor(num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._l2_kl is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        reference_inputs = dict(inputs)  # before the trainer's compute_loss pops or adds keys
        if self._l2_kl_capture is not None:
            with self._l2_kl_capture.capture():
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            policy = self._l2_kl_capture.target_logits(labels, shift_labels)
            reference_inputs.pop("labels", None)  # the reference needs the logits, not the loss
        else:
            out = super().compute_loss(model, inputs, True, num_items_in_batch)
            logits = out[1]["logits"] if isinstance(out[1], dict) else out[1][1]
            if not logits.requires_grad:
                raise ValueError(f"`l2_kl_coef`: {type(self).__name__}.compute_loss returned logits without gradient.")
            policy = target_logits(logits, labels, shift_labels, self._l2_kl_shifts)
        loss, outputs = out if return_outputs or self._l2_kl_capture is None else (out, None)
        reference = self._l2_kl.reference_outputs(self.accelerator.unwrap_model(model), reference_inputs)["logits"]
        kl_sum = token_kl_sum(policy, target_logits(reference, labels, shift_labels, self._l2_kl_shifts),
                              self._l2_kl.temperature)
        term = self._l2_kl.coef * kl_sum / self._kl_normalizer(len(policy), num_items_in_batch)
        self._l2_kl_in_loss = term.detach()
        self._l2_kl_window.append(torch.stack([kl_sum.detach(), kl_sum.new_tensor(float(len(policy)))]))
        loss = loss + term.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _l2_coef_fields(self) -> list[str]:
        return super()._l2_coef_fields() + (["l2_kl_coef"] if self._l2_kl is not None else [])

    def _kl_normalizer(self, tokens: int, num_items_in_batch) -> float | torch.Tensor:
        """What Σ KL is divided by so that it is weighted exactly like the task loss (see `Trainer.compute_loss`).

        Normalized by `num_items_in_batch` (the accumulated batch's tokens, over all processes with
        `average_tokens_across_devices`, which the Trainer offsets by ×num_processes against DDP's averaging);
        otherwise a mean over this micro-batch's tokens, which `training_step` divides by the accumulation steps.
        """
        if num_items_in_batch is None or not self._loss_is_scaled(num_items_in_batch):
            return max(tokens, 1)
        processes = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return num_items_in_batch / (processes if self.args.average_tokens_across_devices else 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._l2_kl_window and "loss" in logs:
            total = torch.stack(self._l2_kl_window).sum(0)
            self._l2_kl_window = []
            if world_size() > 1:  # `log` runs on every process at the same step
                dist.all_reduce(total)
            kl_sum, tokens = total.tolist()
            logs["l2/kl"] = kl_sum / max(tokens, 1.0)
        super().log(logs, start_time)

    # ---- checkpoints: θ₀ of the parameters the penalty does not hold ------------------------------------------
    def _l2_save_anchor_files(self, output_dir: str) -> None:
        """Also the KL's own snapshot, in every checkpoint (and beside the final weights with the penalty's θ₀).
        Written even when empty, so that a checkpoint without it is known to predate it; the snapshot is whole on
        every process (no sharding with the KL), so the main one writes it."""
        super()._l2_save_anchor_files(output_dir)
        if self._l2_kl is not None and self.args.should_save:
            save_anchor(self._l2_kl.own, {}, output_dir, files=KL_ANCHOR_FILES)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the penalty's θ₀, which the KL reads where shared
        if checkpoint is not None and self._l2_kl is not None and self._l2_kl.own:
            self._l2_restore_kl_snapshot(checkpoint)

    def _l2_restore_kl_snapshot(self, checkpoint: str) -> None:
        """The run's own θ₀ for the KL's snapshot, checked like the penalty's; a trainer built from other weights
        (e.g. the checkpoint's) says at WARNING that it does not use them."""
        own, name = self._l2_kl.own, KL_ANCHOR_FILES[0]
        expected = {n: ExpectedAnchor(tuple(t.shape)) for n, t in own.items()}  # exactly the parameter's shape
        loaded = load_anchor(checkpoint, expected=expected, files=KL_ANCHOR_FILES)
        if loaded is None:
            logger.warning(
                f"{checkpoint} has no {name} (saved by an older hf_l2): the KL keeps θ₀ of {len(own)} tensor(s) the "
                "penalty does not hold as they were when the trainer was built. Build the trainer from the model "
                "the run started from so that the reference is right."
            )
            return
        saved, _ = loaded
        missing = [n for n in own if n not in saved]
        if missing:
            raise ValueError(
                f"{checkpoint}/{name} lacks θ₀ for {len(missing)} parameter(s) of the KL's reference, first "
                f"{missing[:5]}: the trainable parameters or the penalty's settings (`l2_mode`, `l2_exclude`, "
                "`l2_anchor_path`, `l2_anchor_dtype`, `l2_anchor_device`) differ from that run's. Resume with the "
                "settings of that run, or start a new run."
            )
        differ = differing_anchors(own, {}, saved, {})
        if differ:
            _warn_saved_anchor_in_force(checkpoint, differ)
        self._l2_kl.restore(saved)


def _with_l2_config(args: tuple, kwargs: dict, trainer: L2PenaltyMixin) -> tuple[tuple, dict]:
    """The Trainer's arguments with `args` an `L2Config`: without one, the trainer's default (`_l2_default_args`).
    Stock `TrainingArguments` are refused: converting them would train with a penalty nobody chose, and a warning
    in a log is easy to miss."""
    positional = len(args) > 1
    config = args[1] if positional else kwargs.get("args")
    if config is None:
        config = trainer._l2_default_args(args[0] if args else kwargs.get("model"))
    elif not isinstance(config, L2Config):
        wanted = trainer.l2_config_class()  # named as imported: `hf_l2.L2Config`, `hf_l2.integrations.trl.L2SFTConfig`
        raise TypeError(
            f"`args` must be an `{wanted.__module__.removesuffix('.config')}.{wanted.__name__}`, got "
            f"{type(config).__name__}: build it from yours plus the penalty you want, e.g. "
            f"`{wanted.__name__}.from_training_args(args, l2_coef=0.01)` (every field kept, the Hub token too)."
        )
    if positional:
        return (args[0], config, *args[2:]), kwargs
    return args, {**kwargs, "args": config}
