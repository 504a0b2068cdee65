"""The default ``deltalora-hf compare`` task with a larger selection budget: a preset of the compare command.

Every arm (LoRA, LoRA with alpha·(1+λ), Delta-LoRA, full fine-tuning, DoRA, LoRA+), three learning rates each, and
a λ/K sweep for Delta-LoRA (lora-scaled sweeps the same λ values, as its alpha follows λ); every candidate runs with
every seed and each arm keeps the best mean validation score, the test split is reported once (see
``deltalora_hf.compare.protocol``).
Any ``deltalora-hf compare`` option given here overrides the preset, e.g. ``--steps 60 --seeds 0``.

Run: ``python benchmarks/quality_nlu.py`` (every candidate with every seed: about three times the training runs of
0.3's protocol, which took 15 min on an idle 2-core machine; not re-run with this protocol yet).
Writes ``results/quality_nlu/`` (results.md, results.json, curves.png).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from deltalora_hf.compare import main as compare_main

PRESET = [
    "--arms",
    "lora,lora-scaled,deltalora,full,dora,loraplus",
    "--lr",
    "1e-3,2e-3,5e-3",
    "full=5e-5,1e-4,3e-4",
    "loraplus=2e-4,5e-4,1e-3",
    "--sweep-update-ratio",
    "0.5,1,2",
    "--sweep-start-step",
    "0,6,20",
    "--output-dir",
    str(Path(__file__).parent / "results" / "quality_nlu"),
]


def main(argv: list[str]) -> int:
    return compare_main(["compare", *PRESET, *argv], command=shlex.join(["python", "benchmarks/quality_nlu.py", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
