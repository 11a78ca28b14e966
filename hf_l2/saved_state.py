"""Every tensor file the penalty saves beside the weights (θ₀, F, the KL's snapshot): their names and globs,
writing and reading them, their checksums and checks, and restoring a resumed run's terms from them.

θ₀ is saved next to optimizer.pt in every checkpoint (and beside the final weights), so that resume restores it
instead of taking it again; F (`l2_sp_fisher`) is laid out like θ₀ and saved in the same format. Sharded runs
(FSDP, ZeRO-3) save one file per rank with that rank's pieces, as FSDP and DeepSpeed save their states. Tools
(interpolate, saved-folder checks) and the Hub upload take the names and globs from here.

A damaged file can still be perfectly readable: NaN or flipped exponent bits train a NaN or stalled model, all
zeros trains plain L2, a tensor of the wrong shape would be reshaped or sliced into place. So each file carries a
SHA-256 of every tensor's bytes (with its dtype and shape) in its metadata, verified on load, and every tensor is
checked against its parameter: shape (embeddings may differ in rows, as `match_anchor` allows), a floating-point
dtype, finite values, and for F no negative value.

All zeros: a tensor whose checksum verifies was written as zeros, so it is legitimate (LoRA's B₀, a zero-initialized
bias or head). In a file without checksums (written before they existed) zeros cannot be told from a zero-filled
torn write, so they are reported by a warning.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from hf_l2.anchor import embedding_parameter_names
from hf_l2.penalty import L2Penalty
from hf_l2.penalty_term import L2Terms, PenaltyTerm
from hf_l2.sharding import local_pieces, world_size

logger = logging.get_logger(__name__)

# Each kind of file as (whole, per rank): the per-rank name is formatted with `rank` and `world`.
ANCHOR_FILE = "l2_anchor.safetensors"
RANK_ANCHOR_FILE = "l2_anchor-rank{rank:05d}-of-{world:05d}.safetensors"
ANCHOR_FILES = (ANCHOR_FILE, RANK_ANCHOR_FILE)
FISHER_FILE = "l2_fisher.safetensors"
RANK_FISHER_FILE = "l2_fisher-rank{rank:05d}-of-{world:05d}.safetensors"
FISHER_FILES = (FISHER_FILE, RANK_FISHER_FILE)
# θ₀ of the trainable parameters that the output anchor (`l2_kl_coef`) holds and the penalty does not: per rank
# under FSDP2, else whole.
KL_ANCHOR_FILES = ("l2_kl_anchor.safetensors", "l2_kl_anchor-rank{rank:05d}-of-{world:05d}.safetensors")


def rank_files_glob(files: tuple[str, str]) -> str:
    """The glob of the per-rank files of `files`, whatever the number of ranks."""
    return files[1].split("{")[0] + "*-of-*.safetensors"


def any_file_glob(files: tuple[str, str]) -> str:
    """The glob of `files`, whole or per rank."""
    return files[0].removesuffix(".safetensors") + "*.safetensors"


# Every file above, whole or per rank (e.g. what the Hub upload leaves out).
SAVED_STATE_GLOBS = tuple(any_file_glob(files) for files in (ANCHOR_FILES, KL_ANCHOR_FILES, FISHER_FILES))

# What to do about a bad F file: one given as `l2_fisher_path`, one in the checkpoint being resumed.
FISHER_PATH_FIX = ("Pass an F computed for this model as `l2_fisher_path`, or leave `l2_fisher_path` unset to compute "
                   "F from the Fisher data.")
FISHER_CHECKPOINT_FIX = ("Resume from an earlier checkpoint, or delete the file to compute F again from the Fisher "
                         "data (at the weights the trainer was built with: build it from the pretrained model then).")


# ---- checksums and checks -------------------------------------------------------------------------------------
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


# ---- writing and reading ------------------------------------------------------------------------------------
def save_anchor(
    anchors: dict[str, torch.Tensor],
    layout: dict[str, tuple[int, torch.Size]],
    folder: str,
    rank: int | None = None,
    world: int | None = None,
    source: str | None = None,
    files: tuple[str, str] = ANCHOR_FILES,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write θ₀ (or, with ``rank``/``world``, this rank's pieces of it) with where each piece sits in the full θ₀,
    ``source``, the model or folder θ₀ was taken from (for the card of a resumed run), and a checksum per tensor.

    ``files`` (whole, per rank) and extra ``metadata`` let tensors laid out like θ₀ (the Fisher) use the same format.
    """
    name = files[0] if rank is None else files[1].format(rank=rank, world=world)
    os.makedirs(folder, exist_ok=True)
    where = {n: [start, list(shape)] for n, (start, shape) in layout.items() if n in anchors}
    tensors = {k: v.detach().contiguous().cpu() for k, v in anchors.items()}
    metadata = {
        **(metadata or {}), "layout": json.dumps(where), **({"source": source} if source else {}),
        **checksum_metadata(tensors),
    }
    save_file(tensors, os.path.join(folder, name), metadata=metadata)
    return name


