"""What a save that fills the disk says: one `DiskFullError` line naming the folder, the file being written and what
to do, where the library's own error buries the cause (safetensors wraps it in a `SafetensorError`)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class DiskFullError(OSError):
    """A save ran out of disk space; the message names the folder, the file and what to do."""


# How a full disk reads in errors that carry no errno (safetensors' `SafetensorError` wraps Rust's io::Error).
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in _DISK_FULL_TEXTS)


def _newest_file(folder: str) -> str | None:
    """The file of `folder` written last: the one a failed save was writing (it creates the file, then writes)."""
    if not os.path.isdir(folder):
        return None
    files = [entry for entry in os.scandir(folder) if entry.is_file()]
    return max(files, key=lambda entry: entry.stat().st_mtime_ns).path if files else None


@contextlib.contextmanager
def naming_a_full_disk(folder: str, checkpoint: bool) -> Iterator[None]:
    """Turn a save into `folder` that runs out of disk space into one `DiskFullError` line naming the folder, the
    file being written and what to do (`checkpoint`: the folder is a checkpoint, which a rerun skips)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:  # noqa: BLE001 - only a full disk is reworded; anything else goes on as it was
        if not _is_disk_full(err):
            raise
        newest = _newest_file(folder)
        where = f" at {newest}" if newest else ""
        then = ("this checkpoint is incomplete and a rerun skips it: free space (or keep fewer checkpoints, "
                "`save_total_limit`), then rerun to resume from the last complete checkpoint" if checkpoint else
                "free space, then save again (`trainer.save_model()`) or rerun to resume from the last complete "
                "checkpoint")
        raise DiskFullError(
            errno.ENOSPC, f"The disk is full: saving {folder} stopped{where} ({' '.join(str(err).split())}); {then}."
        ) from err
