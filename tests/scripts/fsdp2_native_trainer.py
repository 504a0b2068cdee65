"""Trainer + DeltaLoRACallback on a tiny Llama that transformers loads already sharded (native FSDP2, CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scripts.fsdp2_native_trainer \\
        --base DIR_OF_SAVED_BASE --out DIR --runs lora,factored,inplace

Each rank loads the base with ``LlamaForCausalLM.from_pretrained(base, distributed_config=DistributedConfig(
fsdp_size=world))``: every weight is a DTensor sharded on its rows (``fully_shard`` per decoder layer, as the
model's ``fsdp_plan`` says), before PEFT wraps it; the LoRA factors and anchors that ``get_peft_model`` adds are
plain tensors, which ``Trainer`` keeps identical across ranks (it broadcasts them and averages their gradients). A run
is ``lora`` (plain PEFT LoRA), ``factored`` or ``inplace``. The Trainer feeds rows in dataset order, so 2 ranks x 2
rows see the same global batches as one process with 4 rows and no sharding (:func:`train` with
``distributed=False``, the test's reference). Each rank writes ``{run}.rank{r}.safetensors`` (the gathered state)
and ``{run}.rank{r}.json`` (seconds per step, the placements of the targeted W); every rank calls
``trainer.save_model({run}/adapter)`` and ``export_lora(model, {run}/export)``, rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, DeltaLoraLayer, export_lora
from tests.helpers import SequentialTrainer, lm_rows, tiny_llama, train_args
from tests.scripts import _common  # noqa: F401  (offline mode)
from tests.scripts._common import trained_state
from tests.scripts.deepspeed_trainer import StepTimer
from tests.scripts.fsdp2_loop import MODEL, TARGETS

ADAPTER_SEED = 1  # the LoRA factors start the same in every process, however the base was built


def peft_config(mode: str, start_step: int) -> LoraConfig:
    if mode == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    return DeltaLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=start_step, base_update=mode
    )


def load_sharded(path: str, world: int):
    from transformers.distributed import DistributedConfig

    return LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=world))


def train(
    out_dir: str,
    mode: str,
    per_device: int,
    steps: int = 6,
    start_step: int = 2,
    base: str | None = None,
    save: bool = True,
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Train one run (sharded when launched on several processes); return the rank, the state and a report."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = load_sharded(base, world) if world > 1 else tiny_llama(**MODEL)
    torch.manual_seed(ADAPTER_SEED)
    model = get_peft_model(model, peft_config(mode, start_step))
    weights = {n: m.get_base_layer().weight for n, m in model.named_modules() if hasattr(m, "get_base_layer")}
    timer = StepTimer()
    trainer = SequentialTrainer(
        model=model,
        args=train_args(os.path.join(out_dir, "trainer"), max_steps=steps, per_device_train_batch_size=per_device),
        train_dataset=lm_rows(max(64, per_device * world * steps)),
        callbacks=[timer] if mode == "lora" else [DeltaLoRACallback(), timer],
    )
    trainer.train()
    assert trainer.args.world_size == world, trainer.args.world_size
    if save:
        trainer.save_model(os.path.join(out_dir, "adapter"))
        if mode != "lora":
            export_lora(model, os.path.join(out_dir, "export"))
    report = {
        "seconds_per_step": timer.seconds,
        "placements": {n: str(getattr(w, "placements", None)) for n, w in weights.items()},
        "delta_lora_layers": sum(isinstance(m, DeltaLoraLayer) for m in model.modules()),
    }
    return trainer.args.process_index, trained_state(model), report


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="a saved Llama (save_pretrained) to load sharded")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="lora,factored,inplace", help="comma-separated: lora, factored, inplace")
    parser.add_argument("--per-device", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start-step", type=int, default=2)
    parser.add_argument("--no-save", action="store_true", help="skip save_model and export_lora (timing)")
    args = parser.parse_args()
    for run in args.runs.split(","):
        rank, state, report = train(
            str(Path(args.out) / run),
            run,
            args.per_device,
            args.steps,
            args.start_step,
            base=args.base,
            save=not args.no_save,
        )
        save_file(state, os.path.join(args.out, f"{run}.rank{rank}.safetensors"))
        Path(args.out, f"{run}.rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