def expected_anchors(model: nn.Module, names: list[str]) -> dict[str, ExpectedAnchor]:
    """What θ₀ of each named parameter must look like in a checkpoint (for `load_anchor`)."""
    pieces = local_pieces(model)
    resizable = embedding_parameter_names(model, {n: p.param for n, p in pieces.items()})
    return {n: ExpectedAnchor(tuple(pieces[n].shape), n in resizable) for n in names}


def _anchor_file(folder: str, rank: int, world: int, files: tuple[str, str] = ANCHOR_FILES) -> str | None:
    """This rank's file from a sharded run, else the whole file, else None (``files``: whole, per-rank names)."""
    ranked = os.path.join(folder, files[1].format(rank=rank, world=world))
    whole = os.path.join(folder, files[0])
    return next((path for path in (ranked, whole) if os.path.isfile(path)), None)


def anchor_source(folder: str, rank: int = 0, world: int = 1) -> str | None:
    """The model or folder that the θ₀ saved in a checkpoint was taken from, if it was recorded."""
    path = _anchor_file(folder, rank, world)
    if path is None:
        return None
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("source")


def load_anchor(
    folder: str,
    rank: int = 0,
    world: int = 1,
    expected: dict[str, ExpectedAnchor] | None = None,
    files: tuple[str, str] = ANCHOR_FILES,
    what: str = "θ₀",
    fix: str = ANCHOR_FIX,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, torch.Size]]] | None:
    """θ₀ saved in a checkpoint, with its layout: this rank's file from a sharded run, else the whole-θ₀ file.

    Returns None when the checkpoint has neither. Raises when it only has pieces saved by another number of ranks,
    and when the file is damaged or its tensors do not fit `expected` (see `verify_anchor_file`; `what` and `fix`
    word the error for files laid out like θ₀, such as F).
    """
    path = _anchor_file(folder, rank, world, files)
    if path is None:
        others = sorted(glob.glob(os.path.join(folder, rank_files_glob(files))))
        if others:
            raise ValueError(
                f"{folder} holds θ₀ in per-rank pieces ({os.path.basename(others[0])}, ...) saved by a sharded run "
                f"with another number of processes than this one ({world}): resume with the same number of "
                "processes and the same FSDP/ZeRO settings."
            )
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read ({err}): it is truncated or corrupted, e.g. by a kill while it was saved. {fix}"
        ) from err
    where = json.loads(metadata.get("layout", "{}"))
    layout = {n: (int(start), torch.Size(shape)) for n, (start, shape) in where.items()}
    verify_anchor_file(path, tensors, layout, metadata, expected or {}, os.path.basename(path) == files[0], what, fix)
    return tensors, layout


def save_fisher(fisher, layout, folder: str, source: dict, rank: int | None = None, world: int | None = None) -> str:
    """Write F beside θ₀, in θ₀'s format, with ``source`` (where F came from: data, examples) in its metadata."""
    metadata = {"source": json.dumps(source)}
    return save_anchor(fisher, layout, folder, rank, world, files=FISHER_FILES, metadata=metadata)


def load_fisher(
    folder_or_file: str, rank: int = 0, world: int = 1, expected: dict[str, ExpectedAnchor] | None = None,
    fix: str = ANCHOR_FIX,
):
    """(F, its layout, its source) from a checkpoint or output folder (this rank's file under sharding, else the
    whole one) or from a file; None when there is none.

    The file is checked as θ₀ files are (checksums; with `expected`, the shape, dtype and finite values of each
    parameter's F) and its values must not be negative; `fix` says what to do about a bad file."""
    if os.path.isfile(folder_or_file):
        folder, files = os.path.dirname(folder_or_file), (os.path.basename(folder_or_file), RANK_FISHER_FILE)
    else:
        folder, files = folder_or_file, FISHER_FILES
    expected = {n: replace(want, nonnegative=True) for n, want in (expected or {}).items()}
    loaded = load_anchor(folder, rank, world, expected, files, "F", fix)
    if loaded is None:
        return None
    with safe_open(_anchor_file(folder, rank, world, files), "pt") as f:
        source = json.loads((f.metadata() or {}).get("source", "{}"))
    return (*loaded, source)


