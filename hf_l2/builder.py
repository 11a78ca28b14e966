"""From a model and the user's settings to penalty terms: which parameters, warnings about the patterns, θ₀.

One path for `L2Trainer` and `DecoupledL2SPCallback`, so that both select, warn and anchor alike.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import torch
from torch import nn
from transformers.utils import logging

from hf_l2.anchor import l2_sp_penalty
from hf_l2.argument_checks import compile_patterns
from hf_l2.lora import LoraDeltaPenalty, find_lora_layers
from hf_l2.penalty import L2Penalty, select_parameters, snapshot

logger = logging.get_logger(__name__)


def build_penalty(
    model: nn.Module,
    *,
    mode: str,
    coef: float,
    head_coef: float,
    head_params: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    decay_names: Collection[str] | None = None,
    skip: frozenset[str] = frozenset(),
    anchor_weights: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    fields: tuple[str, ...] = ("l2_head_params", "l2_exclude", "l2_anchor_path", "l2_coef", "l2_head_coef"),
    who: str = "L2 penalty",
) -> L2Penalty:
    """The L2 (``mode="l2"``) or L2-SP term (any other mode; Fisher weights are set on it later) over the model's
    trainable parameters, except those in ``skip``.

    ``decay_names`` are the names the Trainer's weight-decay rule decays (``get_decay_parameter_names``); given, the
    others (biases, norm weights) are left out. ``anchor_weights`` are the saved weights θ₀ is taken from (default:
    the current values), stored in ``dtype`` on ``device`` (None: beside each parameter); PEFT adapter weights are
    anchored to their current values even then, as they have no pretrained counterpart. ``fields`` name the settings
    behind ``head_params``, ``exclude``, ``anchor_weights``, ``coef`` and ``head_coef`` in messages; ``who`` starts
    each warning. ``skip`` are covered by another term with coefficient ``coef`` (the LoRA weight change).
    """
    head_field, exclude_field, anchor_field, coef_field, head_coef_field = fields
    parameters = {n: p for n, p in model.named_parameters() if n not in skip}  # tied weights appear once
    no_decay = frozenset(parameters) - frozenset(decay_names) if decay_names is not None else frozenset()
    selection = select_parameters(
        parameters.items(),
        exclude=compile_patterns(exclude, exclude_field),
        exclude_names=no_decay,
        new=compile_patterns(head_params, head_field) if mode != "l2" else [],
    )
    for pattern in selection.unmatched_patterns:
        if not any(re.search(pattern, n) for n in skip):
            logger.warning(f"{who}: pattern {pattern!r} matches no trainable parameter.")
    if not selection.anchored and not selection.new and not skip:
        logger.warning(f"{who}: no trainable parameter is regularized; training is unpenalized.")
    if mode == "l2":  # no θ₀: every tensor decays toward zero with α
        penalty = L2Penalty(0.0, coef, [], selection.anchored + selection.new)
    else:
        penalty, absent = l2_sp_penalty(
            model, parameters, selection, coef, head_coef, anchor_weights, dtype, device, anchor_field
        )
        if absent:
            logger.info(f"L2-SP: {len(absent)} parameter(s) absent from the anchor are new, e.g. {absent[:3]}")
    covered = (penalty.anchored_names or skip) and coef or penalty.new_names and penalty.decay_coef
    if (penalty.anchored_names or penalty.new_names or skip) and not covered:
        why = (
            f"`{coef_field}` is 0" if mode == "l2" else
            f"`{coef_field}`={coef} on {len(penalty.anchored_names) + len(skip)} anchored and `{head_coef_field}`="
            f"{head_coef} on {len(penalty.new_names)} new tensors (new: matched by `{head_field}` or absent from "
            f"`{anchor_field}`)"
        )
        logger.warning(f"{who}: {why}, so the penalty is zero on every parameter it covers and training is "
                       f"unpenalized; raise `{coef_field}`/`{head_coef_field}` or check `{anchor_field}`.")
    return penalty


def build_lora_penalty(
    model: nn.Module, coef: float, exclude: Sequence[str] | str | None, dtype: torch.dtype
) -> LoraDeltaPenalty:
    """L2-SP on the change of each trainable LoRA layer's effective weight (``l2_lora_delta``), θ₀ taken now."""
    layers = find_lora_layers(model, compile_patterns(exclude, "l2_exclude"))
    if not layers:
        raise ValueError(
            "`l2_lora_delta=True` but the model has no trainable LoRA layer: wrap it with "
            "`peft.get_peft_model(model, LoraConfig(...))`, or set `l2_lora_delta=False`."
        )
    names = [n for spec in layers for n in (*spec.a_names, *spec.b_names)]
    anchors = snapshot(dict(model.named_parameters()), names, dtype, None)
    logger.info(f"L2-SP on LoRA weight changes: {len(layers)} adapted layers.")
    return LoraDeltaPenalty(coef, layers, anchors)
