"""Checks on a θ₀ file read back from a checkpoint: it is the θ₀ that was written, and it fits this model. F files
(`l2_sp_fisher`), laid out like θ₀, get the same checks and one more: no negative value.

A damaged `l2_anchor*.safetensors` can still be perfectly readable: NaN or flipped exponent bits train a NaN or
stalled model, all zeros trains plain L2, a tensor of the wrong shape would be reshaped or sliced into place. So
each file carries a SHA-256 of every tensor's bytes (with its dtype and shape) in its metadata, verified on load,
and every tensor is checked against its parameter: shape (embeddings may differ in rows, as `match_anchor`
allows), a floating-point dtype, finite values.

All zeros: a tensor whose checksum verifies was written as zeros, so it is legitimate (LoRA's B₀, a zero-initialized
bias or head). In a file without checksums (written before they existed) zeros cannot be told from a zero-filled
torn write, so they are reported by a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKSUM_KEY = "sha256"  # safetensors metadata: JSON {tensor name: hex digest}


# What `verify_anchor_file` tells the user to do about a bad θ₀ file in a checkpoint (the default).
ANCHOR_FIX = ("Resume from an earlier checkpoint, or delete the file to anchor to the weights the trainer was built "
              "with (build it from the pretrained model then).")


@dataclass(frozen=True)
class ExpectedAnchor:
    """What θ₀ (or F, laid out like θ₀) of one parameter must look like: the parameter's full shape; `resizable` for
    the embeddings, whose θ₀ may have other rows (a vocabulary resized after pretraining); `nonnegative` for F,
    a mean of squares."""

    shape: tuple[int, ...]
    resizable: bool = False
    nonnegative: bool = False


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata entry that `verify_anchor_file` checks, for CPU tensors about to be saved."""
    return {CHECKSUM_KEY: json.dumps({name: tensor_digest(t) for name, t in tensors.items()})}


def verify_anchor_file(
    path: str,
    tensors: dict[str, torch.Tensor],
    layout: dict[str, tuple[int, torch.Size]],
    metadata: dict[str, str],
    expected: dict[str, ExpectedAnchor],
    whole: bool,
    what: str = "θ₀",
    fix: str = ANCHOR_FIX,
) -> None:
    """Raise one error listing every damaged or misfitting tensor of the θ₀ file at `path`.

    `expected` holds the parameters this run anchors (others in the file are not checked against the model);
    `whole` says the file holds whole tensors (`l2_anchor.safetensors`), else this rank's pieces at `layout`.
    `what` names the file's contents (θ₀, F) and `fix` says what to do, in the messages.
    """
    problems = [f"{name}: {p}" for name, want in expected.items() if name in tensors
                and (p := _misfit(tensors[name], layout.get(name), want, whole, what))]
    recorded = json.loads(metadata[CHECKSUM_KEY]) if CHECKSUM_KEY in metadata else None
    if recorded is not None:
        problems += [f"{name}: its bytes differ from the checksum written with it" for name, t in tensors.items()
                     if recorded.get(name) != tensor_digest(t)]
        problems += [f"{name}: written but missing from the file" for name in recorded if name not in tensors]
    if problems:
        raise ValueError(
            f"{path} is damaged or does not belong to this model: {len(problems)} problem(s), "
            + "; ".join(problems[:5])
            + f". {fix}"
        )
    if recorded is None:
        logger.warning_once(f"{path} has no checksums (written by an older hf_l2): a torn write cannot be detected.")
        zeros = [n for n in expected if n in tensors and tensors[n].numel() and not tensors[n].any()]
        if zeros:
            logger.warning(
                f"{path}: {what} is all zeros for {len(zeros)} tensor(s), e.g. {zeros[:3]}; without a checksum a "
                "zero-filled write cannot be ruled out. If these were not zero in the model fine-tuning started "
                "from, the file is damaged."
            )


def _misfit(
    tensor: torch.Tensor, placed: tuple[int, torch.Size] | None, want: ExpectedAnchor, whole: bool, what: str
) -> str:
    """What is wrong with one saved tensor ('' if nothing): dtype, shape or position, non-finite or (`nonnegative`)
    negative values."""
    if not tensor.is_floating_point():
        return f"dtype {tensor.dtype}, not a floating-point type"
    start, full = placed if placed is not None else (0, tensor.shape)
    full, shape = tuple(full), tuple(want.shape)
    resized = want.resizable and len(full) == len(shape) == 2 and full[1] == shape[1]
    if full != shape and not resized:
        return f"{what} of shape {full}, the parameter has {shape}"
    if whole and (start != 0 or tuple(tensor.shape) != full):
        return f"shape {tuple(tensor.shape)}, expected {full}"
    if not whole and (start < 0 or start + tensor.numel() > math.prod(full)):
        return f"a piece of {tensor.numel()} values at {start}, outside the {math.prod(full)} of the parameter"
    finite = torch.isfinite(tensor)
    if not finite.all():
        nan = int(torch.isnan(tensor).sum())
        return f"{nan} NaN and {int((~finite).sum()) - nan} infinite value(s) of {tensor.numel()}"
    if want.nonnegative and (negative := int((tensor < 0).sum())):
        return f"{negative} negative value(s) of {tensor.numel()}"
    return ""


def differing_anchors(
    current: dict[str, torch.Tensor],
    current_layout: dict[str, tuple[int, torch.Size]],
    saved: dict[str, torch.Tensor],
    saved_layout: dict[str, tuple[int, torch.Size]],
) -> list[str]:
    """Names whose θ₀ differ between two stores, over the flat elements both hold (pieces may differ), beyond the
    rounding of the coarser dtype. A θ₀ not taken yet (meta) differs from nothing."""
    out = []
    for name, a in current.items():
        b = saved.get(name)
        if b is None or a.is_meta:
            continue
        start_a = current_layout.get(name, (0, a.shape))[0]
        start_b = saved_layout.get(name, (0, b.shape))[0]
        lo, hi = max(start_a, start_b), min(start_a + a.numel(), start_b + b.numel())
        if hi <= lo:
            continue
        x = a.detach().reshape(-1)[lo - start_a : hi - start_a].float()
        y = b.reshape(-1)[lo - start_b : hi - start_b].to(x.device, torch.float32)
        coarse = max(torch.finfo(a.dtype), torch.finfo(b.dtype), key=lambda f: f.eps)
        if not torch.allclose(x, y, rtol=coarse.eps, atol=coarse.tiny):
            out.append(name)
    return out
