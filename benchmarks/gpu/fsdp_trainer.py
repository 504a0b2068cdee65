"""Delta-LoRA with transformers' Trainer under FSDP2 on several GPUs: throughput, memory and a correctness check.

Launch on a multi-GPU machine (one process per GPU)::

    torchrun --nproc_per_node 8 benchmarks/gpu/fsdp_trainer.py --model /path/to/llama --bf16 --steps 50
    torchrun --nproc_per_node 2 benchmarks/gpu/fsdp_trainer.py                 # tiny random Llama, no download

CPU smoke test of the script (gloo)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu/fsdp_trainer.py --cpu --steps 6 \
        --hidden 64 --layers 2 --seq-len 32

On CPU accelerate ignores the FSDP plugin (its MULTI_CPU mode is plain DDP), so the smoke test runs the script
but does not shard: the result line says ``"fsdp_enabled": false, "base_weight_type": "Tensor"``. On GPUs it must
say ``true`` and ``"DTensor"``; the FSDP2 behaviour itself is tested on CPU with a plain loop in
``tests/test_distributed.py``.

FSDP shards every base weight W, so the default is ``DeltaLoraConfig(base_update="factored")``: W is never
written, the forward pass adds lambda*s*(B A - B_K A_K). ``--base-update inplace`` shows what the in-place mode
does on a sharded W (it is expected to refuse). Data are random token sequences (seeded; no dataset download).

After training, on the first ``--check-layers`` decoder layers, every rank gathers W, A, B and the anchors
(``.full_tensor()``) and checks Algorithm 1's telescoped identity: factored ``W_T == W_0``; in place
``W_T - W_0 == lambda*s*(B_T A_T - B_K A_K)``; and that all ranks hold the same values. Rank 0 prints one JSON
line (and writes it to ``--json``) with tokens/s, seconds per step, peak memory and these checks.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or hub id of a causal LM; default: a tiny random Llama")
    p.add_argument("--hidden", type=int, default=256, help="tiny Llama: hidden size (ignored with --model)")
    p.add_argument("--layers", type=int, default=4, help="tiny Llama: decoder layers (ignored with --model)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated target modules")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--update-ratio", type=float, default=2.0, help="lambda")
    p.add_argument("--start-step", type=int, default=2, help="K: W moves on optimizer steps t > K")
    p.add_argument("--base-update", choices=["factored", "inplace"], default="factored")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (base weights loaded in bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (smoke test of the code path)")
    p.add_argument("--check-layers", type=int, default=2, help="decoder layers whose W, A, B are gathered and checked")
    p.add_argument("--output-dir", default="/tmp/deltalora_fsdp_trainer")
    p.add_argument("--json", default=None, help="also write the result line to this file")
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


def checked_layers(peft_model, n_layers: int):
    """``(name, layer)`` of the Delta-LoRA layers in the first ``n_layers`` decoder layers, in module order."""
    import re

    from deltalora_hf import DeltaLoraLayer

    out = []
    for name, module in peft_model.named_modules():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if isinstance(module, DeltaLoraLayer) and match and int(match.group(1)) < n_layers:
            out.append((name, module))
    return out


def full(t):
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()


def main(argv=None) -> None:
    args = parse_args(argv)

    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import deltalora_hf  # noqa: F401  (registers Delta-LoRA with PEFT)
    from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(args)
    decoder_layer = type(model.model.layers[0]).__name__
    config = DeltaLoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        target_modules=args.targets.split(","),
        update_ratio=args.update_ratio,
        start_step=args.start_step,
        base_update=args.base_update,
    )
    model = get_peft_model(model, config)
    check = checked_layers(model, args.check_layers)
    w0 = {name: layer.get_base_layer().weight.detach().float().cpu().clone() for name, layer in check}

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available() and not args.cpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available() and not args.cpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    n_rows = args.steps * args.batch * args.grad_accum * world
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": [decoder_layer], "reshard_after_forward": True}
    common = dict(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
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
    if world == 1:
        training_args = TrainingArguments(**common)
    else:
        try:  # newer transformers: fsdp=True, everything else in fsdp_config
            training_args = TrainingArguments(**common, fsdp=True, fsdp_config=fsdp_config)
        except (TypeError, ValueError):  # older transformers 5.x: the option string
            training_args = TrainingArguments(**common, fsdp="full_shard auto_wrap", fsdp_config=fsdp_config)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=RandomTokens(n_rows, args.seq_len, model.config.vocab_size),
        callbacks=[DeltaLoRACallback(), timer],
    )
    result = {"world_size": world, "base_update": args.base_update, "decoder_layer": decoder_layer}
    try:
        trainer.train()
    except Exception as exc:  # e.g. the in-place refusal on a sharded W
        result["error"] = f"{type(exc).__name__}: {exc}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    result["fsdp_enabled"] = bool(getattr(trainer, "is_fsdp_enabled", False))
    result["base_weight_type"] = type(check[0][1].get_base_layer().weight.data).__name__ if check else None

    if "error" not in result:
        scale = args.update_ratio * args.alpha / (args.r)
        identity_error, moved, digest = 0.0, 0.0, torch.zeros((), dtype=torch.float64)
        for name, layer in check:  # every rank gathers the same tensors in the same order
            w = full(layer.get_base_layer().weight)
            a, b = full(layer.lora_A["default"].weight), full(layer.lora_B["default"].weight)
            a_k, b_k = full(layer.lora_anchor_A["default"]), full(layer.lora_anchor_B["default"])
            expected = scale * (b @ a - b_k @ a_k) if args.base_update == "inplace" else torch.zeros_like(w)
            identity_error = max(identity_error, (w - w0[name] - expected).abs().max().item())
            moved = max(moved, (scale * (b @ a - b_k @ a_k)).abs().max().item())
            digest += w.double().sum() + a.double().abs().sum() + b.double().abs().sum()
        ranks_agree = True
        if dist.is_initialized():
            digests = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
            dist.all_gather_object(digests, digest)
            ranks_agree = all(torch.equal(d, digests[0]) for d in digests)
        on_gpu = torch.cuda.is_available() and not args.cpu
        steady = timer.times[1:] or timer.times
        seconds = sum(steady) / len(steady)
        result.update(
            seconds_per_step=seconds,
            tokens_per_second=args.batch * args.grad_accum * world * args.seq_len / seconds,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
            move_max_abs=moved,
            algorithm_1_max_error=identity_error,
            ranks_agree=ranks_agree,
        )
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                f.write(line + "\n")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
