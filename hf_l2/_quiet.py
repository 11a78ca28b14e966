"""Imported first by `hf_l2`: silence a stock warning that fires on every run and concerns nothing hf_l2 does.

bitsandbytes (imported by peft when it is installed) warns at import, on CPUs with AVX-512 BF16, that it could not
fetch a 4-bit matmul kernel from the Hub (`kernels-community`).
"""

import logging


class _NoFourBitKernelLookup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoFourBitKernelLookup())
