"""How the penalty's strength changes over training: a factor f(t) that multiplies α (and β).

t is the number of optimizer steps already taken (the Trainer's ``state.global_step``), T the total
(``state.max_steps``); the update from step t to t+1 uses f(t), so f(0) is the first update's factor. Because f
depends on nothing but t and T, a resumed run recomputes it from the restored ``global_step``.

- ``constant``: f = 1.
- ``linear``:   f goes from 1 to ``end_factor`` in a straight line, f(t) = 1 + (e − 1)·t/T.
- ``cosine``:   f(t) = e + (1 − e)·½·(1 + cos(π·t/T)), a half cosine from 1 to e.
- ``sigmoid``:  f(t) = e + (1 − e)·(1 − λ(t)) with λ(t) = 1 / (1 + exp(−k·(t − t₀))), the annealing of RecAdam
  (Chen et al., EMNLP 2020), which weights its quadratic penalty by 1 − λ(t): a strong pull early, released
  around step t₀.

Linear and cosine follow the Trainer's own learning-rate schedules (``get_linear_schedule_with_warmup``,
``get_cosine_schedule_with_warmup`` without warm-up), so their last update uses f(T − 1), one step short of e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hf_l2.argument_checks import check_number

SCHEDULES = ("constant", "linear", "cosine", "sigmoid")


@dataclass(frozen=True)
class CoefSchedule:
    """f(t) for one of :data:`SCHEDULES`; raises on bad values, naming the `l2_*` field they come from."""

    name: str = "constant"
    end_factor: float = 0.0
    sigmoid_k: float = 0.1
    sigmoid_t0: float | None = None

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"`l2_coef_schedule`={self.name!r} is not one of {list(SCHEDULES)}.")
        check_number("l2_coef_end_factor", self.end_factor)
        check_number("l2_sigmoid_k", self.sigmoid_k, strict=True)
        if self.sigmoid_t0 is not None:
            check_number("l2_sigmoid_t0", self.sigmoid_t0)

    @property
    def max_factor(self) -> float:
        """The largest f(t) over any run: every schedule moves between 1 and `end_factor`."""
        return 1.0 if self.name == "constant" else max(1.0, self.end_factor)

    def __call__(self, step: int, total_steps: int) -> float:
        if self.name == "constant":
            return 1.0
        e = self.end_factor
        if self.name == "sigmoid":
            t0 = total_steps / 2 if self.sigmoid_t0 is None else self.sigmoid_t0
            # 1 − λ(t) = σ(−k(t − t₀)), written so that exp never overflows.
            z = -self.sigmoid_k * (step - t0)
            released = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
            return e + (1 - e) * released
        progress = min(step / max(total_steps, 1), 1.0)
        if self.name == "linear":
            return 1 + (e - 1) * progress
        return e + (1 - e) * 0.5 * (1 + math.cos(math.pi * progress))

