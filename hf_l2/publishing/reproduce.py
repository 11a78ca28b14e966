"""The command a card records to reproduce its run: this process's command line as the user typed it, behind the
launcher that started it, with secrets taken out and the config files it names copied beside the card.

`accelerate launch` and `torchrun` start each training process as a child of their own process, whose command line
(`/proc/<parent>/cmdline`, on Linux) holds their options as typed. Where it cannot be read, the launcher is rebuilt
from the variables it sets in each process (the process count, machines, mixed precision) and the card says that
its other options are missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# A flag or config key holding one of these words (as a whole word of its name: `hub_token`, `wandb_api_key`, not
# `max_new_tokens`) is a secret: it never reaches the card or the copied files.
SECRET_WORDS = {"token", "key", "secret", "password", "passwd", "apikey"}
# Flags whose value is a config file, copied beside the card; a recipe also takes one as its first argument.
CONFIG_FLAGS = ("--config_file", "--config", "--deepspeed")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
COPIES_FOLDER = "reproduce"


@dataclass
class Command:
    """A command line as words, and what a reader of the card must know about it."""

    words: list[str]
    notes: list[str] = field(default_factory=list)


def process_command() -> Command:
    """This process's command line as a user types it, behind `accelerate launch` / `torchrun` when one started it."""
    program = _program()
    if program is None:  # a console script (`hf-l2 ...`)
        return Command([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    env = os.environ
    launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env else "torchrun" if "TORCHELASTIC_RUN_ID" in env \
        else None
    if launcher is None:
        return Command(["python", *program, *sys.argv[1:]])
    typed = _launcher_command_line()
    if typed is not None:
        return Command(typed)
    note = (f"`{launcher}` started this run, but its command line could not be read (no `/proc`): the launcher "
            "options above are only those its environment tells (process count, machines, mixed precision); add "
            "the others you gave it (e.g. `--config_file`).")
    return Command([*_launcher_from_environment(launcher), *program, *sys.argv[1:]], [note])


def _program() -> list[str] | None:
    """`-m package.module` or the script path of this process; None for a console script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = sys.argv[0]
    if spec is not None and spec.name:  # python -m package.module
        return ["-m", spec.name.removesuffix(".__main__")]
    if not script.endswith(".py") and shutil.which(os.path.basename(script)) == script:
        return None
    return [script]


def _launcher_command_line() -> list[str] | None:
    """The launcher's command line as typed (`accelerate launch ...` / `torchrun ...`), read from the parent
    process; None when it cannot be read or the parent is not a launcher of this process."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [word.decode(errors="replace") for word in raw.split(b"\0")[:-1]]
    ours = sys.argv[1:]
    if ours and words[-len(ours):] != ours:
        return None
    for at, word in enumerate(words):
        name, before = os.path.basename(word), words[at - 1] if at else ""
        if (name == "accelerate" and words[at + 1: at + 2] == ["launch"]):
            return _with_default_accelerate_config(["accelerate", "launch", *words[at + 2:]], len(ours))
        if name == "accelerate-launch" or (word == "accelerate.commands.launch" and before == "-m"):
            return _with_default_accelerate_config(["accelerate", "launch", *words[at + 1:]], len(ours))
        if name == "torchrun" or (word == "torch.distributed.run" and before == "-m"):
            return ["torchrun", *words[at + 1:]]
    return None


def _with_default_accelerate_config(words: list[str], n_script_args: int) -> list[str]:
    """`accelerate launch` without `--config_file` reads its default config file when there is one: name it."""
    options = words[2: len(words) - n_script_args]
    if any(word.split("=", 1)[0] == "--config_file" for word in options):
        return words
    from accelerate.commands.config import default_config_file

    return [*words[:2], "--config_file", default_config_file, *words[2:]] if os.path.isfile(default_config_file) \
        else words


def _launcher_from_environment(launcher: str) -> list[str]:
    """The launcher and the options its environment variables tell."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    nodes = max(world // max(per_node, 1), 1)
    if launcher == "torchrun":
        return ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(per_node)]
    words = ["accelerate", "launch"]
    words += ["--num_processes", str(world)] if world > 1 else []
    words += ["--num_machines", str(nodes)] if nodes > 1 else []
    precision = env["ACCELERATE_MIXED_PRECISION"]
    return words + (["--mixed_precision", precision] if precision != "no" else [])


# ---- what the card records -------------------------------------------------------------------------------------
def is_secret(name: str) -> bool:
    """Whether a flag (`--hub_token`) or key (`wandb_api_key`) holds a secret."""
    return any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


def without_secrets(words: list[str]) -> list[str]:
    """The command without any secret flag and its value (`--hub_token X`, `--hub_token=X`)."""
    kept, skip_value = [], False
    for word in words:
        if skip_value and not word.startswith("--"):
            skip_value = False
            continue
        skip_value = False
        if word.startswith("-") and is_secret(word.split("=", 1)[0]):
            skip_value = "=" not in word
            continue
        kept.append(word)
    return kept


def recorded_command(command: Command, output_dir: str) -> Command:
    """``command`` as the card records it: without secrets, and with each config file it names replaced by a copy
    in `<output_dir>/reproduce/` (without secrets either), so the command still runs when the original is gone."""
    words = without_secrets(command.words)
    folder = Path(output_dir) / COPIES_FOLDER
    copied: list[str] = []
    for at in _config_file_positions(words):
        source = Path(words[at])
        name, number = source.name, 1
        while name in copied:  # two files of one name (e.g. two `config.yaml`)
            number += 1
            name = f"{source.stem}-{number}{source.suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_without_secret_keys(source))
        words[at] = str(folder / name)
        copied.append(name)
    notes = list(command.notes)
    if copied:
        names = ", ".join(f"`{name}`" for name in copied)
        notes.append(f"The config files it names are copies saved with the model, in `{COPIES_FOLDER}/`: {names}.")
    return Command(words, notes)


def _config_file_positions(words: list[str]) -> list[int]:
    """Where ``words`` name an existing config file: after a `CONFIG_FLAGS` flag, or first after the script."""
    positions = [at + 1 for at, word in enumerate(words[:-1]) if word in CONFIG_FLAGS]
    script = next((at for at, word in enumerate(words) if word.endswith(".py") or
                   (at and words[at - 1] in ("-m", "--module") and "." in word)), None)
    if script is not None and script + 1 < len(words):
        positions.append(script + 1)
    return sorted(at for at in set(positions)
                  if Path(words[at]).suffix in CONFIG_SUFFIXES and Path(words[at]).is_file())


def _without_secret_keys(path: Path) -> bytes:
    """The file's bytes, less its secret keys: for YAML the lines setting them (comments and layout stay)."""
    if path.suffix == ".json":
        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if not is_secret(k)}
            return [clean(v) for v in value] if isinstance(value, list) else value

        return (json.dumps(clean(json.loads(path.read_text(encoding="utf-8"))), indent=2) + "\n").encode()
    setting = re.compile(r"^\s*['\"]?([\w.\-]+)['\"]?\s*:")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(line for line in lines
                   if not ((m := setting.match(line)) and is_secret(m.group(1)))).encode()


def card_command(given: str | None, output_dir: str) -> tuple[str, list[str]]:
    """The command for the card of a run saved in ``output_dir``, and the notes to print under it: ``given`` (the
    caller's, kept as written unless it holds a secret or a config file), else this process's."""
    command = Command(shlex.split(given)) if given else process_command()
    recorded = recorded_command(command, output_dir)
    if given and recorded.words == command.words:
        return given, recorded.notes
    return shlex.join(recorded.words), recorded.notes
