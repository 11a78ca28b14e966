"""The output anchor's reference forward under FSDP2 (`fully_shard`): θ₀ through the sharded model itself.

`torch.func.functional_call` cannot stand in for θ here: FSDP2's pre-forward hook all-gathers each layer's own
sharded parameters and registers the gathered tensors on the module, over any substitute. So θ₀ is put where the
all-gather reads: each rank swaps its shard of θ₀ with its shard of θ in the parameters' local tensors
(`DTensor.to_local()` views `FSDPParam._sharded_param_data`, the all-gather's input), runs the forward, and swaps
back. A swap, not a copy aside: the only extra memory is one tensor's temporary, and both ways are exact copies in
the parameter's dtype, so θ comes back bit for bit. Where θ₀ is narrower than the parameter (a bf16 model that
accelerate upcasts to fp32 under FSDP2 mixed precision) θ₀ widens exactly but θ would not fit in it: that shard of
θ is kept aside instead. The optimizer keeps the same parameter objects and storage.

FSDP2 leaves the root module's parameters gathered after forward (they would be gathered again at once for
backward: `FSDPState._lazy_init` clears the root's `post_forward_mesh_info`), and a module already gathered is not
gathered again (`FSDPParamGroup.unshard` returns early). So every FSDP module is resharded before the reference
forward, lest θ gathered earlier be used as θ₀, and after it, lest the training forward run on gathered θ₀.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


def fsdp2_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules of ``model`` that `fully_shard` wrapped (none: the model is not under FSDP2)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def swapped_in(
    modules: Sequence[FSDPModule], local_pairs: Callable[[], Sequence[tuple[torch.Tensor, torch.Tensor]]]
) -> Iterator[None]:
    """Each (local θ, local θ₀) pair that ``local_pairs`` gives swapped in place, with every FSDP module resharded
    before and after. ``local_pairs`` is called once all are resharded: a gathered module holds whole tensors."""
    with torch.no_grad():
        _reshard(modules)
        pairs = local_pairs()
        aside = [_put(param, anchor) for param, anchor in pairs]
        try:
            yield
        finally:
            _reshard(modules)  # frees the gathered θ₀ before θ is back in the shards
            for (param, anchor), kept in zip(pairs, aside):
                if kept is None:
                    _put(param, anchor)  # swapped back
                else:
                    param.copy_(kept)


def _reshard(modules: Sequence[FSDPModule]) -> None:
    for module in modules:
        module.reshard()


def _put(param: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor | None:
    """``anchor`` into ``param``; what ``param`` held goes into ``anchor`` where it fits exactly (same dtype: None
    is returned), else into the copy returned."""
    kept = param.clone()
    param.copy_(anchor)
    if anchor.dtype != param.dtype:
        return kept
    anchor.copy_(kept)
    return None