def read_fisher_path(path: str, model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """F from `l2_fisher_path` (a folder or a file) for the parameters `names`, and where it came from."""
    loaded = load_fisher(path, expected=expected_anchors(model, names), fix=FISHER_PATH_FIX)
    if loaded is None:
        raise ValueError(f"`l2_fisher_path`: no {FISHER_FILE} in {path!r}.")
    fisher, _, source = loaded
    return {n: fisher[n] for n in names if n in fisher}, {**source, "path": path}


def has_fisher_file(folder: str) -> bool:
    """Whether a checkpoint holds F (whole or per rank): resume restores it instead of recomputing."""
    return bool(glob.glob(os.path.join(folder, any_file_glob(FISHER_FILES))))


# ---- a run's terms: saved into a folder, restored on resume -----------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def save_terms(terms: L2Terms, folder: str, source: str | None, fisher_source: dict | None,
               main_process: bool) -> None:
    """θ₀ of every term (and F) into a checkpoint or output folder, with `source` (the model θ₀ was taken from) and
    `fisher_source`; runs on every rank, and without sharding the main process alone writes."""
    anchors = {name: t for term in terms if term is not None for name, t in term.state_dict()["anchors"].items()}
    if not anchors:
        return
    state = terms.penalty.state_dict()  # its layout says where each piece sits; the LoRA factors are always whole
    sharded = terms.penalty.sharded  # every rank holds different pieces: each saves its own
    if sharded:
        save_anchor(anchors, state["anchor_layout"], folder, dist.get_rank(), world_size(), source)
    elif main_process:
        save_anchor(anchors, state["anchor_layout"], folder, source=source)
    if state["fisher"] is None:
        return
    if sharded:
        save_fisher(state["fisher"], state["fisher_layout"], folder, fisher_source or {}, dist.get_rank(), world_size())
    elif main_process:
        save_fisher(state["fisher"], state["fisher_layout"], folder, fisher_source or {})


@dataclass(frozen=True)
class RestoredRun:
    """What restoring a checkpoint's files says about the run: where its θ₀ and (when restored) its F came from."""

    source: str | None
    fisher_source: dict | None


def restore_terms(checkpoint: str, terms: L2Terms, model: nn.Module, anchor_path: str | None,
                  with_fisher: bool) -> RestoredRun | None:
    """Put the θ₀ (and, `with_fisher`, the F) that `checkpoint` was trained with back into `terms`, after checking
    the files fit this model and the penalized set; None when it holds no θ₀."""
    anchored = [t for t in terms if t is not None and t.anchored_names]
    if not anchored:
        return None
    names = [n for t in anchored for n in t.anchored_names]
    rank = _rank()
    loaded = load_anchor(checkpoint, rank, world_size(), expected_anchors(model, names))
    if loaded is None:
        logger.warning(
            f"{checkpoint} has no {ANCHOR_FILE}; L2-SP keeps the anchor taken when the trainer was built. "
            "Build the trainer from the pretrained model (or set `l2_anchor_path`) so that θ₀ is right."
        )
        return None
    saved, layout = loaded
    source = anchor_source(checkpoint, rank, world_size())
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(
            f"{checkpoint}/{ANCHOR_FILE} lacks θ₀ for {len(missing)} penalized parameter(s), first {missing[:5]}: "
            "the penalized set differs from the checkpoint's (`l2_exclude`, `l2_exclude_bias_and_norm`, "
            "`l2_head_params` or the trainable parameters changed since). Resume with the settings of that run, "
            "or start a new run from the pretrained model."
        )
    _check_resumed_anchor(checkpoint, anchored, terms.penalty, saved, layout, anchor_path)
    for term in anchored:
        term.load_state_dict({"anchors": saved, "anchor_layout": layout})
    fisher_source = _restore_fisher(checkpoint, terms.penalty, model) if with_fisher else None
    for term in anchored:
        term.unbind()  # the next step cuts the restored θ₀ to this rank's pieces
    return RestoredRun(source, fisher_source)


