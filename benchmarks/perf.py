"""CPU performance of Delta-LoRA vs PEFT LoRA (and vs a naive Delta-LoRA that caches the dense B·A).

GPT-2-small-size model (124M parameters, random init from ``GPT2Config()``), r=8 on every attention and MLP
linear (``c_attn``, ``c_proj``, ``c_fc``: 48 layers). Measured:

1. training step time: LoRA, Delta-LoRA and the naive variant, paired and interleaved in one process (one step
   of each per repetition, same batch), median and spread of the per-repetition ratio to LoRA;
2. memory: the persistent extra bytes each variant keeps next to LoRA (tensor accounting), and peak RSS of a
   short training run of each variant in its own fresh process;
3. the time of one W update of all targeted layers (``DeltaLoraUpdater.step`` and the bare
   ``deltalora_hf.functional.add_low_rank_``) vs the same-size in-place ``W.add_(X)``, in float32 and bfloat16.

Run: ``python benchmarks/perf.py [--reps 15] [--seq 32] [--batch 1] [--out benchmarks/results]``.
Writes ``perf.md`` and ``perf.png`` to ``--out``. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["c_attn", "c_proj", "c_fc"]
VARIANTS = ("lora", "deltalora", "factored", "naive")
TITLES = {
    "lora": "PEFT LoRA",
    "deltalora": "Delta-LoRA in place (deltalora_hf)",
    "factored": "Delta-LoRA factored (deltalora_hf)",
    "naive": "naive Delta-LoRA (dense B·A cache)",
}


# ----------------------------------------------------------------------------------------------- models


def gpt2_small(seed: int = 0, dtype: torch.dtype = torch.float32, config_overrides: dict | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **(config_overrides or {}))
    return GPT2LMHeadModel(config).to(dtype)


class NaiveDeltaLoRA:
    """Delta-LoRA done the obvious way: keep ``s·B·A`` dense per layer, and after each step
    ``W += lambda * (s·B'A' - cached)``; ``cached = s·B'A'``. Same math, one extra d x k tensor per layer."""

    def __init__(self, peft_model: nn.Module, update_ratio: float, start_step: int = 0) -> None:
        from peft.tuners.lora import LoraLayer

        self.update_ratio, self.start_step, self.t = update_ratio, start_step, 0
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self.cache = {id(m): self._dense(m) for m in self.layers}

    @staticmethod
    @torch.no_grad()
    def _dense(layer) -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        product = (b @ a) * layer.scaling["default"]  # d x k
        return product.T.contiguous() if layer.fan_in_fan_out else product

    @torch.no_grad()
    def step(self) -> None:
        t, self.t = self.t, self.t + 1
        for layer in self.layers:
            new = self._dense(layer)
            if t > self.start_step:
                layer.get_base_layer().weight.add_(new - self.cache[id(layer)], alpha=self.update_ratio)
            self.cache[id(layer)] = new

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def build(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32, r: int = 8, config_overrides=None):
    """``(model, updater)``; ``updater.step()`` is called after every optimizer step (None for LoRA)."""
    import peft

    import deltalora_hf

    model = gpt2_small(seed, dtype, config_overrides)
    common = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True)
    if variant in ("deltalora", "factored"):
        mode = "inplace" if variant == "deltalora" else "factored"
        config = deltalora_hf.DeltaLoraConfig(**common, update_ratio=2.0, start_step=0, base_update=mode)
        model = peft.get_peft_model(model, config)
        return model, deltalora_hf.DeltaLoraUpdater(model)
    model = peft.get_peft_model(model, peft.LoraConfig(**common))
    return model, (NaiveDeltaLoRA(model, update_ratio=2.0) if variant == "naive" else None)


def adapter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def extra_state_bytes(variant: str, model: nn.Module, updater) -> int:
    """Bytes each variant keeps beyond LoRA's own parameters and optimizer state."""
    if variant == "lora":
        return 0
    if variant == "naive":
        return updater.extra_bytes()
    # the anchors (A_K, B_K) and, in place, the records (copies of the tensors whose move W holds: the factors, and
    # since 0.5 the anchors too; a record tensor that is a live anchor (0.4) is counted once)
    anchors = {id(b): b for n, b in model.named_buffers() if "lora_anchor" in n}
    records = {
        id(t): t
        for m in model.modules()
        for r in getattr(m, "delta_records", {}).values()
        for t in (r.a, r.b, r.a_k, r.b_k)
        if id(t) not in anchors
    }
    return sum(t.numel() * t.element_size() for t in [*anchors.values(), *records.values()])


