"""The report: summary per arm (test split), paired differences, ``results.md``, ``results.json``, ``curves.png``."""

from __future__ import annotations

import json
import os
import platform
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .measure import mean_std, paired_difference
from .settings import ARM_TITLES, CompareSettings

REFERENCES = ("lora", "lora-scaled")
METRICS = {"macro_f1": "macro-F1", "accuracy": "accuracy"}


def summarize(finals: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm: mean and std over seeds of the test metrics and the costs."""
    summary = {}
    for arm, runs in finals.items():
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "choice": runs[0]["candidate"]}
        for split in ("test", "validation"):
            for key in METRICS:
                entry[f"{split}_{key}"] = mean_std([r[split][key] for r in runs])
        for key in ("train_loss_final", "median_step_s", "peak_rss_bytes", "w_change_norm"):
            entry[key] = mean_std([r[key] for r in runs])
        entry["trainable_params"], entry["total_params"] = runs[0]["trainable_params"], runs[0]["total_params"]
        summary[arm] = entry
    return summary


def differences(finals: dict[str, list[dict[str, Any]]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Paired (by seed) test differences of every arm to ``lora`` and to ``lora-scaled``, with 95% t-intervals.

    Each pair once: ``lora-scaled − lora``, not also ``lora − lora-scaled``.
    """
    rows = []
    for index, reference in enumerate(REFERENCES):
        if reference not in finals:
            continue
        ref_seeds = [r["seed"] for r in finals[reference]]
        for arm, runs in finals.items():
            if arm == reference or arm in REFERENCES[:index] or [r["seed"] for r in runs] != ref_seeds:
                continue
            for key in metrics:
                diff = paired_difference([r["test"][key] for r in runs], [r["test"][key] for r in finals[reference]])
                rows.append({"arm": arm, "reference": reference, "metric": key, **diff})
    return rows


def verdict(row: dict[str, Any], metric_title: str) -> str:
    """One sentence on one paired difference."""
    name, ref = ARM_TITLES[row["arm"]], ARM_TITLES[row["reference"]]
    if row["n"] < 2:
        return f"{name} vs {ref}: one seed, no interval; run more seeds to tell."
    interval = f"{row['mean']:+.4f} {metric_title}, 95% CI [{row['low']:+.4f}, {row['high']:+.4f}]"
    if row["excludes_zero"]:
        direction = "higher" if row["mean"] > 0 else "lower"
        return f"{name} is {direction} than {ref} ({interval}): the interval excludes 0, a real difference."
    return f"{name} vs {ref}: {interval} contains 0: no difference shown with {row['n']} seeds."


def differences_table(diffs: list[dict[str, Any]], metrics: dict[str, str]) -> str:
    """Markdown: one row per (arm, reference), one column per metric; * marks an interval excluding 0."""
    header = ["arm", "vs", *(f"test {title} difference (95% CI)" for title in metrics.values())]
    rows = []
    for reference in REFERENCES:
        for arm in ARM_TITLES:
            cells = {d["metric"]: d for d in diffs if d["arm"] == arm and d["reference"] == reference}
            if cells:
                rows.append(
                    [ARM_TITLES[arm], ARM_TITLES[reference]]
                    + [
                        f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" + (" *" if d["excludes_zero"] else "")
                        for d in (cells[key] for key in metrics)
                    ]
                )
    return markdown(header, rows)


def choices_table(selection: dict[str, Any], metric_title: str) -> str:
    """Markdown: each arm's candidates with their validation score, and the one chosen."""
    rows = []
    for arm, choice in selection.items():
        scores = ", ".join(f"{label}: {score:.4f}" for label, score in choice["candidates"])
        rows.append([ARM_TITLES[arm], scores, choice["choice"]])
    seed = next(iter(selection.values()))["seed"]
    return markdown(["arm", f"validation {metric_title} per candidate (seed {seed})", "chosen"], rows)


def _cell(pair: tuple[float, float], n: int, spec: str = ".4f", scale: float = 1.0) -> str:
    mean, std = pair[0] * scale, pair[1] * scale
    return f"{mean:{spec}}" if n == 1 else f"{mean:{spec}} ± {std:{spec}}"


def table_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm",
        "chosen on validation",
        "test macro-F1",
        "test accuracy",
        "validation macro-F1",
        "train loss",
        "trainable params",
        "median step (s)",
        "peak RSS (MiB)",
        "‖ΔW‖ targeted",
    ]
    rows = []
    for arm, e in summary.items():
        n = len(e["seeds"])
        share = 100.0 * e["trainable_params"] / e["total_params"] if e["total_params"] else 0.0
        rows.append(
            [
                ARM_TITLES[arm],
                e["choice"],
                _cell(e["test_macro_f1"], n),
                _cell(e["test_accuracy"], n),
                _cell(e["validation_macro_f1"], n),
                _cell(e["train_loss_final"], n),
                f"{e['trainable_params']:,} ({share:.2f}%)",
                _cell(e["median_step_s"], n, ".3f"),
                _cell(e["peak_rss_bytes"], n, ".0f", 1 / 2**20),
                _cell(e["w_change_norm"], n),
            ]
        )
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


