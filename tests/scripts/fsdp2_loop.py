"""Plain training loop with DeltaLoraUpdater, under FSDP2 (``fully_shard``) or in one process as the reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scripts.fsdp2_loop \
        --out DIR --runs factored,inplace,inplace-cols

Every global batch is ``GLOBAL_BATCH`` consecutive rows; under FSDP2 rank r trains on its r-th slice of it, so
the averaged gradient equals that of one process training on the whole batch (:func:`train` with
``distributed=False``, which the test runs in-process as the reference). The model (:data:`MODEL`) has an ``up_proj``
of 63 rows, so its shards are uneven (32 and 31 rows). A run is ``{mode}[-cols]``: ``cols`` shards the targeted
base weights on their columns (``Shard(1)``, through ``fully_shard``'s ``shard_placement_fn``) instead of rows.

For each run every rank writes ``{run}.rank{r}.safetensors`` (the gathered state: W, A, B, anchors),
``{run}.rank{r}.json`` (placements of the targeted W, the error Delta-LoRA raised if any), and the whole job saves
the adapter (``save_pretrained`` of the full state dict, rank 0) to ``{run}/adapter`` and ``export_lora`` to
``{run}/export``. ``--shard-checks`` also writes ``shard_checks.rank{r}.json``: the in-place update of single
DTensors (uneven, rows or columns, transposed, float32/float64/bfloat16) against the same update of the full tensor.
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

from deltalora_hf import DeltaLoraConfig, DeltaLoraLayer, DeltaLoraUpdater, export_lora
from tests.helpers import lm_rows, tiny_llama
from tests.scripts import _common  # noqa: F401  (offline mode)
from tests.scripts._common import trained_state

GLOBAL_BATCH = 4
TARGETS = ["q_proj", "v_proj", "up_proj"]
MODEL = {"intermediate_size": 63}  # up_proj: 63 x 32, split 32 / 31 over 2 ranks


def delta_model(mode: str, start_step: int):
    return get_peft_model(
        tiny_llama(**MODEL),
        DeltaLoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=start_step, base_update=mode
        ),
    )


def shard(model, columns: bool) -> None:
    """``fully_shard`` each decoder layer, then the root; ``columns``: the targeted W split on dimension 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    targeted = {id(m.get_base_layer().weight) for m in model.modules() if isinstance(m, DeltaLoraLayer)}

    def placement(param):
        return Shard(1) if columns and id(param) in targeted else None  # None: FSDP2's default, Shard(0)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh)


def train(run: str, steps: int, start_step: int, distributed: bool):
    """Train; return the model, the (gathered) state and a report with the error Delta-LoRA raised, if any."""
    mode, *options = run.split("-")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = delta_model(mode, start_step)
    if distributed:
        shard(model, columns="cols" in options)
    weights = {n: m.get_base_layer().weight for n, m in model.named_modules() if isinstance(m, DeltaLoraLayer)}
    report = {
        "placements": {n: str(getattr(w, "placements", None)) for n, w in weights.items()},
        "local_shapes": {n: list(w.to_local().shape) if hasattr(w, "to_local") else None for n, w in weights.items()},
        "error": None,
    }
    rows = lm_rows(GLOBAL_BATCH * steps)
    per_rank = GLOBAL_BATCH // world
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    t = -1
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
        report["error"] = {"type": type(exc).__name__, "message": str(exc), "step": t, "tb": traceback.format_exc()}
    return model, trained_state(model), report