# ----------------------------------------------------------------------------------------------- step time


@dataclass
class Trainee:
    variant: str
    model: nn.Module
    updater: object
    optimizer: torch.optim.Optimizer

    def step(self, batch: torch.Tensor) -> float:
        started = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        if self.updater is not None:
            self.updater.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def make_trainee(variant: str, seed: int = 0, dtype=torch.float32, r: int = 8, config_overrides=None) -> Trainee:
    model, updater = build(variant, seed, dtype, r, config_overrides)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    if hasattr(updater, "watch"):  # 0.5: the updater is given the optimizer, as the docs recommend
        updater.watch(optimizer)
    return Trainee(variant, model, updater, optimizer)


def paired_step_times(trainees: list[Trainee], batches: list[torch.Tensor], warmup: int) -> dict[str, list[float]]:
    """One step of every trainee per repetition, order rotated each repetition; warm-up steps dropped."""
    times: dict[str, list[float]] = {t.variant: [] for t in trainees}
    for i, batch in enumerate(batches):
        order = trainees[i % len(trainees) :] + trainees[: i % len(trainees)]
        for trainee in order:
            elapsed = trainee.step(batch)
            if i >= warmup:
                times[trainee.variant].append(elapsed)
    return times


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
    return {
        "median": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "min": ratios[0],
        "max": ratios[-1],
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
    }


# ----------------------------------------------------------------------------------------------- W update


