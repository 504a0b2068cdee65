"""The fair protocol: choose each arm's settings on validation, train every seed, look at test once.

:func:`select_and_train` is task-agnostic (the NLG benchmark uses it with generation runs); :func:`compare` is the
classification command.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from . import report
from .data import TextTask, load_task, resolve_model
from .measure import run_in_child
from .run import train_classifier
from .settings import ARM_TITLES, Arm, CompareSettings

# (settings of the candidate, arm, seed, learning rate) -> a run dict with "validation" and "test" metric dicts
RunFn = Callable[[CompareSettings, Arm, int, float], dict[str, Any]]


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
    settings: CompareSettings, run: RunFn, metric: str, validation_id: str, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """For every arm: each candidate with seed ``seeds[0]``, the best on ``validation[metric]``, then other seeds.

    Returns ``(selection, finals)``: the choice per arm (with every candidate's validation score and the identity of
    the split it was made on) and the final runs per arm, seed ``seeds[0]``'s being the chosen candidate's run.
    Only ``run["validation"]`` is read to choose; the test metrics are carried, never compared.
    """
    selection: dict[str, Any] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    first, *others = settings.seeds
    for arm in settings.arms:
        grid = candidates(settings, arm)
        runs = [{**run(c.apply(settings), arm, first, c.lr), "candidate": c.label} for c in grid]
        best = max(range(len(grid)), key=lambda i: runs[i]["validation"][metric])  # the first one on a tie
        chosen = grid[best]
        selection[arm] = {
            "choice": chosen.label, "lr": chosen.lr, "update_ratio": chosen.update_ratio,
            "start_step": chosen.start_step, "seed": first, "metric": f"validation {metric}", "split": validation_id,
            "candidates": [(c.label, r["validation"][metric]) for c, r in zip(grid, runs)],
        }  # fmt: skip
        finals[arm] = [runs[best]] + [
            {**run(chosen.apply(settings), arm, seed, chosen.lr), "candidate": chosen.label} for seed in others
        ]
        log(f"  {ARM_TITLES[arm]}: {chosen.label} (on validation); test {metric} "
            + ", ".join(f"{r['test'][metric]:.4f}" for r in finals[arm]))  # fmt: skip
    return selection, finals


def compare(settings: CompareSettings, task: TextTask | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the protocol of ``settings`` on a classification task, write the report and return it (``results.json``).

    1. every candidate (learning rate; λ/K where swept) of each arm with seed ``seeds[0]``; the best on the
       validation split is chosen;
    2. the chosen candidate with the other seeds;
    3. the table reports the test metrics of those runs.
    """
    console = report.console()
    model_path = resolve_model(settings)
    task = load_task(settings) if task is None else task
    baseline = task.majority_baseline("test")
    sizes = {split: len(labels) for split, labels in task.labels.items()}
    console.print(f"[bold]deltalora-hf compare[/]: {', '.join(settings.arms)} on {task.source}: {sizes['train']} "
                  f"train / {sizes['validation']} validation / {sizes['test']} test, {len(task.label_names)} classes; "
                  f"model {model_path}")  # fmt: skip
    console.print(f"  majority-class baseline (test): accuracy {baseline['accuracy']:.4f}, "
                  f"macro-F1 {baseline['macro_f1']:.4f}")  # fmt: skip
    console.print(f"  {settings.steps} steps × batch {settings.batch_size}; r={settings.r}, alpha={settings.lora_alpha:g}"
                  f" (lora-scaled {settings.scaled_alpha:g}); Delta-LoRA λ={settings.update_ratio:g}, "
                  f"K={settings.start_step}; lr grids {settings.lr_grid}; seeds {settings.seeds}")  # fmt: skip
    started = time.perf_counter()

    def run(candidate_settings: CompareSettings, arm: Arm, seed: int, lr: float) -> dict[str, Any]:
        args = (candidate_settings, arm, seed, lr, model_path, task)
        return run_in_child(train_classifier, *args) if settings.isolate else train_classifier(*args)

    selection, finals = select_and_train(settings, run, "macro_f1", task.fingerprint("validation"), console.print)
    seconds = time.perf_counter() - started
    task_info = {"source": task.source, "model": model_path, "label_names": task.label_names, "sizes": sizes,
                 "splits": {s: task.fingerprint(s) for s in ("train", "validation", "test")},
                 "majority_baseline": baseline}  # fmt: skip
    command = command or " ".join(shlex.quote(a) for a in ["python", "-m", "deltalora_hf", *sys.argv[1:]])
    return report.write_report(settings, task_info, selection, finals, seconds, command)
