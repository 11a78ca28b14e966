"""Where this rank's piece of each parameter lies in the full tensor, under every way of spreading a model.

The penalty only ever touches local pieces: θ₀ is cut to the same piece, ∇Ω goes into the local gradient, and
only the logged sums of squares cross ranks. A piece is a contiguous range of the full tensor flattened in
row-major order, which covers all the layouts below:

- plain tensors (one process, DDP, DeepSpeed ZeRO-1/2): the whole tensor, identical on every rank;
- FSDP2 (`fully_shard`): a DTensor sharded on dim 0 (optionally replicated, HSDP): a block of rows;
- FSDP1 with `use_orig_params=True`: a 1-D view of this rank's part of the flat parameter, maybe empty;
- DeepSpeed ZeRO-3: `param.ds_tensor`, this rank's part of the flattened parameter (padded at the end).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

# Prefixes FSDP1 and activation checkpointing put in parameter names; the penalty keys on the model's own names.
_WRAPPER_PREFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


@dataclass(frozen=True)
class Piece:
    """This rank's piece of one parameter.

    Attributes:
        param: the parameter object the optimizer steps (a DTensor under FSDP2, a placeholder under ZeRO-3).
        start: offset of the piece in the full parameter flattened in row-major order.
        shape: shape of the full parameter.
        replicas: how many ranks hold this same piece; `None` when every rank holds the whole tensor.
    """

    param: torch.Tensor
    start: int
    shape: torch.Size
    replicas: int | None = None

    @property
    def sharded(self) -> bool:
        return self.replicas is not None

    @property
    def zero3(self) -> bool:
        return hasattr(self.param, "ds_tensor")

    @property
    def local(self) -> torch.Tensor:
        """The piece's values; differentiable for plain, DTensor and FSDP1 parameters (not ZeRO-3 partitions)."""
        if isinstance(self.param, DTensor):
            return self.param.to_local()
        if self.zero3:
            return self.param.ds_tensor.narrow(0, 0, self.numel)
        return self.param

    @property
    def numel(self) -> int:
        if self.zero3:
            return max(0, min(self.param.ds_tensor.ds_numel, self.param.ds_numel - self.start))
        return self.local.numel()

    def grad(self) -> torch.Tensor:
        """The piece's gradient, created as zeros when the backward gave none (as autograd would give ∇Ω alone)."""
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        grad = self.param.grad
        return grad.to_local() if isinstance(grad, DTensor) else grad


def clean_name(name: str) -> str:
    """The model's own parameter name, without the prefixes that FSDP1 and checkpoint wrappers insert."""
    return _WRAPPER_PREFIXES.sub("", name)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_pieces(model: nn.Module) -> dict[str, Piece]:
    """Every parameter of ``model`` by its own name (tied weights once), with this rank's piece of it."""
    fsdp1 = _fsdp1_offsets(model)
    out = {}
    for name, param in model.named_parameters():
        name = clean_name(name)
        if isinstance(param, DTensor):
            out[name] = _dtensor_piece(name, param)
        elif hasattr(param, "ds_tensor"):
            out[name] = _zero3_piece(param)
        elif fsdp1 is not None:
            start, shape, replicas = fsdp1.get(id(param), (0, param.shape, None))  # None: not managed by FSDP
            out[name] = Piece(param, start, torch.Size(shape), replicas)
        else:
            out[name] = Piece(param, 0, param.shape)
    return out


def _dtensor_piece(name: str, param: DTensor) -> Piece:
    """FSDP2 shards dim 0 with `torch.chunk` semantics: rank i holds rows [i·c, (i+1)·c) with c = ⌈rows / n⌉."""
    mesh, placements = param.device_mesh, param.placements
    sharded_dims = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
    if any(not isinstance(p, (Shard, Replicate)) for p in placements) or len(sharded_dims) > 1 or any(
        placements[d].dim != 0 for d in sharded_dims
    ):
        raise ValueError(
            f"L2 penalty: parameter {name!r} has placements {placements}; only FSDP2's default row sharding "
            "(`Shard(0)`, optionally with `Replicate()` for HSDP) is supported. Drop `shard_placement_fn` or "
            "tensor parallelism for the penalized parameters."
        )
    rows = param.shape[0] if param.dim() else 1
    if sharded_dims:
        shards = mesh.size(sharded_dims[0])
        chunk = math.ceil(rows / shards)
        start_row = min(mesh.get_local_rank(sharded_dims[0]) * chunk, rows)
        own_rows = min(chunk, rows - start_row)
    else:
        shards, start_row, own_rows = 1, 0, rows
    local = param.to_local()
    if world_size() % shards or (param.dim() and local.shape[0] != own_rows):
        raise RuntimeError(
            f"L2 penalty: cannot place the local shard {tuple(local.shape)} of {name!r} {tuple(param.shape)} "
            f"({shards} shards, world size {world_size()})."
        )
    return Piece(param, start_row * (param.numel() // rows if rows else 0), param.shape, world_size() // shards)


def _zero3_piece(param: torch.Tensor) -> Piece:
    """ZeRO-3 pads the flattened parameter to a multiple of the world size; rank r holds the r-th equal part."""
    group = getattr(param, "ds_process_group", None)
    if dist.get_world_size(group) != world_size():
        raise ValueError(
            "L2 penalty under ZeRO-3 needs parameters partitioned over all ranks; partitioning over a subgroup "
            "(MiCS, `mics_shard_size`) is not supported: use plain ZeRO-3 or FSDP2 with HSDP."
        )
    part = param.ds_tensor.ds_numel
    return Piece(param, dist.get_rank(group) * part, torch.Size(param.ds_shape), 1)


def _fsdp1_offsets(model: nn.Module) -> dict[int, tuple[int, torch.Size, int]] | None:
    """FSDP1 (`use_orig_params=True`): id(param) → (start, full shape, replicas) of this rank's piece.

    Reads the flat parameters' shard bookkeeping (`_shard_param_infos`), which FSDP1 exposes no public API for.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    modules = FSDP.fsdp_modules(model)
    if not modules:
        return None
    offsets = {}
    for module in modules:
        handle = module._handle
        if handle is None:
            continue
        flat = handle.flat_param
        if not handle._use_orig_params:
            raise ValueError(
                "L2 penalty under FSDP1 needs `use_orig_params=True` (accelerate: `fsdp_use_orig_params: true`), "
                "so that each parameter keeps its name; or use FSDP2 (`fsdp_version: 2`)."
            )
        replicas = world_size() // module.process_group.size()
        for param, info, shape in zip(flat._params, flat._shard_param_infos, flat._shapes):
            start = info.intra_param_start_idx if info.in_shard else 0  # not in this rank's shard: an empty view
            offsets[id(param)] = (start, torch.Size(shape), replicas)
    return offsets
