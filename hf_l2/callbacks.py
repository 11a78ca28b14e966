"""Callbacks for the stock `transformers.Trainer`: `WeightNormCallback` (weight norms and drift at each logging
step) and `DecoupledL2SPCallback` (the decoupled L2-SP pull, for code that cannot swap its Trainer)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .builder import build_penalty
from .decoupled import DecoupledPull
from .schedule import CoefSchedule
from .sharding import Piece, local_pieces, world_size
from .validation import check_number

logger = logging.get_logger(__name__)

# First matching rule names the group; order matters ("attn.c_proj" is attention, "mlp.c_proj" is MLP).
_TYPE_RULES = [
    ("layer_norm", re.compile(r"(^|[._])(ln|norm|layernorm|layer_norm|rmsnorm)[._\d]|norm(\.|$)", re.I)),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe|shared)(\.|$)", re.I)),
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|final_logits_bias)(\.|$)", re.I)),
    ("attention", re.compile(r"attn|attention|(^|\.)(q|k|v|o|out|qkv)_proj(\.|$)", re.I)),
    ("mlp", re.compile(r"mlp|(^|\.)(fc\d?|c_fc|ffn|feed_forward|up_proj|down_proj|gate_proj|wi|wo)(\.|$)", re.I)),
]
_LAYER = re.compile(r"\.(\d+)\.")


def parameter_group(name: str, group_by: str) -> str:
    """Group of a parameter name: by kind of layer (`"type"`) or by block index (`"layer"`, else by kind)."""
    if group_by == "layer":
        hit = _LAYER.search(name)
        if hit:
            return f"layer_{int(hit.group(1)):02d}"
    return next((group for group, rule in _TYPE_RULES if rule.search(name)), "other")


class WeightNormCallback(TrainerCallback):
    """Adds `weights/norm[/<group>]` (and `weights/drift[/<group>]`, `weights/rel_drift`) to each training log.

    Works with the stock `transformers.Trainer`. Reporting integrations (TensorBoard, W&B) only see keys added
    by callbacks that run before them: `L2Trainer` puts this callback first by itself; with the stock Trainer
    call `callback.attach(trainer)` instead of `add_callback`. `log_history` gets the keys either way.

    Args:
        group_by: `"type"` (embeddings, attention, mlp, layer_norm, head, other) or `"layer"` (per block index).
        track_drift: keep a snapshot of the trainable weights and log the distance to it.
        reference: the weights to measure drift from (a model or a state dict); by default the weights at the
            start of training. Pass it when resuming, or drift is measured from the resumed weights.
        snapshot_dtype / snapshot_device: storage of the snapshot.
    """

    def __init__(
        self,
        group_by: str = "type",
        track_drift: bool = False,
        reference: nn.Module | dict[str, torch.Tensor] | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        snapshot_device: str | None = None,
    ):
        if group_by not in ("type", "layer"):
            raise ValueError(f"`group_by` must be 'type' or 'layer', got {group_by!r}.")
        self.group_by = group_by
        self.track_drift = track_drift or reference is not None
        self.snapshot_dtype = snapshot_dtype
        self.snapshot_device = snapshot_device
        self._snapshot: dict[str, torch.Tensor] | None = None
        if reference is not None:
            state = reference.state_dict() if isinstance(reference, nn.Module) else reference
            self._snapshot = self._copy(state)

    def _copy(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            n: t.detach().to(dtype=self.snapshot_dtype, device=self.snapshot_device or t.device, copy=True)
            for n, t in tensors.items()
        }

    def attach(self, trainer) -> "WeightNormCallback":
        """Register on a trainer ahead of its reporting callbacks, so TensorBoard and W&B get the norms."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.track_drift and self._snapshot is None:
            if state.global_step > 0:
                logger.warning("WeightNormCallback: resumed run without `reference`; drift is from resumed weights.")
            trainable = {n: p.local for n, p in local_pieces(model).items() if p.param.requires_grad}
            self._snapshot = self._copy(trainable)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        values = self.measure(model)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Norms (and drift) of the trainable weights, globally and per group; one host sync.

        Under FSDP or ZeRO-3 each rank measures its own pieces and one all-reduce adds them up, so every rank
        must call this at the same step (the Trainer logs on every rank).
        """
        pieces = {n: p for n, p in local_pieces(model).items() if p.param.requires_grad and math.prod(p.shape)}
        if not pieces:
            return {}
        sharded = any(p.sharded for p in pieces.values()) and world_size() > 1
        named = [(n, p) for n, p in pieces.items() if p.numel]
        device = next(iter(pieces.values())).param.device
        shares = [1.0 / (p.replicas or world_size()) if sharded else 1.0 for _, p in named]
        weights = torch.tensor(shares, device=device)
        tensors = [p.local for _, p in named]
        squares = {"norm": self._squares(tensors, device) * weights}
        if self._snapshot is not None:
            pairs = [(i, t, self._piece_of(n, p, t)) for i, ((n, p), t) in enumerate(zip(named, tensors))
                     if n in self._snapshot]
            drift = torch.zeros(len(named), dtype=torch.float32, device=device)
            ref = torch.zeros_like(drift)
            if pairs:
                index = torch.tensor([i for i, _, _ in pairs], device=device)
                params = [t for _, t, _ in pairs]
                anchors = [a.to(t.device) for _, t, a in pairs]
                drift[index] = self._squares(torch._foreach_sub(params, anchors), device)
                ref[index] = self._squares(anchors, device)
            squares["drift"], squares["ref"] = drift * weights, ref * weights
        groups = [parameter_group(n, self.group_by) for n, _ in named]
        every_group = sorted({parameter_group(n, self.group_by) for n in pieces})  # the same list on every rank
        keys, sums = [], []
        for kind, per_tensor in squares.items():
            keys.append((kind, None))
            sums.append(per_tensor.sum())
            for group in every_group:
                mask = torch.tensor([g == group for g in groups], dtype=torch.bool, device=device)
                keys.append((kind, group))
                sums.append(per_tensor[mask].sum())
        totals = torch.stack(sums)
        if sharded:
            dist.all_reduce(totals)
        numbers = dict(zip(keys, totals.sqrt().tolist()))
        out = {}
        for (kind, group), value in numbers.items():
            if kind == "ref":
                continue
            out[f"weights/{kind}" + (f"/{group}" if group else "")] = value
        if self._snapshot is not None and numbers[("ref", None)] > 0:
            out["weights/rel_drift"] = numbers[("drift", None)] / numbers[("ref", None)]
        return out

    def _piece_of(self, name: str, piece: Piece, local: torch.Tensor) -> torch.Tensor:
        """The snapshot for this rank's piece; a full `reference` is cut to it once (and the rest freed)."""
        full = self._snapshot[name]
        if full.shape != local.shape:
            cut = full.reshape(-1)[piece.start : piece.start + local.numel()].view(local.shape)
            self._snapshot[name] = cut.clone() if cut.numel() < full.numel() else cut
        return self._snapshot[name]

    @staticmethod
    def _squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if not tensors:
            return torch.zeros(0, dtype=torch.float32, device=device)
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().to(device)


