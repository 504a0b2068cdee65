"""What ``deltalora-hf compare`` hides unless ``--verbose``: warnings and log lines a user of the command cannot act on.

* ``FutureWarning`` / ``DeprecationWarning`` raised inside transformers, PEFT or torch by their own calls (e.g.
  transformers' "``is_gradient_checkpointing`` is deprecated", which ``Trainer`` triggers on every run);
* DeepSpeed's "Setting accelerator to CPU", logged to stdout when ``Trainer`` imports DeepSpeed on a machine without
  GPUs (the command does not use DeepSpeed);
* in the worker processes, everything they write to stderr, which goes to ``workers.log`` in the output folder
  instead (``stderr_of_new_processes``): among it bitsandbytes' "Failed to load CPU gemm_4bit_forward from
  kernels-community", logged when ``import peft`` imports bitsandbytes on a CPU with AVX512-BF16 and no ``kernels``
  package. A worker logs it while it imports this package, before any code of ours runs in it; the main process
  logs it once, when ``deltalora-hf`` starts. Errors in a worker still reach the console: the pool raises them here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Loggers that set their own level and handler when their library is imported: a filter on the logger survives that.
FILTERED_LOGGERS = ("DeepSpeed",)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet(verbose: bool = False) -> None:
    """Hide, in this process, the warnings and log lines listed in the module docstring; nothing with ``verbose``."""
    if verbose:
        return
    import transformers

    for name in FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(_errors_only)  # once: Logger.addFilter skips a filter it already has
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # no weight-loading bars: one progress line per run


@contextlib.contextmanager
def stderr_of_new_processes(path: Path | None) -> Iterator[None]:
    """Processes started inside this block write their stderr to ``path`` (appended); ``None``: no change.

    File descriptor 2 is redirected while the block runs and restored after it, so only what this process writes
    to stderr during the block (nothing, when the block only starts processes) also goes to ``path``.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
