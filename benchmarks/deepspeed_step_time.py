"""Step time of Delta-LoRA under DeepSpeed ZeRO-3 next to plain PEFT LoRA, same run, 2 CPU processes.

    python benchmarks/deepspeed_step_time.py [--hidden 256] [--steps 40]

Launches ``tests/scripts/deepspeed_trainer.py`` (the worker the tests use) once with the runs ``zero3-lora``,
``zero3-factored`` and ``zero3-inplace`` in turn, on a Llama of the given hidden size (2 layers, q/v targeted, r=4,
2 rows of 12 tokens per rank), and prints the median seconds per optimizer step after W starts moving (steps
start_step+2 on, over ``--rounds`` launches) and the ratio to plain LoRA. CPU numbers: they show the overhead of
the gathers Delta-LoRA adds, not GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ["zero3-lora", "zero3-factored", "zero3-inplace"]


def launch(env: dict[str, str], args: argparse.Namespace) -> dict[str, list[float]]:
    """One launch of the worker; the seconds of each step after W starts moving (the slower rank's), per run."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        worker = ["-m", "tests.scripts.deepspeed_trainer", "--out", out, "--runs", ",".join(RUNS)]
        options = ["--hidden", str(args.hidden), "--steps", str(args.steps), "--start-step", str(args.start_step)]
        done = subprocess.run(
            [*command, *worker, *options], env=env, check=False, capture_output=True, text=True, cwd=ROOT
        )
        if done.returncode != 0:
            sys.exit(f"the worker failed ({done.returncode}):\n{done.stderr[-6000:]}")
        result = {}
        for run in RUNS:
            ranks = [json.loads(Path(out, f"{run}.rank{r}.json").read_text())["seconds_per_step"] for r in range(2)]
            result[run] = [max(s) for s in list(zip(*ranks))[args.start_step + 2 :]]
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--start-step", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="launches; the median is over all of them")
    args = parser.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    steps: dict[str, list[float]] = {run: [] for run in RUNS}
    for _ in range(args.rounds):  # shared machines are noisy: several launches, each running every configuration
        for run, seconds in launch(env, args).items():
            steps[run] += seconds
    medians = {run: statistics.median(seconds) for run, seconds in steps.items()}
    print(
        f"ZeRO-3, 2 CPU processes, hidden {args.hidden}, {args.rounds} x {args.steps} steps "
        "(median s/step after W moves)"
    )
    for run, median in medians.items():
        print(f"  {run:16s} {median * 1000:8.1f} ms   x{median / medians['zero3-lora']:.2f} vs plain LoRA")


if __name__ == "__main__":
    main()
