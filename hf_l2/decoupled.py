"""The decoupled form of the penalty: a step on Ω alone, applied to the parameters inside each optimizer step.

    θ ← θ − lr·α·(θ − θ₀)   (anchored)        θ ← θ − lr·β·θ   (new)

This is how AdamW applies weight decay (Loshchilov & Hutter, ICLR 2019): the pull never enters the gradient, so
Adam's moments, gradient clipping and the logged `grad_norm` do not see it, and its size is lr·α·(θ − θ₀)
whatever the gradient statistics. The step runs as a pre-hook of the wrapped torch optimizer's `step`:

- it runs once per optimizer step, just before the update, on the values the gradient was computed at (AdamW's
  order), with the learning rate of each parameter's own param group at that step;
- a step that the fp16 GradScaler skips never calls the torch optimizer's `step`, so the pull is skipped too.

The pull is a gradient step of size w = lr·α on a quadratic: θ − θ₀ becomes (1 − w)·(θ − θ₀). At w = 1 it lands on
θ₀ (the task gradient is undone at every step), between 1 and 2 it overshoots and oscillates, past 2 it diverges.
So w ≥ 1 (and lr·β ≥ 1 for new parameters) is refused: when the trainer is built, from `learning_rate` and the
schedule's largest factor; on the first step from the optimizer's own base learning rates (with `l2_sp_fisher`,
whose pull is lr·α·Fᵢ per value, from lr·α·max F: F is known by then); and at every step, before the pull, from
that step's learning rates and α, since a scheduler may raise the learning rate above its base (e.g.
`cosine_with_min_lr` with a `min_lr` above `learning_rate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from hf_l2.penalty import L2Penalty
from hf_l2.penalty_term import PenaltyTerm


def check_pull_rate(lr: float, coef: float, factor: float, symbol: str, where: str, peak_weight: float = 1.0) -> None:
    """Refuse a decoupled pull lr·coef·factor·peak_weight ≥ 1; `symbol` (α or β) and `where` (the lr's source) word
    the error; `peak_weight` is the largest per-value weight (F of `l2_sp_fisher`, whose pull is lr·α·Fᵢ)."""
    rate = lr * coef * factor * peak_weight
    if rate >= 1:
        peak = f" × {factor:g} (the schedule's peak)" if factor != 1 else ""
        weight = f" × {peak_weight:g} (the largest Fisher weight)" if peak_weight != 1 else ""
        raise ValueError(
            f"`l2_impl='decoupled'`: the pull's step lr·{symbol}{'·F' if weight else ''} = {lr:g} × {coef:g}{peak}"
            f"{weight} = {rate:g} ({where}) is ≥ 1, so each step would put the weights on θ₀ (at 1), past it (above "
            f"1), and diverge (from 2). Keep {symbol} below {1 / (lr * factor * peak_weight):g} at this learning rate, "
            "or use `l2_impl='grad'`."
        )


def fisher_peak(term: L2Penalty) -> float:
    """The largest F over all processes' pieces (1 without F): the fastest per-value pull of the decoupled form."""
    if not term.has_fisher:
        return 1.0
    pieces = [f.float().max() for f in term.fisher.values() if f.numel()]
    peak = torch.stack(pieces).max() if pieces else torch.zeros(())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # FSDP: each rank holds a piece
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


@dataclass(frozen=True)
class PullRate:
    """One linear pull of an `L2Penalty` (α on its anchored tensors, or β on its new ones), the optimizer groups of
    its parameters and its largest per-value weight (max F, else 1): its rate is lr·coef·peak."""

    term: L2Penalty
    symbol: str
    groups: list[dict]
    peak: float

    @property
    def base_coef(self) -> float:
        return self.term.base_coef if self.symbol == "α" else self.term.base_decay_coef

    @property
    def coef(self) -> float:
        """The coefficient at this step (the schedule's factor applied)."""
        return self.term.coef if self.symbol == "α" else self.term.decay_coef


class DecoupledPull:
    """Runs each penalty term's `pull_` inside `optimizer.step()`; `attach` it after the terms are bound."""

    def __init__(self, terms: Sequence[PenaltyTerm], max_factor: float = 1.0):
        self.terms = list(terms)
        self.max_factor = max_factor  # the coefficient schedule's peak, for the rate check
        self._rates: list[PullRate] = []
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

        self._rates = self._pull_rates(group_of)
        self._check_base_rates()

        def pull(optimizer, args, kwargs):
            self._check_step_rates()
            for term in self.terms:
                term.pull_(lr_of)

        self.detach()
        self._handle = inner.register_step_pre_hook(pull)
        return self

    def _pull_rates(self, group_of: dict[int, dict]) -> list[PullRate]:
        """What each linear pull's rate is made of; the LoRA-delta pull is not linear in θ: it has no single rate."""
        rates = []
        for term in self.terms:
            if not isinstance(term, L2Penalty):
                continue
            for names, symbol, peak in ((term.anchored_names, "α", fisher_peak(term)), (term.new_names, "β", 1.0)):
                groups = list({id(g): g for g in (group_of[id(term.parameters[n])] for n in names)}.values())
                rate = PullRate(term, symbol, groups, peak)
                if groups and rate.base_coef:
                    rates.append(rate)
        return rates

    def _check_base_rates(self) -> None:
        """lr·α < 1 with each group's base lr (`initial_lr`, kept by torch's schedulers; a warm-up starts lower) and
        the coefficient schedule's peak: refused before any step."""
        for rate in self._rates:
            lr = max(max(float(g["lr"]), float(g.get("initial_lr", 0.0))) for g in rate.groups)
            check_pull_rate(lr, rate.base_coef, self.max_factor, rate.symbol, "the optimizer's learning rate",
                            rate.peak)

    def _check_step_rates(self) -> None:
        """lr·α < 1 with this step's lr and α, before the pull: a scheduler may raise the lr above its base."""
        for rate in self._rates:
            lr = max(float(g["lr"]) for g in rate.groups)
            check_pull_rate(lr, rate.coef, 1.0, rate.symbol, "the learning rate the scheduler set for this step",
                            rate.peak)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
