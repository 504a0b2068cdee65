"""Helpers shared by ``compare`` and the benchmarks: weight snapshots, memory, statistics, split fingerprints."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import math
import resource
import statistics
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def targeted_base_weights(model: nn.Module, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """``name -> weight`` of the base (pre-adapter) weights of the linears named ``targets``, by original name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] not in targets or "modules_to_save" in parts or "original_module" in parts:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(getattr(base, "weight", None), torch.Tensor):
            found[name.removeprefix("base_model.model.")] = base.weight
    return found


def snapshot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, to measure the change of the weights later."""
    return {name: w.detach().to("cpu", copy=True) for name, w in weights.items()}


def weight_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of ``after - before`` over all weights, absolute and relative to ``‖before‖``."""
    if before.keys() != after.keys():
        raise RuntimeError(f"weights differ between snapshots: {sorted(set(before) ^ set(after))[:5]}")
    diff_sq = base_sq = 0.0
    moved = 0
    with torch.no_grad():
        for name, w0 in before.items():
            d = float((after[name].detach().float().cpu() - w0.float()).pow(2).sum())
            diff_sq += d
            base_sq += float(w0.float().pow(2).sum())
            moved += d > 0
    return {
        "w_change_norm": math.sqrt(diff_sq),
        "w_change_rel": math.sqrt(diff_sq / base_sq) if base_sq else 0.0,
        "w_layers_changed": moved,
        "w_layers_targeted": len(before),
    }


def fingerprint(items: Iterable[str]) -> str:
    """A short hash identifying a split (its rows, in order), recorded with every choice made on it."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode() + b"\n")
    return digest.hexdigest()[:16]


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement in this process (Linux >= 4.0; elsewhere the peak stays cumulative).

    Freed heap is handed back to the OS first (``malloc_trim``), so that an earlier run in the same worker process
    does not hide in the next run's peak.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since ``reset_peak_rss`` (``VmHWM``), else since it started."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], spec: str = ".4f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec}}" if len(values) == 1 else f"{mean:{spec}} ± {std:{spec}}"


def paired_difference(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values[i] - reference[i]`` (paired by seed) and its two-sided t-interval at ``level``.

    With one pair the interval is unbounded (no spread to estimate), reported as ``nan``.
    """
    from scipy import stats

    if len(values) != len(reference) or not values:
        raise ValueError("paired differences need the same, non-zero number of values on both sides")
    diffs = [a - b for a, b in zip(values, reference)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1 else float("nan")
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "excludes_zero": bool(n > 1 and (mean - half > 0 or mean + half < 0)),
    }
