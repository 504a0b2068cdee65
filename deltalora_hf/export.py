"""Export a Delta-LoRA adapter as a standard rank-2r PEFT LoRA adapter.

The trained model is ``W_0 + lambda*s*(B A - B_K A_K) + s*B A = W_0 + s * [(1+lambda) B, -lambda B_K] @ [A; A_K]``,
so on the ORIGINAL base it is exactly a LoRA of rank ``2r`` with the same scale ``s``:

    A_export = [A; A_K]                      (2r x k)
    B_export = [(1 + lambda) B, -lambda B_K]  (d x 2r)
    lora_alpha_export = s * 2r               (plain scaling, so that alpha / r == s)

Before W has moved (``lambda = 0`` or the start step not reached) the second half is zero. The result loads
with plain ``peft`` (no ``deltalora_hf`` import needed), so it serves wherever LoRA adapters are served.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import save_file

from . import _distributed
from .config import DeltaLoraConfig
from .layer import DeltaLoraLayer


def exported_factors(layer: DeltaLoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_export, B_export)`` of one layer: rank ``2r``, same scale, relative to the original base."""
    a, b = (_distributed.unsharded(t) for t in layer.lora_factors(adapter_name))
    ratio = layer.delta_settings[adapter_name].update_ratio
    a_k, b_k, flag = (
        _distributed.unsharded(t)
        for t in (
            layer.lora_anchor_A[adapter_name],
            layer.lora_anchor_B[adapter_name],
            layer.lora_anchored[adapter_name],
        )
    )
    if not bool(flag):  # the value, not a cache: it may have been written directly
        ratio, a_k, b_k = 0.0, torch.zeros_like(a), torch.zeros_like(b)
    a_out = torch.cat([a, a_k.to(a.dtype)], dim=0)
    b_out = torch.cat([(1 + ratio) * b, -ratio * b_k.to(b.dtype)], dim=1)
    return a_out.detach().contiguous(), b_out.detach().contiguous()


def _plain_lora_keys(layer: DeltaLoraLayer, name: str, adapter_name: str) -> tuple[str, str]:
    """The keys of a layer's factors in a plain PEFT LoRA adapter file (the adapter name is not part of them)."""
    if adapter_name in layer.lora_A:
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    return f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"  # nn.Embedding: parameters without ".weight"


def _auxiliary_keys(model: PeftModel, peft_state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``peft_state`` (PEFT's selection for ``adapter_name``) that PEFT's own trainable wrappers hold
    (``modules_to_save``, ``trainable_token_indices``): a plain LoRA adapter of the same config has them too. An
    allow-list: what Delta-LoRA adds to its layers (anchors, flags, counts, marks) is never one of them, whatever
    its name, and a new buffer cannot leak into the export."""
    wrappers = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper))
    return [key for key in peft_state if key.startswith(wrappers)] if wrappers else []


def _lora_config(config: DeltaLoraConfig, layers: dict[str, DeltaLoraLayer], adapter_name: str) -> LoraConfig:
    lora_fields = {f.name for f in fields(LoraConfig)}
    values = {
        k: v
        for k, v in config.to_dict().items()
        if k in lora_fields and k not in ("peft_type", "rank_pattern", "alpha_pattern")
    }
    default_r, default_scale = 2 * config.r, (config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r))
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in layers.items():
        r = 2 * layer.r[adapter_name]
        scale = layer.scaling[adapter_name]
        if r != default_r or abs(scale - default_scale) > 1e-12 * max(1.0, abs(default_scale)):
            key = f"^{name.removeprefix('base_model.model.')}$"
            rank_pattern[key], alpha_pattern[key] = r, scale * r
    values.update(
        r=default_r,
        lora_alpha=default_scale * default_r,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        inference_mode=True,
    )
    return LoraConfig(**values)


def export_lora(model: PeftModel, save_directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_name`` of a Delta-LoRA ``model`` as a plain PEFT LoRA adapter (rank ``2r``).

    The adapter reproduces the trained model on the original base model, with plain ``peft``:
    ``PeftModel.from_pretrained(original_base, save_directory)``. ``modules_to_save`` (e.g. a classifier head)
    are exported too. Size: twice a rank-r LoRA adapter of the same layers, plus any ``modules_to_save``.

    In a distributed job rank 0 writes. Under DeepSpeed ZeRO-3 and FSDP2 (``fully_shard``) call it on every rank:
    the factors are gathered, a collective.

    In ``base_update="inplace"`` mode with a bfloat16/float16 base, the export is the exact telescoped change,
    while the W in memory also carries the rounding noise of its per-step updates.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, DeltaLoraConfig):
        raise ValueError(f"adapter '{adapter_name}' is not a Delta-LoRA adapter ({type(config).__name__}).")
    params = [p for n, p in model.named_parameters() if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")]
    with _distributed.gathered(*params):  # ZeRO-3: the adapter's factors, whole (a collective: all ranks)
        layers = {
            n: m for n, m in model.named_modules() if isinstance(m, DeltaLoraLayer) and adapter_name in m.lora_anchored
        }
        state = {}
        for name, layer in layers.items():
            key_a, key_b = _plain_lora_keys(layer, name, adapter_name)
            state[key_a], state[key_b] = exported_factors(layer, adapter_name)
        peft_state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        for key in _auxiliary_keys(model, peft_state):  # FSDP2: whole values on every rank
            state[key] = _distributed.unsharded(peft_state[key])
    out = Path(save_directory)
    if not _distributed.is_main_process():
        return out  # distributed: rank 0 writes (under ZeRO-3 and FSDP2 every rank had to gather)
    out.mkdir(parents=True, exist_ok=True)
    _lora_config(config, layers, adapter_name).save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    return out
