"""Host-side overhead of Delta-LoRA vs PEFT LoRA: ops, host reads and Python per layer (issue 17).

On a fast accelerator the W update's memory traffic is tiny; what costs is what runs on the host. This script
measures that on the CPU (float32, one thread by default), for both base-update modes (``inplace``,
``factored``) next to PEFT LoRA where a comparison applies. Models are GPT-2 from ``GPT2Config`` (random init, no
downloads), r=8 on ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``: 4 targeted linears per block, 48 in
GPT-2 small. Rows:

1. **aten ops launched by one ``DeltaLoraUpdater.step()`` after the factors changed** (every factor perturbed in
   place, as an optimizer step does, after the anchoring step and one warm-up move): every ``aten::`` event of
   ``torch.profiler`` (nested ones included, e.g. the ``as_strided`` under a ``permute``), the number of
   outermost ones (aten ops called from Python), the top names; also for a step where no factor changed.
2. **host reads per step**: calls, from Python, that read a tensor's value into the host, counted with a
   ``torch.overrides.TorchFunctionMode`` (:class:`HostReads`): ``Tensor.item``, ``tolist``, ``numpy``,
   ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``__complex__``, ``torch.equal``, ``allclose``,
   ``is_nonzero``, and the ops whose output size depends on values (``nonzero``, ``argwhere``, ``masked_select``,
   ``unique``); plus ``Tensor.cpu``/``to`` from a non-CPU tensor to the CPU. On a GPU each of these waits for the
   device (a synchronisation); on the CPU they are counted, not waited for. Reads made inside C++ (none in
   PyTorch's CPU ops that matter here) are not seen; as a cross-check the profile's ``aten::_local_scalar_dense``
   count (the kernel behind ``item``/``bool``/``float``, but not ``tolist``) is reported too.
3. **``updater.step()`` when no factor changed**: median of many calls.
4. **forward-time check cost**: on a host-bound model (small width, many layers, short input) the paired,
   interleaved difference of ``no_grad`` eval forward time, Delta-LoRA (anchored, W moved) minus PEFT LoRA of the
   same shapes, per forward and per targeted layer. In place this is the check (the adapter path is LoRA's);
   in factored mode it also contains the factored forward's extra work (the concatenated rank-2r factors).
   Additionally, the per-layer check method called directly over all layers, if the package has one: the
   first of ``CHECK_METHODS`` found on ``DeltaLoraLayer`` (or ``--check-method``); "n/a" if none.
5. **training step time vs PEFT LoRA**: forward + backward + ``AdamW.step`` + ``updater.step``, same seed, same
   batches, paired and interleaved (one step of each variant per repetition, order rotated), at batch 1x32 and
   4x128 on GPT-2 small: median and quartiles of the per-repetition ratios.
6. **greedy ``generate``** (32 new tokens, ``use_cache``, no sampling, the length forced with
   ``min_new_tokens``) vs PEFT LoRA, paired and interleaved: median [quartiles] of the per-pair time ratio and
   tokens/s, at 12 layers x 128 dims (host-bound, as on a GPU) and at GPT-2 small width; Delta-LoRA adapters
   anchored and W moved before generating, so the real path is measured. GPT-2's vocabulary is kept.

Times on the CPU are the process's CPU time by default (``--clock cpu``): with one thread it is the call's own
work, which stays comparable when other jobs share the cores (``--clock wall`` for wall time); on a GPU they are
CUDA events. Compare only ratios measured in the same run: the machine may be shared (the load average is printed).

Run: ``python benchmarks/overhead.py [--reps 12] [--large-reps 6] [--threads 1] [--clock cpu] [--out DIR]``
(default ``--out benchmarks/results/overhead``);
``--quick`` uses tiny sizes (a check of the script, meaningless numbers). Writes ``overhead.md`` and
``overhead.json`` to ``--out``. ``benchmarks/perf_gpu.py`` runs the same measurements on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402  (benchmarks/perf.py: models, trainees, factor perturbation, ratio statistics)

Mode = Literal["inplace", "factored"]
MODES: tuple[Mode, ...] = ("inplace", "factored")
VARIANT: dict[str, str] = {"inplace": "deltalora", "factored": "factored", "lora": "lora"}  # perf.build's names
TITLE = {"inplace": "in-place", "factored": "factored", "lora": "PEFT LoRA"}
# names of a per-layer forward-time check, tried in this order on DeltaLoraLayer (the first one found is timed)
CHECK_METHODS = ("_ensure_synced", "ensure_synced", "_check_synced", "check_synced", "_ensure_in_sync")

_READ_METHODS = {
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "equal",
    "allclose",
    "is_nonzero",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
}


# ----------------------------------------------------------------------------------------------- counters


class HostReads(TorchFunctionMode):
    """Counts the calls from Python that read tensor values into the host (see the module docstring, row 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _READ_METHODS:
            self.counts[name] += 1
        elif name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                self.counts[f"{name} (to host)"] += 1
            return out
        return func(*args, **kwargs)


@dataclass
class OpProfile:
    """What the profiler saw during one call: aten ops (all, outermost), host reads, CUDA launches and kernels."""

    aten_ops: int
    outermost_aten_ops: int
    top_ops: list[tuple[str, int]]
    top_outermost: list[tuple[str, int]]  # the ops called from Python (or from non-aten code), by name
    local_scalar_dense: int
    cuda_launches: int = 0  # CPU-side kernel launch calls (cudaLaunchKernel & co.)
    cuda_kernels: int = 0  # kernels that ran on the device
    top_kernels: list[tuple[str, int]] = field(default_factory=list)


def profile_ops(fn: Callable[[], object], device: torch.device | None = None, top: int = 12) -> OpProfile:
    """Run ``fn`` once under ``torch.profiler`` and count what it launched."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device is not None and device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = list(prof.events())
    aten = [e for e in events if e.name.startswith("aten::")]

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    outer = [e.name.removeprefix("aten::") for e in aten if outermost(e)]
    return OpProfile(
        aten_ops=len(aten),
        outermost_aten_ops=len(outer),
        top_ops=Counter(e.name.removeprefix("aten::") for e in aten).most_common(top),
        top_outermost=Counter(outer).most_common(top),
        local_scalar_dense=sum(e.name == "aten::_local_scalar_dense" for e in aten),
        cuda_launches=sum("LaunchKernel" in e.name for e in events if e.device_type == DeviceType.CPU),
        cuda_kernels=len(kernels),
        top_kernels=Counter(e.name[:80] for e in kernels).most_common(top),
    )


def count_host_reads(fn: Callable[[], object]) -> Counter[str]:
    with HostReads() as reads:
        fn()
    return reads.counts


# ----------------------------------------------------------------------------------------------- timing


Clock = Literal["cpu", "wall"]


@dataclass(frozen=True)
class Target:
    """Where the rows run, and how a call is timed.

    On a GPU: CUDA events (the queue drained first), i.e. the device's time including the gaps the host leaves.
    On the CPU: ``clock="cpu"`` is the process's CPU time (``time.process_time``; with one thread, the work of the
    call without the time other processes held the core: robust on a shared machine), ``"wall"`` is
    ``time.perf_counter``.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    clock: Clock = "cpu"

    def timed(self, fn: Callable[[], object]) -> float:
        """Seconds taken by ``fn()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        now = time.process_time if self.clock == "cpu" else time.perf_counter
        started = now()
        fn()
        return now() - started

    @property
    def clock_name(self) -> str:
        if self.device.type == "cuda":
            return "CUDA events"
        return "process CPU time (time.process_time)" if self.clock == "cpu" else "wall time (time.perf_counter)"


def interleaved(
    fns: dict[str, Callable[[int], object]], reps: int, warmup: int, timed: Callable[[Callable[[], object]], float]
) -> dict[str, list[float]]:
    """``fn(i)`` of every function per repetition ``i``, in rotating order; the warm-up repetitions are dropped."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            elapsed = timed(lambda name=name, i=i: fns[name](i))
            if i >= warmup:
                times[name].append(elapsed)
    return times


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": q[0], "q3": q[2], "n": len(ordered)}


# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Sizes:
    """Model configs (``GPT2Config`` overrides) and input shapes of each row."""

    model: dict  # rows 1-3 and 5 (GPT-2 small: no override)
    host_bound: dict  # row 4: small width, many layers
    generate: dict[str, dict]  # row 6: label -> overrides
    step_batches: tuple[tuple[int, int], ...] = ((1, 32), (4, 128))
    forward_shape: tuple[int, int] = (1, 8)
    prompt: int = 8
    new_tokens: int = 32
    r: int = 8


FULL = Sizes(
    model={},
    host_bound={"n_layer": 24, "n_embd": 64, "n_head": 4, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0},
    generate={"12 layers x 128": {"n_embd": 128, "n_head": 4}, "GPT-2 small (12 x 768)": {}},
)
_TINY = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 4,
    "vocab_size": 97,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
QUICK = Sizes(
    model=_TINY,
    host_bound={**_TINY, "n_layer": 3},
    generate={"tiny": _TINY},
    step_batches=((1, 8),),
    forward_shape=(1, 4),
    prompt=4,
    new_tokens=4,
    r=2,
)


def build(variant: str, overrides: dict, r: int, target: Target, moved: bool = False) -> tuple[nn.Module, Any]:
    """``perf.build``'s model on the target. ``moved``: anchored, factors changed, W moved (LoRA: factors changed)."""
    with target.device:  # parameters created where they are used (a 0.5B init on the host is slow)
        model, updater = perf.build(VARIANT[variant], 0, target.dtype, r, overrides)
    if updater is not None and hasattr(updater, "watch"):  # 0.5: the warm-up counts this optimizer's own steps
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        updater.watch(optimizer)
        updater._benchmark_optimizer = optimizer  # kept alive with the updater
    if moved:
        if updater is not None:
            if hasattr(updater, "watch"):
                updater._benchmark_optimizer.step()  # no gradients: changes nothing, but it is a step taken
            updater.step()  # start_step 0: anchors
        perf.perturb_factors(model, torch.Generator().manual_seed(1))
        if updater is not None:
            updater.step()  # moves W (in place) / the effective W (factored)
    return model, updater


