"""One run per output folder: `train()` holds a lock file in `output_dir` naming its process and host.

Two runs in one folder resume each other's checkpoints, rotate them away and overwrite each other's files. The
main process creates `_hf_l2.lock` (atomically: `O_CREAT | O_EXCL`) holding its pid and host, and deletes it when
`train()` ends, also on an exception. A lock whose process is gone (same host, no such pid: a killed run) is
stale and taken over; a lock from another host cannot be checked and is respected. Under several processes only
the main one takes the lock; it tells the others, so every rank refuses, or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator

import torch.distributed as dist

# "_*" is left out of Hub uploads, by the Trainer's pushes during training and by `hf-l2 push`.
LOCK_FILE = "_hf_l2.lock"


class OutputDirInUseError(ValueError):
    """Another live run holds the output folder's lock."""


def _holder(path: str) -> dict | None:
    """The lock's content ({"pid", "host"}), or None if it vanished; an unreadable one counts as live."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        return {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        return {"pid": None, "host": None, "text": text}  # being written this instant, or not ours: respected


def _is_stale(holder: dict) -> bool:
    """The lock's process is known to be gone: same host, and no process has its pid."""
    if holder["host"] != socket.gethostname() or holder["pid"] is None:
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _refusal(output_dir: str, path: str, holder: dict) -> OutputDirInUseError:
    who = f"pid {holder['pid']} on {holder['host']}" if holder["pid"] is not None else "an unreadable lock"
    return OutputDirInUseError(
        f"{output_dir} is in use by another run ({who}, lock file {path}): two runs in one output folder resume and "
        "overwrite each other's checkpoints. Wait for it to end, pass another `output_dir`, or delete the lock file "
        "if that run is gone."
    )


def check_free(output_dir: str) -> None:
    """Raise `OutputDirInUseError` if a live run holds `output_dir` (before deleting anything in it)."""
    path = os.path.join(output_dir, LOCK_FILE)
    holder = _holder(path)
    if holder is not None and not _is_stale(holder):
        raise _refusal(output_dir, path, holder)


def acquire(output_dir: str) -> str:
    """Take `output_dir`'s lock for this process (taking over a stale one); return its path. Raises
    `OutputDirInUseError` while a live run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # released meanwhile: try again
                continue
            if not _is_stale(holder):
                raise _refusal(output_dir, path, holder) from None
            # Remove only the stale lock just read: a run that took it over meanwhile keeps its own.
            if _holder(path) == holder:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        return path


def release(path: str) -> None:
    """Delete the lock at `path` if this process holds it."""
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def holding_output_dir(output_dir: str, main: bool) -> Iterator[None]:
    """Hold `output_dir`'s lock for the block (`main`: this is the process that takes it). With several processes,
    the main one's verdict is sent to all, so that every rank raises the same error or none does."""
    path, refusal = None, None
    if main:
        try:
            path = acquire(output_dir)
        except OutputDirInUseError as err:
            refusal = str(err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise OutputDirInUseError(refusal)
    try:
        yield
    finally:
        if path is not None:
            release(path)
