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


def choices_table(selection: dict[str, Any], metric_title: str, baseline: float | None = None) -> str:
    """Markdown: each arm's candidates with their mean validation score over seeds (each seed's in brackets).

    With ``baseline`` (the validation split's majority-class score), a seed at or below it is marked "(collapsed)".
    """
    rows = []
    for arm, choice in selection.items():
        cells = []
        for candidate in choice["candidates"]:
            seeds = ", ".join(
                f"{score:.3f}" + (" (collapsed)" if baseline is not None and is_collapsed(score, baseline) else "")
                for score in candidate["scores"]
            )
            cells.append(f"{candidate['label']}: {candidate['mean']:.4f} [{seeds}]")
        rows.append([ARM_TITLES[arm], "; ".join(cells), choice["choice"]])
    seeds = ", ".join(map(str, next(iter(selection.values()))["seeds"]))
    return markdown(["arm", f"validation {metric_title} per candidate: mean [seeds {seeds}]", "chosen"], rows)


COLLAPSE_TOLERANCE = 1e-9


def is_collapsed(score: float, baseline: float) -> bool:
    """A score at (or below) the majority-class baseline's: the run predicts one class for every input."""
    return score <= baseline + COLLAPSE_TOLERANCE


def run_checks(
    finals: dict[str, list[dict[str, Any]]], baselines: dict[str, dict[str, Any]], metric: str = "macro_f1"
) -> list[dict[str, Any]]:
    """Per run (arm, seed): its validation and test scores, the splits on which it collapsed to the majority class
    (``baselines[split][metric]``), and whether its test score is at least 2× the test baseline's."""
    rows = []
    for arm, runs in finals.items():
        for run in runs:
            scores = {split: run[split][metric] for split in ("validation", "test")}
            rows.append(
                {
                    "arm": arm,
                    "seed": run["seed"],
                    **scores,
                    "collapsed": [s for s in scores if is_collapsed(scores[s], baselines[s][metric])],
                    "twice_baseline": scores["test"] >= 2 * baselines["test"][metric],
                }
            )
    return rows


def _run_note(check: dict[str, Any]) -> str:
    if check["collapsed"]:
        return f"collapsed ({', '.join(check['collapsed'])})"
    return "" if check["twice_baseline"] else "below 2× baseline (test)"


def runs_table(checks: list[dict[str, Any]], metric_title: str) -> str:
    """Markdown: one row per run of the table, with the collapse and 2×-baseline checks."""
    rows = [
        [ARM_TITLES[c["arm"]], str(c["seed"]), f"{c['validation']:.4f}", f"{c['test']:.4f}", _run_note(c)]
        for c in checks
    ]
    return markdown(["arm", "seed", f"validation {metric_title}", f"test {metric_title}", "check"], rows)


def baseline_sentence(checks: list[dict[str, Any]], baseline: float) -> str:
    """The 2×-majority-baseline check, run by run (a mean can hide a run that learned nothing)."""
    weak = [c for c in checks if not c["twice_baseline"]]
    if not weak:
        return f"every run's test macro-F1 is at least 2× the majority-class baseline's ({baseline:.4f})"
    names = ", ".join(f"{ARM_TITLES[c['arm']]} seed {c['seed']} ({c['test']:.4f})" for c in weak)
    share = f"{len(weak)} of {len(checks)} runs"
    return f"{share} are below 2× the majority-class baseline's test macro-F1 ({baseline:.4f}): {names}"


def collapsed_candidates(selection: dict[str, Any], baseline: float) -> list[dict[str, Any]]:
    """Every run of the selection (each candidate of each arm, each seed) whose validation score is at the
    majority-class baseline's: a candidate's collapse counts against it in the mean, and is shown here."""
    rows = []
    for arm, choice in selection.items():
        for candidate in choice["candidates"]:
            for seed, score in zip(choice["seeds"], candidate["scores"]):
                if is_collapsed(score, baseline):
                    rows.append({"arm": arm, "candidate": candidate["label"], "seed": seed, "validation": score})
    return rows


def collapse_sentence(
    checks: list[dict[str, Any]], selection: dict[str, Any] | None = None, baseline: float | None = None
) -> str:
    """Collapse in the reported runs (validation or test), then, with ``selection`` and the validation ``baseline``,
    in every run trained to choose (validation only: candidates are not tested)."""
    collapsed = [c for c in checks if c["collapsed"]]
    reported = f"{len(checks)} reported runs (each arm's chosen setting, every seed)"
    if not collapsed:
        line = f"None of the {reported} collapsed to the majority class."
    else:
        names = "; ".join(f"{ARM_TITLES[c['arm']]} seed {c['seed']} ({', '.join(c['collapsed'])})" for c in collapsed)
        line = (
            f"{len(collapsed)} of the {reported} collapsed to the majority class (macro-F1 at the baseline's): "
            f"{names}. Their scores are in the means and the paired differences above."
        )
    if selection is None or baseline is None:
        return line
    trained = sum(len(c["scores"]) for choice in selection.values() for c in choice["candidates"])
    fallen = collapsed_candidates(selection, baseline)
    line += (
        f" Of all {trained} runs trained to choose (every candidate, every seed), {len(fallen)} collapsed on validation"
    )
    if not fallen:
        return line + "."
    names = "; ".join(f"{ARM_TITLES[c['arm']]} {c['candidate']} seed {c['seed']}" for c in fallen)
    return f"{line}: {names}."


