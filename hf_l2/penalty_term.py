"""The interface every penalty term offers (`L2Penalty`, `LoraDeltaPenalty`): what the regularizer, the decoupled
pull and the checkpoint files rely on, and nothing about how a term computes Ω; and `L2Terms`, the terms of a run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import torch
from torch import nn

from hf_l2.lora import LoraDeltaPenalty
from hf_l2.penalty import L2Penalty


class PenaltyTerm(Protocol):
    """One term of Ω over a fixed set of named parameters, with its θ₀."""

    anchored_names: list[str]  # the parameters pulled toward θ₀
    anchors: dict[str, torch.Tensor]  # θ₀ by name (this rank's pieces once bound under sharding)
    parameters: dict[str, torch.Tensor]  # the live parameters, once bound
    coef: float  # α at this step (the schedule's factor applied)

    @property
    def penalized_names(self) -> list[str]:
        """Every parameter the term covers."""

    @property
    def bound(self) -> bool: ...

    def bind_model(self, model: nn.Module) -> None:
        """Attach to the model's live parameters (again whenever parameter objects change)."""

    def unbind(self) -> None: ...

    def set_factor(self, factor: float) -> None:
        """The coefficients become factor × their configured values (a coefficient schedule)."""

    def loss_term(self) -> torch.Tensor:
        """Ω as a differentiable scalar (the in-loss form)."""

    def add_to_grads_(self, scale: torch.Tensor | None = None) -> None:
        """grad += ∇Ω (times the AMP loss scale, when given), after backward."""

    def pull_(self, lr_of: Callable[[torch.Tensor], float]) -> None:
        """A gradient step on Ω alone, straight on the parameters (the decoupled form)."""

    def log_values(self) -> dict[str, torch.Tensor]:
        """The term's Ω (``penalty``) and its other logged values, as 0-d tensors (named without the ``l2/``)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the term (θ₀, and what goes with it)."""

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned from a saved run."""


class L2Terms(NamedTuple):
    """The penalty's terms on a trainer (None where absent): over ordinary parameters, and over the LoRA weight
    change (`l2_lora_delta`)."""

    penalty: L2Penalty | None
    lora: LoraDeltaPenalty | None
