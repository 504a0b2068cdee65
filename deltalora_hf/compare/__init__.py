"""``deltalora-hf compare``: LoRA, LoRA with ``lora_alpha·(1+λ)``, Delta-LoRA and full fine-tuning on one task.

Every arm gets the same model, data, batch order, schedule and steps; each arm's learning rate is chosen on a
validation split carved from train, and the test split is read once, for the final table (mean ± std over seeds,
paired differences with 95% intervals). ``lora-scaled`` is the control of docs/theory.md: under Adam, Delta-LoRA after
step K follows a LoRA with scale ``(1+λ)·alpha/r``. Modules: ``.settings`` (arms, options), ``.data`` (task,
splits), ``.run`` (one training run), ``.protocol`` (selection, seeds), ``.report`` (tables, plot, JSON),
``.measure`` and ``.metrics`` (helpers the benchmarks share).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

from .data import SetupError, TextTask, load_task
from .protocol import compare
from .settings import ARM_TITLES, ARMS, DEFAULT_ARMS, CompareSettings, build_parser, settings_from_args

__all__ = [
    "ARMS",
    "ARM_TITLES",
    "DEFAULT_ARMS",
    "CompareSettings",
    "SetupError",
    "TextTask",
    "compare",
    "load_task",
    "main",
]


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    """Console entry point: ``deltalora-hf compare [options]`` (also ``python -m deltalora_hf compare``).

    ``command`` is the command line written into the report; by default the one that ``argv`` stands for.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        compare(settings_from_args(args), command=command or shlex.join(["python", "-m", "deltalora_hf", *argv]))
    except (SetupError, ValueError) as error:
        print(f"deltalora-hf {args.command}: {error}", file=sys.stderr)
        return 2
    return 0