WIDE_INTERVAL = 0.1  # a 95% interval wider than this cannot tell a difference of a few points of macro-F1


def headline(diffs: list[dict[str, Any]], checks: list[dict[str, Any]], metric: str = "macro_f1") -> str | None:
    """The one-line verdict: Delta-LoRA against its scale-matched control (else against LoRA), in words."""
    rows = {(d["arm"], d["reference"]): d for d in diffs if d["metric"] == metric}
    row = rows.get(("deltalora", "lora-scaled")) or rows.get(("deltalora", "lora"))
    if row is None:
        return None
    reference = "its scale-matched control" if row["reference"] == "lora-scaled" else "LoRA"
    numbers = f"{row['mean']:+.3f}" + (f" [{row['low']:+.3f}, {row['high']:+.3f}]" if row["n"] > 1 else "")
    if row["n"] < 2:
        words = "one seed, no interval"
    elif row["excludes_zero"]:
        words = "Delta-LoRA " + ("higher" if row["mean"] > 0 else "lower") + " (the 95% interval excludes 0)"
    else:
        words = "no difference detected"
    line = f"Delta-LoRA vs {reference}: {words} ({numbers} test macro-F1, {row['n']} seeds)"
    if row["n"] > 1 and row["high"] - row["low"] > WIDE_INTERVAL:
        line += "; the interval is wide: more --seeds narrow it"
    collapsed = [c for c in checks if c["collapsed"] and c["arm"] in (row["arm"], row["reference"])]
    if collapsed:
        line += f"; {len(collapsed)} of these runs collapsed, see above"
    return line + "."


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
    """PNG: one panel per ``(curve key, name)`` of the runs; per arm the mean over seeds, each seed faintly under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for arm, runs in finals.items():
            steps = [s for s, _ in runs[0][key]]
            values = [statistics.fmean(r[key][i][1] for r in runs) for i in range(len(steps))]
            (line,) = ax.plot(steps, values, marker="o" if len(steps) < 12 else None, label=ARM_TITLES[arm])
            if len(runs) > 1:
                for run in runs:
                    ax.plot(*zip(*run[key]), color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set(xlabel="optimizer step", ylabel=name, title=f"{name} (mean over seeds; each seed faint)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CONSOLE_WIDTH = 100
FILE_WIDTH = 10_000  # output to a file or a pipe: no line is wrapped


def console():
    """The rich console of the run: the terminal's width up to 100 columns; unwrapped lines when the output goes to
    a file or a pipe (a table is as wide as its content, a sentence stays on its line)."""
    from rich.console import Console

    out = Console(width=FILE_WIDTH, soft_wrap=True)
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
    baselines = task_info.get("majority_baselines", {"validation": baseline, "test": baseline})
    checks = run_checks(finals, baselines)
    learned = baseline_sentence(checks, baseline["macro_f1"])
    collapse = collapse_sentence(checks, selection, baselines["validation"]["macro_f1"])
    verdict_line = headline(diffs, checks)
    header, rows = table_rows(summary)
    details = (
        f"task: {task_info['source']} ({len(task_info['label_names'])} classes, "
        f"{task_info['sizes']['train']} train / {task_info['sizes']['validation']} validation / "
        f"{task_info['sizes']['test']} test); {settings.steps} steps × batch {settings.batch_size}, max length "
        f"{settings.max_length}, r={settings.r}, lora_alpha={settings.lora_alpha:g}, lora_dropout=0; "
        f"{method_setting(settings)}; seeds {settings.seeds}"
    )
    setting = f"model `{task_info['model']}`; {details}"
    plot_title = f"{task_info.get('model_name', task_info['model'])}; {details}"
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
                f"macro-F1 {baseline['macro_f1']:.4f} (validation {baselines['validation']['macro_f1']:.4f}); "
                f"{learned}. {collapse}"
            ),
            "",
            *([f"**{verdict_line}**", ""] if verdict_line else []),
            "## Test split (used once, for this table)",
            "",
            markdown(header, rows),
            "",
            (
                "Mean ± std over seeds. Each arm's settings were chosen by their mean score over all seeds on the "
                "validation split (carved from train, disjoint from test); the test split was not used for any "
                "choice. Train loss: mean of the last 10% "
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
            "## Every run",
            "",
            runs_table(checks, "macro-F1"),
            "",
            "Collapsed: macro-F1 at (or below) the majority-class baseline's on that split, i.e. one class predicted "
            "for every input.",
            "",
            "## Validation choices",
            "",
            choices_table(selection, "macro-F1", baselines["validation"]["macro_f1"]),
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
    plot_curves(finals, paths["plot"], plot_title)
    report = {
        "command": command,
        "settings": asdict(settings),
        "task": task_info,
        "selection": selection,
        "summary": summary,
        "differences": diffs,
        "run_checks": checks,
        "verdict": verdict_line,
        "runs": [r for runs in finals.values() for r in runs],
        "environment": environment(),
        "wall_seconds": seconds,
    }
    paths["json"].write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    out_console = console()
    for table in console_tables(summary, diffs):
        out_console.print(table)
    out_console.print(learned[0].upper() + learned[1:] + ".")
    out_console.print(collapse)
    out_console.print(
        f"Report: {out}/results.md (every column, every run, the validation choices), results.json, curves.png"
    )
    out_console.print(f"Wall time {seconds:.0f} s (load average at the end {_load()})")
    if verdict_line:
        out_console.print(f"[bold]{verdict_line}[/]")
    return report
