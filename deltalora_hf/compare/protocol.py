"""The fair protocol: choose each arm's learning rate on validation, train every seed, look at test once."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any

from . import report
from .data import TextTask, load_task, resolve_model
from .measure import run_in_child
from .report import write_report
from .run import train_classifier
from .settings import ARM_TITLES, Arm, CompareSettings


def choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the best *validation* macro-F1 (the first one on a tie). Test numbers are never read here."""
    return max(candidates, key=lambda run: run["validation"]["macro_f1"])


def compare(settings: CompareSettings, task: TextTask | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the protocol of ``settings``, write the report and return it (as in ``results.json``).

    1. every learning rate of each arm's grid with seed ``seeds[0]``; the best on the validation split is chosen;
    2. the chosen learning rate with the other seeds;
    3. the table reports the test metrics of those runs (seed ``seeds[0]``'s run is the one chosen in 1).
    """
    console = report.console()
    model_path = resolve_model(settings)
    task = load_task(settings) if task is None else task
    baseline = task.majority_baseline("test")
    sizes = {split: len(labels) for split, labels in task.labels.items()}
    console.print(
        f"[bold]deltalora-hf compare[/]: {', '.join(settings.arms)} on {task.source}: {sizes['train']} "
        f"train / {sizes['validation']} validation / {sizes['test']} test, {len(task.label_names)} classes; "
        f"model {model_path}"
    )
    console.print(
        f"  majority-class baseline (test): accuracy {baseline['accuracy']:.4f}, macro-F1 {baseline['macro_f1']:.4f}"
    )
    console.print(
        f"  {settings.steps} steps × batch {settings.batch_size}; r={settings.r}, alpha={settings.lora_alpha:g}"
        f" (lora-scaled {settings.scaled_alpha:g}); Delta-LoRA λ={settings.update_ratio:g}, "
        f"K={settings.start_step}; lr grids {settings.lr_grid}; seeds {settings.seeds}"
    )
    started = time.perf_counter()

    def run(arm: Arm, seed: int, lr: float) -> dict[str, Any]:
        args = (settings, arm, seed, lr, model_path, task)
        return run_in_child(train_classifier, *args) if settings.isolate else train_classifier(*args)

    selection: dict[str, Any] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    first, *others = settings.seeds
    for arm in settings.arms:
        candidates = [run(arm, first, lr) for lr in settings.lr_grid[arm]]
        chosen = choose(candidates)
        selection[arm] = {
            "lr": chosen["lr"],
            "seed": first,
            "metric": "validation macro_f1",
            "split": task.fingerprint("validation"),
            "candidates": [(r["lr"], r["validation"]["macro_f1"]) for r in candidates],
        }
        finals[arm] = [chosen] + [run(arm, seed, chosen["lr"]) for seed in others]
        f1 = [r["test"]["macro_f1"] for r in finals[arm]]
        console.print(
            f"  {ARM_TITLES[arm]}: lr {chosen['lr']:g} (validation), test macro-F1 " + ", ".join(f"{v:.4f}" for v in f1)
        )
    seconds = time.perf_counter() - started
    task_info = {
        "source": task.source,
        "model": model_path,
        "label_names": task.label_names,
        "sizes": sizes,
        "splits": {s: task.fingerprint(s) for s in ("train", "validation", "test")},
        "majority_baseline": baseline,
    }
    command = command or " ".join(shlex.quote(a) for a in ["python", "-m", "deltalora_hf", *sys.argv[1:]])
    return write_report(settings, task_info, selection, finals, seconds, command)
