"""Trainer + DeltaLoRACallback on a tiny Llama under DDP (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scripts.ddp_trainer \
        --out DIR --per-device 2

The Trainer feeds rows in dataset order (``SequentialTrainer``); accelerate gives rank r the r-th of every
``world`` consecutive per-device batches, so 2 ranks x 2 rows see the same global batches as one process with
4 rows (:func:`train` with ``per_device=4``, which the test runs in-process as the reference). Each rank writes
``rank{r}.safetensors`` with its whole model state (W, A, B and the anchors).
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import get_peft_model

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig
from tests.helpers import SequentialTrainer, lm_rows, tiny_llama, train_args
from tests.scripts import _common  # noqa: F401  (offline mode)
from tests.scripts._common import trained_state

TARGETS = ["q_proj", "v_proj"]


def train(out_dir: str, per_device: int, steps: int = 6, start_step: int = 2) -> tuple[int, dict[str, torch.Tensor]]:
    """Train; return this process's rank and its model state."""
    distributed = "WORLD_SIZE" in os.environ
    model = get_peft_model(
        tiny_llama(),
        DeltaLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=start_step),
    )
    trainer = SequentialTrainer(
        model=model,
        args=train_args(
            os.path.join(out_dir, "trainer"),
            max_steps=steps,
            per_device_train_batch_size=per_device,
            ddp_backend="gloo" if distributed else None,
        ),
        train_dataset=lm_rows(64),
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train()
    assert trainer.args.world_size == int(os.environ.get("WORLD_SIZE", "1")), trainer.args.world_size
    return trainer.args.process_index, trained_state(model)


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start-step", type=int, default=2)
    args = parser.parse_args()
    rank, state = train(args.out, args.per_device, args.steps, args.start_step)
    save_file(state, os.path.join(args.out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
