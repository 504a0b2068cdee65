"""Max abs logit difference on each path of issue 9, both base-update modes, against an independent dense reference.

Run from the repository root: ``python -m benchmarks.invariant_paths`` (tiny Llama, fp32, trained past K with
Trainer + DeltaLoRACallback). Prints a markdown table and writes ``benchmarks/results/invariant_paths.md``.
The reference and the model builders are the tests' own (``tests/helpers.py``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from deltalora_hf import DeltaLoRACallback, DeltaLoraUpdater
from tests.helpers import adapter_state, delta_config, logits, reference, tiny_llama, train


def trained(folder: Path, mode: str, data_seed: int = 0):
    """As the tests' session fixture ``trained`` builds its models (tests/conftest.py), trained into ``folder``."""
    model = get_peft_model(tiny_llama(), delta_config(mode))
    train(model, folder / f"run-{mode}-{data_seed}", seed=data_seed)
    return model


def diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def rows(mode: str, tmp: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    model = trained(tmp, mode)
    t = adapter_state(model)
    model.save_pretrained(tmp / "saved")
    base = tiny_llama()
    base.load_adapter(str(tmp / "saved"))
    out["`base.load_adapter(saved_dir)`"] = f"{diff(logits(base), reference(t)):.1e}"
    low = PeftModel.from_pretrained(tiny_llama(), tmp / "saved", low_cpu_mem_usage=True)
    out["`from_pretrained(..., low_cpu_mem_usage=True)`"] = f"{diff(logits(low), reference(t)):.1e}"

    again = trained(tmp / "again", mode)
    train(again, tmp / "second", steps=2, seed=3)
    again.save_pretrained(tmp / "again-saved")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp / "again-saved")
    with again.disable_adapter():
        disabled = diff(logits(again), reference(None))
    out["second run (new Trainer), vs save → reload; `disable_adapter()` vs original base"] = (
        f"{diff(logits(again), logits(reloaded)):.1e}; {disabled:.1e}"
    )

    first, second = trained(tmp / "a", mode, data_seed=0), trained(tmp / "b", mode, data_seed=5)
    tf, ts = adapter_state(first), adapter_state(second)
    second.save_pretrained(tmp / "other")
    first.load_adapter(tmp / "other", adapter_name="other")
    default_after = diff(logits(first), reference(tf))
    first.set_adapter("other")
    out['`load_adapter(other, "other")`: "other" alone; "default" after the load'] = (
        f"{diff(logits(first), reference(ts)):.1e}; {default_after:.1e}"
    )
    first.set_adapter("default")
    first.delete_adapter("other")
    with first.disable_adapter():
        out["`delete_adapter` then `disable_adapter()` vs original base"] = (
            f"{diff(logits(first), reference(None)):.1e}"
        )
    out["`unload()` vs original base"] = f"{diff(logits(first.unload()), reference(None)):.1e}"

    try:
        get_peft_model(tiny_llama(tie_word_embeddings=True), delta_config(mode, target_modules=["embed_tokens"]))
        out["tied `embed_tokens`"] = "accepted (!)"
    except ValueError as error:
        out["tied `embed_tokens`"] = f"ValueError: {str(error)[:60]}…"

    twice = get_peft_model(tiny_llama(), delta_config(mode))
    train(twice, tmp / "twice", callbacks=[DeltaLoRACallback(), DeltaLoRACallback()])
    once = trained(tmp / "once", mode)
    out["two callbacks vs one (max abs diff of every parameter)"] = (
        f"{max(diff(a, b) for a, b in zip(once.parameters(), twice.parameters())):.1e}"
    )
    DeltaLoraUpdater(twice)
    try:
        delta_config(mode, update_ratio=float("inf"))
        out["`update_ratio=inf`"] = "accepted (!)"
    except ValueError:
        out["`update_ratio=inf`"] = "ValueError"
    return out


def main() -> None:
    results = {mode: rows(mode, Path(tempfile.mkdtemp()) / mode) for mode in ("inplace", "factored")}
    lines = ["| path | in-place | factored |", "|---|---|---|"]
    lines += [f"| {k} | {results['inplace'][k]} | {results['factored'][k]} |" for k in results["inplace"]]
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).parent / "results" / "invariant_paths.md"
    out.write_text(
        "# Issue 9 paths: max abs logit difference to the reference (tiny Llama, fp32)\n\n"
        "`python -m benchmarks.invariant_paths`; reference: W_0 + sBA + λs(BA − B_K A_K) written densely on a fresh "
        "base (see tests/helpers.py).\n\n" + table + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
