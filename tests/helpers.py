"""What the tests share (no downloads): tiny models, data, a Trainer with a fixed batch order, the Delta-LoRA setup
most tests use, the independent dense reference, and the helpers of the multi-process tests.

The dense reference (``dense_model``/``reference``) shares no code with the package, nor with PEFT: a fresh base
whose every targeted weight is written, densely and from the adapter's raw tensors, as
``W_0 + m s B A + lambda m s (B A - B_K A_K)`` (the move only when the adapter is anchored; ``m`` a scale
multiplier, 1 unless an operation rescales the adapter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import SequentialSampler, default_collate
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

VOCAB = 97


TINY_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    values = {**TINY_LLAMA, **config_overrides}
    return LlamaForCausalLM(LlamaConfig(**values)).to(dtype)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def lm_rows(n: int, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token sequences with a learnable pattern (each token predicts the next by a fixed rule)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + 7 * torch.arange(length)) % VOCAB
    labels = ids.clone()
    labels[:, 0] = -100  # no loss term for it anyway: Trainer's token count then equals the loss's
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def cls_rows(n: int, length: int = 10, num_labels: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = ids[:, 0] % num_labels
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


class SequentialTrainer(Trainer):
    """Trainer that feeds batches in dataset order, so a hand-written loop can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def train_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """Copies of every targeted base weight, keyed by module name."""
    from deltalora_hf import DeltaLoraLayer

    return {
        name: module.get_base_layer().weight.detach().clone()
        for name, module in peft_model.named_modules()
        if isinstance(module, DeltaLoraLayer)
    }


def delta_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Delta-LoRA layers by module name relative to the transformers model."""
    from deltalora_hf import DeltaLoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, DeltaLoraLayer)}


# -- the Delta-LoRA setup most tests share ----------------------------------------------------------------------

R, ALPHA, LAMBDA, K = 4, 8, 0.5, 2
SCALE = ALPHA / R
TARGETS = ["q_proj", "v_proj"]
STEPS = 6  # optimizer steps of a standard run: W moves on steps K+1..STEPS-1
TOL = 1e-5
MODES = ["inplace", "factored"]


def delta_config(mode: str = "inplace", **overrides):
    from deltalora_hf import DeltaLoraConfig

    values = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, update_ratio=LAMBDA, start_step=K, base_update=mode)
    values.update(overrides)
    return DeltaLoraConfig(**values)


def train(model, tmp_path, steps: int = STEPS, seed: int = 0, callbacks=None, lr: float = 1e-2) -> Trainer:
    """``steps`` Trainer steps of 4 rows of ``lm_rows(seed=seed)`` each, in order, with one DeltaLoRACallback."""
    from deltalora_hf import DeltaLoRACallback

    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, learning_rate=lr),
        train_dataset=lm_rows(4 * steps, seed=seed),
        callbacks=[DeltaLoRACallback()] if callbacks is None else callbacks,
    )
    trainer.train()
    return trainer


def logits(model) -> torch.Tensor:
    """Float logits of 4 fixed rows, in eval mode and without gradients (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=default_collate(lm_rows(4, seed=7))["input_ids"]).logits.float()
    model.train(was_training)
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max abs logit difference {diff:.3e} > {tol}"
    return diff


# -- the independent dense reference ----------------------------------------------------------------------------


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, dict[str, Any]]:
    """Per Delta-LoRA module (name relative to the transformers model): float copies of A, B, A_K, B_K (Linear
    layout: ``delta W = B @ A``), the anchored flag, and whether W is stored transposed (embeddings). Read from the
    layers' tensors by their names, as a user reads them."""
    out = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_anchor_A") and adapter in module.lora_anchor_A):
            continue
        embedding = adapter in module.lora_embedding_A
        a = module.lora_embedding_A[adapter] if embedding else module.lora_A[adapter].weight
        b = module.lora_embedding_B[adapter] if embedding else module.lora_B[adapter].weight
        out[name.removeprefix("base_model.model.")] = dict(
            a=a.detach().float().clone(),
            b=b.detach().float().clone(),
            a_k=module.lora_anchor_A[adapter].detach().float().clone(),
            b_k=module.lora_anchor_B[adapter].detach().float().clone(),
            anchored=bool(module.lora_anchored[adapter]),
            transposed=embedding,
        )
    return out


