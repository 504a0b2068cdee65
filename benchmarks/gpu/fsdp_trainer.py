"""Delta-LoRA with transformers' Trainer and accelerate's FSDP2 plugin on several GPUs: both base-update modes next to
plain PEFT LoRA in one launch, with the checks of ``tests/test_fsdp2.py`` and the step time of each.

Launch on a machine with N GPUs (one process per GPU)::

    torchrun --nproc_per_node 2 benchmarks/gpu/fsdp_trainer.py                      # tiny random Llama, no download
    torchrun --nproc_per_node 8 benchmarks/gpu/fsdp_trainer.py --model /path/to/llama --bf16 --steps 50

and, to compare with one process on the same global batches (same rows per optimizer step)::

    torchrun --nproc_per_node 1 benchmarks/gpu/fsdp_trainer.py --batch 8 --output-dir /tmp/one
    torchrun --nproc_per_node 2 benchmarks/gpu/fsdp_trainer.py --batch 4 --reference /tmp/one

``Trainer(fsdp=True, fsdp_config={"version": 2, ...})`` shards the PEFT model with ``fully_shard`` (one unit per
decoder layer): W, A and B become DTensors. Per run (``--runs lora,factored,inplace``), every rank gathers the
targeted layers of the first ``--check-layers`` decoder layers and rank 0 prints one JSON line with:

* ``fsdp_enabled`` / ``base_weight_type`` / ``placements``: that the base really was sharded (``DTensor``);
* ``ranks_identical``: W, A, B and the anchors hash the same on every rank;
* ``algorithm_1_max_error``: in place ``W_T - W_0 - lambda*s*(B_T A_T - B_K A_K)``, factored ``W_T - W_0``;
* ``reference_max_difference``: with ``--reference``, the largest difference from the one-process run's W, A, B
  and anchors (float32: expect about 1e-6 or less; bf16 differs by rounding);
* ``reload_logits_difference`` / ``export_logits_difference``: ``trainer.save_model()`` and ``export_lora`` (a plain
  rank-2r LoRA), each loaded on a fresh base on rank 0, against the logits of the sharded trained model;
* ``seconds_per_step`` (median after W starts moving), ``tokens_per_second``, ``peak_memory_gib``, and the step-time
  ratio to plain LoRA of the same launch.

Data are seeded random token sequences fed in dataset order (no download). On CPU (``--cpu``, gloo) accelerate does
not build FSDP: the plugin is ignored and Trainer runs DDP (``"fsdp_enabled": false``); the CPU route to FSDP2 is
transformers' native loading, tested in ``tests/test_fsdp2.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path of a causal LM; default: a tiny random Llama")
    p.add_argument("--hidden", type=int, default=256, help="tiny Llama: hidden size (ignored with --model)")
    p.add_argument("--layers", type=int, default=4, help="tiny Llama: decoder layers (ignored with --model)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated target modules")
    p.add_argument("--runs", default="lora,factored,inplace", help="comma-separated: lora, factored, inplace")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--update-ratio", type=float, default=2.0, help="lambda")
    p.add_argument("--start-step", type=int, default=2, help="K: W moves on optimizer steps t > K")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (base weights loaded in bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu", action="store_true", help="CPU, gloo: a smoke test of the script (runs DDP, see above)")
    p.add_argument("--check-layers", type=int, default=2, help="decoder layers whose W, A, B are gathered and checked")
    p.add_argument("--reference", default=None, help="--output-dir of a one-process run with the same global batch")
    p.add_argument("--skip-reload", action="store_true", help="skip the save/export reload checks (large models)")
    p.add_argument("--output-dir", default="/tmp/deltalora_fsdp_trainer")
    p.add_argument("--json", default=None, help="also write the result lines to this file")
    return p.parse_args(argv)


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(2048, args.seq_len),
    )
    return LlamaForCausalLM(config).to(dtype)


def peft_config(args, run: str):
    from peft import LoraConfig

    from deltalora_hf import DeltaLoraConfig

    targets = args.targets.split(",")
    if run == "lora":
        return LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0)
    return DeltaLoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        target_modules=targets,
        update_ratio=args.update_ratio,
        start_step=args.start_step,
        base_update=run,
    )


class RandomTokens:
    """``n`` seeded random sequences for causal LM training (labels = inputs)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def checked_state(peft_model, n_layers: int) -> dict:
    """Whole values (gathered: every rank must call this) of W, A, B and the anchors of the targeted layers in the
    first ``n_layers`` decoder layers, keyed by parameter name, float32 on the CPU."""
    import re

    from deltalora_hf._distributed import unsharded

    state = {}
    for name, value in peft_model.state_dict().items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match and int(match.group(1)) < n_layers and (".lora_" in name or ".base_layer.weight" in name):
            state[name] = unsharded(value).detach().float().cpu().contiguous()
    return state


