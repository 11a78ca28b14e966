"""The L2 / L2-SP penalty in pure torch: which parameters, their anchors, Ω, ∇Ω and the norms.

Nothing here knows about the Trainer, so every piece can be checked by hand on a two-parameter model.

    Ω(θ) = (α/2)·Σ_anchored ‖θ − θ₀‖²  +  (β/2)·Σ_new ‖θ‖²

With per-value weights F on the anchored tensors (``set_fisher``, the diagonal Fisher of L2-SP-Fisher / EWC), the
first sum is (α/2)·Σ F·(θ − θ₀)²; F is stored, cut to this rank's pieces and saved like θ₀.
β is a plain decay toward zero (``decay_coef``): for ``l2_mode="l2"`` every regularized tensor is "new" and
decays with β = α (no anchor is kept). A penalty with α = β = 0 (``L2Penalty.drift_meter``) only measures.
A coefficient schedule multiplies α and β by a factor (``set_factor``); ``pull_`` is the decoupled form, a step
on Ω alone applied straight to the parameters.
Per-step work runs on lists of tensors with multi-tensor (``torch._foreach_*``) kernels, in chunks of
bounded size: with ``add_to_grads_`` the only full-size copy kept in memory is the anchor itself. The in-loss
form (``loss_term``) hands autograd a full-size ∇Ω, as any loss term's backward does (with F it is formed in the
forward, which needs F·(θ − θ₀) for Ω anyway, and kept for the backward). On the CPU the weighted decoupled pull
forms its per-value step one cache-sized block at a time (``_weighted_lerp_``).

Under sharding (FSDP, ZeRO-3) everything is per rank: the penalty binds to this rank's pieces of the parameters
(``sharding.local_pieces``), keeps only the matching pieces of θ₀, and its statistics are summed across ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hf_l2.chunks import BLOCK_NUMEL, NORM_BLOCK, chunk_slices
from hf_l2.sharding import Piece, local_pieces, world_size


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
        if not param.requires_grad or getattr(param, "ds_numel", param.numel()) == 0:  # ZeRO-3: placeholders
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
    named_parameters: Mapping[str, torch.Tensor | Piece], names: Iterable[str], dtype: torch.dtype, device: str | None
) -> dict[str, torch.Tensor]:
    """Detached copies of the named tensors (of this rank's pieces when given pieces): the anchor θ₀.

    ``device=None`` keeps each tensor's own device.
    """
    with torch.no_grad():
        out = {}
        for n in names:
            t = named_parameters[n]
            t = t.local if isinstance(t, Piece) else t
            # A meta tensor (weights not loaded yet on this rank) stays meta: `bind` takes θ₀ then.
            out[n] = t.detach().to(dtype=dtype, device="meta" if t.is_meta else device or t.device, copy=True)
        return out


def group_by_value(values: Sequence[float]) -> dict[float, list[int]]:
    """Indices of equal values, so tensors sharing a learning rate share one multi-tensor kernel."""
    groups: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return groups


def _norms_sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖t‖² of each tensor, in fp32, as one 1-d tensor (on the CPU summed over blocks of ``NORM_BLOCK`` values)."""
    if not tensors or tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square()
    blocks = [t.reshape(-1).split(NORM_BLOCK) if t.is_contiguous() else (t,) for t in tensors]
    squares = torch.stack(torch._foreach_norm([b for parts in blocks for b in parts], 2, dtype=torch.float32)).square()
    return torch.stack([part.sum() for part in squares.split([len(parts) for parts in blocks])])


def _sums_of_products(diff: Sequence[torch.Tensor], weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ d·h of each pair of tensors, in fp32, as one 1-d tensor; ``diff`` (a temporary) is overwritten.

    A cascade ``sum``: on the CPU an fp32 ``norm`` or ``dot`` accumulator drifts by 10⁻³–10⁻¹ over the tens of
    millions of values of an embedding.
    """
    wide = [d.float() for d in diff]  # fp32 stays in place
    torch._foreach_mul_(wide, [h.float() for h in weighted])
    return torch.stack([t.sum(dtype=torch.float32) for t in wide])


def _weighted_lerp_(params: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    rate: float) -> None:
    """p ← lerp(p, end, rate·w) per value, with ``lerp_``'s own rounding (w ≡ 1 gives a scalar-weight lerp's bits).

    On the CPU, where a multi-tensor op runs one tensor at a time anyway, rate·w is formed one cache-sized block
    (``BLOCK_NUMEL``) at a time and never goes through memory; elsewhere one fused kernel per op and chunk.
    """
    if params[0].device.type != "cpu":
        steps = torch._foreach_mul([w.to(p.dtype) for w, p in zip(weights, params)], rate)
        torch._foreach_lerp_(params, ends, steps)
        return
    for p, end, w in zip(params, ends, weights):
        if not p.is_contiguous():  # no flat view to cut into blocks: the whole tensor is one block
            p.lerp_(end, w.to(p.dtype) * rate)
            continue
        step = torch.empty(min(p.numel(), BLOCK_NUMEL), dtype=p.dtype, device=p.device)
        for p_block, end_block, w_block in zip(*(t.reshape(-1).split(BLOCK_NUMEL) for t in (p, end, w))):
            # widened first: a product of a bf16 F and the rate would be rounded to bf16
            p_block.lerp_(end_block, torch.mul(w_block.to(p.dtype), rate, out=step[: p_block.numel()]))


def _sum_sq(tensors: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w·‖t‖² in fp32 as a 0-d tensor, without a host sync."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    squares = _norms_sq(tensors)
    return (squares if weights is None else squares * weights.to(squares.device)).sum()


class L2Penalty:
    """Ω, its gradient and its statistics over a fixed set of tensors.

    Build it from names (``anchored``, ``new``) and an anchor dict; :meth:`bind` attaches it to a model's live
    parameters (call again whenever parameter objects change, e.g. after ``accelerator.prepare``).

    ``anchors`` hold θ₀ whole, or a piece of it: ``anchor_layout[name] = (start, shape)`` says where the stored
    tensor begins in the full θ₀ flattened in row-major order, and the full θ₀'s shape (default: ``(0, its own
    shape)``). Binding to sharded pieces cuts each anchor down to this rank's piece and frees the rest. A meta
    anchor means "the parameter's value at the first bind".
    """

    def __init__(
        self,
        coef: float,
        decay_coef: float,
        anchored: Sequence[str],
        new: Sequence[str],
        anchors: dict[str, torch.Tensor] | None = None,
        anchors_on_cpu: bool = False,
        anchor_layout: dict[str, tuple[int, torch.Size]] | None = None,
    ):
        self.base_coef, self.base_decay_coef = float(coef), float(decay_coef)
        self.coef, self.decay_coef = self.base_coef, self.base_decay_coef
        self.anchors_on_cpu = anchors_on_cpu
        self.anchored_names = list(anchored)
        self.new_names = list(new)
        self.anchors = anchors if anchors is not None else {}
        missing = [n for n in self.anchored_names if n not in self.anchors]
        if missing:
            raise ValueError(f"No anchor for anchored parameters: {missing[:5]}")
        self.anchor_layout = {n: (0, torch.Size(a.shape)) for n, a in self.anchors.items()}
        self.anchor_layout.update(anchor_layout or {})
        self.fisher: dict[str, torch.Tensor] | None = None
        self.fisher_layout: dict[str, tuple[int, torch.Size]] = {}
        self._bound = False

    @classmethod
    def drift_meter(
        cls, anchored: Sequence[str], new: Sequence[str], anchors: dict[str, torch.Tensor],
        anchors_on_cpu: bool = False, anchor_layout: dict[str, tuple[int, torch.Size]] | None = None,
    ) -> L2Penalty:
        """A penalty with α = β = 0 that only measures: its statistics (norms, drift from ``anchors``) without Ω."""
        return cls(0.0, 0.0, anchored, new, anchors, anchors_on_cpu, anchor_layout)

    @property
    def penalized_names(self) -> list[str]:
        """Every parameter the term covers: anchored, then new."""
        return self.anchored_names + self.new_names

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this term: θ₀ and F, each with where its tensors sit in the full parameters."""
        return {"anchors": self.anchors, "anchor_layout": self.anchor_layout,
                "fisher": self.fisher, "fisher_layout": self.fisher_layout}

    def load_state_dict(self, state: Mapping) -> None:
        """θ₀ and F, those of them ``state`` has, as saved by a run: each θ₀ keeps the dtype and device it had here,
        and the next :meth:`bind` cuts them to this rank's pieces."""
        anchors, layout = state.get("anchors"), state.get("anchor_layout", {})
        for name in self.anchored_names if anchors is not None else ():
            old = self.anchors[name]
            self.anchors[name] = anchors[name].to(dtype=old.dtype, device=old.device)
            self.anchor_layout[name] = layout.get(name, (0, anchors[name].shape))
        if state.get("fisher") is not None:
            fisher = {n: f.to(self.anchors[n].device) for n, f in state["fisher"].items()}
            self.set_fisher(fisher, state.get("fisher_layout"))
        self._bound = False

    def set_fisher(
        self, fisher: dict[str, torch.Tensor], layout: dict[str, tuple[int, torch.Size]] | None = None
    ) -> None:
        """Weight each anchored value's pull by F (same shapes and layout as θ₀; ``layout`` as ``anchor_layout``,
        default: whole tensors). The next :meth:`bind` cuts F to this rank's pieces."""
        missing = [n for n in self.anchored_names if n not in fisher]
        if missing:
            raise ValueError(f"No Fisher weights for anchored parameters: {missing[:5]}")
        self.fisher = {n: fisher[n] for n in self.anchored_names}
        self.fisher_layout = {n: (0, torch.Size(f.shape)) for n, f in self.fisher.items()}
        self.fisher_layout.update({n: v for n, v in (layout or {}).items() if n in self.fisher})
        self._bound = False

    def set_factor(self, factor: float) -> None:
        """α and β become factor × their configured values (a coefficient schedule)."""
        self.coef, self.decay_coef = self.base_coef * factor, self.base_decay_coef * factor

    # ---- binding --------------------------------------------------------------------------------------------
    def bind(self, pieces: Mapping[str, torch.Tensor | Piece]) -> None:
        """Resolve names to live parameters (or this rank's pieces of them, see ``sharding.local_pieces``).

        A resized embedding anchors its rows that θ₀ has; the extra rows are new.
        """
        pieces = {n: p if isinstance(p, Piece) else Piece(p, 0, p.shape) for n, p in pieces.items()}
        self.parameters = {n: pieces[n].param for n in self.anchored_names + self.new_names}
        self._anchor_sq: torch.Tensor | None = None  # ‖θ₀‖², fixed until the next bind: computed once
        self._anchored: list[tuple[Piece, int | None]] = []  # (piece, rows of it anchored or None for all)
        self._anchor_tensors: list[torch.Tensor] = []
        self._fisher_tensors: list[torch.Tensor] | None = [] if self.fisher is not None else None
        self._new: list[tuple[Piece, int | None]] = []  # (piece, first new row or None for all)
        self._labels_a: list[str] = []  # the parameter name of each entry, for per-group reports
        self._labels_n: list[str] = []
        for name in self.anchored_names:
            piece = pieces[name]
            anchor, rows = self._cut_anchor(name, piece)
            if anchor.numel():
                self._anchored.append((piece, rows))
                self._anchor_tensors.append(anchor)
                self._labels_a.append(name)
                if self._fisher_tensors is not None:
                    self._fisher_tensors.append(self.fisher[name])
            if rows is not None:
                self._new.append((piece, rows))
                self._labels_n.append(name)
        fresh = [n for n in self.new_names if pieces[n].numel]
        self._new += [(pieces[n], None) for n in fresh]
        self._labels_n += fresh
        self._anchored_chunks = chunk_slices([a.numel() for a in self._anchor_tensors])
        # Every rank sees the same wrapping, so all of them agree on whether statistics need a reduction.
        self._sharded = any(p.sharded for p in pieces.values()) and world_size() > 1
        self._zero3 = any(p.zero3 for p in pieces.values())
        first = next(iter(pieces.values()), None)
        self._home = first.param.device if first is not None else torch.device("cpu")
        weight = lambda p: 1.0 / (p.replicas or world_size())  # noqa: E731 -- each piece counts once globally
        self._weights_a = torch.tensor([weight(p) for p, _ in self._anchored]) if self._sharded else None
        self._weights_n = torch.tensor([weight(p) for p, _ in self._new]) if self._sharded else None
        self._bound = True

    def bind_model(self, model: nn.Module) -> None:
        """:meth:`bind` to ``model``'s parameters as this rank holds them (whole, or its shards under FSDP / ZeRO-3)."""
        self.bind(local_pieces(model))

    def _cut_anchor(self, name: str, piece: Piece) -> tuple[torch.Tensor, int | None]:
        """θ₀ (and F) for this rank's piece, stored back in place of the larger tensors, and the rows of the piece
        they cover.

        θ₀ covers the leading elements of the flattened parameter (all of them unless the embeddings were resized
        after θ₀ was taken, in which case its rows are the first ones).
        """
        stored = self.anchors[name]
        stored_start, full_shape = self.anchor_layout[name]
        if stored.is_meta:  # taken before this rank had weights (FSDP's cpu_ram_efficient_loading): take it now
            stored = piece.local.detach().reshape(-1).to(
                device="cpu" if self.anchors_on_cpu else None, dtype=stored.dtype, copy=True
            )
            stored_start, full_shape = piece.start, piece.shape
        covered = min(math.prod(full_shape), math.prod(piece.shape))
        size = piece.numel
        under = min(max(covered - piece.start, 0), size)
        local_shape = piece.local.shape
        rows = None if under == size else under // (size // local_shape[0])
        shape = local_shape if rows is None else (rows, *local_shape[1:])
        self.anchors[name] = self._cut(name, "θ₀", stored, stored_start, piece, under, shape)
        self.anchor_layout[name] = (piece.start, full_shape)
        if self.fisher is not None:
            start, fisher_shape = self.fisher_layout[name]
            self.fisher[name] = self._cut(name, "F", self.fisher[name], start, piece, under, shape)
            self.fisher_layout[name] = (piece.start, fisher_shape)
        return self.anchors[name], rows

    def _cut(
        self, name: str, what: str, stored: torch.Tensor, stored_start: int, piece: Piece, under: int, shape
    ) -> torch.Tensor:
        """The ``under`` leading values of ``piece`` out of ``stored`` (which begins at ``stored_start`` of the full
        flattened tensor), shaped ``shape``, on the device the penalty keeps them on."""
        offset = piece.start - stored_start
        if offset < 0 or offset + under > stored.numel():
            raise ValueError(
                f"L2 penalty: the stored {what} of {name!r} holds elements "
                f"[{stored_start}, {stored_start + stored.numel()})"
                f" of the full tensor, but this rank's piece needs [{piece.start}, {piece.start + under}). It was "
                "saved by a run sharded differently: resume with the same number of processes and the same "
                "FSDP/ZeRO settings, or from a checkpoint with whole (not per-rank) files."
            )
        cut = stored.reshape(-1)[offset : offset + under].view(shape)
        if cut.numel() != stored.numel():
            cut = cut.clone()  # a copy of just this piece, so that the full tensor can be freed
        if cut.device != piece.param.device and not self.anchors_on_cpu:  # e.g. the model moved after the snapshot
            cut = cut.to(piece.param.device)
        elif self.anchors_on_cpu and piece.param.is_cuda and not cut.is_pinned():
            cut = cut.pin_memory()  # page-locked, so the per-step copy to the GPU does not block the host
        return cut

    @property
    def bound(self) -> bool:
        return self._bound

    @property
    def has_fisher(self) -> bool:
        """Whether the bound penalty weights its anchored values by F."""
        return self._bound and self._fisher_tensors is not None

    @property
    def sharded(self) -> bool:
        """Whether the bound parameters are sharded across ranks (anchors are then per-rank pieces)."""
        return self._bound and self._sharded

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
            [self._view(p.local, r, False) for p, r in self._anchored],
            [self._view(p.local, r, True) for p, r in self._new],
        )

    def _drift_chunks(
        self, anchored: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor] | None = None,
        chunks: Sequence[slice] | None = None, diff: bool = True,
    ) -> Iterator[tuple[slice, list[torch.Tensor], list[torch.Tensor] | None]]:
        """The one loop over θ − θ₀: per chunk, its slice of ``anchored``, its θ₀ on the parameters' device (an
        anchor kept on the CPU is copied per step) and θ − θ₀ (None unless ``diff``).

        ``anchors`` default to the bound θ₀ and ``chunks`` to chunks of bounded size: a caller that drops a chunk's
        tensors before taking the next keeps one chunk of temporaries alive.
        """
        anchors = self._anchor_tensors if anchors is None else anchors
        for sl in self._anchored_chunks if chunks is None else chunks:
            here = [a if a.device == t.device else a.to(t.device, non_blocking=True)
                    for a, t in zip(anchors[sl], anchored[sl])]
            delta = torch._foreach_sub(anchored[sl], here) if diff else None
            yield sl, here, delta
            del here, delta

    def _fisher_chunk(self, sl: slice, anchored: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """F of a chunk of the anchored tensors, on their device; None without F."""
        if self._fisher_tensors is None:
            return None
        return [f if f.device == t.device else f.to(t.device, non_blocking=True)
                for f, t in zip(self._fisher_tensors[sl], anchored[sl])]

    @torch.no_grad()
    def add_to_grads_(self, scale: torch.Tensor | None = None) -> None:
        """grad += ∇Ω (times ``scale``, the AMP loss scale, when given), in place, after backward.

        θ − θ₀ is formed first, so a small task gradient is not lost against the larger αθ and αθ₀.
        A parameter with no gradient gets ∇Ω alone, as autograd would give it; where that is exactly zero (a zero
        coefficient) its gradient stays None, so that the optimizer skips it as the stock Trainer does. Under
        sharding each rank adds the gradient of its own pieces to its own gradient shards, after the data-parallel
        reduction.
        """
        anchored, new = self.tensors()
        if self.coef:
            grads_a = [self._view(p.grad(), r, False) for p, r in self._anchored]
            for sl, _, diff in self._drift_chunks(anchored):
                if scale is not None:
                    torch._foreach_mul_(diff, scale)
                fisher = self._fisher_chunk(sl, anchored)
                if fisher is None:
                    torch._foreach_add_(grads_a[sl], diff, alpha=self.coef)
                else:  # grad += α·F·(θ − θ₀) in one pass: a single extra read, of F
                    torch._foreach_addcmul_(grads_a[sl], diff, fisher, value=self.coef)
                del diff, fisher  # free this chunk before the next one is formed
        if new and self.decay_coef:
            grads_n = [self._view(p.grad(), r, True) for p, r in self._new]
            if scale is not None:
                new = torch._foreach_mul(new, scale)
            torch._foreach_add_(grads_n, new, alpha=self.decay_coef)

    # ---- decoupled step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def pull_(self, lr_of: Callable[[torch.Tensor], float]) -> None:
        """θ ← θ − lr·α·(θ − θ₀) (with F: lr·α·F·(θ − θ₀)) on anchored tensors and θ ← θ − lr·β·θ on new ones.

        ``lr_of(param)`` is the learning rate of the parameter's optimizer group. This is a plain gradient step on Ω
        alone, applied to the parameters instead of through the optimizer (AdamW's decoupled form).
        """
        anchored, new = self.tensors()
        if self.coef:
            lrs = [lr_of(p.param) for p, _ in self._anchored]
            for sl, anchors, _ in self._drift_chunks(anchored, diff=False):
                params = anchored[sl]
                # lerp takes one dtype: a bf16 anchor is widened chunk by chunk
                anchors = [a.to(p.dtype) for a, p in zip(anchors, params)]
                fisher = self._fisher_chunk(sl, anchored)
                for lr, idx in group_by_value(lrs[sl]).items():
                    ends = [anchors[i] for i in idx]
                    if fisher is None:
                        torch._foreach_lerp_([params[i] for i in idx], ends, lr * self.coef)
                    else:  # a step of lr·α·F per value
                        _weighted_lerp_([params[i] for i in idx], ends, [fisher[i] for i in idx], lr * self.coef)
                del anchors, fisher
        if self.decay_coef and new:
            for lr, idx in group_by_value([lr_of(p.param) for p, _ in self._new]).items():
                torch._foreach_mul_([new[i] for i in idx], 1 - lr * self.decay_coef)

    # ---- value and statistics -------------------------------------------------------------------------------
    def _drift_sq(
        self, anchored: Sequence[torch.Tensor], weights: torch.Tensor | None = None, fisher: bool = False,
        keep: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Σ(θ − θ₀)², or with ``fisher`` Σ F·(θ − θ₀)² (the same without F); ``weights`` per tensor (sharding).

        With F and a ``keep`` list, F·(θ − θ₀) of each tensor (∇Ω/α, full-size) is appended to it.
        """
        total = torch.zeros((), dtype=torch.float32, device=self._home)
        with torch.no_grad():
            for sl, _, diff in self._drift_chunks(anchored):
                f = self._fisher_chunk(sl, anchored) if fisher else None
                w = None if weights is None else weights[sl]
                if f is None:
                    total = total + _sum_sq(diff, w).to(total.device)
                elif diff:
                    weighted = torch._foreach_mul(diff, f)
                    if keep is not None:
                        keep += weighted
                    squares = _sums_of_products(diff, weighted)
                    total = total + (squares if w is None else squares * w.to(squares.device)).sum().to(total.device)
                    del weighted
        return total

    def value(self, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Ω as a detached fp32 0-d tensor (no host sync); under sharding, this rank's pieces' share of Ω.

        With F, a ``keep`` list receives F·(θ − θ₀) of each anchored tensor (see :meth:`gradients`).
        """
        anchored, new = self.tensors()
        with torch.no_grad():
            weighted_drift_sq = self._drift_sq(anchored, fisher=True, keep=keep)
            new_sq = _sum_sq(new).to(weighted_drift_sq.device) if new else torch.zeros_like(weighted_drift_sq)
            return self.omega(weighted_drift_sq, new_sq)

    def omega(self, weighted_drift_sq: torch.Tensor, new_sq: torch.Tensor) -> torch.Tensor:
        """Ω from its sums of squares: (α/2)·Σ F·(θ − θ₀)² + (β/2)·Σ_new θ²."""
        return 0.5 * self.coef * weighted_drift_sq + 0.5 * self.decay_coef * new_sq

    def log_values(self) -> dict[str, torch.Tensor]:
        """Ω and the norms for a training log, as 0-d tensors (global: a collective under sharding, see
        :meth:`statistics`): ``penalty``, ``weight_norm`` and, with anchored tensors, ``drift`` and ``rel_drift``."""
        stats = self.statistics()
        values = {"penalty": self.omega(stats["weighted_drift_sq"], stats["new_sq"]),
                  "weight_norm": (stats["anchored_sq"] + stats["new_sq"]).sqrt()}
        if self.anchored_names:
            drift = stats["drift_sq"].sqrt()
            values["drift"] = drift
            values["rel_drift"] = drift / stats["anchor_sq"].sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        return values

    def statistics(self) -> dict[str, torch.Tensor]:
        """Sums of squares behind the logged norms, as 0-d fp32 tensors (take roots for norms); ``weighted_drift_sq``
        is Σ F·(θ − θ₀)², the anchored part of Ω/(α/2) (``drift_sq`` without F).

        They are global: under sharding each rank sums its pieces and ONE all-reduce adds the ranks up (a collective:
        every rank must call this at the same step).
        """
        anchored, new = self.tensors()
        wa, wn = self._weights_a, self._weights_n
        with torch.no_grad():
            drift_sq = self._drift_sq(anchored, wa)
            weighted = self._drift_sq(anchored, wa, fisher=True) if self._fisher_tensors is not None else drift_sq
            if self._anchor_sq is None:
                self._anchor_sq = sum(
                    (_sum_sq(self._anchor_tensors[sl], None if wa is None else wa[sl]).to(drift_sq.device)
                     for sl in self._anchored_chunks),
                    torch.zeros_like(drift_sq),
                )
            anchor_sq = self._anchor_sq
            new_sq = _sum_sq(new, wn).to(drift_sq.device) if new else torch.zeros_like(drift_sq)
            anchored_sq = _sum_sq(anchored, wa).to(drift_sq.device) if anchored else torch.zeros_like(drift_sq)
            stats = torch.stack([drift_sq, anchor_sq, new_sq, anchored_sq, weighted])
            if self._sharded:
                dist.all_reduce(stats)
        return dict(zip(("drift_sq", "anchor_sq", "new_sq", "anchored_sq", "weighted_drift_sq"), stats.unbind()))

    def group_statistics(self, group_of: Callable[[str], str]) -> dict[str, dict[str, float]]:
        """Per group of parameters (``group_of(name)``), and over all of them as ``"all"``: Σθ² (``weight_sq``),
        Σ(θ − θ₀)² (``drift_sq``), Σθ₀² (``anchor_sq``) and the numbers of anchored and new values, as floats.

        For reports such as drift per layer group. Global like :meth:`statistics` (under sharding a collective:
        every rank must call it). A group without anchored parameters has no ``drift_sq`` / ``anchor_sq``.
        """
        groups = ["all"] + sorted({group_of(n) for n in self.anchored_names + self.new_names})  # same on all ranks
        row_of = {group: i for i, group in enumerate(groups)}
        anchored, new = self.tensors()
        columns = []  # per entry: weight_sq, drift_sq, anchor_sq, anchored values, new values
        with torch.no_grad():
            for sl, anchors, diff in self._drift_chunks(anchored):
                drift = _norms_sq(diff)
                counts = torch.tensor([float(t.numel()) for t in anchored[sl]], device=drift.device)
                columns.append(torch.stack([_norms_sq(anchored[sl]), drift, _norms_sq(anchors), counts,
                                            torch.zeros_like(counts)], dim=1).to(self._home))
            if new:
                weight = _norms_sq(new)
                counts = torch.tensor([float(t.numel()) for t in new], device=weight.device)
                zero = torch.zeros_like(weight)
                columns.append(torch.stack([weight, zero, zero, zero, counts], dim=1).to(self._home))
            sums = torch.zeros(len(groups), 5, dtype=torch.float32, device=self._home)
            if columns:
                entries = torch.cat(columns)
                if self._sharded:  # a piece held by several ranks counts once
                    entries = entries * torch.cat([self._weights_a, self._weights_n]).to(entries)[:, None]
                rows = torch.tensor([row_of[group_of(n)] for n in self._labels_a + self._labels_n], device=self._home)
                sums.index_add_(0, rows, entries)
                sums[0] = entries.sum(0)
            if self._sharded:
                dist.all_reduce(sums)
        anchored_groups = {"all", *map(group_of, self.anchored_names)} if self.anchored_names else set()
        out = {}
        for group, (weight_sq, drift_sq, anchor_sq, n_anchored, n_new) in zip(groups, sums.tolist()):
            out[group] = {"weight_sq": weight_sq, "anchored_values": n_anchored, "new_values": n_new}
            if group in anchored_groups:
                out[group] |= {"drift_sq": drift_sq, "anchor_sq": anchor_sq}
        return out

    # ---- the in-loss (autograd) form, and its ZeRO-3 variant --------------------------------------------------
    def loss_term(self) -> torch.Tensor:
        """Ω as a differentiable scalar whose backward adds ∇Ω with multi-tensor kernels (the in-loss form).

        Under FSDP the inputs are the local shards (``DTensor.to_local`` views), so each rank's term reaches only
        its own gradient shards, bypassing the data-parallel reduction: the ranks' terms add up to Ω exactly.
        Under ZeRO-3 the gradient has to go through DeepSpeed's reduction instead: see ``zero3.py``.
        """
        if self._zero3:
            from hf_l2.zero3 import zero3_loss_term

            return zero3_loss_term(self)
        anchored, new = self.tensors()
        return _PenaltyFunction.apply(self, *anchored, *new)

    def gradients(
        self, scale: torch.Tensor | float = 1.0, weighted: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """∇Ω·scale as new tensors, for the anchored and new parts (the backward of :meth:`loss_term`).

        ``weighted``: F·(θ − θ₀) as kept by ``value(keep=...)`` at the same θ, scaled in place into the anchored
        part instead of being formed again.
        """
        anchored, new = self.tensors()
        if weighted is not None:
            grads_a = weighted
            if grads_a:
                torch._foreach_mul_(grads_a, self._factor(self.coef, scale))
        else:
            grads_a = []
            for sl, _, diff in self._drift_chunks(anchored):
                fisher = self._fisher_chunk(sl, anchored)
                if fisher is not None:
                    torch._foreach_mul_(diff, fisher)
                torch._foreach_mul_(diff, self._factor(self.coef, scale))
                grads_a += diff
        grads_n = torch._foreach_mul(new, self._factor(self.decay_coef, scale)) if new else []
        return grads_a, grads_n

    @staticmethod
    def _factor(coef: float, scale: torch.Tensor | float):
        return scale * coef if isinstance(scale, torch.Tensor) else coef * scale

    def bound_parameters(self) -> list[torch.Tensor]:
        """Each parameter with a non-empty piece under the penalty, once, in binding order."""
        return list({id(p.param): p.param for p, _ in self._anchored + self._new}.values())

    def local_gradients(self, scale: torch.Tensor, ids: set[int]) -> dict[int, tuple[Piece, torch.Tensor]]:
        """∇Ω·scale on this rank's pieces of the parameters whose ``id`` is in ``ids``, flattened, by ``id``.

        A piece's anchored rows come first and its new rows (a resized embedding's) last.
        """
        anchored = [(i, p, r) for i, (p, r) in enumerate(self._anchored) if id(p.param) in ids]
        new = [(p, r) for p, r in self._new if id(p.param) in ids]
        out: dict[int, tuple[Piece, torch.Tensor]] = {}

        def flat(piece: Piece) -> torch.Tensor:
            if id(piece.param) not in out:
                local = piece.local
                out[id(piece.param)] = (piece, torch.zeros(piece.numel, dtype=local.dtype, device=local.device))
            return out[id(piece.param)][1]

        if anchored:
            values = [self._view(p.local, r, False) for _, p, r in anchored]
            anchors = [self._anchor_tensors[i] for i, _, _ in anchored]
            ((_, _, diffs),) = self._drift_chunks(values, anchors, [slice(None)])  # a few gathered tensors: one chunk
            if self._fisher_tensors is not None:
                fisher = [self._fisher_tensors[i].to(d.device) for (i, _, _), d in zip(anchored, diffs)]
                torch._foreach_mul_(diffs, fisher)
            torch._foreach_mul_(diffs, self._factor(self.coef, scale))
            for (_, piece, _), d in zip(anchored, diffs):
                flat(piece)[: d.numel()] = d.reshape(-1)
        if new:
            values = [self._view(p.local, r, True) for p, r in new]
            grads = torch._foreach_mul(values, self._factor(self.decay_coef, scale))
            for (piece, _), g in zip(new, grads):
                target = flat(piece)
                target[target.numel() - g.numel() :] = g.reshape(-1)
        return out


class _PenaltyFunction(torch.autograd.Function):
    """Ω(θ) with a hand-written backward: one autograd node instead of one per parameter.

    The gradient flows through autograd like any loss term, so it carries the AMP loss scale, DeepSpeed's hooks
    and DDP's reducer see it, and gradient accumulation treats it like the task loss.
    """

    @staticmethod
    def forward(ctx, penalty: L2Penalty, *tensors):
        ctx.penalty = penalty
        # With F the forward forms F·(θ − θ₀) anyway: kept, it is the backward's full-size ∇Ω/α (formed earlier,
        # not in addition), so the backward is one in-place scaling.
        ctx.weighted = [] if penalty.has_fisher and penalty.coef and any(ctx.needs_input_grad) else None
        return penalty.value(keep=ctx.weighted)

    @staticmethod
    def backward(ctx, grad_output):
        penalty = ctx.penalty
        weighted, ctx.weighted = ctx.weighted, None  # consumed in place: a second backward forms it again
        grads_a, grads_n = penalty.gradients(grad_output, weighted)
        # A zero coefficient gives no gradient at all (None), not zeros: a parameter the task did not reach keeps
        # `.grad = None`, and the optimizer skips it.
        if not penalty.coef:
            grads_a = [None] * len(grads_a)
        if not penalty.decay_coef:
            grads_n = [None] * len(grads_n)
        return (None, *grads_a, *grads_n)

