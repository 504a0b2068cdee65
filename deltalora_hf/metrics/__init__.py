"""Small local ``evaluate`` metric scripts, so that metrics load offline.

``evaluate.load(metric_path("accuracy"))`` loads ``accuracy.py`` from this folder: the hub's metric scripts
cannot be fetched without a network connection. Each script is a self-contained ``evaluate.Metric``.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("accuracy", "f1", "rouge_l", "bleu")


def metric_path(name: str) -> str:
    """Path of the shipped metric script ``name`` (one of :data:`AVAILABLE`)."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(AVAILABLE)}")
    return str(METRICS_DIR / f"{name}.py")


def load(name: str):
    """``evaluate.load`` of the shipped script ``name`` (needs the ``evaluate`` package)."""
    import evaluate

    return evaluate.load(metric_path(name))
