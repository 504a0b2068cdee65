"""The ``deltalora-hf`` console script.

It lives outside the package for one reason: ``import deltalora_hf`` imports PEFT, which imports bitsandbytes, which
logs "Failed to load CPU gemm_4bit_forward from kernels-community" on CPUs with AVX512-BF16 when the optional
``kernels`` package is missing. Nothing of the command can act on that, and only code that runs before the import can
hide it (``--verbose`` shows it). The library itself leaves other libraries' logging alone.
"""

from __future__ import annotations

import logging
import sys

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def main() -> int:
    if "--verbose" not in sys.argv[1:]:
        logging.getLogger(_BNB_CPU_LOGGER).addFilter(_not_the_kernels_notice)
    from deltalora_hf.compare import main as compare_main

    return compare_main()


if __name__ == "__main__":
    sys.exit(main())
