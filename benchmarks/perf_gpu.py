"""GPU performance of Delta-LoRA vs PEFT LoRA (and the naive dense-cache variant), bfloat16, CUDA.

The same measurements as ``perf.py`` and ``overhead.py`` on a ~0.5B model built from a config (default: GPT-2
architecture, 24 layers x 1280, 0.54B parameters, bfloat16 weights, random init), r=8 on ``c_attn``/``c_proj``/
``c_fc``:

* training step time, paired and interleaved, timed with CUDA events (ratio to LoRA, median and spread);
* peak ``torch.cuda.max_memory_allocated`` of each variant over a few steps, vs LoRA, in adapter bytes;
* one W update of all targeted layers (``DeltaLoraUpdater.step``, ``add_low_rank_``) vs the same-size
  ``W.add_(X)``, in bfloat16 and float32, with the achieved memory bandwidth of the update
  (minimum traffic: W read + written = 2 x W bytes; ``W.add_(X)`` moves 3 x W bytes);
* the host-side rows of ``overhead.py`` on this device (bfloat16, CUDA-event times): CUDA kernel launches, aten
  ops and host reads of one ``updater.step()``, its time and achieved bandwidth, the unchanged step, the
  forward-time check on a host-bound model, the step-time ratio at batch 1x32, and greedy ``generate`` tokens/s vs
  LoRA at 12 layers x 128 and at this model's size.

Run on a CUDA machine: ``python benchmarks/perf_gpu.py [--layers 24 --hidden 1280 --heads 20]``; writes
``perf_gpu.md``/``perf_gpu.json`` to ``--out``. Without CUDA it prints why and exits (0); ``--allow-cpu`` runs
the same code on the CPU with a tiny model, only to check that the script works (``perf_gpu_cpucheck.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/overhead.py: host-side overhead rows, CUDA-event timer, paired runs)
import perf  # noqa: E402  (benchmarks/perf.py: models, naive variant, timers)


def cuda_peak_memory(variant: str, overrides: dict, batch: int, seq: int, steps: int, device) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with device:  # the model, the optimizer state and the naive variant's cache on the device
        trainee = perf.make_trainee(variant, dtype=torch.bfloat16, config_overrides=overrides)
    data = torch.randint(0, 50257, (steps, batch, seq), device=device)
    for b in data:
        trainee.step(b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del trainee, data
    torch.cuda.empty_cache()
    return peak


def overhead_sizes(overrides: dict, label: str, cpu_check: bool) -> overhead.Sizes:
    """``overhead.py``'s rows on this device: its host-bound models, and this script's model for the rest."""
    if cpu_check:
        return overhead.QUICK
    small = {"12 layers x 128": overhead.FULL.generate["12 layers x 128"]}
    # the training step at this script's batch is in the first table (with the naive variant)
    return overhead.Sizes(
        model=overrides,
        host_bound=overhead.FULL.host_bound,
        generate={**small, label: overrides},
        step_batches=((1, 32),),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--update-reps", type=int, default=20)
    parser.add_argument("--generate-reps", type=int, default=5, help="paired generate calls per width (overhead rows)")
    parser.add_argument("--skip-overhead", action="store_true", help="leave out overhead.py's rows")
    parser.add_argument("--allow-cpu", action="store_true", help="no CUDA: run a tiny model on the CPU (a check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        overrides = {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads}
    elif args.allow_cpu:
        device = torch.device("cpu")
        overrides = {"n_layer": 2, "n_embd": 64, "n_head": 4}
        args.batch, args.seq, args.reps, args.warmup, args.update_reps, args.generate_reps = 1, 16, 2, 1, 1, 1
        print("perf_gpu: no CUDA device; --allow-cpu: tiny model on the CPU, numbers are meaningless.")
    else:
        print(
            "perf_gpu: no CUDA device found (torch.cuda.is_available() is False). This benchmark needs an NVIDIA GPU; "
            "on a CPU run benchmarks/perf.py instead (or pass --allow-cpu to check this script with a tiny model)."
        )
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"[1/4] paired step time on {name}", flush=True)
    with device:  # parameters, optimizer state and the naive variant's cache created on the device
        trainees = {v: perf.make_trainee(v, dtype=torch.bfloat16, config_overrides=overrides) for v in perf.VARIANTS}
    total = sum(p.numel() for p in trainees["lora"].model.parameters())
    adapter = perf.adapter_bytes(trainees["lora"].model)
    batches = [torch.randint(0, 50257, (args.batch, args.seq), device=device) for _ in range(args.reps + args.warmup)]
    steps = {v: (lambda i, t=t, b=batches: t.step(b[i])) for v, t in trainees.items()}
    target = overhead.Target(device, torch.bfloat16)  # CUDA events on a GPU
    times = overhead.interleaved(steps, args.reps, args.warmup, target.timed)
    ratios = {v: perf.ratio_stats(times[v], times["lora"]) for v in perf.VARIANTS if v != "lora"}
    del trainees, batches, steps

    memory = {}
    if device.type == "cuda":
        print("[2/4] peak CUDA memory per variant", flush=True)
        memory = {v: cuda_peak_memory(v, overrides, args.batch, args.seq, 3, device) for v in perf.VARIANTS}

    print("[3/4] W update vs W.add_(X)", flush=True)
    updates = [
        perf.update_timings(dtype, args.update_reps, device, overrides) for dtype in (torch.bfloat16, torch.float32)
    ]
    for u in updates:
        u["bandwidth_updater_GBps"] = 2 * u["weight_bytes"] / u["updater_step_s"] / 1e9
        u["bandwidth_add_GBps"] = 3 * u["weight_bytes"] / u["w_add_s"] / 1e9

    host = None
    if not args.skip_overhead:
        print("[4/4] host-side overhead (overhead.py's rows): launches, host reads, check, steps, generate", flush=True)
        cpu_check = device.type != "cuda"
        sizes = overhead_sizes(overrides, f"{total / 1e9:.2f}B ({args.layers} x {args.hidden})", cpu_check)
        options = ["--reps", str(args.reps), "--warmup", str(args.warmup), "--generate-reps", str(args.generate_reps)]
        if cpu_check:
            options += ["--forward-reps", "4", "--fast-reps", "4"]
        host_args = overhead.parser().parse_args([*options, "--command", " ".join(["python", *sys.argv])])
        host = overhead.run(host_args, sizes, device, torch.bfloat16)

    med = statistics.median
    timing = target.clock_name
    lines = [
        f"# Delta-LoRA performance on {name}",
        "",
        f"GPT-2 architecture, {total / 1e6:.0f}M parameters ({overrides}), bfloat16 weights, r=8, targets "
        f"{perf.TARGETS}, batch {args.batch} x {args.seq}, AdamW. torch {torch.__version__}. Step times: {timing}, "
        f"{args.reps} paired repetitions in rotating order.",
        "",
        "| variant | median step (s) | ratio to LoRA median [q1, q3] | peak CUDA memory | vs LoRA (× adapter bytes) |",
        "|---|---|---|---|---|",
    ]
    for v in perf.VARIANTS:
        ratio = "1" if v == "lora" else f"{ratios[v]['median']:.3f} [{ratios[v]['q1']:.3f}, {ratios[v]['q3']:.3f}]"
        mem = perf.mib(memory[v]) if memory else "n/a"
        extra = f"{(memory[v] - memory['lora']) / adapter:.2f}" if memory else "n/a"
        lines.append(f"| {perf.TITLES[v]} | {med(times[v]):.4f} | {ratio} | {mem} | {extra} |")
    lines += [
        "",
        f"Adapter: {perf.mib(adapter)}.",
        "",
        "| dtype | targeted W | `W.add_(X)` (s) | `updater.step` (s) | ratio | `add_low_rank_` (s) | ratio | "
        "update bandwidth (GB/s) | `add_` bandwidth (GB/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for u in updates:
        lines.append(
            f"| {u['dtype']} | {perf.mib(u['weight_bytes'])} | {u['w_add_s']:.5f} | {u['updater_step_s']:.5f} | "
            f"{u['ratio_updater_vs_add']:.2f} | {u['add_low_rank_s']:.5f} | {u['ratio_functional_vs_add']:.2f} | "
            f"{u['bandwidth_updater_GBps']:.0f} | {u['bandwidth_add_GBps']:.0f} |"
        )
    if host is not None:
        lines += [
            "",
            "## Host-side overhead (the rows of `benchmarks/overhead.py`, bfloat16 on this device)",
            "",
            f"Updater and step rows on this model; forward-check model {host['sizes']['host_bound']}. Times: {timing}. "
            f"Load average before / after: {host['environment']['load_before']} / {host['environment']['load_after']}.",
            "",
            *overhead.table(host),
            "",
            *overhead.details(host),
        ]
    markdown = "\n".join(lines) + "\n"
    suffix = "" if device.type == "cuda" else "_cpucheck"
    (out / f"perf_gpu{suffix}.md").write_text(markdown)
    (out / f"perf_gpu{suffix}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "device": name,
                "times": times,
                "ratios": ratios,
                "memory": memory,
                "updates": updates,
                "adapter_bytes": adapter,
                "overhead": host,
            },
            indent=1,
        )
    )
    print(markdown)


if __name__ == "__main__":
    main()
