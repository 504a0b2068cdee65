"""Trainer + DeltaLoRACallback on a tiny Llama under DeepSpeed ZeRO (CPU, ``DS_ACCELERATOR=cpu``).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m tests.scripts.deepspeed_trainer \\
        --out DIR --runs zero2-inplace,zero3-factored --per-device 2

Each run is ``zero{stage}-{mode}[-offload][-persistent][-pretrained][-accumulate]``: mode is inplace, factored, or
lora for plain PEFT LoRA; offload puts the optimizer on the CPU (``offload_optimizer: {device: cpu}``); persistent
keeps ZeRO-3's default ``stage3_param_persistence_threshold`` (this tiny model's W then stay whole; otherwise every
parameter is split); pretrained saves the base and loads it back with ``from_pretrained``, which partitions it while
loading; accumulate takes the same rows per optimizer step in 2 micro-batches (``gradient_accumulation_steps=2``).
The runs of one launch share its imports and process group. As in ``ddp_trainer.py``, rows come in dataset order,
so 2 ranks x 2 rows see the same global batches as one process with 4 rows: :func:`train` with ``stage=None`` (no
DeepSpeed) is the single-process reference. Each rank writes ``{run}.rank{r}.safetensors`` (the whole model state,
gathered under ZeRO-3) and ``{run}.rank{r}.json`` (seconds per step, what was partitioned); ZeRO-3 runs also save
the adapter with ``trainer.save_model()`` to ``{run}/adapter`` and export it with ``deltalora_hf.export_lora`` to
``{run}/export``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, export_lora
from tests.helpers import SequentialTrainer, lm_rows, tiny_llama, train_args
from tests.scripts import _common  # noqa: F401  (offline mode)
from tests.scripts._common import trained_state

TARGETS = ["q_proj", "v_proj"]


def ds_config(stage: int, offload: bool = False, partition_all: bool = True) -> dict:
    """The DeepSpeed config of a run: only the keys that matter, the rest "auto" (filled in by Trainer)."""
    zero: dict = {"stage": stage}
    if stage == 3:
        # trainer.save_model() gathers the weights into a normal adapter file.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if partition_all:  # partition even this tiny model (by default parameters under 1e5 elements stay whole)
            zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        # Keep Trainer's torch AdamW with an offloaded optimizer (DeepSpeedCPUAdam would need a C++ build).
        "zero_force_ds_cpu_optimizer": False,
    }


def peft_config(mode: str, start_step: int) -> LoraConfig:
    if mode == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    return DeltaLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=start_step, base_update=mode
    )


class OneGroupTrainer(SequentialTrainer):
    """SequentialTrainer whose AdamW has a single param group (same hyperparameters as Trainer's ``adamw_torch``).

    Trainer gives its AdamW a second, here empty, group (parameters without weight decay); DeepSpeed's ZeRO
    optimizer drops empty groups, and with transformers 4.57 the LR scheduler of torch >= 2.13 then fails at the
    first step (``zip() argument 2 is longer than argument 1``; transformers 5.24 is not affected).
    """

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer and Delta-LoRA update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def gathered_parameters(model: torch.nn.Module):
    """All of ``model``'s parameters whole inside the block (ZeRO-3), else a no-op."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def start_deepspeed_on_cpu() -> None:
    """Make accelerate see every DeepSpeed process on a machine without GPUs.

    Given ``TrainingArguments(deepspeed=...)``, accelerate picks a process-group backend only for accelerators
    (nccl, xccl, ...); on CPUs it has none, counts ONE process, and every rank then trains on the same rows. Starting
    its state with gloo first (and ``accelerator_config={"use_configured_state": True}``) gives the real world size.
    Not needed on GPUs. Also skips DeepSpeed's shared-memory all-reduce op, a C++ build of about a minute that only
    speeds up large CPU all-reduces. Several runs in one process each get a fresh accelerator state.
    """
    import deepspeed.ops
    from accelerate.state import AcceleratorState, PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    AcceleratorState._reset_state()  # forget the previous run's DeepSpeed plugin, keep the process group


def train(
    out_dir: str,
    *,
    stage: int | None,
    mode: str,
    per_device: int,
    steps: int = 6,
    start_step: int = 2,
    offload: bool = False,
    partition_all: bool = True,
    from_pretrained: bool = False,
    accumulation: int = 1,
    model_size: dict | None = None,
    save: bool = False,
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Train one run; return this process's rank, its (gathered) model state, and a report: the seconds of each
    step, the names of the parameters that were partitioned (ZeRO-3) after training, and whether the whole base
    was partitioned as it was created."""
    extra = {}
    if stage is not None:
        start_deepspeed_on_cpu()
        extra = {
            "deepspeed": ds_config(stage, offload, partition_all),
            "use_cpu": False,
            "accelerator_config": {"use_configured_state": True},
        }
    # TrainingArguments first, as DeepSpeed users do: from then on from_pretrained loads under deepspeed.zero.Init
    # with ZeRO-3, so the base weights are partitioned as they are created.
    args = train_args(
        os.path.join(out_dir, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=per_device // accumulation,
        gradient_accumulation_steps=accumulation,
        **extra,
    )
    base = tiny_llama(**(model_size or {}))
    if from_pretrained:
        path = os.path.join(out_dir, "base")
        if args.process_index == 0:
            base.save_pretrained(path)
        args.distributed_state.wait_for_everyone()
        base = type(base).from_pretrained(path)
    loaded_partitioned = all(hasattr(p, "ds_id") for p in base.parameters())
    model = get_peft_model(base, peft_config(mode, start_step))
    timer = StepTimer()
    callbacks = [timer] if mode == "lora" else [DeltaLoRACallback(), timer]
    trainer = OneGroupTrainer(model=model, args=args, train_dataset=lm_rows(64), callbacks=callbacks)
    trainer.train()
    assert trainer.args.world_size == int(os.environ.get("WORLD_SIZE", "1")), trainer.args.world_size
    if save:
        trainer.save_model(os.path.join(out_dir, "adapter"))
        export_lora(model, os.path.join(out_dir, "export"))  # gathers the factors itself; every rank must call it
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id") and p.numel() == 0]
    with gathered_parameters(model):
        state = trained_state(model)
    report = {"seconds_per_step": timer.seconds, "partitioned": partitioned, "loaded_partitioned": loaded_partitioned}
    return trainer.args.process_index, state, report


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--runs",
        required=True,
        help="comma-separated zero{1,2,3}-{inplace,factored,lora}[-offload][-persistent][-pretrained][-accumulate]",
    )
    parser.add_argument("--per-device", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start-step", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=0, help="hidden size of a bigger Llama (timing); 0: tiny")
    args = parser.parse_args()
    size = {} if not args.hidden else {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
    for run in args.runs.split(","):
        stage, mode, *rest = run.split("-")
        run_dir = Path(args.out) / run
        rank, state, report = train(
            str(run_dir),
            stage=int(stage.removeprefix("zero")),
            mode=mode,
            per_device=args.per_device,
            steps=args.steps,
            start_step=args.start_step,
            offload="offload" in rest,
            partition_all="persistent" not in rest,
            from_pretrained="pretrained" in rest,
            accumulation=2 if "accumulate" in rest else 1,
            model_size=size,
            save=stage == "zero3" and mode != "lora",
        )
        save_file(state, os.path.join(args.out, f"{run}.rank{rank}.safetensors"))
        Path(args.out, f"{run}.rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
