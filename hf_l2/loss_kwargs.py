"""Whether a model's loss reads `num_items_in_batch`: the Trainer guesses it from the forward's signature alone."""

from __future__ import annotations

import inspect

from torch import nn

# Names in a forward's source that say its loss is normalized by `num_items_in_batch`: the argument itself, or
# transformers' `loss_function` (`ForCausalLMLoss` and the others pass it on to `fixed_cross_entropy`).
READS_NUM_ITEMS = ("num_items_in_batch", "loss_function")


def loss_reads_num_items(model: nn.Module) -> bool:
    """Whether `model`'s loss is normalized by `num_items_in_batch` when the Trainer passes it.

    The Trainer says yes for any forward that takes `**kwargs` (`model_accepts_loss_kwargs`), but e.g.
    `MarianMTModel.forward(..., **kwargs)` returns a plain `CrossEntropyLoss()` mean. Read from the source of the
    forward the model runs: no if it names neither `num_items_in_batch` nor `loss_function`; a forward that calls
    `super().forward(` is decided by its parent's. A model's own `accepts_loss_kwargs` is taken as is, and a
    forward whose source cannot be read counts as reading it (the Trainer's guess).
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):
            return True
        if any(name in source for name in READS_NUM_ITEMS):
            return True
        if "super().forward(" not in source:
            return False
    return True
