"""Imported first by `hf_l2`: silence a stock warning that fires on every run and concerns nothing hf_l2 does.

bitsandbytes (imported by peft when it is installed) warns at import, on CPUs with AVX-512 BF16, that it could not
fetch a 4-bit matmul kernel from the Hub (`kernels-community`); where the `kernels` package is installed (newer
transformers pull it in), its lookup says instead that it skips a trust check because the Hub is offline.
"""

import logging


class _NoFourBitKernelLookup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_NoFourBitKernelLookup())