def delta_layers(model: nn.Module) -> list[nn.Module]:
    from deltalora_hf import DeltaLoraLayer

    return [m for m in model.modules() if isinstance(m, DeltaLoraLayer)]


def targeted_layers(model: nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


# ----------------------------------------------------------------------------------------------- rows


def updater_costs(mode: Mode, sizes: Sizes, target: Target, reps: int, fast_reps: int) -> dict[str, Any]:
    """Rows 1-3 for one mode: ops and host reads of a step after the factors changed and of one with no change,
    the time of both (``reps`` and ``fast_reps`` calls), and the update's achieved bandwidth (2 x W bytes, W read
    and written once, over the time of a step after the factors changed; meaningful in place only)."""
    model, updater = build(mode, sizes.model, sizes.r, target, moved=True)  # anchored + one warm-up move
    generator = torch.Generator().manual_seed(2)
    layers = targeted_layers(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in (m.get_base_layer().weight for m in delta_layers(model)))
    timed, device = target.timed, target.device
    changed_s = []
    for _ in range(reps):
        perf.perturb_factors(model, generator)  # what an optimizer step does to the factors
        changed_s.append(timed(updater.step))

    perf.perturb_factors(model, generator)  # what an optimizer step does to the factors
    profile_changed = profile_ops(updater.step, device)
    moved = getattr(getattr(updater, "last", None), "layers_moved", None)  # UpdateStats, if the updater keeps it
    perf.perturb_factors(model, generator)
    reads_changed = count_host_reads(updater.step)
    updater.step()  # nothing changed since the last step
    profile_unchanged = profile_ops(updater.step, device)
    reads_unchanged = count_host_reads(updater.step)
    for _ in range(3):
        updater.step()
    unchanged_s = [timed(updater.step) for _ in range(fast_reps)]
    return {
        "mode": mode,
        "layers": layers,
        "layers_moved_by_profiled_step": moved,
        "weight_bytes": weight_bytes,
        "changed_step_s": spread(changed_s),
        "bandwidth_GBps": 2 * weight_bytes / statistics.median(changed_s) / 1e9,  # in place: W read and written
        "changed": {"profile": asdict(profile_changed), "host_reads": dict(reads_changed)},
        "unchanged": {"profile": asdict(profile_unchanged), "host_reads": dict(reads_unchanged)},
        "unchanged_step_s": spread(unchanged_s),
    }


def check_method(name: str | None) -> str | None:
    """The per-layer check method to time: ``name`` if given and present, else the first of CHECK_METHODS found."""
    from deltalora_hf import DeltaLoraLayer

    for candidate in [name] if name else CHECK_METHODS:
        if callable(getattr(DeltaLoraLayer, candidate, None)):
            return candidate
    return None


def forward_check(sizes: Sizes, target: Target, reps: int, fast_reps: int, method: str | None) -> dict[str, Any]:
    """Row 4: paired no_grad forward time of each mode minus LoRA's, and the direct per-layer check."""
    models = {v: build(v, sizes.host_bound, sizes.r, target, moved=True)[0].eval() for v in ("lora", *MODES)}
    vocab = models["lora"].config.vocab_size
    ids = torch.randint(0, vocab, sizes.forward_shape, generator=torch.Generator().manual_seed(0)).to(target.device)

    def forward(model: nn.Module) -> Callable[[int], object]:
        def run(_: int) -> object:
            with torch.no_grad():
                return model(input_ids=ids)

        return run

    timed = target.timed
    times = interleaved({v: forward(m) for v, m in models.items()}, reps, max(3, reps // 10), timed)
    layers = targeted_layers(models["lora"])
    result: dict[str, Any] = {
        "config": sizes.host_bound,
        "input": list(sizes.forward_shape),
        "layers": layers,
        "forward_s": {v: spread(t) for v, t in times.items()},
        "check_method": method,
    }
    for mode in MODES:
        diff = [d - lo for d, lo in zip(times[mode], times["lora"])]
        result[mode] = {"difference_s": spread(diff), "ratio": perf.ratio_stats(times[mode], times["lora"])}
        if method is not None:
            members = delta_layers(models[mode])

            def check_all(members=members) -> None:
                for layer in members:
                    getattr(layer, method)()

            for _ in range(3):
                check_all()
            result[mode]["direct_check_s"] = spread([timed(check_all) for _ in range(fast_reps)])
    return result


def step_ratios(sizes: Sizes, target: Target, reps: Sequence[int], warmup: int) -> list[dict]:
    """Row 5: paired, interleaved training steps (LoRA, in place, factored), ``reps[i]`` for batch shape ``i``.

    The step is ``perf.Trainee.step`` (forward, backward, AdamW, updater, zero_grad), timed from outside with the
    target's clock (on a GPU the device's time, CUDA events, not the host's).
    """
    trainees = {}
    for variant in ("lora", *MODES):
        with target.device:
            trainees[variant] = perf.make_trainee(
                VARIANT[variant], dtype=target.dtype, r=sizes.r, config_overrides=sizes.model
            )
    vocab = trainees["lora"].model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    results = []
    for (batch, seq), n in zip(sizes.step_batches, reps):
        batches = [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(n + warmup)]
        batches = [b.to(target.device) for b in batches]
        fns = {v: (lambda i, t=t, b=batches: t.step(b[i])) for v, t in trainees.items()}
        times = interleaved(fns, n, warmup, target.timed)
        results.append(
            {
                "batch": [batch, seq],
                "step_s": {v: spread(t) for v, t in times.items()},
                "ratio": {m: perf.ratio_stats(times[m], times["lora"]) for m in MODES},
            }
        )
    return results


def generate_ratios(label: str, overrides: dict, sizes: Sizes, target: Target, reps: int) -> dict[str, Any]:
    """Row 6: paired greedy generate (``new_tokens``, use_cache) of each mode vs LoRA."""
    models = {v: build(v, overrides, sizes.r, target, moved=True)[0].eval() for v in ("lora", *MODES)}
    vocab = models["lora"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, sizes.prompt), generator=torch.Generator().manual_seed(0)).to(target.device)
    produced: dict[str, int] = {}

    def generate(variant: str) -> Callable[[int], object]:
        def run(_: int) -> object:
            out = models[variant].generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=sizes.new_tokens,
                min_new_tokens=sizes.new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
            produced[variant] = out.shape[1] - prompt.shape[1]
            return out

        return run

    times = interleaved({v: generate(v) for v in models}, reps, 1, target.timed)
    return {
        "label": label,
        "config": overrides,
        "layers": targeted_layers(models["lora"]),
        "new_tokens": produced,
        "generate_s": {v: spread(t) for v, t in times.items()},
        "tokens_per_s": {v: sizes.new_tokens / statistics.median(t) for v, t in times.items()},
        "ratio": {m: perf.ratio_stats(times[m], times["lora"]) for m in MODES},
    }


# ----------------------------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def time_cell(s: dict[str, float]) -> str:
    return f"{ms(s['median'])} [{ms(s['q1'])}, {ms(s['q3'])}]"


def ratio_cell(r: dict[str, float]) -> str:
    return f"{r['median']:.3f}× [{r['q1']:.3f}, {r['q3']:.3f}]"


def ops_cell(p: dict, layers: int) -> str:
    top = ", ".join(f"{n} {name}" for name, n in p["top_ops"][:6])
    head = f"{p['aten_ops']:,} ({p['aten_ops'] / layers:.1f}/layer; {p['outermost_aten_ops']:,} outermost)"
    return f"{head}: {top}" if top else head


def reads_cell(reads: dict[str, int], local_scalar_dense: int) -> str:
    names = ", ".join(f"{n} {name}" for name, n in sorted(reads.items(), key=lambda kv: -kv[1]))
    return f"{sum(reads.values())}{' (' + names + ')' if names else ''}; `_local_scalar_dense` {local_scalar_dense}"


def load_average() -> str:
    return perf.load_average()


def package_version() -> str:
    """The last git commit of the imported ``deltalora_hf`` package, and whether it has uncommitted changes."""
    import subprocess

    import deltalora_hf

    package = Path(deltalora_hf.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("log", "-1", "--format=%h", "--", ".")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return f"{deltalora_hf.__version__} (not a git checkout)"
    return f"{deltalora_hf.__version__}, last commit {commit}{' + uncommitted changes' if dirty else ''}"


def table(results: dict[str, Any]) -> list[str]:
    """The summary table: one row per measurement, a column per mode, PEFT LoRA where a comparison applies."""
    up = {u["mode"]: u for u in results["updater"]}
    fc = results["forward_check"]
    layers, per_forward = up["inplace"]["layers"], fc["layers"]
    rows = ["| | in-place | factored | PEFT LoRA | goal (issue 17) |", "|---|---|---|---|---|"]

    def row(label: str, cell: Callable[[Mode], str], lora: str = "—", goal: str = "") -> None:
        rows.append(f"| {label} | {' | '.join(cell(m) for m in MODES)} | {lora} | {goal} |")

    changed = {m: up[m]["changed"] for m in MODES}
    row(
        f"aten ops launched by one `updater.step()` after the factors changed ({layers} layers)",
        lambda m: ops_cell(changed[m]["profile"], layers),
        goal="in place ≤ 4 per layer or grouped; factored 0",
    )
    if results["environment"]["device"] != "cpu":
        row(
            "CUDA kernel launches (kernels run) in that step",
            lambda m: (
                f"{changed[m]['profile']['cuda_launches']:,} ({changed[m]['profile']['cuda_kernels']:,}); "
                f"{changed[m]['profile']['cuda_launches'] / layers:.1f}/layer"
            ),
            goal="in place ≤ 4 per layer or grouped; factored 0",
        )
    row(
        "host reads in that step",
        lambda m: reads_cell(changed[m]["host_reads"], changed[m]["profile"]["local_scalar_dense"]),
        goal="1",
    )
    row(
        "time of that step (median [q1, q3]); achieved bandwidth of the update (2 × W bytes / time)",
        lambda m: (
            f"{time_cell(up[m]['changed_step_s'])}; "
            + (f"{up[m]['bandwidth_GBps']:.1f} GB/s" if m == "inplace" else "W not written")
        ),
        goal=f"targeted W: {perf.mib(up['inplace']['weight_bytes'])}",
    )
    row(
        "aten ops / host reads, `updater.step()` with no factor changed",
        lambda m: f"{up[m]['unchanged']['profile']['aten_ops']:,} / {sum(up[m]['unchanged']['host_reads'].values())}",
        goal="≈ 0",
    )
    row(
        "`updater.step()` when no factor changed (median [q1, q3])",
        lambda m: time_cell(up[m]["unchanged_step_s"]),
        goal="≈ 0",
    )
    row(
        f"forward-time cost: no_grad forward minus LoRA's, paired, median [q1, q3] (host-bound model, {per_forward} "
        "layers)",
        lambda m: (
            f"{time_cell(fc[m]['difference_s'])} per forward "
            f"({us(fc[m]['difference_s']['median'] / per_forward)} per layer)"
        ),
        lora=f"{ms(fc['forward_s']['lora']['median'])} per forward",
        goal="O(1) per model forward",
    )
    method = fc["check_method"]
    row(
        f"forward-time check `{method}` called directly over all {per_forward} layers"
        if method
        else f"forward-time check called directly over all layers (none of {', '.join(CHECK_METHODS)} found)",
        lambda m: (
            f"{ms(fc[m]['direct_check_s']['median'])} per forward "
            f"({us(fc[m]['direct_check_s']['median'] / per_forward)} per layer)"
            if method
            else "n/a"
        ),
        goal="O(1) per model forward",
    )
    goals = {(1, 32): "in place ≤ 1.07×", (4, 128): "in place ≤ 1.02×"}
    for s in results["steps"]:
        batch, seq = s["batch"]
        row(
            f"step time vs PEFT LoRA, batch {batch}×{seq}: median [q1, q3] of paired ratios",
            lambda m, s=s: ratio_cell(s["ratio"][m]),
            lora=f"{s['step_s']['lora']['median']:.3f} s",
            goal=goals.get((batch, seq), ""),
        )
    for g in results["generate"]:
        row(
            f"greedy `generate`, {results['sizes']['new_tokens']} new tokens, {g['label']}: time ratio to LoRA "
            "[q1, q3]; tokens/s",
            lambda m, g=g: f"{ratio_cell(g['ratio'][m])}; {g['tokens_per_s'][m]:.1f} tok/s",
            lora=f"{g['tokens_per_s']['lora']:.1f} tok/s",
            goal="≤ 1.05× in both modes",
        )
    return rows


def details(results: dict[str, Any]) -> list[str]:
    lines = ["## Profile of one `updater.step()` after the factors changed", ""]
    for u in results["updater"]:
        p = u["changed"]["profile"]
        lines.append(
            f"- {TITLE[u['mode']]}: {p['aten_ops']:,} aten events, {p['outermost_aten_ops']:,} outermost, "
            f"{u['layers_moved_by_profiled_step']} of {u['layers']} layers moved. All, by name: "
            + (", ".join(f"`{name}` {n}" for name, n in p["top_ops"]) or "none")
            + ". Outermost, by name: "
            + (", ".join(f"`{name}` {n}" for name, n in p["top_outermost"]) or "none")
        )
        if p["cuda_launches"] or p["cuda_kernels"]:
            lines.append(
                f"  CUDA: {p['cuda_launches']} kernel launches, {p['cuda_kernels']} kernels: "
                + ", ".join(f"`{name}` {n}" for name, n in p["top_kernels"][:6])
            )
    fc = results["forward_check"]
    lines += [
        "",
        "## Forward time of the host-bound model",
        "",
        f"GPT-2 {fc['config']}, input {fc['input'][0]}×{fc['input'][1]}, eval, `no_grad`; "
        + ", ".join(f"{TITLE[v]} {ms(s['median'])}" for v, s in fc["forward_s"].items())
        + " (medians); ratio to LoRA: "
        + ", ".join(f"{TITLE[m]} {ratio_cell(fc[m]['ratio'])}" for m in MODES)
        + ".",
        "",
        "## Step and generate times",
        "",
    ]
    for s in results["steps"]:
        lines.append(
            f"- batch {s['batch'][0]}×{s['batch'][1]}: median step "
            + ", ".join(f"{TITLE[v]} {t['median']:.3f} s" for v, t in s["step_s"].items())
            + f" ({s['step_s']['lora']['n']} paired repetitions)"
        )
    for g in results["generate"]:
        lines.append(
            f"- generate, {g['label']} ({g['layers']} targeted layers): median "
            + ", ".join(f"{TITLE[v]} {t['median']:.3f} s" for v, t in g["generate_s"].items())
            + f"; tokens produced {g['new_tokens']} ({g['generate_s']['lora']['n']} paired repetitions)"
        )
    return lines


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Host-side overhead of Delta-LoRA vs PEFT LoRA (issue 17)",
        "",
        f"Command: `{env['command']}`. deltalora_hf {env['deltalora_hf']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, peft "
        f"{env['peft']}; {env['device']}, {env['dtype']}, {env['threads']} thread(s), {env['cpus']} CPUs; times: "
        f"{env['clock']}; "
        f"load average before / after: {env['load_before']} / {env['load_after']} (the machine may be shared: "
        f"compare only ratios from the same run); wall time {env['wall_s']:.0f} s.",
        "",
        f"Model for the updater and step rows: GPT-2 {results['sizes']['model'] or 'small (GPT2Config())'}, r="
        f"{results['sizes']['r']}, targets {perf.TARGETS} (4 linears per block), random init. Host reads are "
        "Python-level value reads (see the script docstring); `_local_scalar_dense` is the profiler's count of "
        "the scalar-read kernel.",
        "",
        *table(results),
        "",
        *details(results),
        "",
    ]
    return "\n".join(lines)


def run(
    args: argparse.Namespace, sizes: Sizes, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> dict:
    """All rows (``args`` as parsed by :func:`parser`); returns the results dictionary written to ``overhead.json``."""
    target = Target(device or torch.device("cpu"), dtype, args.clock)
    threads = torch.get_num_threads()
    if target.device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, sizes, target)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, sizes: Sizes, target: Target) -> dict:
    import peft
    import transformers

    started, load_before = time.perf_counter(), load_average()
    method = check_method(args.check_method)
    print(f"[overhead 1/4] updater.step: ops, host reads, unchanged time ({', '.join(MODES)})", flush=True)
    updater = [updater_costs(m, sizes, target, args.reps, args.fast_reps) for m in MODES]
    print(f"[overhead 2/4] forward-time check (paired forwards; direct method: {method or 'n/a'})", flush=True)
    fc = forward_check(sizes, target, args.forward_reps, args.fast_reps, method)
    print(f"[overhead 3/4] paired training steps at {sizes.step_batches}", flush=True)
    step_reps = [args.reps] + [args.large_reps] * (len(sizes.step_batches) - 1)
    steps = step_ratios(sizes, target, step_reps, args.warmup)
    print(f"[overhead 4/4] paired greedy generate at {list(sizes.generate)}", flush=True)
    generate = [generate_ratios(k, v, sizes, target, args.generate_reps) for k, v in sizes.generate.items()]
    device = target.device
    return {
        "environment": {
            "command": " ".join(["python", *sys.argv]) if args.command is None else args.command,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "deltalora_hf": package_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(target.dtype).removeprefix("torch."),
            "clock": target.clock_name,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_before": load_before,
            "load_after": load_average(),
            "wall_s": time.perf_counter() - started,
        },
        "args": {k: v for k, v in vars(args).items() if k != "command"},
        "sizes": asdict(sizes),
        "updater": updater,
        "forward_check": fc,
        "steps": steps,
        "generate": generate,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=12, help="paired training steps at 1x32; timed changed updater steps")
    p.add_argument("--large-reps", type=int, default=6, help="paired training steps at the larger batch (4x128)")
    p.add_argument("--warmup", type=int, default=2, help="training steps dropped before measuring")
    p.add_argument("--generate-reps", type=int, default=6, help="paired generate calls per width")
    p.add_argument("--forward-reps", type=int, default=200, help="paired forwards of the host-bound model")
    p.add_argument("--fast-reps", type=int, default=300, help="calls timed for the unchanged step and direct check")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    p.add_argument(
        "--clock",
        choices=get_args(Clock),
        default="cpu",
        help="CPU timing: process CPU time (default, robust to other jobs on the cores) or wall time",
    )
    p.add_argument("--check-method", default=None, help=f"per-layer check to time (default: first of {CHECK_METHODS})")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions: checks the script only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead"))
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # what the report says was run
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.quick:
        args.reps, args.large_reps, args.warmup = min(args.reps, 2), min(args.large_reps, 2), min(args.warmup, 2)
        args.generate_reps = min(args.generate_reps, 2)
        args.forward_reps, args.fast_reps = min(args.forward_reps, 4), min(args.fast_reps, 4)
    results = run(args, QUICK if args.quick else FULL)
    markdown = report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(markdown, encoding="utf-8")
    (out / "overhead.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(markdown)
    return results


if __name__ == "__main__":
    main()
