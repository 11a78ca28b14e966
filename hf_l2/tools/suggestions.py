"""The nearest valid flag for a misspelled one, for the recipes' and `hf-l2`'s error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_arguments_message(unknown: list[str], known: Iterable[str], what: str = "argument") -> str:
    """`unknown argument(s): ...; did you mean `--x`?` for what a parser left over (`--flag=value` counts as
    `--flag`; values after a flag are shown, not matched). ``known``: the valid flags, or a config file's keys with
    ``what="key"``."""
    known = sorted(set(known))
    names = list(unknown) if what == "key" else [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    matches = {name: difflib.get_close_matches(name, known, n=1) for name in names}
    hints = {name: match[0] for name, match in matches.items() if match}
    said = f"unknown {what}{'s' if len(names) > 1 else ''}: {' '.join(unknown)}"
    if not hints:
        return said
    if len(names) == 1:
        return f"{said}; did you mean `{hints[names[0]]}`?"
    return f"{said}; did you mean " + ", ".join(f"`{hint}` for `{name}`" for name, hint in hints.items()) + "?"
