"""GPU performance of Delta-LoRA vs PEFT LoRA (and the naive dense-cache variant), bfloat16, CUDA.

The same measurements as ``perf.py`` on a 0.5B-1B model built from a config (default: GPT-2 large size, 774M,
bfloat16 weights, random init), r=8 on ``c_attn``/``c_proj``/``c_fc``:

* training step time, paired and interleaved (ratio to LoRA, median and spread);
* peak ``torch.cuda.max_memory_allocated`` of each variant over a few steps, vs LoRA, in adapter bytes;
* one W update of all targeted layers (``DeltaLoraUpdater.step``, ``add_low_rank_``) vs the same-size
  ``W.add_(X)``, in bfloat16 and float32, with the achieved memory bandwidth of the update
  (minimum traffic: W read + written = 2 x W bytes; ``W.add_(X)`` moves 3 x W bytes).

Run on a CUDA machine: ``python benchmarks/perf_gpu.py [--layers 36 --hidden 1280 --heads 20]``; writes
``perf_gpu.md``/``perf_gpu.json`` to ``--out``. Without CUDA it prints why and exits (0); ``--allow-cpu`` runs
the same code on the CPU with a tiny model, only to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402  (benchmarks/perf.py: models, naive variant, timers)


def cuda_peak_memory(variant: str, overrides: dict, batch: int, seq: int, steps: int, device) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainee = perf.make_trainee(variant, dtype=torch.bfloat16, config_overrides=overrides)
    trainee.model.to(device)
    if trainee.updater is not None and variant == "deltalora":
        import deltalora_hf

        trainee.updater = deltalora_hf.DeltaLoraUpdater(trainee.model)
    data = torch.randint(0, 50257, (steps, batch, seq), device=device)
    for b in data:
        trainee.step(b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del trainee, data
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--update-reps", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="no CUDA: run a tiny model on the CPU (a check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        overrides = {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads}
    elif args.allow_cpu:
        device = torch.device("cpu")
        overrides = {"n_layer": 2, "n_embd": 64, "n_head": 4}
        args.batch, args.seq, args.reps, args.warmup, args.update_reps = 1, 16, 2, 1, 1
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
    print(f"[1/3] paired step time on {name}", flush=True)
    trainees = [perf.make_trainee(v, dtype=torch.bfloat16, config_overrides=overrides) for v in perf.VARIANTS]
    for t in trainees:
        t.model.to(device)
        if t.variant == "deltalora":
            import deltalora_hf

            t.updater = deltalora_hf.DeltaLoraUpdater(t.model)  # factors cached on the device
        elif t.variant == "naive":
            t.updater = perf.NaiveDeltaLoRA(t.model, update_ratio=2.0)
        t.optimizer = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad], lr=1e-4)
    total = sum(p.numel() for p in trainees[0].model.parameters())
    adapter = perf.adapter_bytes(trainees[0].model)
    batches = [torch.randint(0, 50257, (args.batch, args.seq), device=device) for _ in range(args.reps + args.warmup)]

    def synced_step(trainee, batch):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return perf.Trainee.step(trainee, batch)

    times: dict[str, list[float]] = {t.variant: [] for t in trainees}
    for i, batch in enumerate(batches):
        order = trainees[i % 3 :] + trainees[: i % 3]
        for t in order:
            elapsed = synced_step(t, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[t.variant].append(elapsed)
    ratios = {v: perf.ratio_stats(times[v], times["lora"]) for v in ("deltalora", "naive")}
    del trainees, batches

    memory = {}
    if device.type == "cuda":
        print("[2/3] peak CUDA memory per variant", flush=True)
        memory = {v: cuda_peak_memory(v, overrides, args.batch, args.seq, 3, device) for v in perf.VARIANTS}

    print("[3/3] W update vs W.add_(X)", flush=True)
    updates = [
        perf.update_timings(dtype, args.update_reps, device, overrides) for dtype in (torch.bfloat16, torch.float32)
    ]
    for u in updates:
        u["bandwidth_updater_GBps"] = 2 * u["weight_bytes"] / u["updater_step_s"] / 1e9
        u["bandwidth_add_GBps"] = 3 * u["weight_bytes"] / u["w_add_s"] / 1e9

    med = statistics.median
    lines = [
        f"# Delta-LoRA performance on {name}",
        "",
        f"GPT-2 architecture, {total / 1e6:.0f}M parameters ({overrides}), bfloat16 weights, r=8, targets "
        f"{perf.TARGETS}, batch {args.batch} x {args.seq}, AdamW. torch {torch.__version__}.",
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
            },
            indent=1,
        )
    )
    print(markdown)


if __name__ == "__main__":
    main()
