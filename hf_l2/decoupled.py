"""The decoupled form of the penalty: a step on Ω alone, applied to the parameters inside each optimizer step.

    θ ← θ − lr·α·(θ − θ₀)   (anchored)        θ ← θ − lr·β·θ   (new)

This is how AdamW applies weight decay (Loshchilov & Hutter, ICLR 2019): the pull never enters the gradient, so
Adam's moments, gradient clipping and the logged `grad_norm` do not see it, and its size is lr·α·(θ − θ₀)
whatever the gradient statistics. The step runs as a pre-hook of the wrapped torch optimizer's `step`:

- it runs once per optimizer step, just before the update, on the values the gradient was computed at (AdamW's
  order), with the learning rate of each parameter's own param group at that step;
- a step that the fp16 GradScaler skips never calls the torch optimizer's `step`, so the pull is skipped too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.utils.hooks import RemovableHandle


class PenaltyTerm(Protocol):
    """What a penalty term offers once bound (`L2Penalty`, `LoraDeltaPenalty`)."""

    parameters: dict[str, torch.Tensor]

    def pull_(self, lr_of) -> None: ...


class DecoupledPull:
    """Runs each penalty term's `pull_` inside `optimizer.step()`; `attach` it after the terms are bound."""

    def __init__(self, terms: Sequence[PenaltyTerm]):
        self.terms = list(terms)
        self._handle: RemovableHandle | None = None

    def attach(self, optimizer) -> DecoupledPull:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps a torch one
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"The decoupled penalty needs a torch optimizer to hook into, got {type(inner).__name__} "
                "(e.g. DeepSpeed's engine steps by itself). Use `l2_impl='loss'` there."
            )
        group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
        missing = [n for term in self.terms for n, p in term.parameters.items() if id(p) not in group_of]
        if missing:
            raise ValueError(
                f"The decoupled penalty covers parameters the optimizer does not update, e.g. {missing[:3]}; pass "
                "an optimizer over all trainable parameters, or leave them out (`l2_exclude`, callback: `exclude`)."
            )

        def lr_of(param: torch.Tensor) -> float:
            return float(group_of[id(param)]["lr"])

        def pull(optimizer, args, kwargs):
            for term in self.terms:
                term.pull_(lr_of)

        self.detach()
        self._handle = inner.register_step_pre_hook(pull)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
