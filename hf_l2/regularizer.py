"""The regularizer: Ω's terms and everything a training loop does with them, built and usable without a Trainer.

It binds the terms to a model, applies the coefficient schedule at each optimizer step, adds Ω in one of the three
forms (`loss_term`, `add_to_grads_`, the decoupled pull it hooks into the optimizer), takes F for
`l2_mode="l2_sp_fisher"`, saves and restores the terms' state with the checkpoint files (`hf_l2.saved_state`),
gathers the `l2/*` values of a training log from the terms, and words the stop of a run whose values are no longer
finite. The Trainer layer (`hf_l2.trainer`) only calls it from the Trainer's hooks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.utils import logging

from hf_l2.decoupled import DecoupledPull, check_pull_rate
from hf_l2.fisher import normalize_fisher
from hf_l2.lora import LoraDeltaPenalty
from hf_l2.penalty import L2Penalty
from hf_l2.penalty_term import L2Terms, PenaltyTerm
from hf_l2.saved_state import RestoredRun, restore_terms, save_terms
from hf_l2.schedule import CoefSchedule
from hf_l2.sharding import local_pieces

logger = logging.get_logger(__name__)

# The logged values whose being NaN or infinite means the weights are garbage.
FINITE_KEYS = ("l2/penalty", "l2/drift", "l2/lora_delta", "l2/kl")


class L2Regularizer:
    """The terms of Ω (`penalty` over ordinary parameters, `lora` over the LoRA weight change, or None) with the
    settings that say how they enter training: `mode` and `impl` as `l2_mode` and `l2_impl`, and the `schedule`
    of the coefficients (default: constant). `trainable`: the model's trainable parameters when the terms were
    built (see `warn_if_trainable_changed`)."""

    def __init__(
        self,
        penalty: L2Penalty,
        lora: LoraDeltaPenalty | None = None,
        *,
        mode: str = "l2_sp",
        impl: str = "grad",
        schedule: CoefSchedule | None = None,
        trainable: list[str] | None = None,
    ):
        self.terms = L2Terms(penalty, lora)
        self.mode, self.impl = mode, impl
        self.schedule = schedule if schedule is not None else CoefSchedule()
        self.trainable_at_build = list(trainable) if trainable is not None else []
        self.factor = 1.0  # the schedule's factor used by the latest optimizer step
        self.fisher_source: dict | None = None  # where F came from (data, examples), for the card
        self._pull: DecoupledPull | None = None

    @property
    def penalty(self) -> L2Penalty:
        return self.terms.penalty

    @property
    def active_terms(self) -> list[PenaltyTerm]:
        return [t for t in self.terms if t is not None]

    @property
    def alpha(self) -> float:
        """α as configured (in `l2` mode the coefficient of the plain decay of every tensor)."""
        return self.penalty.base_decay_coef if self.mode == "l2" else self.penalty.base_coef

    # ---- binding --------------------------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return self.penalty.bound

    def bind(self, model: nn.Module, optimizer=None) -> None:
        """Attach the terms to `model`'s parameters (after `accelerator.prepare`: under FSDP / ZeRO-3 the pieces
        are this rank's shards, and θ₀ is cut to match) and, with `impl="decoupled"`, the pull to `optimizer`."""
        self.warn_if_trainable_changed(model)
        self.bind_terms(model)
        if self.impl == "decoupled":
            self._pull = DecoupledPull(self.active_terms, self.schedule.max_factor).attach(optimizer)

    def bind_terms(self, model: nn.Module) -> None:
        """The terms alone, bound to `model` (e.g. for a card written before training)."""
        for term in self.active_terms:
            term.bind_model(model)

    def unbind(self) -> None:
        """Forget the live parameters (and the optimizer hook): the next step binds them afresh."""
        for term in self.active_terms:
            term.unbind()
        self.detach_pull()

    def detach_pull(self) -> None:
        """Leave no hook on an optimizer the user may step by hand."""
        if self._pull is not None:
            self._pull.detach()
            self._pull = None

    def warn_if_trainable_changed(self, model: nn.Module) -> None:
        """The terms cover the parameters trainable when they were built: say so if that set changed."""
        now, then = trainable_names(model), self.trainable_at_build
        covered = {n for t in self.active_terms for n in t.penalized_names}
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

    # ---- each optimizer step --------------------------------------------------------------------------------
    def start_step(self, step: int, max_steps: int) -> None:
        """The coefficients of the update from `step` to `step + 1` (the schedule's factor)."""
        self.factor = self.schedule(step, max_steps)
        for term in self.active_terms:
            term.set_factor(self.factor)

    def loss_term(self, device: torch.device) -> torch.Tensor:
        """Ω as a differentiable scalar on `device` (`impl="loss"`)."""
        return sum(t.loss_term().to(device) for t in self.active_terms)

    def add_to_grads_(self, scale: torch.Tensor | None = None) -> None:
        """grad += ∇Ω (times the AMP loss scale, when given), after backward (`impl="grad"`)."""
        for term in self.active_terms:
            term.add_to_grads_(scale=scale)

    def check_pull_rate(self, learning_rate: float) -> None:
        """lr·α < 1 (and lr·β in the L2-SP modes) for the decoupled pull, from `learning_rate`; a scheduler that
        raises the lr above it is caught at that step, before the pull (see `DecoupledPull`)."""
        beta = [("β", "l2_head_coef", self.penalty.base_decay_coef)] if self.mode != "l2" else []
        coefs = [("α", "l2_coef", self.alpha), *beta]
        for symbol, field, coef in coefs:
            check_pull_rate(learning_rate, coef, self.schedule.max_factor, symbol, f"`learning_rate` × `{field}`")

    # ---- the Fisher weights (l2_sp_fisher) ------------------------------------------------------------------
    @property
    def needs_fisher(self) -> bool:
        """Whether the penalty still waits for its F."""
        return self.mode == "l2_sp_fisher" and self.penalty.fisher is None

    def set_fisher(self, fisher: dict[str, torch.Tensor], source: dict, normalize: bool) -> None:
        """Give the penalty F (over exactly θ₀'s values, normalized to mean 1 with `normalize`), and keep where it
        came from (`source`) for the card."""
        fitted = self._fit_fisher(fisher)
        self.penalty.set_fisher(normalize_fisher(fitted) if normalize else fitted)
        self.fisher_source = {**source, "normalized": normalize}

    def _fit_fisher(self, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """F over exactly θ₀'s values: an embedding resized after θ₀ was taken keeps F on its anchored rows."""
        out = {}
        for name in self.penalty.anchored_names:
            if name not in fisher:
                raise ValueError(f"`l2_fisher_path`: the saved F lacks {name!r}: was it computed for another model?")
            anchor, f = self.penalty.anchors[name], fisher[name]
            if f.numel() < anchor.numel():
                raise ValueError(f"The Fisher of {name!r} has {f.numel()} values, θ₀ has {anchor.numel()}.")
            out[name] = f.reshape(-1)[: anchor.numel()].view(anchor.shape).to(device=anchor.device, dtype=anchor.dtype)
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, folder: str, source: str | None, main_process: bool) -> None:
        """θ₀ (and F) into a checkpoint or output folder, `source` naming the model θ₀ was taken from; call it on
        every process."""
        save_terms(self.terms, folder, source, self.fisher_source, main_process)

    def restore(self, checkpoint: str, model: nn.Module, anchor_path: str | None) -> RestoredRun | None:
        """The θ₀ (and F) `checkpoint` was trained with, back in the terms; None when it holds no θ₀."""
        restored = restore_terms(checkpoint, self.terms, model, anchor_path, self.mode == "l2_sp_fisher")
        if restored is not None and restored.fisher_source is not None:
            self.fisher_source = restored.fisher_source
        return restored

    # ---- logging --------------------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """`l2/*` values for a training log, one host sync for all of them: Ω summed over the terms, each term's
        own values, and α of the latest update (as `learning_rate` is that update's lr). Under sharding a collective:
        call it on every process."""
        values: dict[str, torch.Tensor] = {}
        for term in self.active_terms:
            for key, value in term.log_values().items():
                key = f"l2/{key}"
                values[key] = values[key] + value.to(values[key].device) if key in values else value
        numbers = torch.stack([v.float() for v in values.values()]).tolist()
        return {**dict(zip(values, numbers)), "l2/coef": self.alpha * self.factor}


def trainable_names(model: nn.Module) -> list[str]:
    """The model's trainable parameters (this rank's view under sharding)."""
    return [n for n, piece in local_pieces(model).items() if piece.param.requires_grad]


def not_finite(logs: dict[str, float]) -> dict[str, float]:
    """The values of a training log (`FINITE_KEYS`) that are NaN or infinite."""
    return {k: logs[k] for k in FINITE_KEYS if k in logs and not math.isfinite(logs[k])}


def non_finite_stop(what: str, keys: tuple[str, ...], coefs: list[str], impl: str, log_history: list[dict],
                    last_checkpoint: str | None) -> FloatingPointError:
    """The error that ends a run gone non-finite: `what` happened (at which step), the last step that logged `keys`
    finite, the last checkpoint, and which settings (`coefs`) to lower.

    The Trainer alone would carry on: its `logging_nan_inf_filter` logs a non-finite loss as the running mean.
    """
    finite = [h["step"] for h in log_history if any(k in h and math.isfinite(h[k]) for k in keys)]
    decoupled = " (with `l2_impl='decoupled'`, lr·α near or above 1)" if impl == "decoupled" else ""
    coefs = " or ".join(f"`{c}`" for c in coefs)
    return FloatingPointError(
        f"Training stopped {what}. Likely causes: a learning rate or {coefs} too large{decoupled}, "
        "fp16 overflow, or a non-finite θ₀ or model. The logged `loss` may not show it (`logging_nan_inf_filter`). "
        + (f"The last finite statistics were logged at step {finite[-1]}. " if finite else "")
        + (f"The last checkpoint is {last_checkpoint}: resume from it with a lower learning rate or {coefs}."
           if last_checkpoint else "No checkpoint had been saved yet.")
    )