def _restore_fisher(checkpoint: str, penalty: L2Penalty, model: nn.Module) -> dict | None:
    """F from the checkpoint (the run's own, already normalized) and its source; without one, the F computed
    before training stays (None)."""
    expected = expected_anchors(model, penalty.anchored_names)
    loaded = load_fisher(checkpoint, _rank(), world_size(), expected, FISHER_CHECKPOINT_FIX)
    if loaded is None:
        if penalty.fisher is None:
            raise ValueError(f"{checkpoint} has no {FISHER_FILE} and no F was computed before resuming.")
        return None
    fisher, layout, source = loaded
    penalty.load_state_dict({"fisher": fisher, "fisher_layout": layout})
    return source


def _check_resumed_anchor(checkpoint: str, terms: Sequence[PenaltyTerm], penalty: L2Penalty, saved, layout,
                          anchor_path: str | None) -> None:
    """A resumed run keeps the θ₀ it was trained with: refuse an `l2_anchor_path` that says otherwise, and say
    at WARNING when the weights the trainer was built with (the θ₀ it would have taken) differ from it."""
    differ = [
        n for t in terms
        for n in differing_anchors(t.anchors, t.state_dict().get("anchor_layout", {}), saved, layout)
    ]
    if not differ:
        return
    from_path = [n for n in differ if n in penalty.anchors] if anchor_path else []
    if from_path:
        raise ValueError(
            f"`l2_anchor_path`={anchor_path!r} differs from the θ₀ that {checkpoint} was trained "
            f"with in {len(from_path)} tensor(s), e.g. {from_path[:3]}; a resumed run keeps its own θ₀. To "
            "resume, drop `l2_anchor_path` or point it at the model this run started from; to anchor to the "
            "other model, start a new run from the checkpoint's weights without `resume_from_checkpoint`."
        )
    _warn_saved_anchor_in_force(checkpoint, differ)


def _warn_saved_anchor_in_force(checkpoint: str, differ: list[str]) -> None:
    logger.warning(
        f"θ₀ in force: the one saved in {checkpoint} (this run's own), not the weights the trainer was built "
        f"with, which differ in {len(differ)} tensor(s), e.g. {differ[:3]}."
    )


# ---- the output anchor's own snapshot ----------------------------------------------------------------------------
def save_kl_snapshot(own: dict[str, torch.Tensor], layout: dict[str, tuple[int, torch.Size]], folder: str,
                     sharded: bool, main_process: bool) -> None:
    """θ₀ that the KL holds beyond the penalty's, with where each tensor sits in the full θ₀ (`layout`). Written
    even when empty, so that a checkpoint without it is known to predate it; under sharding (`sharded`) every rank
    writes its pieces, else the main process the whole."""
    if sharded:
        save_anchor(own, layout, folder, dist.get_rank(), world_size(), files=KL_ANCHOR_FILES)
    elif main_process:
        save_anchor(own, layout, folder, files=KL_ANCHOR_FILES)


def read_kl_snapshot(
    checkpoint: str, own: dict[str, torch.Tensor], layout: dict[str, tuple[int, torch.Size]]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, torch.Size]]] | None:
    """The run's own θ₀ for the KL's snapshot `own` (laid out as `layout` says) and where its tensors sit: this
    rank's file from a sharded run, else the whole one, checked like the penalty's; None (with a warning) for a
    checkpoint saved before it existed. A trainer built from other weights (e.g. the checkpoint's) is told at
    WARNING that they are not used."""
    name = KL_ANCHOR_FILES[0]
    expected = {n: ExpectedAnchor(tuple(layout[n][1])) for n in own}  # exactly the parameter's shape
    loaded = load_anchor(checkpoint, _rank(), world_size(), expected, files=KL_ANCHOR_FILES)
    if loaded is None:
        logger.warning(
            f"{checkpoint} has no {name} (saved by an older hf_l2): the KL keeps θ₀ of {len(own)} tensor(s) the "
            "penalty does not hold as they were when the trainer was built. Build the trainer from the model "
            "the run started from so that the reference is right."
        )
        return None
    saved, saved_layout = loaded
    missing = [n for n in own if n not in saved]
    if missing:
        raise ValueError(
            f"{checkpoint}/{name} lacks θ₀ for {len(missing)} parameter(s) of the KL's reference, first "
            f"{missing[:5]}: the trainable parameters or the penalty's settings (`l2_mode`, `l2_exclude`, "
            "`l2_anchor_path`, `l2_anchor_dtype`, `l2_anchor_device`) differ from that run's. Resume with the "
            "settings of that run, or start a new run."
        )
    differ = differing_anchors(own, layout, saved, saved_layout)
    if differ:
        _warn_saved_anchor_in_force(checkpoint, differ)
    return saved, saved_layout
