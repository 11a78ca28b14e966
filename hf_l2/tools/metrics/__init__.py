"""`evaluate` metric modules shipped with hf_l2, so evaluation works without the Hub."""

from __future__ import annotations

from pathlib import Path

import evaluate

AVAILABLE = ("sacrebleu", "chrf")


def load(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` on the module file shipped here (`"sacrebleu"` or `"chrf"`); never touches the network."""
    if name not in AVAILABLE:
        raise ValueError(f"No shipped metric {name!r}; available: {list(AVAILABLE)}.")
    return evaluate.load(str(Path(__file__).with_name(f"{name}.py")), **kwargs)
