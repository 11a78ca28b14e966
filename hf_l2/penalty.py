"""The L2 / L2-SP penalty in pure torch: which parameters, their anchors, Ω, ∇Ω and the norms.

Nothing here knows about the Trainer, so every piece can be checked by hand on a two-parameter model.

    Ω(θ) = (α/2)·Σ_anchored ‖θ − θ₀‖²  +  (β/2)·Σ_new ‖θ‖²

For ``l2_mode="l2"`` every regularized tensor is "new" with coefficient α (no anchor is kept).
A coefficient schedule multiplies α and β by a factor (``set_factor``); ``pull_`` is the decoupled form, a step
on Ω alone applied straight to the parameters.
Per-step work runs on lists of tensors with multi-tensor (``torch._foreach_*``) kernels, in chunks of
bounded size: with ``add_to_grads_`` the only full-size copy kept in memory is the anchor itself. The in-loss
form (``loss_term``) hands autograd a full-size ∇Ω, as any loss term's backward does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

# Elements per chunk of temporaries (θ − θ₀); 2**24 fp32 values = 64 MiB, a few chunks for GPT-2 small.
CHUNK_NUMEL = 1 << 24


def compile_patterns(patterns: Sequence[str] | str | None, field_name: str) -> list[re.Pattern]:
    """Compile user regexes, naming the config field when one is invalid."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{field_name}`: {pattern!r} is not a valid regular expression ({err}).") from err
    return compiled


