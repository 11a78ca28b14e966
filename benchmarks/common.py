"""Shared by the benchmark scripts: device description, timing sync, peak memory and the sections of RESULTS.md."""

from __future__ import annotations

import ctypes
import gc
import platform
import random
import re
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import hf_l2

RESULTS = Path(__file__).with_name("RESULTS.md")
PREAMBLE = (
    "# Benchmarks\n\n"
    "The sections between `<!-- key -->` markers are written by the scripts in this folder, each replacing only its "
    "own (one per script and device type): do not edit them by hand, rerun the command given in the section.\n"
)


class RandomTokens(torch.utils.data.Dataset):
    """Seeded random token sequences that are their own labels: the benchmarks' training data."""

    def __init__(self, n: int, seq_len: int, vocab_size: int):
        self.ids = torch.randint(vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
    order_seed: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each timed call; each repeat calls every function once, in turn.

    With ``order_seed`` each repeat takes a fresh random order, so that no function always runs right after the
    same one (what a call leaves in the allocator and the caches changes the next one's cost). CPU seconds are this
    process's, all threads (``time.process_time``): on a shared machine they leave out the time other processes
    hold the cores, which wall time counts. They mean nothing for CUDA work.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(order_seed)
    for i in range(warmup + repeats):
        if order_seed is not None:
            rng.shuffle(order)
        for name in order:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            if i >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} (torch threads: {torch.get_num_threads()})"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory growth inside a ``with`` block, in bytes as ``.delta`` (``None`` where it cannot be measured).

    CUDA: the caching allocator's ``max_memory_allocated``. CPU (Linux only): the process's peak resident set
    (VmHWM), reset through ``/proc/self/clear_refs`` once glibc has returned its free pages (``malloc_trim``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.delta: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux ≥ 4.0)
            self.base = _status_kib("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.delta = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.delta = (_status_kib("VmHWM") - self.base) * 1024

    @staticmethod
    def label(device: torch.device) -> str:
        if device.type == "cuda":
            return "growth of `torch.cuda.max_memory_allocated`"
        return "growth of the process's peak RSS (VmHWM reset via `/proc/self/clear_refs`; n/a off Linux)"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def environment(device: torch.device, *notes: str) -> str:
    """Markdown list: device, versions, date, the exact command line, then ``notes``."""
    items = [
        f"device: {device_name(device)}",
        (f"torch {torch.__version__}, transformers {transformers.__version__}, hf_l2 {hf_l2.__version__}, "
        f"python {platform.python_version()}"),
        f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"command: `{shlex.join(['python', *sys.argv])}`",
        *notes,
    ]
    return "\n".join(f"- {item}" for item in items)


def write_section(path: Path, key: str, body: str) -> None:
    """Put ``body`` between ``<!-- key -->`` and ``<!-- /key -->`` in ``path``: replaces that section, or appends it."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else PREAMBLE
    section = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if section.search(text):
        text = section.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    print(f"wrote section {key!r} of {path}")


def add_run_arguments(parser) -> None:
    """--threads and --out, shared by every benchmark script."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (default 1: on a shared VM a stolen vCPU stalls every 2-thread parallel region)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file whose section this run replaces")
