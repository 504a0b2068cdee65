"""Step time of Delta-LoRA on a base loaded sharded by transformers (native FSDP2) next to plain PEFT LoRA, same
launch, 2 CPU processes (gloo).

    python benchmarks/fsdp2_step_time.py [--hidden 256 1024] [--steps 30] [--rounds 3]

Saves a Llama of the given hidden size (2 layers, intermediate 2 x hidden) and launches
``tests/scripts/fsdp2_native_trainer.py`` (the worker the tests use) ``--rounds`` times, each training plain LoRA,
Delta-LoRA factored and Delta-LoRA in place in turn (the order rotates from round to round), with q_proj, v_proj and
up_proj targeted, r=4, 2 rows of 12 tokens per rank, ``Trainer`` + ``DeltaLoRACallback``. Per run it takes the median
seconds per optimizer step after W starts moving (steps start_step+2 on, the slower rank's time of each step); the
ratio to plain LoRA is taken within each launch (paired: both saw the same machine load), and the median of those
ratios is reported with their range. The machine's load average is recorded before and after. Writes
``benchmarks/results/fsdp2/step_time.{json,md}``. CPU numbers: they show the overhead Delta-LoRA adds to a sharded
step (gathering the small factors, the rank-2r update of the local shard), not GPU speed.
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
RUNS = ["lora", "factored", "inplace"]
RESULTS = ROOT / "benchmarks" / "results" / "fsdp2"


def save_base(directory: Path, hidden: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_llama

    tiny_llama(hidden_size=hidden, intermediate_size=2 * hidden).save_pretrained(directory)


def launch(env: dict[str, str], base: Path, runs: list[str], args: argparse.Namespace) -> dict[str, float]:
    """One launch of the worker; per run, the median seconds per step after W starts moving (the slower rank's)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        worker = ["-m", "tests.scripts.fsdp2_native_trainer", "--base", str(base), "--out", out, "--no-save"]
        options = ["--runs", ",".join(runs), "--steps", str(args.steps), "--start-step", str(args.start_step)]
        done = subprocess.run([*command, *worker, *options], env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"the worker failed ({done.returncode}):\n{done.stderr[-6000:]}")
        medians = {}
        for run in runs:
            ranks = [json.loads(Path(out, f"{run}.rank{r}.json").read_text())["seconds_per_step"] for r in range(2)]
            medians[run] = statistics.median(max(s) for s in list(zip(*ranks))[args.start_step + 2 :])
        return medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--start-step", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="launches per hidden size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    report = {"command": " ".join(["python", "benchmarks/fsdp2_step_time.py", *sys.argv[1:]]), "cpus": os.cpu_count()}
    report["load_average_before"] = os.getloadavg()
    report["sizes"] = {}
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            save_base(Path(tmp) / "base", hidden)
            launches = []
            for i in range(args.rounds):  # rotate the order, so no run always comes first (warm-up, drifting load)
                runs = RUNS[i % len(RUNS) :] + RUNS[: i % len(RUNS)]
                launches.append(launch(env, Path(tmp) / "base", runs, args))
        ratios = {run: [m[run] / m["lora"] for m in launches] for run in RUNS[1:]}
        report["sizes"][hidden] = {
            "seconds_per_step": {run: [m[run] for m in launches] for run in RUNS},
            "ratio_to_lora": {run: statistics.median(r) for run, r in ratios.items()},
            "ratio_range": {run: [min(r), max(r)] for run, r in ratios.items()},
        }
    report["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_time.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Step time under native FSDP2 (2 CPU processes, gloo) relative to plain PEFT LoRA in the same launch",
        "",
        f"`{report['command']}`; {args.rounds} launches per size, {args.steps} steps each, median s/step after W "
        f"moves; {report['cpus']} CPUs, load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_before'])}, after "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_after'])}.",
        "",
        "| hidden | plain LoRA s/step | factored / LoRA (range) | in-place / LoRA (range) |",
        "|---|---|---|---|",
    ]
    for hidden, size in report["sizes"].items():
        lora = statistics.median(size["seconds_per_step"]["lora"])
        cells = [
            f"{size['ratio_to_lora'][run]:.2f}x ({size['ratio_range'][run][0]:.2f}-{size['ratio_range'][run][1]:.2f})"
            for run in RUNS[1:]
        ]
        lines.append(f"| {hidden} | {lora * 1000:.1f} ms | {cells[0]} | {cells[1]} |")
    (args.out / "step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
