"""What decides the floating-point path of a CPU run, said in the demo's and the study's reports.

torch, oneDNN and MKL each pick the widest vector instructions the CPU has (AVX-512 on this machine, AVX2 on
many others), and the numbers change with them. `make demo` and `make real-model` pin all three to AVX2
(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_CBWR`): the path of any x86-64 CPU with AVX2. The variables
must be set before torch starts, so they are set by the caller, and reported here as they took effect.
"""

from __future__ import annotations

import os

import torch

# The pins `make demo` sets (its `FLOAT_PATH`, which a test keeps equal to this).
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def float_path() -> str:
    """What decides the floating-point path of these runs: torch's CPU kernels (as torch reports them) and the ISA
    pins of oneDNN and MKL, as set."""
    pins = ", ".join(f"{name}={os.environ[name]}" for name in PINS if name != "ATEN_CPU_CAPABILITY"
                     and name in os.environ)
    return f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}" + (f" ({pins})" if pins else "")
