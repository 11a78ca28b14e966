"""Checks of user-given settings that raise early and name the field: numbers, and regexes of parameter names."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence


def compile_patterns(patterns: Sequence[str] | str | None, field_name: str) -> list[re.Pattern]:
    """Compile user regexes, naming the config field when one is invalid."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{field_name}`: {pattern!r} is not a valid regular expression ({err}).") from err
    return compiled


def check_number(field_name: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    """Reject a non-number, NaN, infinity or a value below ``minimum`` (or equal, when ``strict``), naming the field."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"`{field_name}` must be a number {'>' if strict else '≥'} {minimum:g}, got {value!r}.")


def matches(name: str, patterns: Iterable[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)
