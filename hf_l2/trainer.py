"""`L2Trainer` and `L2Seq2SeqTrainer`: the stock trainers plus the penalty, its logging and its checkpointing."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import HfApi
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.utils import logging

from .anchor import ANCHOR_FILE, l2_sp_penalty, load_anchor, read_weights, save_anchor
from .callbacks import WeightNormCallback
from .config import ANCHOR_DTYPES, L2Config
from .decoupled import DecoupledPull
from .hub import ensure_repo, upload_run
from .lora import LoraDeltaPenalty, find_lora_layers
from .model_card import measure_penalty, write_model_card
from .penalty import L2Penalty, compile_patterns, select_parameters, snapshot
from .sharding import local_pieces, world_size

logger = logging.get_logger(__name__)


class L2PenaltyMixin:
    """Adds Ω to any `Trainer` subclass; `args` must be an [`L2Config`].

    The penalty enters once per optimizer step, on the micro-batch where `accelerator.sync_gradients` is true:
    `l2_impl="grad"` adds ∇Ω to the gradients right after that backward (so clipping and `grad_norm` see it);
    `l2_impl="loss"` adds Ω to that micro-batch's loss, scaled so that the Trainer's own division by the
    accumulation steps leaves exactly Ω; `l2_impl="decoupled"` steps on Ω alone inside `optimizer.step()` (see
    `hf_l2.decoupled`). The coefficient schedule is evaluated there too, from `state.global_step`. The logged
    `loss` is always the task loss.

    Ω has up to two terms: `_l2` (an `L2Penalty` over ordinary parameters, PEFT `modules_to_save` copies included)
    and, with `l2_lora_delta`, `_l2_lora` (a `LoraDeltaPenalty` over the LoRA factors).
    """

    args: L2Config

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, L2Config):
            raise TypeError(
                f"`args` must be an `hf_l2.L2Config` (or `L2Seq2SeqConfig`), got {type(self.args).__name__}: "
                "build it with the same arguments plus the `l2_*` fields."
            )
        self._l2: L2Penalty | None = None
        self._l2_lora: LoraDeltaPenalty | None = None
        self._l2_pull: DecoupledPull | None = None
        self._l2_factor = 1.0  # the schedule's factor used by the latest optimizer step
        self._card_info: dict = {}  # what `create_model_card` was told, for the cards written after it
        self._l2_add_to_loss = False
        self._l2_in_loss: torch.Tensor | None = None
        self._move_weight_norm_callbacks_first()
        if not self.args.l2_enabled:
            return
        if self.is_deepspeed_enabled and self.args.l2_impl != "loss":
            raise ValueError(
                f"`l2_impl='{self.args.l2_impl}'` cannot work under DeepSpeed: the engine steps inside `backward`, "
                "before a gradient could be added or a step hooked. Use `l2_impl='loss'`."
            )
        self._l2_lora = self._build_lora_penalty(self.model)
        skip = frozenset(self._l2_lora.anchored_names if self._l2_lora else ())
        self._l2 = self._build_penalty(self.model, skip)

    # ---- construction ---------------------------------------------------------------------------------------
    def _build_lora_penalty(self, model: nn.Module) -> LoraDeltaPenalty | None:
        args = self.args
        if not args.l2_lora_delta:
            return None
        layers = find_lora_layers(model, compile_patterns(args.l2_exclude, "l2_exclude"))
        if not layers:
            raise ValueError(
                "`l2_lora_delta=True` but the model has no trainable LoRA layer: wrap it with "
                "`peft.get_peft_model(model, LoraConfig(...))`, or set `l2_lora_delta=False`."
            )
        names = [n for spec in layers for n in (*spec.a_names, *spec.b_names)]
        anchors = snapshot(dict(model.named_parameters()), names, ANCHOR_DTYPES[args.l2_anchor_dtype], None)
        logger.info(f"L2-SP on LoRA weight changes: {len(layers)} adapted layers.")
        return LoraDeltaPenalty(args.l2_coef, layers, anchors)

    def _build_penalty(self, model: nn.Module, skip: frozenset[str] = frozenset()) -> L2Penalty:
        """The L2 / L2-SP term over trainable parameters, except those in `skip` (the LoRA factors, if covered)."""
        args = self.args
        parameters = {n: p for n, p in model.named_parameters() if n not in skip}  # tied weights appear once
        no_decay = (
            frozenset(parameters) - frozenset(self.get_decay_parameter_names(model))
            if args.l2_exclude_bias_and_norm
            else frozenset()
        )
        head = compile_patterns(args.l2_head_params, "l2_head_params") if args.l2_mode == "l2_sp" else []
        selection = select_parameters(
            parameters.items(),
            exclude=compile_patterns(args.l2_exclude, "l2_exclude"),
            exclude_names=no_decay,
            new=head,
        )
        for pattern in selection.unmatched_patterns:
            if not any(re.search(pattern, n) for n in skip):
                logger.warning(f"L2 penalty: pattern {pattern!r} matches no trainable parameter.")
        if not selection.anchored and not selection.new and not skip:
            logger.warning("L2 penalty: no trainable parameter is regularized; training is unpenalized.")

        if args.l2_mode == "l2":
            penalty = L2Penalty(0.0, args.l2_coef, [], selection.anchored + selection.new)
        else:
            dtype = ANCHOR_DTYPES[args.l2_anchor_dtype]
            device = "cpu" if args.l2_anchor_device == "cpu" else None
            weights = read_weights(args.l2_anchor_path) if args.l2_anchor_path else None
            penalty, absent = l2_sp_penalty(
                model, parameters, selection, args.l2_coef, args.l2_head_coef, weights, dtype, device
            )
            if absent:
                logger.info(f"L2-SP: {len(absent)} parameter(s) absent from the anchor are new, e.g. {absent[:3]}")

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

    # ---- training -------------------------------------------------------------------------------------------
    def _l2_terms(self) -> list[L2Penalty | LoraDeltaPenalty]:
        return [t for t in (self._l2, self._l2_lora) if t is not None]

    def _l2_unbind(self) -> None:
        """Forget the live parameters (and the optimizer hook): the next optimizer step binds them afresh."""
        for term in self._l2_terms():
            term.unbind()
        if self._l2_pull is not None:
            self._l2_pull.detach()
            self._l2_pull = None

    def _l2_bind(self) -> None:
        self._l2_bind_terms()
        if self.args.l2_impl == "decoupled":
            self._l2_pull = DecoupledPull(self._l2_terms()).attach(self.optimizer)

    def _l2_bind_terms(self) -> None:
        # After `accelerator.prepare`: under FSDP / ZeRO-3 the pieces are this rank's shards, and θ₀ is cut to match.
        self._l2.bind(local_pieces(self.model))
        if self._l2_lora is not None:
            self._l2_lora.bind(dict(self.model.named_parameters()))

    def train(self, *args, **kwargs):
        self._l2_unbind()  # `accelerator.prepare` may swap parameter objects: rebind on the first step
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._l2_pull is not None:  # leave no hook on an optimizer the user may step by hand
                self._l2_pull.detach()

    def _loss_divisor(self, num_items_in_batch) -> int:
        """What `Trainer.training_step` will divide this micro-batch's loss by (mirrors its own test)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1 if scaled else self.current_gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._l2 is None or not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self._l2.bound:
            self._l2_bind()
        # This micro-batch ends the window of the update from `global_step` to `global_step + 1`.
        self._l2_factor = self.args.l2_schedule(self.state.global_step, self.state.max_steps)
        for term in self._l2_terms():
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
        for term in self._l2_terms():
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
        term = sum(t.loss_term().to(loss.device) for t in self._l2_terms())
        self._l2_in_loss = term.detach()
        # Added after the Trainer's ×num_processes (else DDP would count it N times) and pre-multiplied by the
        # divisor `training_step` applies next, so Ω counts once per optimizer step.
        loss = loss + term.to(loss.device) * self._loss_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ---- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._l2 is not None and self._l2.bound and "loss" in logs:
            logs.update(self._l2_metrics())
        super().log(logs, start_time)

    def _l2_metrics(self) -> dict[str, float]:
        """`l2/*` values for a training log; one host sync for all of them."""
        stats = self._l2.statistics()
        penalty = 0.5 * self._l2.coef * stats["drift_sq"] + 0.5 * self._l2.head_coef * stats["new_sq"]
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
        anchors = {name: t for term in self._l2_terms() for name, t in term.anchors.items()}
        if not anchors:
            return
        layout = self._l2.anchor_layout  # where each piece sits; the LoRA factors are always whole
        if self._l2.sharded:  # every rank holds different pieces of θ₀: each saves its own (this runs on all ranks)
            save_anchor(anchors, layout, output_dir, dist.get_rank(), world_size())
        elif self.args.should_save:
            save_anchor(anchors, layout, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        terms = [t for t in self._l2_terms() if t.anchored_names]
        if checkpoint is None or not terms:
            return
        loaded = load_anchor(checkpoint, dist.get_rank() if world_size() > 1 else 0, world_size())
        if loaded is None:
            logger.warning(
                f"{checkpoint} has no {ANCHOR_FILE}; L2-SP keeps the anchor taken when the trainer was built. "
                "Build the trainer from the pretrained model (or set `l2_anchor_path`) so that θ₀ is right."
            )
            return
        saved, layout = loaded
        missing = [n for t in terms for n in t.anchored_names if n not in saved]
        if missing:
            raise ValueError(
                f"{checkpoint}/{ANCHOR_FILE} lacks θ₀ for {len(missing)} penalized parameter(s), first {missing[:5]}: "
                "the penalized set differs from the checkpoint's (`l2_exclude`, `l2_exclude_bias_and_norm`, "
                "`l2_head_params` or the trainable parameters changed since). Resume with the settings of that run, "
                "or start a new run from the pretrained model."
            )
        for term in terms:
            for name in term.anchored_names:
                old = term.anchors[name]
                term.anchors[name] = saved[name].to(dtype=old.dtype, device=old.device)
        for name in self._l2.anchored_names:
            self._l2.anchor_layout[name] = layout.get(name, (0, saved[name].shape))
        self._l2_unbind()  # the next step cuts the restored θ₀ to this rank's pieces

    # ---- model card and Hub ---------------------------------------------------------------------------------
    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        command: str | None = None,
    ) -> None:
        """Write the L2 model card (`README.md`) and its plot (`l2_training.png`) into `output_dir`.

        Replaces the stock card; the arguments are the stock ones (`dataset_tags`: Hub dataset ids, the first being
        the evaluation data) plus `command`, the command line to record (default: this process's). Values given
        here are kept for the cards that `save_model()` and `push_to_hub()` write later. Call it on every process
        (as the Trainer's own calls are): under FSDP / ZeRO-3 the drift statistics are summed across them.
        """
        given = {
            "language": language, "license": license, "tags": tags, "model_name": model_name,
            "finetuned_from": finetuned_from, "tasks": tasks, "dataset_tags": dataset_tags, "dataset": dataset,
            "dataset_args": dataset_args, "command": command,
        }
        info = {**self._card_info, **{k: v for k, v in given.items() if v is not None}}
        self._write_model_card(self.args.output_dir, info)
        self._card_info = info

    def _write_model_card(self, output_dir: str, info: dict) -> None:
        if self._l2 is not None and not self._l2.bound:  # a card written before training
            self._l2_bind_terms()
        report = measure_penalty(self._l2, self._l2_lora)  # on every process: a collective under FSDP / ZeRO-3
        if self.is_world_process_zero():
            write_model_card(self, output_dir, report, **info)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model and tokenizer; called by the user, also the card and plot, then push if `push_to_hub`.

        The stock method would push before the card exists; here the upload starts only once all is on disk.
        """
        super().save_model(output_dir, _internal_call=True)
        if _internal_call:  # checkpoints and `push_to_hub` itself
            return
        self._write_model_card(output_dir or self.args.output_dir, self._card_info)
        if self.args.push_to_hub:
            self._upload_output_dir("Model save")

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save model, tokenizer, card and plot in `output_dir`, then upload it to `hub_model_id`.

        Nothing is sent before the local save is complete. A Hub failure (no network, missing or invalid token,
        repo errors) raises one `hf_l2.HubPublishError` saying what to do, with the local output intact (with
        `blocking=False`, from the returned future). `kwargs` go to `create_model_card`.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        # Both on every process: gathering a sharded model, and the card's statistics, need all of them.
        self.save_model(_internal_call=True)
        self.create_model_card(**kwargs)
        return self._upload_output_dir(commit_message, blocking, token, revision, private)

    def _upload_output_dir(self, commit_message, blocking=True, token=None, revision=None, private=None):
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()  # a checkpoint upload still running would race with this one
        upload = functools.partial(
            upload_run,
            self.args.output_dir,
            self.hub_model_id or self._hub_repo_name(),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            revision=revision or self.args.hub_revision,
        )
        return upload() if blocking else HfApi().run_as_future(upload)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo. With `push_to_hub=True` the Trainer calls this when it is built, so a missing or
        invalid token or an unreachable Hub stops the run before any training, with one `HubPublishError`."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = ensure_repo(
            self._hub_repo_name(),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
        )
        self.push_in_progress = None

    def _hub_repo_name(self) -> str:
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name


class L2Trainer(L2PenaltyMixin, Trainer):
    """[`~transformers.Trainer`] that fine-tunes with an explicit L2 or L2-SP penalty; see [`L2Config`]."""


class L2Seq2SeqTrainer(L2PenaltyMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with the penalty of [`L2Trainer`]; takes an [`L2Seq2SeqConfig`]."""
