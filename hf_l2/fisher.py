"""The diagonal empirical Fisher at θ₀, the weights of `l2_mode="l2_sp_fisher"` (L2-SP-Fisher, Li, Grandvalet &
Davoine, ICML 2018; EWC, Kirkpatrick et al., PNAS 2017):

    Fᵢ = (1/N)·Σₙ (∂ℓₙ/∂θᵢ)²

with ℓₙ the model's own loss on the n-th example alone. It is the mean of the squared per-example gradients,
never the square of the mean gradient (a known bug of hand-written EWC): each example gets its own forward and
backward (a loop over batches of one, which works for any model and any collator; `torch.func`'s vmap does not
go through Hugging Face models' mask construction). F costs about N forward+backward passes of one example.

`diagonal_fisher` and `normalize_fisher` are pure torch; `trainer_fisher` feeds them a trainer's data
(`hf_l2.saved_state` keeps F beside θ₀ in checkpoints).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


def diagonal_fisher(
    loss_of: Callable[[Any], torch.Tensor],
    parameters: Mapping[str, torch.Tensor],
    examples: Iterable[Any],
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], int]:
    """F of ``parameters`` (name → tensor) over ``examples``, and how many examples there were.

    ``loss_of(example)`` is ℓₙ, a scalar, for one example. Squares are summed in fp32 and stored in ``dtype``.
    A parameter the loss does not reach has F = 0.
    """
    names, tensors = list(parameters), list(parameters.values())
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    count = 0
    for example in examples:
        grads = torch.autograd.grad(loss_of(example), tensors, allow_unused=True)
        reached = [(s, g.float()) for s, g in zip(sums, grads) if g is not None]
        if reached:
            squares, values = zip(*reached)
            torch._foreach_addcmul_(list(squares), list(values), list(values))
        count += 1
    if count == 0:
        raise ValueError("The Fisher needs at least one example; the Fisher data set is empty.")
    return {n: (s / count).to(dtype) for n, s in zip(names, sums)}, count


def normalize_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F / mean(F) over all values, so that α weighs about as in L2-SP."""
    total = sum(f.double().sum() for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = float(total) / max(count, 1)
    if not math.isfinite(mean):
        raise ValueError(
            f"The Fisher is not finite (its mean is {mean}): the model's loss or gradients on the Fisher data are "
            "NaN or infinite. Check the model's weights and the Fisher data."
        )
    if mean <= 0:
        raise ValueError(
            "The Fisher is zero on every penalized value (the loss does not depend on them on this data): "
            "check the Fisher data's labels, or set `l2_fisher_normalize=False`."
        )
    return {n: (f.float() / mean).to(f.dtype) for n, f in fisher.items()}


def trainer_fisher(trainer, dataset, names: list[str], samples: int, seed: int, dtype: torch.dtype):
    """F of the trainer's model over ``samples`` examples of ``dataset`` (a random subset drawn with ``seed``, all
    of it when smaller), each collated alone by the trainer's data collator; the model runs in eval mode
    (no dropout) and F is taken at its current weights. Every process computes the same F.
    """
    from tqdm.auto import tqdm

    model = trainer.model
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        raise ValueError(
            "`l2_mode='l2_sp_fisher'`: under DeepSpeed ZeRO-3 the weights are partitioned when the trainer is built, "
            "so F cannot be computed here: compute it in a one-process run and pass its file as `l2_fisher_path`."
        )
    if hasattr(dataset, "column_names"):  # a `datasets.Dataset`: keep only what the model's forward takes
        dataset = trainer._remove_unused_columns(dataset, description="Fisher")
    if hasattr(dataset, "__len__"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
        examples, total = (dataset[i] for i in order), len(order)
    else:  # an iterable data set: its first examples
        examples, total = itertools.islice(iter(dataset), samples), samples
    named = dict(model.named_parameters())
    device = next(iter(named.values())).device

    def loss_of(example) -> torch.Tensor:
        batch = trainer._prepare_inputs(trainer.data_collator([example]))
        return model(**batch)["loss"]

    quiet = trainer.args.disable_tqdm or not trainer.is_local_process_zero()
    bar = tqdm(examples, total=total, desc="Fisher", disable=quiet)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            fisher, count = diagonal_fisher(loss_of, {n: named[n] for n in names}, bar, dtype)
    finally:
        model.train(was_training)
    return {n: f.to(device) for n, f in fisher.items()}, count
