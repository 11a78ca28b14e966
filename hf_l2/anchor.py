"""Where θ₀ comes from: the pretrained weights on disk or the Hub, or the model's current values (the files θ₀ is
saved to are `hf_l2.saved_state`'s)."""

from __future__ import annotations

import json
import os
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hf_l2.lora import adapter_parameter_names, modules_to_save_originals
from hf_l2.penalty import L2Penalty, Selection, snapshot
from hf_l2.sharding import local_pieces


def read_weights(path_or_repo_id: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved model: a local folder (safetensors, sharded or not, or pytorch_model.bin) or a Hub id."""
    folder = path_or_repo_id
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(path_or_repo_id, allow_patterns=["*.safetensors", "*.json", "*.bin"])
        except Exception as err:
            raise ValueError(
                f"`l2_anchor_path`: {path_or_repo_id!r} is neither a local folder nor a reachable Hub model "
                f"({type(err).__name__}: {err}). Pass the folder your pretrained model was saved in."
            ) from err
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    legacy = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return _read_weights_file(single, load_file)
    if os.path.isfile(index):
        shards = _read_weights_file(index, lambda path: sorted(set(_json_file(path)["weight_map"].values())))
        weights = {}
        for shard in shards:
            weights.update(_read_weights_file(os.path.join(folder, shard), load_file))
        return weights
    if os.path.isfile(legacy):
        return _read_weights_file(legacy, lambda path: torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(
        f"`l2_anchor_path`: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {folder!r}."
    )


def _json_file(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_weights_file(path: str, read):
    """`read(path)`, or one error naming the file (and where a link leads) when it is not what its name says:
    a damaged or hostile header, a link to another kind of file, a missing shard."""
    try:
        return read(path)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        target = os.path.realpath(path)
        shown = path if target == os.path.abspath(path) else f"{path} (a link to {target})"
        raise ValueError(
            f"`l2_anchor_path`: {shown} cannot be read ({type(err).__name__}: {err}): it is damaged or not the file "
            "its name says. Point `l2_anchor_path` at the folder the pretrained model was saved in by "
            "`save_pretrained`, or save it again."
        ) from err


def embedding_parameter_names(model: nn.Module, parameters: dict[str, torch.Tensor]) -> frozenset[str]:
    """Names of the input/output embedding weights: the only parameters allowed to change rows vs. the anchor."""
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = _embedding_module(model, getter)
        if module is not None and getattr(module, "weight", None) is not None:
            wanted.add(id(module.weight))
    return frozenset(n for n, p in parameters.items() if id(p) in wanted)


def _embedding_module(model: nn.Module, getter: str) -> nn.Module | None:
    """`model.<getter>()`, or None for a model without one: transformers 5's `PreTrainedModel.get_input_embeddings`
    raises `NotImplementedError` where it finds no embedding (a regression head, many vision / audio models)."""
    try:
        return getattr(model, getter, lambda: None)()
    except NotImplementedError:
        return None


def match_anchor(
    shapes: dict[str, torch.Size],
    names: list[str],
    weights: dict[str, torch.Tensor],
    base_model_prefix: str = "",
    resizable: frozenset[str] = frozenset(),
    field: str = "l2_anchor_path",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pair each parameter name with a saved tensor; names absent from ``weights`` are new parameters.

    A saved base model (``h.0...``) matches a model with a head (``transformer.h.0...``) through
    ``base_model_prefix``. Only ``resizable`` parameters (the embeddings) may differ in their first dimension;
    any other shape mismatch raises, listing the first offenders; ``field`` names the setting the weights came from.
    """
    prefix = f"{base_model_prefix}." if base_model_prefix else ""
    found, new, bad = {}, [], []
    for name in names:
        candidates = [name, name.removeprefix(prefix), prefix + name] if prefix else [name]
        key = next((c for c in candidates if c in weights), None)
        if key is None:
            new.append(name)
            continue
        saved, shape = weights[key], tuple(shapes[name])
        same = tuple(saved.shape) == shape
        resized = name in resizable and saved.dim() == len(shape) == 2 and saved.shape[1] == shape[1]
        if not (same or resized):
            bad.append(f"{name}: model {shape} vs anchor {tuple(saved.shape)}")
            continue
        found[name] = saved
    if bad:
        raise ValueError(
            f"`{field}`: {len(bad)} parameter shape(s) differ from the anchor, first: "
            + "; ".join(bad[:5])
            + f". Point `{field}` at the checkpoint this model was fine-tuned from."
        )
    return found, new


def take_anchors(
    model: nn.Module,
    parameters: dict[str, torch.Tensor],
    names: list[str],
    anchor_weights: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    field: str = "l2_anchor_path",
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, tuple[int, torch.Size]]]:
    """θ₀ for ``names``, the names that have none (new parameters), and where each θ₀ sits in its full tensor.

    PEFT `modules_to_save` copies are anchored to the frozen original module beside them, PEFT adapter weights
    to their current values; the other names to ``anchor_weights`` (matched by :func:`match_anchor`) or, without
    ``anchor_weights``, to their current values: this rank's
    piece of them when the model is already sharded (ZeRO-3 `zero.Init`), the whole tensor otherwise.
    """
    originals = {n: t for n, t in modules_to_save_originals(model).items() if n in names}
    anchors = snapshot(originals, list(originals), dtype, device)
    rest = [n for n in names if n not in originals]
    pieces = local_pieces(model)
    # Adapter weights (LoRA A/B, ...) start where PEFT put them, and no pretrained checkpoint holds them.
    own = rest if anchor_weights is None else sorted(set(rest) & adapter_parameter_names(model), key=rest.index)
    anchors.update(snapshot(pieces, own, dtype, device))
    layout = {n: (pieces[n].start, pieces[n].shape) for n in own}
    rest = [n for n in rest if n not in layout]
    if not rest:
        return anchors, [], layout
    found, absent = match_anchor(
        {n: pieces[n].shape for n in rest},
        rest,
        anchor_weights,
        getattr(model, "base_model_prefix", ""),
        embedding_parameter_names(model, parameters),
        field,
    )
    anchors.update({n: t.to(dtype=dtype, device=device or parameters[n].device) for n, t in found.items()})
    return anchors, absent, layout


def l2_sp_penalty(
    model: nn.Module,
    parameters: dict[str, torch.Tensor],
    selection: Selection,
    coef: float,
    decay_coef: float,
    anchor_weights: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    field: str = "l2_anchor_path",
) -> tuple[L2Penalty, list[str]]:
    """The L2-SP term over ``selection`` with θ₀ from :func:`take_anchors`, and the selected names that have no
    θ₀ (they join the new parameters)."""
    anchors, absent, layout = take_anchors(model, parameters, selection.anchored, anchor_weights, dtype, device, field)
    anchored = [n for n in selection.anchored if n in anchors]
    penalty = L2Penalty(
        coef, decay_coef, anchored, selection.new + absent, anchors, anchors_on_cpu=device == "cpu",
        anchor_layout=layout,
    )
    return penalty, absent