PANELS = (("validation_curve", "validation macro-F1"), ("loss_curve", "train loss"))


def plot_curves(
    finals: dict[str, list[dict[str, Any]]], path: Path, title: str, panels: Sequence[tuple[str, str]] = PANELS
) -> None:
    """PNG: one panel per ``(curve key, name)`` of the runs, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for arm, runs in finals.items():
            steps = [s for s, _ in runs[0][key]]
            values = [statistics.fmean(r[key][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, label=ARM_TITLES[arm])
        ax.set(xlabel="optimizer step", ylabel=name, title=f"{name} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CONSOLE_WIDTH = 100


def console():
    """The rich console of the run: the terminal's width up to 100 columns (100 when the output goes to a file)."""
    from rich.console import Console

    out = Console(width=CONSOLE_WIDTH)
    if out.is_terminal:
        out = Console(width=min(Console().width, CONSOLE_WIDTH))
    return out


def console_tables(summary: dict[str, dict[str, Any]], diffs: list[dict[str, Any]]) -> list[Any]:
    """The two rich tables printed at the end, each within 100 columns (every column is in ``results.md``)."""
    from rich import box
    from rich.table import Table

    scores = Table(
        "arm",
        "chosen on validation",
        "test macro-F1",
        "test accuracy",
        "‖ΔW‖",
        "trainable",
        title="Test split (mean ± std over seeds)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for arm, e in summary.items():
        n = len(e["seeds"])
        share = 100.0 * e["trainable_params"] / e["total_params"] if e["total_params"] else 0.0
        scores.add_row(
            ARM_TITLES[arm],
            e["choice"],
            _cell(e["test_macro_f1"], n),
            _cell(e["test_accuracy"], n),
            f"{e['w_change_norm'][0]:.2f}",
            f"{share:.2f}%",
        )
    paired = Table(
        "test macro-F1 difference",
        "mean",
        "95% CI",
        "",
        title="Paired by seed",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for d in diffs:
        if d["metric"] != "macro_f1":
            continue
        interval = f"[{d['low']:+.4f}, {d['high']:+.4f}]" if d["n"] > 1 else "one seed"
        real = "excludes 0: a real difference" if d["excludes_zero"] else "contains 0"
        paired.add_row(f"{ARM_TITLES[d['arm']]} − {ARM_TITLES[d['reference']]}", f"{d['mean']:+.4f}", interval, real)
    return [scores, paired]


def _load() -> str:
    """The 1/5/15-minute load averages: above the core count, other jobs shared the cores (slower steps)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import deltalora_hf

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltalora_hf": deltalora_hf.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_end": _load(),
    }


def method_setting(settings: CompareSettings) -> str:
    """λ and K of Delta-LoRA and the control's alpha: the fixed values, or the swept ones (chosen on validation)."""
    ratios, starts = settings.sweep_update_ratio, settings.sweep_start_step
    ratio = f"λ ∈ {{{', '.join(f'{u:g}' for u in ratios)}}}" if ratios else f"λ={settings.update_ratio:g}"
    start = f"K ∈ {{{', '.join(str(k) for k in starts)}}}" if starts else f"K={settings.start_step}"
    swept = ", chosen on validation" if ratios or starts else ""
    control = "the same λ values" if ratios else f"lora_alpha={settings.scaled_alpha:g}"
    return f"Delta-LoRA {ratio}, {start}{swept}; LoRA, alpha·(1+λ): {control}"


def write_report(
    settings: CompareSettings,
    task_info: dict[str, Any],
    selection: dict[str, Any],
    finals: dict[str, list[dict[str, Any]]],
    seconds: float,
    command: str,
) -> dict[str, Any]:
    """Write ``results.md``, ``results.json`` and ``curves.png``; print the tables; return the JSON content."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(finals)
    diffs = differences(finals, list(METRICS))
    baseline = task_info["majority_baseline"]
    weak = [arm for arm, e in summary.items() if e["test_macro_f1"][0] < 2 * baseline["macro_f1"]]
    learned = (
        "every arm's test macro-F1 is at least 2× the majority baseline's"
        if not weak
        else f"below 2× the majority baseline's macro-F1: {', '.join(ARM_TITLES[a] for a in weak)}"
    )
    header, rows = table_rows(summary)
    setting = (
        f"model `{task_info['model']}`; task: {task_info['source']} ({len(task_info['label_names'])} classes, "
        f"{task_info['sizes']['train']} train / {task_info['sizes']['validation']} validation / "
        f"{task_info['sizes']['test']} test); {settings.steps} steps × batch {settings.batch_size}, max length "
        f"{settings.max_length}, r={settings.r}, lora_alpha={settings.lora_alpha:g}, lora_dropout=0; "
        f"{method_setting(settings)}; seeds {settings.seeds}"
    )
    words = [verdict(d, "macro-F1") for d in diffs if d["metric"] == "macro_f1"]
    text = "\n".join(
        [
            "# deltalora-hf compare",
            "",
            f"Command: `{command}`",
            "",
            setting + ".",
            "",
            (
                f"Majority-class baseline on test (always `{baseline['label']}`): accuracy {baseline['accuracy']:.4f}, "
                f"macro-F1 {baseline['macro_f1']:.4f}; {learned}."
            ),
            "",
            "## Test split (used once, for this table)",
            "",
            markdown(header, rows),
            "",
            (
                "Mean ± std over seeds. Learning rates were chosen on the validation split (carved from train, "
                "disjoint from test); the test split was not used for any choice. Train loss: mean of the last 10% "
                "of logged losses; median step: one optimizer step including Delta-LoRA's W update; ‖ΔW‖: Frobenius "
                "norm of the change of the targeted base weights (0 for the LoRA arms, whose W is frozen)."
            ),
            "",
            "## Paired differences (by seed, test split)",
            "",
            differences_table(diffs, METRICS),
            "",
            "95% t-intervals over seeds; * marks an interval that excludes 0.",
            "",
            *[f"- {w}" for w in words],
            "",
            "## Validation choices",
            "",
            choices_table(selection, "macro-F1"),
            "",
            (
                f"Total wall time {seconds:.0f} s ({os.cpu_count()} CPU cores, load average at the end {_load()}). "
                "Plot: `curves.png`; every number: `results.json`."
            ),
            "",
        ]
    )
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "curves.png"}
    paths["markdown"].write_text(text, encoding="utf-8")
    plot_curves(finals, paths["plot"], setting)
    report = {
        "command": command,
        "settings": asdict(settings),
        "task": task_info,
        "selection": selection,
        "summary": summary,
        "differences": diffs,
        "runs": [r for runs in finals.values() for r in runs],
        "environment": environment(),
        "wall_seconds": seconds,
    }
    paths["json"].write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    out_console = console()
    for table in console_tables(summary, diffs):
        out_console.print(table)
    out_console.print(
        f"Majority-class baseline macro-F1 {baseline['macro_f1']:.4f}: {learned}."
        if weak
        else f"Every arm's test macro-F1 is at least 2× the majority-class baseline's ({baseline['macro_f1']:.4f})."
    )
    out_console.print(f"Report: {out}/results.md (every column, the validation choices), results.json, curves.png")
    out_console.print(f"Wall time {seconds:.0f} s")
    return report
