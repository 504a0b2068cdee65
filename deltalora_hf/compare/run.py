"""One training run of one arm (model, seed, learning rate), evaluated on validation and, once, on test."""

from __future__ import annotations

import contextlib
import hashlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .data import TextTask
from .measure import peak_rss_bytes, reset_peak_rss, snapshot, targeted_base_weights, weight_change
from .metrics import classification_scores
from .quiet import quiet
from .report import is_collapsed
from .settings import Arm, CompareSettings

# Names of the attention/MLP linears by architecture family; the first family present in the model is used.
TARGET_FAMILIES = (
    ("query", "key", "value", "dense"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),  # DistilBERT
    ("c_attn", "c_proj", "c_fc"),  # GPT-2
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Qwen, Mistral
)
HEAD_NAMES = ("classifier", "score", "classification_head")


def pick_target_modules(model: nn.Module, explicit: Sequence[str] | None = None) -> list[str]:
    """The attention/MLP linear names of the model's family (``explicit`` if given)."""
    if explicit:
        return list(explicit)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in TARGET_FAMILIES:
        present = [n for n in family if n in leaf_names]
        if len(present) >= 2:
            return present
    raise ValueError(f"cannot tell the attention/MLP linears of {type(model).__name__}; pass --target-modules a,b")


def adapter_config(
    arm: Arm, settings: CompareSettings, targets: list[str], task_type: str, modules_to_save: list[str] | None = None
):
    """The PEFT config of an adapter arm: LoRA, LoRA with ``lora_alpha·(1+λ)``, Delta-LoRA, DoRA or LoRA+."""
    import peft

    import deltalora_hf

    common: dict[str, Any] = {
        "r": settings.r,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "task_type": task_type,
        "modules_to_save": modules_to_save,
    }
    if arm == "deltalora":
        return deltalora_hf.DeltaLoraConfig(
            **common, lora_alpha=settings.lora_alpha, update_ratio=settings.update_ratio, start_step=settings.start_step
        )
    alpha = settings.scaled_alpha if arm == "lora-scaled" else settings.lora_alpha
    return peft.LoraConfig(**common, lora_alpha=alpha, use_dora=arm == "dora")


def build_classifier(model_path: str, task: TextTask, arm: Arm, settings: CompareSettings, seed: int):
    """The model of ``arm`` and its targeted linear names; the classification head trains in every arm."""
    import peft
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)  # the same head initialisation for every arm of this seed
    names = task.label_names
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced
    )
    targets = pick_target_modules(model, settings.target_modules)
    if arm == "full":
        return model, targets
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    heads = [name for name in HEAD_NAMES if name in leaf_names]
    return peft.get_peft_model(model, adapter_config(arm, settings, targets, "SEQ_CLS", heads)), targets


class RunProgress(TrainerCallback):
    """One progress bar per run (rich), and the wall time of every optimizer step (Delta-LoRA's W update included).

    With ``live=False`` (runs in parallel processes sharing one terminal) it prints one line when the run ends.
    """

    def __init__(self, description: str, live: bool = True) -> None:
        self.description, self.live = description, live
        self.step_times: list[float] = []
        self.status = ""
        self._t0 = self._started = self._seconds = 0.0
        self._steps = 0
        self._progress: Any = None
        self._task: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps, status="")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._t0)
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.status = f"loss {logs['loss']:.3f}"
        elif logs and "eval_macro_f1" in logs:
            self.status = f"validation macro-F1 {logs['eval_macro_f1']:.3f}"
        if self._progress is not None:
            self._progress.update(self._task, status=self.status)

    def on_train_end(self, args, state, control, **kwargs):
        self._seconds, self._steps = time.perf_counter() - self._started, state.global_step
        if self._progress is not None:
            self._progress.stop()

    def finish(self, result: str, alert: bool = False) -> None:
        """The run's end line: ``result`` (its final validation score, with a mark such as ``(collapsed)``).

        Without ``live`` (runs in parallel) every run gets the line; with ``live`` its bar is the line, and only a
        run with ``alert`` gets one more, so that the mark is seen.
        """
        if not self.live:
            print(f"{self.description} {self._steps} steps in {self._seconds:.0f} s, {result}", flush=True)
        elif alert:
            print(f"{self.description} {result}", flush=True)


@contextlib.contextmanager
def training_randomness_untouched() -> Iterator[None]:
    """Run the block, then restore every random stream training draws from: torch's (CPU and CUDA), Python's, NumPy's.

    An evaluation draws from torch's global generator (each ``DataLoader`` iterator takes a base seed from it); without
    this, how often the run evaluates would change the dropout masks of the steps after it, and so the scores.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class EvaluationApartTrainer(Trainer):
    """``Trainer`` whose evaluations and predictions draw nothing from training's random streams.

    Two runs that differ only in ``eval_steps`` train with the same dropout masks and batches, to the same weights.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with training_randomness_untouched():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with training_randomness_untouched():
            return super().predict(*args, **kwargs)


# Buffers that define a trained model, by a part of their name: Delta-LoRA's anchors and flag. Other buffers
# (position ids, warm-up counts, marks a version adds) are left out: an allow-list.
DEFINING_BUFFERS = ("lora_anchor_A", "lora_anchor_B", "lora_anchored")