def perturb_factors(model: nn.Module, generator: torch.Generator) -> None:
    """Change every LoRA factor in place, as an optimizer step does (``generator`` on the CPU, any device)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                p.add_(noise.to(p.device, p.dtype), alpha=1e-3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def update_timings(dtype: torch.dtype, reps: int, device: torch.device, config_overrides=None) -> dict[str, float]:
    """Median time of one W update of all targeted layers vs ``W.add_(X)`` of the same sizes."""
    import deltalora_hf
    from deltalora_hf.functional import add_low_rank_, delta_factors

    model, updater = build("deltalora", 0, dtype, config_overrides=config_overrides)
    model.to(device)
    updater = deltalora_hf.DeltaLoraUpdater(model)  # cache on the device
    layers = [(layer, "default", layer.delta_settings["default"].update_ratio) for layer in updater.layers()]
    weights = [layer.get_base_layer().weight for layer, _, _ in layers]
    deltas = [torch.randn(w.shape, dtype=torch.float32, device=device).mul_(1e-4).to(dtype) for w in weights]
    generator = torch.Generator().manual_seed(0)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    if hasattr(updater, "watch"):  # 0.5: the warm-up counts the optimizer's own steps
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        updater.watch(optimizer)
        optimizer.step()  # no gradients: changes nothing, but it is a step taken
    updater.step(0)  # start_step 0: anchors now, so that every timed step moves every layer

    def timed(fn) -> float:
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - started

    step_t, functional_t, add_t = [], [], []
    for i in range(reps + 1):
        perturb_factors(model, generator)
        elapsed = timed(lambda step=i + 1: updater.step(step))
        assert updater.last.layers_moved == len(layers), updater.last
        factors = []
        for layer, adapter, ratio in layers:
            a, b = layer.lora_factors(adapter)
            factors.append(
                (delta_factors(a, b, a * 0.5, b * 0.5), ratio * layer.scaling[adapter], layer.weight_is_transposed)
            )

        def functional(factors=factors) -> None:
            for w, ((u, v), alpha, transposed) in zip(weights, factors):
                add_low_rank_(w, u, v, alpha, transposed=transposed, generator=torch.Generator(device).manual_seed(0))

        f_elapsed = timed(functional)
        a_elapsed = timed(lambda: [w.add_(x) for w, x in zip(weights, deltas)])
        if i > 0:  # first repetition is warm-up
            step_t.append(elapsed)
            functional_t.append(f_elapsed)
            add_t.append(a_elapsed)
    med = statistics.median
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "layers": len(layers),
        "weight_bytes": weight_bytes,
        "updater_step_s": med(step_t),
        "add_low_rank_s": med(functional_t),
        "w_add_s": med(add_t),
        "ratio_updater_vs_add": med(step_t) / med(add_t),
        "ratio_functional_vs_add": med(functional_t) / med(add_t),
        "updater_step_all_s": step_t,
        "w_add_all_s": add_t,
    }


# ----------------------------------------------------------------------------------------------- memory


def _rss(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(variant: str, steps: int, batch: int, seq: int) -> dict[str, int]:
    """In a fresh process: peak RSS of building and training ``variant`` for a few steps."""
    torch.manual_seed(0)
    trainee = make_trainee(variant)
    data = torch.randint(0, 50257, (steps, batch, seq))
    for b in data:
        trainee.step(b)
    return {
        "peak_rss": _rss("VmHWM"),
        "rss": _rss("VmRSS"),
        "adapter_bytes": adapter_bytes(trainee.model),
        "extra_state_bytes": extra_state_bytes(variant, trainee.model, trainee.updater),
    }


def memory_in_subprocess(variant: str, steps: int, batch: int, seq: int) -> dict[str, int]:
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import perf; "
        f"print('RESULT' + json.dumps(perf.memory_child({variant!r}, {steps}, {batch}, {seq})))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.split("RESULT", 1)[1])


# ----------------------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def plot(step_times: dict[str, list[float]], updates: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.boxplot([step_times[v] for v in step_times], tick_labels=[TITLES[v].split(" (")[0] for v in step_times])
    left.set(ylabel="seconds per training step", title="Training step time (CPU, GPT-2 124M, r=8)")
    names, values = [], []
    for u in updates:
        names += [f"W.add_(X)\n{u['dtype']}", f"updater.step\n{u['dtype']}", f"add_low_rank_\n{u['dtype']}"]
        values += [u["w_add_s"], u["updater_step_s"], u["add_low_rank_s"]]
    right.bar(names, values, color=["grey", "C1", "C2"] * len(updates))
    right.set(ylabel="seconds (median)", title="One W update of all 48 targeted layers")
    right.tick_params(axis="x", labelsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="measured training steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--update-reps", type=int, default=7)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()

    print(f"[1/3] step time: {args.reps} paired steps (+{args.warmup} warm-up) of {', '.join(VARIANTS)}", flush=True)
    trainees = [make_trainee(v) for v in VARIANTS]
    total_params = sum(p.numel() for p in trainees[0].model.parameters())
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 50257, (args.batch, args.seq), generator=generator) for _ in range(args.reps + args.warmup)
    ]
    step_times = paired_step_times(trainees, batches, args.warmup)
    ratios = {v: ratio_stats(step_times[v], step_times["lora"]) for v in VARIANTS if v != "lora"}
    state = {t.variant: extra_state_bytes(t.variant, t.model, t.updater) for t in trainees}
    adapter = adapter_bytes(trainees[0].model)
    del trainees

    print("[2/3] W update timings (float32, bfloat16)", flush=True)
    cpu = torch.device("cpu")
    updates = [
        update_timings(torch.float32, args.update_reps, cpu),
        update_timings(torch.bfloat16, args.update_reps, cpu),
    ]

    memory = {}
    if not args.skip_memory:
        print("[3/3] peak RSS, one fresh process per variant", flush=True)
        memory = {v: memory_in_subprocess(v, 3, args.batch, args.seq) for v in VARIANTS}

    med = statistics.median
    lines = [
        "# Delta-LoRA performance on CPU",
        "",
        f"GPT-2 small size ({total_params / 1e6:.0f}M parameters, random init from `GPT2Config()`), r=8, alpha=16, "
        f"targets {TARGETS} (48 layers), batch {args.batch} x {args.seq} tokens, AdamW, float32. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average before/after: {load_before} / {load_average()} "
        "(above the core count means other jobs shared the cores: absolute times get noisy, paired ratios less so).",
        "",
        "## Training step time (paired, interleaved)",
        "",
        "| variant | median step (s) | ratio to LoRA: median [q1, q3] (min..max) | target |",
        "|---|---|---|---|",
        f"| {TITLES['lora']} | {med(step_times['lora']):.3f} | 1 | |",
    ]
    for v in VARIANTS[1:]:
        r = ratios[v]
        target = {"deltalora": "≤ 1.03", "factored": "≤ 1.02 at 4×128"}.get(v, "")
        lines.append(
            f"| {TITLES[v]} | {med(step_times[v]):.3f} | {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}] "
            f"({r['min']:.3f}..{r['max']:.3f}) | {target} |"
        )
    lines += [
        "",
        f"{args.reps} measured repetitions; each repetition runs one step of every variant on the same "
        "batch, in rotating order; the ratio is taken per repetition.",
        "",
        "## Memory beyond LoRA",
        "",
        f"LoRA adapter parameters: {mib(adapter)} (float32).",
        "",
        "| variant | extra persistent state | × adapter bytes | target | peak RSS of 3 training steps (own process) |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        peak = mib(memory[v]["peak_rss"]) if memory else "not measured"
        if memory and v != "lora":
            peak += f" ({(memory[v]['peak_rss'] - memory['lora']['peak_rss']) / 2**20:+,.1f} MiB vs LoRA)"
        target = "≤ 2×" if v == "deltalora" else ("≤ 1×" if v == "factored" else "")
        lines.append(f"| {TITLES[v]} | {mib(state[v])} | {state[v] / adapter:.2f} | {target} | {peak} |")
    lines += [
        "",
        "In place, Delta-LoRA keeps the anchors (A_K, B_K) and a copy of the factors whose move W holds (what "
        "the next update starts from): 2× the adapter; factored mode keeps only the anchors (1×); "
        "the naive variant keeps one dense s·B·A per layer, i.e. a second copy of every targeted weight.",
        "",
        "## One W update of all targeted layers vs the same-size `W.add_(X)`",
        "",
        "| dtype | targeted W | `W.add_(X)` (s) | `DeltaLoraUpdater.step` (s) | ratio | `add_low_rank_` only (s) "
        "| ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for u in updates:
        target = "≤ 2.5×" if u["dtype"] == "float32" else ""
        lines.append(
            f"| {u['dtype']} | {mib(u['weight_bytes'])} | {u['w_add_s']:.4f} | {u['updater_step_s']:.4f} | "
            f"{u['ratio_updater_vs_add']:.2f} | {u['add_low_rank_s']:.4f} | {u['ratio_functional_vs_add']:.2f} "
            f"| {target} |"
        )
    lines += [
        "",
        "`DeltaLoraUpdater.step` includes its per-step checks (factors changed, delta finite: one host sync). "
        "bfloat16 uses stochastic rounding (float32 block sum, random draw per element), which is why it costs "
        "more than a plain bf16 add.",
        "",
        "![perf](perf.png)",
        "",
    ]
    markdown = "\n".join(lines)
    (out / "perf.md").write_text(markdown, encoding="utf-8")
    (out / "perf.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "step_times": step_times,
                "ratios": ratios,
                "extra_state_bytes": state,
                "adapter_bytes": adapter,
                "updates": updates,
                "memory": memory,
            },
            indent=1,
        )
    )
    plot(step_times, updates, out / "perf.png")
    print(markdown)


if __name__ == "__main__":
    main()
