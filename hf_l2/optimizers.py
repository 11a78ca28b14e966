"""Which optimizers update the parameters inside `backward`, where no gradient added afterwards can reach them.

The Trainer offers three kinds: layer-wise GaLore / APOLLO (`optim="*_layerwise"`: one optimizer per parameter,
stepped by a post-accumulate-grad hook, behind a `LayerWiseDummyOptimizer` whose `step` does nothing) and LOMO /
AdaLomo (`optim="lomo"`, `"adalomo"`: `fused_backward` updates each parameter as its gradient is formed).
"""

from __future__ import annotations

IN_BACKWARD_OPTIMS = ("lomo", "adalomo")


def _steps_in_backward(optimizer_cls: type) -> bool:
    names = {c.__name__ for c in optimizer_cls.__mro__}
    return "LayerWiseDummyOptimizer" in names or hasattr(optimizer_cls, "fused_backward")


def in_backward_optimizer(optim: str, optimizer=None, optimizer_cls_and_kwargs=None) -> str | None:
    """A description of the optimizer if it steps inside backward, else None.

    ``optim`` is `TrainingArguments.optim`; ``optimizer`` one passed by hand (`optimizers=(...)`, maybe wrapped by
    accelerate) and ``optimizer_cls_and_kwargs`` the Trainer argument of that name, which take precedence.
    """
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        return f"the optimizer `{type(inner).__name__}`" if _steps_in_backward(type(inner)) else None
    if optimizer_cls_and_kwargs is not None:
        cls = optimizer_cls_and_kwargs[0]
        return f"`optimizer_cls_and_kwargs` ({cls.__name__})" if _steps_in_backward(cls) else None
    optim = str(getattr(optim, "value", optim))
    if optim.endswith("layerwise") or optim in IN_BACKWARD_OPTIMS:
        return f"`optim='{optim}'`"
    return None
