"""`L2Trainer` and `L2Seq2SeqTrainer`: the stock trainers plus the penalty, its logging and its checkpointing."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.utils import logging

from .anchor import ANCHOR_FILE, load_anchor, match_anchor, read_weights, save_anchor
from .callbacks import WeightNormCallback
from .config import ANCHOR_DTYPES, L2Config
from .penalty import L2Penalty, compile_patterns, select_parameters, snapshot
from .sharding import local_pieces, world_size

logger = logging.get_logger(__name__)


def _embedding_parameter_names(model: nn.Module, parameters: dict[str, torch.Tensor]) -> frozenset[str]:
    """Names of the input/output embedding weights: the only parameters allowed to change rows vs. the anchor."""
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            wanted.add(id(module.weight))
    return frozenset(n for n, p in parameters.items() if id(p) in wanted)


class L2PenaltyMixin:
    """Adds Ω to any `Trainer` subclass; `args` must be an [`L2Config`].

    The penalty enters once per optimizer step, on the micro-batch where `accelerator.sync_gradients` is true:
    `l2_impl="grad"` adds ∇Ω to the gradients right after that backward (so clipping and `grad_norm` see it);
    `l2_impl="loss"` adds Ω to that micro-batch's loss, scaled so that the Trainer's own division by the
    accumulation steps leaves exactly Ω. The logged `loss` is always the task loss.
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
        self._l2_add_to_loss = False
        self._l2_in_loss: torch.Tensor | None = None
        self._move_weight_norm_callbacks_first()
        if not self.args.l2_enabled:
            return
        if self.is_deepspeed_enabled and self.args.l2_impl == "grad":
            raise ValueError(
                "`l2_impl='grad'` cannot work under DeepSpeed: the engine steps inside `backward`, before a gradient "
                "could be added. Use `l2_impl='loss'`."
            )
        self._l2 = self._build_penalty(self.model)

    # ---- construction ---------------------------------------------------------------------------------------
    def _build_penalty(self, model: nn.Module) -> L2Penalty:
        args = self.args
        parameters = dict(model.named_parameters())  # tied weights appear once
        pieces = local_pieces(model)  # whole tensors, unless the model is already sharded (ZeRO-3 `zero.Init`)
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
            logger.warning(f"L2 penalty: pattern {pattern!r} matches no trainable parameter.")
        if not selection.anchored and not selection.new:
            logger.warning("L2 penalty: no trainable parameter is regularized; training is unpenalized.")

        if args.l2_mode == "l2":
            penalty = L2Penalty(0.0, args.l2_coef, [], selection.anchored + selection.new)
        else:
            dtype = ANCHOR_DTYPES[args.l2_anchor_dtype]
            device = "cpu" if args.l2_anchor_device == "cpu" else None
            anchored, new = selection.anchored, selection.new
            layout = None
            if args.l2_anchor_path:
                weights = read_weights(args.l2_anchor_path)
                found, absent = match_anchor(
                    {n: p.shape for n, p in pieces.items()},
                    anchored,
                    weights,
                    getattr(model, "base_model_prefix", ""),
                    _embedding_parameter_names(model, parameters),
                )
                anchors = {n: t.to(dtype=dtype, device=device or parameters[n].device) for n, t in found.items()}
                anchored, new = list(found), new + absent
                if absent:
                    logger.info(f"L2-SP: {len(absent)} parameter(s) absent from the anchor are new, e.g. {absent[:3]}")
            else:
                anchors = snapshot(pieces, anchored, dtype, device)
                layout = {n: (pieces[n].start, pieces[n].shape) for n in anchored}
            penalty = L2Penalty(
                args.l2_coef, args.l2_head_coef, anchored, new, anchors, anchors_on_cpu=device == "cpu",
                anchor_layout=layout,
            )

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
    def train(self, *args, **kwargs):
        if self._l2 is not None:
            self._l2.unbind()  # `accelerator.prepare` may swap parameter objects: rebind on the first step
        return super().train(*args, **kwargs)

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
            # After `accelerator.prepare`: under FSDP the pieces are this rank's shards, and θ₀ is cut to match.
            self._l2.bind(local_pieces(self.model))
        if self.args.l2_impl == "loss":
            self._l2_add_to_loss = True
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._l2_add_to_loss = False
            # The returned loss is (task + d·Ω)/d: report the task part only.
            return loss - self._l2_in_loss.to(loss.device, loss.dtype)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._l2.add_to_grads_(scale=self._amp_loss_scale())
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
        term = self._l2.loss_term()
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
        numbers = torch.stack([v.float() for v in values.values()]).tolist()
        return dict(zip(values, numbers))

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._l2 is None or not self._l2.anchors:
            return
        if self._l2.sharded:  # every rank holds different pieces of θ₀: each saves its own (this runs on all ranks)
            save_anchor(self._l2.anchors, self._l2.anchor_layout, output_dir, dist.get_rank(), world_size())
        elif self.args.should_save:
            save_anchor(self._l2.anchors, self._l2.anchor_layout, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self._l2 is None or not self._l2.anchored_names:
            return
        rank = dist.get_rank() if world_size() > 1 else 0
        loaded = load_anchor(checkpoint, rank, world_size())
        if loaded is None:
            logger.warning(
                f"{checkpoint} has no {ANCHOR_FILE}; L2-SP keeps the anchor taken when the trainer was built. "
                "Build the trainer from the pretrained model (or set `l2_anchor_path`) so that θ₀ is right."
            )
            return
        saved, layout = loaded
        missing = [n for n in self._l2.anchored_names if n not in saved]
        if missing:
            raise ValueError(f"{checkpoint}/{ANCHOR_FILE} lacks anchors for {missing[:5]}: was the model changed?")
        for name in self._l2.anchored_names:
            old = self._l2.anchors[name]
            self._l2.anchors[name] = saved[name].to(dtype=old.dtype, device=old.device)
            self._l2.anchor_layout[name] = layout.get(name, (0, saved[name].shape))
        self._l2.unbind()  # the next step cuts the restored θ₀ to this rank's pieces


class L2Trainer(L2PenaltyMixin, Trainer):
    """[`~transformers.Trainer`] that fine-tunes with an explicit L2 or L2-SP penalty; see [`L2Config`]."""


class L2Seq2SeqTrainer(L2PenaltyMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with the penalty of [`L2Trainer`]; takes an [`L2Seq2SeqConfig`]."""