def check_number(field_name: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    """Reject a non-number, NaN, infinity or a value below ``minimum`` (or equal, when ``strict``), naming the field."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"`{field_name}` must be a number {'>' if strict else '≥'} {minimum:g}, got {value!r}.")


def matches(name: str, patterns: Iterable[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


@dataclass
class Selection:
    """Names of the parameters the penalty sees, split into anchored (L2-SP pull) and new (plain L2)."""

    anchored: list[str]
    new: list[str]
    unmatched_patterns: list[str]


def select_parameters(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    exclude: Sequence[re.Pattern] = (),
    exclude_names: set[str] | frozenset[str] = frozenset(),
    new: Sequence[re.Pattern] = (),
) -> Selection:
    """Pick trainable, non-empty parameters; ``named_parameters`` must already be deduplicated (tied weights once).

    ``exclude`` regexes and ``exclude_names`` (e.g. biases and norm weights) leave a parameter out; a parameter
    matching a ``new`` regex is treated as having no pretrained counterpart.
    """
    anchored, fresh = [], []
    used = set()
    for name, param in named_parameters:
        if not param.requires_grad or param.numel() == 0:
            continue
        hit = [p.pattern for p in exclude if p.search(name)]
        used.update(hit)
        if hit or name in exclude_names:
            continue
        hit = [p.pattern for p in new if p.search(name)]
        used.update(hit)
        (fresh if hit else anchored).append(name)
    unmatched = [p.pattern for p in (*exclude, *new) if p.pattern not in used]
    return Selection(anchored, fresh, unmatched)


def snapshot(
    named_parameters: dict[str, torch.Tensor], names: Iterable[str], dtype: torch.dtype, device: str | None
) -> dict[str, torch.Tensor]:
    """Detached copies of the named tensors: the anchor θ₀ (``device=None`` keeps each tensor's own device)."""
    with torch.no_grad():
        return {
            n: named_parameters[n].detach().to(dtype=dtype, device=device or named_parameters[n].device, copy=True)
            for n in names
        }


def _chunks(numels: Sequence[int], limit: int = CHUNK_NUMEL) -> list[slice]:
    """Consecutive index ranges whose total size stays near ``limit`` (one tensor may exceed it alone)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if total and total + n > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    if start < len(numels):
        out.append(slice(start, len(numels)))
    return out


def group_by_value(values: Sequence[float]) -> dict[float, list[int]]:
    """Indices of equal values, so tensors sharing a learning rate share one multi-tensor kernel."""
    groups: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return groups


def _sum_sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖t‖² in fp32 as a 0-d tensor, without a host sync."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


class L2Penalty:
    """Ω, its gradient and its statistics over a fixed set of tensors.

    Build it from names (``anchored``, ``new``) and an anchor dict; :meth:`bind` attaches it to a model's live
    parameters (call again whenever parameter objects change, e.g. after ``accelerator.prepare``).
    """

    def __init__(
        self,
        coef: float,
        head_coef: float,
        anchored: Sequence[str],
        new: Sequence[str],
        anchors: dict[str, torch.Tensor] | None = None,
        anchors_on_cpu: bool = False,
    ):
        self.base_coef, self.base_head_coef = float(coef), float(head_coef)
        self.coef, self.head_coef = self.base_coef, self.base_head_coef
        self.anchors_on_cpu = anchors_on_cpu
        self.anchored_names = list(anchored)
        self.new_names = list(new)
        self.anchors = anchors if anchors is not None else {}
        missing = [n for n in self.anchored_names if n not in self.anchors]
        if missing:
            raise ValueError(f"No anchor for anchored parameters: {missing[:5]}")
        self._bound = False

    def set_factor(self, factor: float) -> None:
        """α and β become factor × their configured values (a coefficient schedule)."""
        self.coef, self.head_coef = self.base_coef * factor, self.base_head_coef * factor

    # ---- binding --------------------------------------------------------------------------------------------
    def bind(self, named_parameters: dict[str, torch.Tensor]) -> None:
        """Resolve names to live parameters; a resized embedding anchors its overlapping rows, the rest are new."""
        self.parameters = {n: named_parameters[n] for n in self.anchored_names + self.new_names}
        self._anchored: list[tuple[torch.Tensor, int | None]] = []  # (param, rows anchored or None for all)
        self._anchor_tensors: list[torch.Tensor] = []
        self._new: list[tuple[torch.Tensor, int | None]] = []  # (param, first new row or None for all)
        self._new_labels: list[str] = []  # the parameter name of each entry of `_new`
        for name in self.anchored_names:
            param, anchor = named_parameters[name], self.anchors[name]
            if anchor.device != param.device and not self.anchors_on_cpu:  # e.g. the model moved after the snapshot
                anchor = self.anchors[name] = anchor.to(param.device)
            if anchor.shape == param.shape:
                self._anchored.append((param, None))
                self._anchor_tensors.append(anchor)
                continue
            rows = min(anchor.shape[0], param.shape[0])
            self._anchored.append((param, rows))
            self._anchor_tensors.append(anchor[:rows])
            if param.shape[0] > rows:
                self._new.append((param, rows))
                self._new_labels.append(name)
        self._new += [(named_parameters[n], None) for n in self.new_names]
        self._new_labels += self.new_names
        self._anchored_chunks = _chunks([a.numel() for a in self._anchor_tensors])
        self._bound = True

    @property
    def bound(self) -> bool:
        return self._bound

    def unbind(self) -> None:
        self._bound = False

    @staticmethod
    def _view(t: torch.Tensor, rows: int | None, head: bool) -> torch.Tensor:
        if rows is None:
            return t
        return t[rows:] if head else t[:rows]

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Fresh views of the anchored and new parameter tensors (autograd-safe for this step)."""
        return (
            [self._view(p, r, False) for p, r in self._anchored],
            [self._view(p, r, True) for p, r in self._new],
        )

    def _anchors_on(self, tensors: Sequence[torch.Tensor], sl: slice) -> list[torch.Tensor]:
        """Anchors of a chunk on the parameters' device (an anchor kept on the CPU is copied per step)."""
        return [
            a if a.device == t.device else a.to(t.device, non_blocking=True)
            for a, t in zip(self._anchor_tensors[sl], tensors[sl])
        ]

    # ---- gradient -------------------------------------------------------------------------------------------
    def gradients(self, scale: torch.Tensor | float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """∇Ω·scale as new tensors, for the anchored and new parts (used by the in-loss autograd form)."""
        anchored, new = self.tensors()
        grads_a: list[torch.Tensor] = []
        for sl in self._anchored_chunks:
            diff = torch._foreach_sub(anchored[sl], self._anchors_on(anchored, sl))
            torch._foreach_mul_(diff, self._factor(self.coef, scale))
            grads_a += diff
        grads_n = torch._foreach_mul(new, self._factor(self.head_coef, scale)) if new else []
        return grads_a, grads_n

    @staticmethod
    def _factor(coef: float, scale: torch.Tensor | float):
        return scale * coef if isinstance(scale, torch.Tensor) else coef * scale

    @torch.no_grad()
    def add_to_grads_(self, scale: torch.Tensor | None = None) -> None:
        """grad += ∇Ω (times ``scale``, the AMP loss scale, when given), in place, after backward.

        θ − θ₀ is formed first, so a small task gradient is not lost against the larger αθ and αθ₀.
        A parameter with no gradient gets ∇Ω alone, as autograd would give it.
        """
        anchored, new = self.tensors()
        for param, _ in self._anchored + self._new:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads_a = [self._view(p.grad, r, False) for p, r in self._anchored]
        grads_n = [self._view(p.grad, r, True) for p, r in self._new]
        for sl in self._anchored_chunks:
            diff = torch._foreach_sub(anchored[sl], self._anchors_on(anchored, sl))
            if scale is not None:
                torch._foreach_mul_(diff, scale)
            torch._foreach_add_(grads_a[sl], diff, alpha=self.coef)
            del diff  # free this chunk before the next one is formed
        if new:
            if scale is not None:
                new = torch._foreach_mul(new, scale)
            torch._foreach_add_(grads_n, new, alpha=self.head_coef)

    # ---- decoupled step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def pull_(self, lr_of: Callable[[torch.Tensor], float]) -> None:
        """θ ← θ − lr·α·(θ − θ₀) on anchored tensors and θ ← θ − lr·β·θ on new ones, in place.

        ``lr_of(param)`` is the learning rate of the parameter's optimizer group. This is a plain gradient step on Ω
        alone, applied to the parameters instead of through the optimizer (AdamW's decoupled form).
        """
        anchored, new = self.tensors()
        if self.coef:
            lrs = [lr_of(p) for p, _ in self._anchored]
            for sl in self._anchored_chunks:
                params = anchored[sl]
                # lerp takes one dtype: a bf16 anchor is widened chunk by chunk
                anchors = [a.to(p.dtype) for a, p in zip(self._anchors_on(anchored, sl), params)]
                for lr, idx in group_by_value(lrs[sl]).items():
                    torch._foreach_lerp_([params[i] for i in idx], [anchors[i] for i in idx], lr * self.coef)
                del anchors
        if self.head_coef and new:
            for lr, idx in group_by_value([lr_of(p) for p, _ in self._new]).items():
                torch._foreach_mul_([new[i] for i in idx], 1 - lr * self.head_coef)

    # ---- value and statistics -------------------------------------------------------------------------------
    def _drift_sq(self, anchored: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self._device())
        with torch.no_grad():
            for sl in self._anchored_chunks:
                total = total + _sum_sq(torch._foreach_sub(anchored[sl], self._anchors_on(anchored, sl)))
        return total

    def _device(self) -> torch.device:
        entries = self._anchored or self._new
        return entries[0][0].device if entries else torch.device("cpu")

    def value(self) -> torch.Tensor:
        """Ω as a detached fp32 0-d tensor (no host sync)."""
        anchored, new = self.tensors()
        with torch.no_grad():
            out = 0.5 * self.coef * self._drift_sq(anchored)
            if new:
                out = out + 0.5 * self.head_coef * _sum_sq(new).to(out.device)
        return out

    def statistics(self) -> dict[str, torch.Tensor]:
        """Sums of squares behind the logged norms, as 0-d fp32 tensors (reduce them, then take roots)."""
        anchored, new = self.tensors()
        with torch.no_grad():
            drift_sq = self._drift_sq(anchored)
            anchor_sq = torch.zeros_like(drift_sq)
            for sl in self._anchored_chunks:
                anchor_sq = anchor_sq + _sum_sq(self._anchors_on(anchored, sl)).to(anchor_sq.device)
            new_sq = _sum_sq(new).to(drift_sq.device) if new else torch.zeros_like(drift_sq)
            anchored_sq = _sum_sq(anchored).to(drift_sq.device) if anchored else torch.zeros_like(drift_sq)
        return {"drift_sq": drift_sq, "anchor_sq": anchor_sq, "new_sq": new_sq, "anchored_sq": anchored_sq}

    def squares_by_parameter(self) -> dict[str, dict[str, float]]:
        """Per parameter name: ``weight_sq`` = Σθ² over its regularized entries and, for anchored ones, ``drift_sq``
        = Σ(θ − θ₀)² and ``anchor_sq`` = Σθ₀², as floats (one host sync). For reports, e.g. drift per layer group.

        A resized embedding reports its anchored and new rows together under its one name.
        """
        anchored, new = self.tensors()
        if not anchored and not new:
            return {}
        with torch.no_grad():
            drift, anchor = [], []
            for sl in self._anchored_chunks:
                chunk_anchors = self._anchors_on(anchored, sl)
                drift += torch._foreach_norm(torch._foreach_sub(anchored[sl], chunk_anchors), 2, dtype=torch.float32)
                anchor += torch._foreach_norm(chunk_anchors, 2, dtype=torch.float32)
            weight = torch._foreach_norm(anchored + new, 2, dtype=torch.float32)
            values = torch.stack(drift + anchor + list(weight)).square().tolist()
        k = len(anchored)
        drift_sq, anchor_sq, weight_sq = values[:k], values[k : 2 * k], values[2 * k :]
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.anchored_names):
            out[name] = {"weight_sq": weight_sq[i], "drift_sq": drift_sq[i], "anchor_sq": anchor_sq[i]}
        for name, value in zip(self._new_labels, weight_sq[k:]):
            entry = out.setdefault(name, {"weight_sq": 0.0})
            entry["weight_sq"] += value
        return out

    def loss_term(self) -> torch.Tensor:
        """Ω as a differentiable scalar whose backward adds ∇Ω with multi-tensor kernels (the in-loss form)."""
        anchored, new = self.tensors()
        return _PenaltyFunction.apply(self, *anchored, *new)


class _PenaltyFunction(torch.autograd.Function):
    """Ω(θ) with a hand-written backward: one autograd node instead of one per parameter.

    The gradient flows through autograd like any loss term, so it carries the AMP loss scale, DeepSpeed's hooks
    and DDP's reducer see it, and gradient accumulation treats it like the task loss.
    """

    @staticmethod
    def forward(ctx, penalty: L2Penalty, *tensors):
        ctx.penalty = penalty
        return penalty.value()

    @staticmethod
    def backward(ctx, grad_output):
        grads_a, grads_n = ctx.penalty.gradients(grad_output)
        return (None, *grads_a, *grads_n)