def adapter_state_from_state_dict(state: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, dict]:
    """``adapter_state`` read from a PEFT model's full state dict (``base_model.model.<module>.lora_A.<adapter>
    .weight`` ...) of Linear layers. Without anchor keys (plain LoRA): not anchored."""
    out = {}
    for key in state:
        if not key.endswith(f".lora_A.{adapter}.weight"):
            continue
        prefix = key.removesuffix(f".lora_A.{adapter}.weight")
        a, b = state[key].float(), state[f"{prefix}.lora_B.{adapter}.weight"].float()
        anchored = f"{prefix}.lora_anchored.{adapter}.weight" in state
        out[prefix.removeprefix("base_model.model.")] = dict(
            a=a,
            b=b,
            a_k=state[f"{prefix}.lora_anchor_A.{adapter}.weight"].float() if anchored else torch.zeros_like(a),
            b_k=state[f"{prefix}.lora_anchor_B.{adapter}.weight"].float() if anchored else torch.zeros_like(b),
            anchored=anchored and bool(state[f"{prefix}.lora_anchored.{adapter}.weight"]),
            transposed=False,
        )
    return out


def dense_model(
    state: dict[str, dict[str, Any]] | None,
    multiplier: float | dict[str, float] = 1.0,
    lora: bool = True,
    move: bool = True,
    build: Callable[[], nn.Module] = tiny_llama,
) -> nn.Module:
    """A fresh base from ``build`` with ``W_0 + m s B A`` (``lora``) ``+ lambda m s (B A - B_K A_K)`` (``move``, if
    anchored) written densely (in float64, then rounded once) into every module of ``state`` (``adapter_state``);
    ``multiplier`` m for all layers or per module name. ``state=None``: the base itself."""
    model = build()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in (state or {}).items():
            m = multiplier if isinstance(multiplier, float | int) else multiplier[name]
            ba = t["b"].double() @ t["a"].double()
            delta = torch.zeros_like(ba)
            if lora:
                delta += m * SCALE * ba
            if move and t["anchored"]:
                delta += LAMBDA * m * SCALE * (ba - t["b_k"].double() @ t["a_k"].double())
            weight = modules[name].weight
            weight.copy_((weight.double() + (delta.T if t["transposed"] else delta)).to(weight.dtype))
    return model


def reference(state: dict[str, dict[str, Any]] | None, **kwargs: Any) -> torch.Tensor:
    """``logits`` of ``dense_model(state, **kwargs)``."""
    return logits(dense_model(state, **kwargs))


def move_size(state: dict[str, dict[str, Any]]) -> float:
    """Largest entry of the adapter's move lambda s (B A - B_K A_K) over its anchored layers (0 when none is)."""
    return max(
        (
            (LAMBDA * SCALE * (t["b"] @ t["a"] - t["b_k"] @ t["a_k"])).abs().max().item()
            for t in state.values()
            if t["anchored"]
        ),
        default=0.0,
    )


# -- multi-process runs (DDP, FSDP2, DeepSpeed): the workers are in tests/scripts/ ------------------------------

REPO_ROOT = Path(__file__).parent.parent
WORLD = 2
TARGET_SUFFIXES = (".self_attn.q_proj", ".self_attn.v_proj")


def torchrun(script: str, *args: str, timeout: float = 150, **env_extra: str) -> None:
    """Run the module ``tests.scripts.<script>`` on WORLD processes; fail with the job's output if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m"]
    module = f"tests.scripts.{script.removesuffix('.py')}"
    done = subprocess.run(
        [*command, module, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


def load_ranks(directory: Path, prefix: str = "") -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(directory / f"{prefix}rank{r}.safetensors") for r in range(WORLD)]


def load_run(directory: Path, run: str) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """Each rank's final state (safetensors) and report (JSON) of one configuration of a multi-configuration job."""
    import json

    from safetensors.torch import load_file

    states = [load_file(directory / f"{run}.rank{r}.safetensors") for r in range(WORLD)]
    reports = [json.loads((directory / f"{run}.rank{r}.json").read_text()) for r in range(WORLD)]
    return states, reports


