"""Plain training loop with DeltaLoraUpdater, under FSDP2 (``fully_shard``) or in one process as the reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scripts.fsdp2_loop \
        --out DIR --modes inplace,factored

Every global batch is ``GLOBAL_BATCH`` consecutive rows; under FSDP2 rank r trains on its r-th slice of it, so
the averaged gradient equals that of one process training on the whole batch (:func:`train` with
``distributed=False``, which the test runs in-process as the reference). For each mode, every rank writes
``{mode}.rank{r}.safetensors`` with the gathered state (``.full_tensor()``: W, A, B, anchors) and, if Delta-LoRA
raised, ``{mode}.rank{r}.error.json`` (the state is then the one at the time of the error).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoraConfig, DeltaLoraUpdater
from tests.helpers import lm_rows, tiny_llama
from tests.scripts import _common  # noqa: F401  (offline mode)
from tests.scripts._common import trained_state

GLOBAL_BATCH = 4
TARGETS = ["q_proj", "v_proj"]


def delta_model(mode: str, start_step: int):
    return get_peft_model(
        tiny_llama(),
        DeltaLoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=start_step, base_update=mode
        ),
    )


def train(mode: str, steps: int, start_step: int, distributed: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Train; return the (gathered) state and the error Delta-LoRA raised, if any."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = delta_model(mode, start_step)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    rows = lm_rows(GLOBAL_BATCH * steps)
    per_rank = GLOBAL_BATCH // world
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    error, t = None, -1
    try:
        updater = DeltaLoraUpdater(model)
        for t in range(steps):
            start = t * GLOBAL_BATCH + rank * per_rank
            loss = model(**default_collate(rows[start : start + per_rank])).loss
            loss.backward()
            optimizer.step()
            updater.step()
            optimizer.zero_grad()
    except Exception as exc:  # reported to the test, which decides whether it was expected
        error = {"type": type(exc).__name__, "message": str(exc), "step": t, "traceback": traceback.format_exc()}
    return trained_state(model), error


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default="inplace,factored", help="comma-separated base_update modes")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start-step", type=int, default=2)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    os.makedirs(args.out, exist_ok=True)
    for mode in args.modes.split(","):
        state, error = train(mode, args.steps, args.start_step, distributed)
        save_file(state, os.path.join(args.out, f"{mode}.rank{rank}.safetensors"))
        if error is not None:
            with open(os.path.join(args.out, f"{mode}.rank{rank}.error.json"), "w") as f:
                json.dump(error, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
