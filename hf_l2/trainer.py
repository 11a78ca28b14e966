"""The Trainer layer: `L2PenaltyMixin` (the penalty in the step, its logging, θ₀ in checkpoints) and
`L2TokenLossMixin` (that plus DFT token weighting and the KL anchor). `hf_l2.trainers` adds publishing and builds
`L2Trainer`."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, unwrap_peft_model
from transformers.utils import logging

from hf_l2.anchor import read_weights
from hf_l2.builder import build_lora_penalty, build_penalty
from hf_l2.callbacks import WeightNormCallback
from hf_l2.config import ANCHOR_DTYPES, ANCHORED_MODES, L2Config, validate_l2_fields
from hf_l2.disk_full import naming_a_full_disk
from hf_l2.fisher import trainer_fisher
from hf_l2.loss_kwargs import loss_reads_num_items
from hf_l2.optimizers import in_backward_optimizer
from hf_l2.output_anchor import BackboneCapture, OutputAnchor, token_kl_sum
from hf_l2.output_lock import holding_output_dir
from hf_l2.penalty import L2Penalty
from hf_l2.penalty_term import L2Terms
from hf_l2.regularizer import FINITE_KEYS, L2Regularizer, non_finite_stop, not_finite, trainable_names
from hf_l2.saved_state import has_fisher_file, read_fisher_path, read_kl_snapshot, save_kl_snapshot
from hf_l2.sharding import local_pieces, world_size
from hf_l2.target_tokens import target_ids, target_logits
from hf_l2.token_weighting import dft_token_sums

logger = logging.get_logger(__name__)


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
    Everything done with them lives in an `L2Regularizer` (`hf_l2.regularizer`); this class only calls it from the
    Trainer's hooks. Publishing (card, Hub) is `L2PublishingMixin`'s; `L2TrainerMixin` combines both.

    `fisher_dataset` (`l2_mode="l2_sp_fisher"`): the examples the Fisher F is computed on, before the first step;
    default: the training set.
    """

    args: L2Config
    l2_base_model: str | None = None  # the model's `_name_or_path` when built (None: a model built from a config)
    default_config: type[L2Config] = L2Config  # what `args=None` becomes

    def __init__(self, *args, fisher_dataset=None, **kwargs):
        args, kwargs = _with_l2_config(args, kwargs, self)  # before `Trainer.__init__` runs
        super().__init__(*args, **kwargs)
        token_terms = [f for f in ("l2_kl_coef", "l2_token_weighting") if getattr(self.args, f) not in (0, "none")]
        if token_terms and not isinstance(self, L2TokenLossMixin):
            raise TypeError(
                f"`{token_terms[0]}` needs the token-level loss hooks: build `{type(self).__name__}` on "
                "`L2TrainerMixin` (or `L2TokenLossMixin`) instead of `L2PenaltyMixin`."
            )
        self.fisher_dataset = fisher_dataset
        self._l2_regularizer: L2Regularizer | None = None  # `_l2_build_regularizer` sets it (None: no penalty)
        self._l2_add_to_loss = False
        self._l2_in_loss: torch.Tensor | None = None
        self._move_weight_norm_callbacks_first()
        self._treat_mean_loss_as_mean()
        if (precision_off := mixed_precision_turned_off(self)) is not None:
            logger.warning(f"Mixed precision is off: {precision_off} (the model card says so).")
        self._l2_build_regularizer()

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

    def _l2_build_regularizer(self) -> None:
        """The penalty's terms from `self.args` and θ₀ from `self.model` (or `l2_anchor_path`), after refusing the
        set-ups where `l2_impl` could not reach the weights."""
        self._l2_regularizer = None
        # The model fine-tuned (θ₀ unless `l2_anchor_path`), named in the card; saved with θ₀ in checkpoints, so
        # that a run resumed on a model loaded from a checkpoint still names the pretrained one.
        self.l2_base_model = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        args = self.args
        if not args.l2_enabled:
            return
        self._refuse_unreachable_impl()
        lora = None
        if args.l2_lora_delta:
            lora = build_lora_penalty(self.model, args.l2_coef, args.l2_exclude, ANCHOR_DTYPES[args.l2_anchor_dtype])
        penalty = self._build_penalty(frozenset(lora.anchored_names if lora else ()))
        self._l2_regularizer = L2Regularizer(penalty, lora, mode=args.l2_mode, impl=args.l2_impl,
                                             schedule=args.l2_schedule, trainable=trainable_names(self.model))
        if args.l2_impl == "decoupled" and self.optimizer is None:  # a user's optimizer is checked at step 1
            self._l2_regularizer.check_pull_rate(args.learning_rate)

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
        if self._l2_regularizer is not None:
            self._l2_regularizer.unbind()
        self._l2_build_regularizer()
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
            anchor_weights=read_weights(args.l2_anchor_path)
            if args.l2_anchor_path and args.l2_mode in ANCHORED_MODES else None,
            dtype=ANCHOR_DTYPES[args.l2_anchor_dtype],
            device="cpu" if args.l2_anchor_device == "cpu" else None,
        )
        pieces = local_pieces(model)  # ZeRO-3 `zero.Init` placeholders count by their real size
        count = lambda names: sum(math.prod(pieces[n].shape) for n in names)  # noqa: E731
        logger.info(
            f"L2 penalty ({args.l2_mode}, impl={args.l2_impl}): {len(penalty.anchored_names)} anchored tensors "
            f"({count(penalty.anchored_names):,} values), {len(penalty.new_names)} new tensors "
            f"({count(penalty.new_names):,} values)."
        )
        return penalty

    def _move_weight_norm_callbacks_first(self) -> None:
        """Reporting callbacks (TensorBoard, W&B) only see keys added to `logs` by callbacks that run before them."""
        callbacks = self.callback_handler.callbacks
        norms = [cb for cb in callbacks if isinstance(cb, WeightNormCallback)]
        callbacks[:] = norms + [cb for cb in callbacks if not isinstance(cb, WeightNormCallback)]

    # ---- the terms -------------------------------------------------------------------------------------------
    @property
    def l2_terms(self) -> L2Terms:
        """The penalty's terms (read-only; both None with `l2_mode="none"`)."""
        return self._l2_regularizer.terms if self._l2_regularizer is not None else L2Terms(None, None)

    @property
    def l2_fisher_source(self) -> dict | None:
        """Where F came from (data, examples, or the file), for the card; None without F."""
        return self._l2_regularizer.fisher_source if self._l2_regularizer is not None else None

    def bound_l2_terms(self) -> L2Terms:
        """`l2_terms`, bound to the model's parameters if training has not bound them yet (e.g. a card written
        before training); call it on every process."""
        if self._l2_regularizer is not None and not self._l2_regularizer.bound:
            self._l2_regularizer.bind_terms(self.model)
        return self.l2_terms

    # ---- training -------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        # One run per output folder (see `hf_l2.output_lock`), before anything reads or writes in it.
        with holding_output_dir(self.args.output_dir, self.is_world_process_zero()):
            self._l2_prepare_fisher(kwargs.get("resume_from_checkpoint", args[0] if args else None))
            if self._l2_regularizer is not None:
                self._l2_regularizer.unbind()  # `accelerator.prepare` may swap parameter objects: rebind on step 1
            try:
                return super().train(*args, **kwargs)
            finally:
                if self._l2_regularizer is not None:  # leave no hook on an optimizer the user may step by hand
                    self._l2_regularizer.detach_pull()

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
        regularizer = self._l2_regularizer
        if regularizer is None or not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        if not regularizer.bound:
            regularizer.bind(self.model, self.optimizer)
        # This micro-batch ends the window of the update from `global_step` to `global_step + 1`.
        regularizer.start_step(self.state.global_step, self.state.max_steps)
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
        regularizer.add_to_grads_(scale=self._amp_loss_scale())
        return loss

    def _amp_loss_scale(self) -> torch.Tensor | None:
        """fp16 gradients are still multiplied by the GradScaler's scale here; ∇Ω must carry it too."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # a device tensor: no host sync

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self._l2_task_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self._l2_add_to_loss and model.training):
            return out
        loss, outputs = out if return_outputs else (out, None)
        term = self._l2_regularizer.loss_term(loss.device)
        self._l2_in_loss = term.detach()
        # Added after the Trainer's ×num_processes (else DDP would count it N times) and pre-multiplied by the
        # divisor `training_step` applies next, so Ω counts once per optimizer step.
        loss = loss + term.to(loss.device) * self._loss_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _l2_task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The loss Ω is added to: the trainer's own (`L2TokenLossMixin` reweights it and adds the KL)."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ---- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (`l2/kl`, if any, is in `logs` already: see `L2TokenLossMixin.log`)
            if self._l2_regularizer is not None and self._l2_regularizer.bound:
                logs.update(self._l2_regularizer.log_values())
            self._l2_stop_if_not_finite(logs)
        super().log(logs, start_time)

    def _l2_stop_if_not_finite(self, logs: dict[str, float]) -> None:
        """A NaN or infinite Ω, drift or KL means the weights are garbage: stop now, before the next checkpoint
        saves them (a non-finite KL is in the loss of the step just taken, so its update is non-finite too)."""
        bad = not_finite(logs)
        if bad:
            coefs = ["l2_coef", "l2_kl_coef"] if "l2/kl" in bad else ["l2_coef"]
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            self._l2_stop(f"at step {self.state.global_step}: {what}, so the weights are no longer finite",
                          FINITE_KEYS, coefs)

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
        return ["l2_coef"] if self._l2_regularizer is not None else []

    def _l2_stop(self, what: str, keys: tuple[str, ...], coefs: list[str]) -> None:
        """Raise the `FloatingPointError` that ends a run gone non-finite (see `hf_l2.regularizer.non_finite_stop`)."""
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        raise non_finite_stop(what, keys, coefs, self.args.l2_impl, self.state.log_history, last)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self._l2_save_state(output_dir)

    def _l2_save_state(self, output_dir: str) -> None:
        """θ₀ (and F) into a checkpoint or the output folder; runs on every rank."""
        if self._l2_regularizer is not None:
            self._l2_regularizer.save(output_dir, self.l2_base_model, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self._l2_regularizer is None:
            return
        restored = self._l2_regularizer.restore(checkpoint, self.model, self.args.l2_anchor_path)
        if restored is not None:
            self.l2_base_model = restored.source

    # A full disk during any save (a checkpoint, the final weights) is one line naming the file and what to do.
    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with naming_a_full_disk(folder, checkpoint=True):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # A checkpoint (`_internal_call`) gets θ₀ from `_save_optimizer_and_scheduler`.
        with naming_a_full_disk(output_dir or self.args.output_dir, checkpoint=_internal_call):
            super().save_model(output_dir, _internal_call)

    def save_weights(self, output_dir: str | None = None) -> None:
        """Save the model and tokenizer, and θ₀ (and F) beside them so that `hf-l2 interpolate` and later runs find
        them: no card, no push (what `push_to_hub` saves)."""
        output_dir = output_dir or self.args.output_dir
        with naming_a_full_disk(output_dir, checkpoint=False):
            super().save_model(output_dir, _internal_call=True)
            if self._l2_regularizer is not None and self._l2_regularizer.penalty.anchored_names:
                self._l2_save_state(output_dir)

    # ---- the Fisher weights (l2_sp_fisher) ------------------------------------------------------------------
    def _l2_prepare_fisher(self, resume_from_checkpoint) -> None:
        """Give the penalty its F once, before training: from `l2_fisher_path`, from the checkpoint being resumed
        (restored in `_load_optimizer_and_scheduler`, not recomputed), or computed on the Fisher data now, while
        the model still holds θ₀ and is not yet wrapped."""
        args, regularizer = self.args, self._l2_regularizer
        if regularizer is None or not regularizer.needs_fisher:
            return
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
        if resume_from_checkpoint and has_fisher_file(resume_from_checkpoint):
            return
        names = regularizer.penalty.anchored_names
        if args.l2_fisher_path:
            fisher, source = read_fisher_path(args.l2_fisher_path, self.model, names)
        else:
            dataset = self.fisher_dataset if self.fisher_dataset is not None else self.train_dataset
            if dataset is None:
                raise ValueError(
                    "`l2_mode='l2_sp_fisher'` needs data for F: pass `fisher_dataset=` or `train_dataset=`."
                )
            fisher, count = trainer_fisher(self, dataset, names, args.l2_fisher_samples, args.seed,
                                           ANCHOR_DTYPES[args.l2_anchor_dtype])
            which = "the training set" if self.fisher_dataset is None else "the `fisher_dataset`"
            source = {"data": getattr(dataset, "l2_fisher_description", which), "examples": count}
        regularizer.set_fisher(fisher, source, args.l2_fisher_normalize)


def mixed_precision_turned_off(trainer) -> str | None:
    """Why the mixed precision asked for does not run, or None. `fp16=True` without a GPU is no error: accelerate
    silently turns AMP off (while the stock card still says "Native AMP")."""
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled or accelerator.native_amp or accelerator.mixed_precision == "no":
        return None
    return (f"{accelerator.mixed_precision} was asked for, but accelerate runs it only on a GPU; this run trains in "
            f"fp32 on {accelerator.device.type}")


class L2TokenLossMixin(L2PenaltyMixin):
    """`L2PenaltyMixin` plus the token-level parts of the training loss, the two halves of Anchored SFT:
    `l2_token_weighting="dft"` (the task loss's tokens weighted by their detached probabilities, see
    `hf_l2.token_weighting`) and the output-space anchor `l2_kl_coef`·KL(p_θ₀ ‖ p_θ) (see `hf_l2.output_anchor`).

    Both are sums over the target tokens divided by what the task loss is divided by, formed in `_l2_task_loss`
    (so Ω is added on top, as to any task loss; training only: the eval loss stays the model's own). The reported
    `loss` is the task loss (DFT-weighted with "dft"); `l2/kl` logs the mean per-token KL and, with "dft", `l2/ce`
    the plain cross-entropy. θ₀ that the KL holds beyond the penalty's goes into every checkpoint
    (`KL_ANCHOR_FILES`, per rank under FSDP2) and is restored on resume.
    `_l2_token_logits` says where the policy's logits come from: `"outputs"` (the model's `logits`), `"backbone"`
    (hidden states projected by the output embeddings, for fused-head losses such as TRL's SFT) or None (the KL
    is refused). `_l2_dft_by` says who weights the task loss for "dft": `"hf_l2"` (here), `"loss_type"` (the
    trainer's own `loss_type="dft"`, TRL's SFT) or None (refused: the trainer's loss is not a token loss).
    """

    _l2_token_logits: str | None = "outputs"
    _l2_dft_by: str | None = "hf_l2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._l2_kl: OutputAnchor | None = None
        self._l2_kl_capture: BackboneCapture | None = None
        self._l2_kl_in_loss: torch.Tensor | None = None
        self._l2_dft = self._l2_check_token_weighting()
        self._l2_token_window: dict[str, list[torch.Tensor]] = {}  # log key → [Σ, tokens] per micro-batch
        # Decoder-only models predict the next token; not `_loss_shifts_labels`, which is False for GPT-2 (its
        # `loss_type` is unset) although its loss shifts.
        self._l2_shifts = not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        if self.args.l2_kl_coef:
            self._l2_kl = self._build_output_anchor()

    def _l2_check_token_weighting(self) -> bool:
        """Whether `_l2_task_loss` weights the task loss's tokens itself (DFT); refuse what it cannot do exactly."""
        args = self.args
        if args.l2_token_weighting == "none":
            return False
        name = type(self).__name__
        if self._l2_dft_by is None:
            raise ValueError(
                f"`l2_token_weighting='{args.l2_token_weighting}'` weights the target tokens of a language-modeling "
                f"loss; {name}'s loss is not one. Set `l2_token_weighting='none'`."
            )
        if self._l2_dft_by == "loss_type":
            if getattr(args, "loss_type", None) != args.l2_token_weighting:
                raise ValueError(
                    f"{name} weights its tokens by its own `loss_type`: with `l2_token_weighting="
                    f"'{args.l2_token_weighting}'` set `loss_type='{args.l2_token_weighting}'` too (its L2 config "
                    "does so when built)."
                )
            return False
        conflicts = [f for f, on in (("label_smoothing_factor", args.label_smoothing_factor),
                                     ("compute_loss_func", self.compute_loss_func is not None)) if on]
        if conflicts:
            raise ValueError(
                f"`l2_token_weighting='{args.l2_token_weighting}'` replaces the task loss by the weighted "
                f"cross-entropy of the target tokens, which leaves no room for `{conflicts[0]}`: drop one of the two."
            )
        return True

    def _hp_search_setup(self, trial) -> None:
        """As the penalty (see `L2PenaltyMixin._hp_search_setup`): each trial's λ, τ and θ₀."""
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            self._l2_dft = self._l2_check_token_weighting()
            self._l2_kl = self._build_output_anchor() if self.args.l2_kl_coef else None

    def _build_output_anchor(self) -> OutputAnchor:
        args = self.args
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)  # as `Trainer` tells FSDP2 from FSDP1
        fsdp1 = self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2
        where = "FSDP1" if fsdp1 else "DeepSpeed" if self.is_deepspeed_enabled else None
        if where:
            raise ValueError(
                f"`l2_kl_coef` > 0 is not supported under {where}: the reference forward swaps θ₀ into the "
                "parameters that the forward gathers, which only FSDP2 exposes (as DTensor shards). Use FSDP2 "
                "(accelerate: `fsdp_version: 2`) or DDP, or set `l2_kl_coef=0`."
            )
        if self._l2_token_logits is None:
            raise ValueError(f"`l2_kl_coef` > 0 is not supported by {type(self).__name__}: set `l2_kl_coef=0`.")
        if self._l2_token_logits == "backbone":
            self._l2_kl_capture = BackboneCapture(self.model)
        shared = {}
        if args.l2_anchor_path is None:  # anchors taken from the model as it is now: θ₀ of the reference too
            for term in filter(None, self.l2_terms):
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

    def _l2_task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        if not model.training or (self._l2_kl is None and not self._l2_dft):
            return super()._l2_task_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        reference = None
        if self._l2_kl is not None:  # before the training forward, which FSDP2 must gather θ for afterwards (see
            # `hf_l2.sharded_reference`); its target rows at once, so the whole logits are freed
            reference = self._l2_kl.reference_outputs(self.accelerator.unwrap_model(model), inputs)["logits"]
            reference = target_logits(reference, labels, shift_labels, self._l2_shifts)
        if self._l2_kl_capture is not None:
            with self._l2_kl_capture.capture():
                out = super()._l2_task_loss(model, inputs, return_outputs, num_items_in_batch)
            policy = self._l2_kl_capture.target_logits(labels, shift_labels)
        else:
            out = super()._l2_task_loss(model, inputs, True, num_items_in_batch)
            logits = out[1]["logits"] if isinstance(out[1], dict) else out[1][1]
            if not logits.requires_grad:
                raise ValueError(f"{type(self).__name__}.compute_loss returned logits without gradient: "
                                 "`l2_kl_coef` and `l2_token_weighting` need them.")
            policy = target_logits(logits, labels, shift_labels, self._l2_shifts)
        loss, outputs = out if return_outputs or self._l2_kl_capture is None else (out, None)
        divisor = self._token_sum_divisor(len(policy), num_items_in_batch)
        tokens = float(len(policy))
        if self._l2_dft:  # the model's own loss is replaced by the weighted one over the same tokens
            weighted, ce_sum = dft_token_sums(policy, target_ids(labels, shift_labels, self._l2_shifts))
            loss = (weighted / divisor).to(loss.device, loss.dtype)
            self._l2_log_tokens("l2/ce", ce_sum, tokens)
        if reference is not None:
            kl_sum = token_kl_sum(policy, reference, self._l2_kl.temperature)
            term = self._l2_kl.coef * kl_sum / divisor
            self._l2_kl_in_loss = term.detach()
            self._l2_log_tokens("l2/kl", kl_sum.detach(), tokens)
            loss = loss + term.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _l2_log_tokens(self, key: str, total: torch.Tensor, tokens: float) -> None:
        self._l2_token_window.setdefault(key, []).append(torch.stack([total, total.new_tensor(tokens)]))

    def _l2_coef_fields(self) -> list[str]:
        return super()._l2_coef_fields() + (["l2_kl_coef"] if self._l2_kl is not None else [])

    def _token_sum_divisor(self, tokens: int, num_items_in_batch) -> float | torch.Tensor:
        """What a sum over the target tokens is divided by, to be weighted exactly like the task loss (see
        `Trainer.compute_loss`).

        Normalized by `num_items_in_batch` (the accumulated batch's tokens, over all processes with
        `average_tokens_across_devices`, which the Trainer offsets by ×num_processes against DDP's averaging);
        otherwise a mean over this micro-batch's tokens, which `training_step` divides by the accumulation steps.
        """
        if num_items_in_batch is None or not self._loss_is_scaled(num_items_in_batch):
            return max(tokens, 1)
        processes = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return num_items_in_batch / (processes if self.args.average_tokens_across_devices else 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._l2_token_window and "loss" in logs:
            window, self._l2_token_window = self._l2_token_window, {}
            for key, parts in window.items():
                total = torch.stack(parts).sum(0)
                if world_size() > 1:  # `log` runs on every process at the same step
                    dist.all_reduce(total)
                token_sum, tokens = total.tolist()
                logs[key] = token_sum / max(tokens, 1.0)
        super().log(logs, start_time)

    # ---- checkpoints: θ₀ of the parameters the penalty does not hold ------------------------------------------
    def _l2_save_state(self, output_dir: str) -> None:
        """Also the KL's own snapshot, in every checkpoint (and beside the final weights with the penalty's θ₀):
        under FSDP2 each rank writes its shards, else the main process the whole of it."""
        super()._l2_save_state(output_dir)
        if self._l2_kl is not None:
            save_kl_snapshot(self._l2_kl.own, self._l2_kl.own_layout, output_dir, self._l2_kl.sharded,
                             self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the penalty's θ₀, which the KL reads where shared
        if checkpoint is not None and self._l2_kl is not None and self._l2_kl.own:
            saved = read_kl_snapshot(checkpoint, self._l2_kl.own, self._l2_kl.own_layout)
            if saved is not None:
                self._l2_kl.restore(*saved)


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