def algorithm_1_error(state: dict, w0: dict, scale: float, inplace: bool) -> tuple[float, float]:
    """Largest |W_T - W_0 - expected| (expected: lambda s (B A - B_K A_K) in place, 0 factored), and of the move."""
    error, moved = 0.0, 0.0
    for key, w in state.items():
        if not key.endswith(".base_layer.weight"):
            continue
        prefix = key.removesuffix(".base_layer.weight")
        a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        a_k, b_k = state[f"{prefix}.lora_anchor_A.default.weight"], state[f"{prefix}.lora_anchor_B.default.weight"]
        move = scale * (b @ a - b_k @ a_k)
        error = max(error, (w - w0[key] - (move if inplace else 0.0)).abs().max().item())
        moved = max(moved, move.abs().max().item())
    return error, moved


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return h.hexdigest()


def train_run(args, run: str, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from deltalora_hf import DeltaLoRACallback, export_lora

    on_gpu = torch.cuda.is_available() and not args.cpu

    class InOrder(Trainer):  # rows in dataset order, so a one-process run sees the same global batches
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    out = Path(args.output_dir) / run
    model = build_model(args)
    decoder_layer = type(model.model.layers[0]).__name__
    torch.manual_seed(1)  # the same LoRA initialisation in every launch
    model = get_peft_model(model, peft_config(args, run))
    w0 = {k: v for k, v in checked_state(model, args.check_layers).items() if k.endswith(".base_layer.weight")}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        bf16=args.bf16,
        use_cpu=args.cpu,
        ddp_backend="gloo" if args.cpu and world > 1 else None,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    if world > 1:
        fsdp_config = {
            "version": 2,
            "transformer_layer_cls_to_wrap": [decoder_layer],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",  # save_model() writes a normal adapter file
        }
        common.update(fsdp=True, fsdp_config=fsdp_config)
    timer = Timer()
    trainer = InOrder(
        model=model,
        args=TrainingArguments(**common),
        train_dataset=RandomTokens(args.steps * args.batch * world, args.seq_len, model.config.vocab_size),
        callbacks=[timer] if run == "lora" else [DeltaLoRACallback(), timer],
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    weight = next(m.get_base_layer().weight for n, m in model.named_modules() if n.endswith(args.targets.split(",")[0]))
    result = {
        "run": run,
        "world_size": world,
        "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "base_weight_type": type(weight).__name__,
        "placements": str(getattr(weight, "placements", None)),
    }

    state = checked_state(model, args.check_layers)
    digests = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(digests, digest(state))
    else:
        digests = [digest(state)]
    result["ranks_identical"] = len(set(digests)) == 1
    if run != "lora":
        scale = args.update_ratio * args.alpha / args.r
        result["algorithm_1_max_error"], result["move_max_abs"] = algorithm_1_error(state, w0, scale, run == "inplace")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "checked_state.safetensors"))
        if args.reference:
            reference = load_file(str(Path(args.reference) / run / "checked_state.safetensors"))
            result["reference_max_difference"] = max((state[k] - reference[k]).abs().max().item() for k in reference)

    if not args.skip_reload:
        ids = torch.arange(2 * 64).reshape(2, 64) % model.config.vocab_size
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=ids.to(device)).logits.float().cpu()  # every rank: FSDP gathers layer by layer
        trainer.save_model(str(out / "adapter"))  # every rank: a collective under FSDP; rank 0 writes
        if run != "lora":
            export_lora(model, out / "export")  # every rank: the sharded factors are gathered; rank 0 writes
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            for key, path in [("reload", out / "adapter"), ("export", out / "export")]:
                if path.exists():
                    fresh = PeftModel.from_pretrained(build_model(args), str(path)).to(device).eval()
                    with torch.no_grad():
                        logits = fresh(input_ids=ids.to(device)).logits.float().cpu()
                    result[f"{key}_logits_difference"] = (logits - expected).abs().max().item()
                    del fresh

    moving = timer.times[args.start_step + 2 :] or timer.times[1:] or timer.times
    seconds = statistics.median(moving)
    result.update(
        seconds_per_step=seconds,
        tokens_per_second=args.batch * world * args.seq_len / seconds,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    )
    if dist.is_initialized():
        dist.barrier()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    import deltalora_hf  # noqa: F401  (registers Delta-LoRA with PEFT)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = [train_run(args, run, world) for run in args.runs.split(",")]
    lora = next((r["seconds_per_step"] for r in results if r["run"] == "lora"), None)
    lines = []
    for result in results:
        if lora:
            result["step_time_vs_lora"] = result["seconds_per_step"] / lora
        lines.append(json.dumps(result))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
        if args.json:
            Path(args.json).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