def assert_ranks_bit_identical(states: list[dict[str, torch.Tensor]]) -> None:
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        differ = [k for k in state if not torch.equal(state[k], states[0][k])]
        assert not differ, f"rank {rank} differs from rank 0 in {differ[:5]}"


def max_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def targeted(state: dict[str, torch.Tensor], suffixes: tuple[str, ...] = TARGET_SUFFIXES) -> list[str]:
    """Module prefixes (``base_model.model.model.layers.0.self_attn.q_proj``) of the Delta-LoRA layers: one per
    suffix in each of the tiny Llama's 2 decoder layers."""
    prefixes = sorted(k[: -len(".base_layer.weight")] for k in state if k.endswith(".base_layer.weight"))
    assert len(prefixes) == 2 * len(suffixes) and all(p.endswith(suffixes) for p in prefixes), prefixes
    return prefixes


def initial_weights(suffixes: tuple[str, ...] = TARGET_SUFFIXES, **model_overrides) -> dict[str, torch.Tensor]:
    """The base model's weights before any training, keyed as in the PEFT model's state dict."""
    state = {f"base_model.model.{k}": v for k, v in tiny_llama(**model_overrides).state_dict().items()}
    for key in list(state):
        module = key.rsplit(".", 1)[0]
        if module.endswith(suffixes):
            state[f"{module}.base_layer.{key.rsplit('.', 1)[1]}"] = state.pop(key)
    return state


def assert_algorithm_1_moves(
    state: dict[str, torch.Tensor], *, inplace: bool, suffixes: tuple[str, ...] = TARGET_SUFFIXES, **model_overrides
) -> float:
    """W_T - W_0 == lambda*s*(B_T A_T - B_K A_K) (in place) or W_T == W_0 (factored); untargeted weights unchanged.

    Returns the largest |W_T - W_0| over the targeted layers, so callers can check that W really moved.
    """
    w0 = initial_weights(suffixes, **model_overrides)
    moved = 0.0
    for prefix in targeted(state, suffixes):
        assert bool(state[f"{prefix}.lora_anchored.default.weight"]), f"{prefix}: anchors were never recorded"
        a, b = state[f"{prefix}.lora_A.default.weight"].double(), state[f"{prefix}.lora_B.default.weight"].double()
        a_k, b_k = (
            state[f"{prefix}.lora_anchor_A.default.weight"].double(),
            state[f"{prefix}.lora_anchor_B.default.weight"].double(),
        )
        change = state[f"{prefix}.base_layer.weight"].double() - w0[f"{prefix}.base_layer.weight"].double()
        expected = LAMBDA * SCALE * (b @ a - b_k @ a_k) if inplace else torch.zeros_like(change)
        assert (change - expected).abs().max().item() <= TOL, prefix
        assert (LAMBDA * SCALE * (b @ a - b_k @ a_k)).abs().max().item() > 1e-4, f"{prefix}: B A never changed"
        moved = max(moved, change.abs().max().item())
    for key, value in w0.items():  # everything Delta-LoRA does not target stays as it was
        if ".base_layer." not in key:
            assert torch.equal(state[key], value), key
    return moved


# -- the random-operation machine (tests/test_random_operations.py) ----------------------------------------------

MACHINE_LLAMA = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
)


def machine_llama(seed: int = 0) -> LlamaForCausalLM:
    """The smallest tiny Llama: 1 layer, hidden 16, vocab 32 (the random-operation machine builds it once)."""
    return tiny_llama(seed, **MACHINE_LLAMA)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, read through ``named_parameters``/``named_buffers`` (no state-dict hook
    runs), with their dtypes."""
    tensors = {f"param:{n}": p for n, p in model.named_parameters(remove_duplicate=False)}
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers(remove_duplicate=False)})
    return {k: v.detach().clone() for k, v in tensors.items()}


def same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str) -> None:
    """The same names, dtypes and values (NaN equal to NaN): the model was not changed."""
    assert before.keys() == after.keys(), (
        f"{what}: tensors added {sorted(after.keys() - before.keys())[:5]}, removed "
        f"{sorted(before.keys() - after.keys())[:5]}"
    )
    differ = [
        k
        for k in before
        if before[k].dtype != after[k].dtype
        or before[k].shape != after[k].shape
        or not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())
    ]
    assert not differ, f"{what}: changed {differ[:5]}"
