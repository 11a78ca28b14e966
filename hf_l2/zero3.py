"""The in-loss penalty under DeepSpeed ZeRO-3, where parameters are empty placeholders outside forward.

Ω's value needs only this rank's partitions (``param.ds_tensor``) and its piece of θ₀. Its gradient must travel
DeepSpeed's own path (the gradient hooks that reduce-scatter into the partitioned fp32 gradients, before the
engine's clipping and step, all inside ``backward``), and that path only takes full-size gradients of parameters
recorded in the autograd graph with their full shape. So the anchored parameters are gathered once per optimizer
step, a chunk at a time, just long enough for autograd to record them; the backward hands each one a full-size
gradient that is zero except on this rank's partition, where it is world × ∇Ω: DeepSpeed averages gradients over
the ranks, and every partition gets exactly one rank's contribution, so the average is ∇Ω.

Cost per optimizer step (not per micro-batch): one all-gather of the penalized parameters, as one forward does.
"""

from __future__ import annotations

import torch

from hf_l2.chunks import chunk_slices
from hf_l2.sharding import world_size


def zero3_loss_term(penalty) -> torch.Tensor:
    """Ω's local share, plus zero-valued autograd nodes whose backward delivers ∇Ω to DeepSpeed's gradient hooks.

    ``penalty`` is the bound `L2Penalty` (its ``value``, ``bound_parameters`` and ``local_gradients``); this module
    does not import it, so that `penalty.py` alone depends on the other.
    """
    import deepspeed

    params = penalty.bound_parameters()
    term = penalty.value()
    for sl in chunk_slices([p.ds_numel for p in params]):
        chunk = params[sl]
        with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None):
            term = term + _Zero3Gradient.apply(penalty, *chunk)
    return term


class _Zero3Gradient(torch.autograd.Function):
    """Value 0; gradient: world × ∇Ω on this rank's partition of each (gathered) parameter, zero elsewhere."""

    @staticmethod
    def forward(ctx, penalty, *params):
        ctx.penalty = penalty
        ctx.ids = [id(p) for p in params]
        ctx.shapes = [p.shape for p in params]
        return torch.zeros((), dtype=torch.float32, device=params[0].device)

    @staticmethod
    def backward(ctx, grad_output):
        local = ctx.penalty.local_gradients(grad_output * world_size(), set(ctx.ids))
        grads = []
        for pid, shape in zip(ctx.ids, ctx.shapes):
            piece, flat = local[pid]
            full = torch.zeros(shape.numel(), dtype=flat.dtype, device=flat.device)
            full[piece.start : piece.start + flat.numel()] = flat
            grads.append(full.view(shape))
        return (None, *grads)