def save_adapter(model, directory: str) -> None:
    """``save_pretrained`` under FSDP2: gather the full state dict (a collective), rank 0 writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(directory, state_dict=state, is_main_process=dist.get_rank() == 0)


# -- the in-place update of single DTensors -------------------------------------------------------------------


def shard_checks() -> dict:
    """Max differences of the local-shard update from the full update, per case, plus refusals (run on all ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # reference only

    from deltalora_hf import _distributed, functional
    from deltalora_hf.model import check_target

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    out: dict = {"cases": {}}
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (1, 7), (8, 6)]:
        for placement in [Shard(0), Shard(1), Replicate()]:
            for transposed in (False, True):
                for dtype, rounding in [
                    (torch.float32, "nearest"),
                    (torch.float64, "nearest"),
                    (torch.bfloat16, "nearest"),
                    (torch.bfloat16, "stochastic"),
                ]:
                    d, k = (shape[1], shape[0]) if transposed else shape  # W is d x k; stored transposed if asked
                    full = torch.randn(shape, generator=g).to(dtype)
                    u, v = torch.randn(d, 6, generator=g), torch.randn(6, k, generator=g)
                    w = distribute_tensor(full.clone(), mesh, [placement])
                    _distributed.check_writable_in_place(w, "w")
                    block = _distributed._local_block(w)
                    shape_ref, offset_ref = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
                    generators = [torch.Generator().manual_seed(1) for _ in range(2)]
                    _distributed.add_low_rank_(
                        w, u, v, 0.75, transposed=transposed, rounding=rounding, generator=generators[0]
                    )
                    left, right = (v.T, u.T) if transposed else (u, v)
                    exact = full.double() + 0.75 * (left.double() @ right.double())
                    whole = functional.add_low_rank_(
                        full.clone(), u, v, 0.75, transposed=transposed, rounding="nearest"
                    )
                    got = w.full_tensor().double()
                    # the same rounding as functional.add_low_rank_ on that slice, with the same generator state
                    local_ref = full[block].clone()
                    functional.add_low_rank_(
                        local_ref, left[block[0]], right[:, block[1]], 0.75, rounding=rounding, generator=generators[1]
                    )
                    ulp = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7}[dtype]
                    name = f"{tuple(shape)}-{placement}-{'T' if transposed else 'N'}-{dtype}-{rounding}"
                    out["cases"][name] = {
                        # relative to max(1, |W|), in units of the dtype's epsilon
                        "ulps_from_exact": ((got - exact).abs() / (ulp * exact.abs().clamp(min=1.0))).max().item(),
                        "ulps_from_full_update": ((got - whole.double()).abs() / (ulp * exact.abs().clamp(min=1.0)))
                        .max()
                        .item(),
                        "block": [[s.start, s.stop] for s in block],
                        "block_is_torch_reference": (
                            [s.stop - s.start for s in block] == list(shape_ref)
                            and all(s.start == o for s, o in zip(block, offset_ref) if s.stop > s.start)
                        ),
                        "local_is_distribute_tensor_block": torch.equal(
                            distribute_tensor(full, mesh, [placement]).to_local(), full[block]
                        ),
                        "shard_equals_functional_on_slice": torch.equal(w.to_local(), local_ref),
                        "moved": (got - full.double()).abs().max().item(),
                    }
    target = distribute_tensor(torch.zeros(5, 7), mesh, [Shard(0)])
    value = torch.arange(35.0).reshape(5, 7)
    _distributed.copy_from_full_(target, value)
    out["copy_from_full_exact"] = torch.equal(target.full_tensor(), value)
    partial = DTensor.from_local(torch.zeros(4, 4), mesh, [Partial()])
    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    refused = {"partial": partial, "tp": distribute_tensor(torch.zeros(4, 4), tp_mesh, [Shard(0)])}
    out["refusals"] = {}
    for name, tensor in refused.items():
        try:
            _distributed.check_writable_in_place(tensor, name)
            out["refusals"][name] = None
        except RuntimeError as exc:
            out["refusals"][name] = str(exc)
    linear = torch.nn.Linear(4, 4)  # get_peft_model's check: factored accepts it, in-place refuses it up front
    linear.weight = torch.nn.Parameter(refused["tp"], requires_grad=False)
    for mode in ("inplace", "factored"):
        try:
            check_target(linear, "linear", mode)
            out["refusals"][f"check_target_tp_{mode}"] = None
        except ValueError as exc:
            out["refusals"][f"check_target_tp_{mode}"] = str(exc)
    return out


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="factored,inplace,inplace-cols", help="comma-separated {mode}[-cols]")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start-step", type=int, default=2)
    parser.add_argument("--shard-checks", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.makedirs(args.out, exist_ok=True)
    if args.shard_checks:
        with open(os.path.join(args.out, f"shard_checks.rank{rank}.json"), "w") as f:
            json.dump(shard_checks(), f)
    for run in args.runs.split(","):
        model, state, report = train(run, args.steps, args.start_step, distributed=True)
        save_file(state, os.path.join(args.out, f"{run}.rank{rank}.safetensors"))
        if report["error"] is None:
            save_adapter(model, os.path.join(args.out, run, "adapter"))
            export_lora(model, os.path.join(args.out, run, "export"))  # a collective: every rank calls it
        with open(os.path.join(args.out, f"{run}.rank{rank}.json"), "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
