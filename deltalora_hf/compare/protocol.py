"""The fair protocol: choose each arm's settings on validation, train every seed, look at test once.

``select_and_train`` is task-agnostic (the NLG benchmark uses it with generation runs); ``compare`` is the
classification command.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .data import TextTask, load_task, model_name, resolve_model
from .quiet import quiet, stderr_of_new_processes
from .run import train_classifier
from .settings import ARM_TITLES, Arm, CompareSettings

# jobs of (settings of the candidate, arm, seed, learning rate) -> run dicts with "validation" and "test" metric dicts
RunAllFn = Callable[[list[tuple[CompareSettings, Arm, int, float]]], list[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of an arm's selection grid."""

    lr: float
    update_ratio: float | None = None  # Delta-LoRA's λ, or the λ of lora-scaled's alpha·(1+λ)
    start_step: int | None = None  # Delta-LoRA's K

    @property
    def label(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.update_ratio is not None:
            parts.append(f"λ={self.update_ratio:g}")
        if self.start_step is not None:
            parts.append(f"K={self.start_step}")
        return " ".join(parts)

    def apply(self, settings: CompareSettings) -> CompareSettings:
        changes: dict[str, Any] = {}
        if self.update_ratio is not None:
            changes["update_ratio"] = self.update_ratio
        if self.start_step is not None:
            changes["start_step"] = self.start_step
        return dataclasses.replace(settings, **changes) if changes else settings


def candidates(settings: CompareSettings, arm: Arm) -> list[Candidate]:
    """The selection grid of ``arm``: its learning rates, times the λ / K sweeps where they apply.

    ``lora-scaled`` sweeps the same λ values as Delta-LoRA (its alpha is ``lora_alpha·(1+λ)``), so that the control
    gets the same selection budget for the scale.
    """
    ratios: list[float | None] = list(settings.sweep_update_ratio or []) or [None]
    starts: list[int | None] = list(settings.sweep_start_step or []) or [None]
    if arm == "deltalora":
        return [Candidate(lr, u, k) for lr, u, k in itertools.product(settings.lr_grid[arm], ratios, starts)]
    if arm == "lora-scaled":
        return [Candidate(lr, u) for lr, u in itertools.product(settings.lr_grid[arm], ratios)]
    return [Candidate(lr) for lr in settings.lr_grid[arm]]


def select_and_train(
    settings: CompareSettings, run_all: RunAllFn, metric: str, validation_id: str, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """For every arm: each candidate with every seed; the candidate with the best mean validation score is kept.

    The choice does not bet on one seed: a learning rate that collapses one seed pays for it in the mean. Every arm
    gets the same budget, ``len(candidates) × len(seeds)`` runs. ``run_all`` trains a list of ``(settings, arm, seed,
    lr)`` jobs (in any order, possibly in parallel) and returns their runs in the same order. Returns ``(selection,
    finals)``: the choice per arm (every candidate's validation scores per seed and their mean, the identity of the
    split they were read on) and the chosen candidate's runs per arm, one per seed. Only ``run["validation"]`` is
    read to choose; test metrics are only carried.
    """
    grids = {arm: candidates(settings, arm) for arm in settings.arms}
    jobs = [
        (c.apply(settings), arm, seed, c.lr) for arm in settings.arms for c in grids[arm] for seed in settings.seeds
    ]
    results = iter(run_all(jobs))
    tried = {
        arm: [[{**next(results), "candidate": c.label} for _ in settings.seeds] for c in grids[arm]]
        for arm in settings.arms
    }
    selection: dict[str, Any] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for arm, per_candidate in tried.items():
        scores = [[run["validation"][metric] for run in runs] for runs in per_candidate]
        best = max(range(len(scores)), key=lambda i: statistics.fmean(scores[i]))  # the first one on a tie
        chosen = grids[arm][best]
        selection[arm] = {
            "choice": chosen.label,
            "lr": chosen.lr,
            "update_ratio": chosen.update_ratio,
            "start_step": chosen.start_step,
            "seeds": list(settings.seeds),
            "rule": "best mean over seeds",
            "metric": f"validation {metric}",
            "split": validation_id,
            "candidates": [
                {"label": c.label, "mean": statistics.fmean(s), "scores": s} for c, s in zip(grids[arm], scores)
            ],
            "index": best,
        }
        finals[arm] = per_candidate[best]
        log(
            f"  {ARM_TITLES[arm]}: {chosen.label} (best mean validation {metric} over seeds); test {metric} "
            + ", ".join(f"{r['test'][metric]:.4f}" for r in finals[arm])
        )
    return selection, finals


def run_jobs(function: Callable[..., dict[str, Any]], jobs: list[tuple], extra: tuple, settings: CompareSettings):
    """``function(*job, *extra)`` for every job, in order: in this process, or in ``settings.jobs`` worker processes.

    Workers are spawned once per call and reused; each run resets the worker's peak-RSS counter when it starts
    (``reset_peak_rss``), so that the reported peak is that run's own. Unless
    ``settings.verbose``, the workers' stderr goes to ``workers.log`` in ``settings.output_dir`` (``.quiet``).
    """
    if not settings.isolate:
        return [function(*job, *extra) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    log = None if settings.verbose else Path(settings.output_dir) / "workers.log"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(settings.jobs, len(jobs)) or 1, mp_context=context) as pool:
        with stderr_of_new_processes(log):  # workers start when the jobs are submitted
            futures = [pool.submit(function, *job, *extra) for job in jobs]
        return [future.result() for future in futures]


def compare(settings: CompareSettings, task: TextTask | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the protocol of ``settings`` on a classification task, write the report and return it (``results.json``).

    1. every candidate (learning rate; λ/K where swept) of each arm with every seed;
    2. the candidate with the best mean validation score over the seeds is chosen;
    3. the table reports the test metrics of its runs, and marks every run that collapsed to the majority class.
    """
    quiet(settings.verbose)
    console = report.console()
    model_path = resolve_model(settings)
    task = load_task(settings) if task is None else task
    baselines = {split: task.majority_baseline(split) for split in ("validation", "test")}
    baseline = baselines["test"]
    sizes = {split: len(labels) for split, labels in task.labels.items()}
    arms_of: dict[str, list[str]] = {}  # arms that share a grid on one line
    for arm, lrs in settings.lr_grid.items():
        arms_of.setdefault(",".join(f"{lr:g}" for lr in lrs), []).append(arm)
    grids = "; ".join(f"{', '.join(arms)} {lrs}" for lrs, arms in arms_of.items())
    console.print(f"[bold]deltalora-hf compare[/]: {', '.join(settings.arms)}")
    console.print(f"  task: {task.source}")
    console.print(
        f"  {len(task.label_names)} classes: {sizes['train']} train / {sizes['validation']} validation / "
        f"{sizes['test']} test"
    )
    console.print(
        f"  majority-class baseline (test): accuracy {baseline['accuracy']:.4f}, macro-F1 {baseline['macro_f1']:.4f} "
        "(a run at it: collapsed)"
    )
    console.print(f"  model: {model_path}")
    console.print(
        f"  {settings.steps} steps × batch {settings.batch_size}, validation every {settings.eval_every} steps, "
        f"seeds {','.join(map(str, settings.seeds))}"
    )
    console.print(
        f"  r={settings.r}, alpha={settings.lora_alpha:g} (lora-scaled {settings.scaled_alpha:g}); "
        f"Delta-LoRA λ={settings.update_ratio:g}, K={settings.start_step}"
    )
    console.print(f"  learning rates: {grids}")
    console.print("  selection: every candidate with every seed; the best mean validation macro-F1 is kept")
    started = time.perf_counter()

    def run_all(jobs: list[tuple]) -> list[dict[str, Any]]:
        return run_jobs(train_classifier, jobs, (model_path, task), settings)

    selection, finals = select_and_train(settings, run_all, "macro_f1", task.fingerprint("validation"), console.print)
    seconds = time.perf_counter() - started
    task_info = {
        "source": task.source,
        "model": model_path,
        "model_name": model_name(settings),
        "label_names": task.label_names,
        "sizes": sizes,
        "splits": {s: task.fingerprint(s) for s in ("train", "validation", "test")},
        "majority_baseline": baseline,
        "majority_baselines": baselines,
    }
    command = command or shlex.join(["python", "-m", "deltalora_hf", *sys.argv[1:]])
    return report.write_report(settings, task_info, selection, finals, seconds, command)