def defining_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What defines a trained model, by name (sorted): every parameter (base weights, adapter factors, heads and
    ``modules_to_save``; full fine-tuning: all its weights) and Delta-LoRA's anchors ``A_K``, ``B_K`` and flag."""
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        if any(part in DEFINING_BUFFERS for part in name.split(".")):
            tensors[name] = buffer
    return dict(sorted(tensors.items()))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of :func:`defining_tensors` (name, dtype, shape, bytes): equal iff those tensors are bit-identical,
    whatever other buffers a version of a library adds."""
    digest = hashlib.sha256()
    for name, tensor in defining_tensors(model).items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_label(arm: Arm, seed: int, lr: float, settings: CompareSettings) -> str:
    """The progress line's name of a run: the settings that apply to ``arm`` only (λ and K for Delta-LoRA alone)."""
    extra = {
        "deltalora": f" λ={settings.update_ratio:g} K={settings.start_step}",
        "lora-scaled": f" alpha={settings.scaled_alpha:g}",
    }.get(arm, "")
    return f"{arm:11s} seed {seed} lr {lr:<7g}{extra}"


def start_process(settings: CompareSettings) -> None:
    """Per-run process setup: torch threads, warnings the user cannot act on hidden (``.quiet``), peak RSS reset."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    quiet(settings.verbose)
    reset_peak_rss()


def run_callbacks(arm: Arm, seed: int, description: str, settings: CompareSettings) -> list[TrainerCallback]:
    """``[DeltaLoRACallback (deltalora only), RunProgress]``: the progress line of the run and the W update."""
    import deltalora_hf

    progress = RunProgress(description, live=not settings.isolate or settings.jobs == 1)
    return ([deltalora_hf.DeltaLoRACallback(seed=seed)] if arm == "deltalora" else []) + [progress]


def training_arguments(settings: CompareSettings, seed: int, lr: float, output_dir: str, **extra: Any):
    """The ``TrainingArguments`` every arm and benchmark shares (linear schedule, no saving, no reporting)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=settings.data_seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **extra,
    )


def progress_of(trainer) -> RunProgress:
    """The trainer's :class:`RunProgress` (from :func:`run_callbacks`)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, RunProgress))


def fit(trainer, settings: CompareSettings) -> dict[str, Any]:
    """Train (Trainer's per-step log dicts only with ``verbose``); the timing and loss fields of the run's result."""
    from transformers import PrinterCallback

    if not settings.verbose:
        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    progress = progress_of(trainer)
    return {
        "train_loss_final": statistics.fmean(loss for _, loss in losses[-max(1, len(losses) // 10) :]),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "median_step_s": statistics.median(progress.step_times),
        "train_seconds": train_seconds,
        "loss_curve": losses,
    }


class _Encoded(torch.utils.data.Dataset):
    """Tokenized texts with labels."""

    def __init__(self, encodings: dict[str, list], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def train_classifier(
    settings: CompareSettings, arm: Arm, seed: int, lr: float, model_path: str, task: TextTask
) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` and ``lr``; evaluate on validation (curve and final) and once on test."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoTokenizer, DataCollatorWithPadding

    start_process(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, targets = build_classifier(model_path, task, arm, settings, seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    w0 = snapshot(targeted_base_weights(model, targets))

    def encoded(split) -> _Encoded:
        texts = task.texts[split]
        return _Encoded(dict(tokenizer(texts, truncation=True, max_length=settings.max_length)), task.labels[split])

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1).tolist()
        return classification_scores(predicted, np.asarray(prediction.label_ids).tolist(), len(task.label_names))

    callbacks = run_callbacks(arm, seed, run_label(arm, seed, lr, settings), settings)
    optimizer = None
    if arm == "loraplus":
        optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=settings.loraplus_lr_ratio,
            weight_decay=settings.weight_decay,
        )
    args = training_arguments(
        settings,
        seed,
        lr,
        tempfile.mkdtemp(prefix=f"deltalora-compare-{arm}-"),
        per_device_eval_batch_size=settings.eval_batch_size,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_steps=max(1, settings.steps // 25),
        dataloader_num_workers=0,
    )
    trainer = EvaluationApartTrainer(
        model=model,
        args=args,
        train_dataset=encoded("train"),
        eval_dataset=encoded("validation"),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )
    trained = fit(trainer, settings)
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_macro_f1" in h), None)
    validation = last if last is not None and last["step"] == settings.steps else trainer.evaluate()
    baseline = task.majority_baseline("validation")["macro_f1"]
    collapsed = is_collapsed(validation["eval_macro_f1"], baseline)
    result_line = f"validation macro-F1 {validation['eval_macro_f1']:.3f}" + (" (collapsed)" if collapsed else "")
    progress_of(trainer).finish(result_line, alert=collapsed)
    test = trainer.predict(encoded("test"), metric_key_prefix="test").metrics  # the only look at the test split
    result: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "validation": {
            "accuracy": validation["eval_accuracy"],
            "macro_f1": validation["eval_macro_f1"],
            "loss": validation["eval_loss"],
            "split": task.fingerprint("validation"),
        },
        "test": {
            "accuracy": test["test_accuracy"],
            "macro_f1": test["test_macro_f1"],
            "loss": test["test_loss"],
            "split": task.fingerprint("test"),
        },
        **trained,
        "total_params": sum(p.numel() for p in model.parameters()),
        "target_modules": targets,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "validation_curve": [(h["step"], h["eval_macro_f1"]) for h in history if "eval_macro_f1" in h],
        "weights_sha256": weights_digest(model),
        **weight_change(w0, targeted_base_weights(model, targets)),
    }
    if arm == "deltalora":
        updater = callbacks[0].updater
        result["deltalora_has_moved"] = updater.has_moved()
        result["deltalora_move_norm"] = updater.move_norm()
    return result