class DecoupledL2SPCallback(TrainerCallback):
    """Decoupled L2-SP on the stock `Trainer`: before each optimizer update, θ ← θ − lr·α·(θ − θ₀) on anchored
    parameters and θ ← θ − lr·β·θ on new ones, with the learning rate of each parameter's param group.

    The same pull as `L2Trainer` with `l2_impl="decoupled"` (see `hf_l2.decoupled`), hooked into the optimizer
    at `on_train_begin`. θ₀ is taken when the callback is built: from `model`, or from `reference`. When
    resuming, build it from the pretrained model again (the Trainer loads the checkpoint's weights later, inside
    `train`), or pass `reference`; a callback whose anchor equals the resumed weights warns.

    Args:
        model: the model the Trainer will train; its trainable parameters are selected now.
        coef: α ≥ 0, the pull toward θ₀.
        head_coef: β ≥ 0, the decay of new parameters (those matching `head_params` or absent from `reference`).
        head_params / exclude: regexes (`re.search` on parameter names), as `l2_head_params` / `l2_exclude`.
        exclude_bias_and_norm: leave biases and norm weights out (the Trainer's weight-decay rule).
        reference: θ₀ as a model or a state dict; a base model's names match a model with a head. PEFT
            `modules_to_save` copies default to their frozen original module.
        schedule: a `CoefSchedule` for α and β over the steps (default: constant).
    """

    def __init__(
        self,
        model: nn.Module,
        coef: float,
        head_coef: float = 0.0,
        head_params: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_bias_and_norm: bool = True,
        reference: nn.Module | dict[str, torch.Tensor] | None = None,
        schedule: CoefSchedule | None = None,
    ):
        check_number("coef", coef)
        check_number("head_coef", head_coef)
        self.penalty = build_penalty(
            model,
            mode="l2_sp",
            coef=coef,
            head_coef=head_coef,
            head_params=head_params,
            exclude=exclude,
            # The Trainer's own no-decay rule; `get_decay_parameter_names` does not use its `self`.
            decay_names=Trainer.get_decay_parameter_names(None, model) if exclude_bias_and_norm else None,
            weights=reference.state_dict() if isinstance(reference, nn.Module) else reference,
            fields=("head_params", "exclude", "reference"),
            who="DecoupledL2SPCallback",
        )
        self.schedule = schedule or CoefSchedule()
        self._pull = DecoupledPull([self.penalty])

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed_plugin", None) is not None:
            raise ValueError(
                "DecoupledL2SPCallback cannot hook DeepSpeed's optimizer (the engine steps inside `backward`); "
                "use `L2Trainer` with `l2_impl='loss'`."
            )
        self.penalty.bind(dict(model.named_parameters()))
        if state.global_step > 0 and self.penalty.anchored_names and self.penalty.statistics()["drift_sq"] == 0:
            logger.warning(
                "DecoupledL2SPCallback: θ₀ equals the resumed weights, so the pull is toward the checkpoint, not "
                "the pretrained model. Build the callback from the pretrained model or pass `reference=`."
            )
        self._pull.attach(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.penalty.set_factor(self.schedule(state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        self._pull.detach()
