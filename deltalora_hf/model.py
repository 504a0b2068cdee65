"""``DeltaLoraModel``: PEFT's ``LoraModel`` with Delta-LoRA layers and checks on what may be targeted."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DeltaLoraConfig
from .layer import SUPPORTED_BASE_LAYERS, Embedding, Linear, bnb_layer_classes


def _base_layer(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _bnb_kind(base: nn.Module) -> str | None:
    """"4bit" / "8bit" for a bitsandbytes linear layer, else None (without importing bitsandbytes)."""
    module = type(base).__module__
    if module.startswith("bitsandbytes"):
        return {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}.get(type(base).__name__)
    return None


def check_target(base: nn.Module, name: str, base_update: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless Delta-LoRA can target it in this base-update mode."""
    if base_update == "factored" and _bnb_kind(base) is not None:
        return
    weight = getattr(base, "weight", None)
    kinds = ", ".join(f"{c.__module__}.{c.__name__}" for c in SUPPORTED_BASE_LAYERS)
    if _bnb_kind(base) is not None:
        raise ValueError(
            f"Delta-LoRA cannot target '{name}' ({type(base).__name__}) with base_update='inplace': a bitsandbytes "
            "quantized weight cannot be written in place. Use DeltaLoraConfig(base_update='factored'), which never "
            "writes W and supports 4-bit and 8-bit bases."
        )
    if not isinstance(base, SUPPORTED_BASE_LAYERS) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"Delta-LoRA cannot target '{name}' ({type(base).__name__}): supported targets are {kinds} with a "
            "floating-point weight (and bitsandbytes 4/8-bit linears with base_update='factored'). Remove this "
            "module from target_modules."
        )
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
        hint = " or use base_update='factored'" if base_update == "inplace" else ""
        raise ValueError(
            f"Delta-LoRA cannot target '{name}': its weight is a {type(weight).__name__} of dtype {weight.dtype} "
            f"(quantized or non-float), which Delta-LoRA does not support. Remove it from target_modules{hint}."
        )


class DeltaLoraModel(LoraModel):
    """Creates a Delta-LoRA model from a pretrained transformers model (see :class:`DeltaLoraConfig`).

    The layers are PEFT's LoRA layers (same parameter names, same forward pass) that also carry the anchor
    factors of the base-weight update. W itself is moved by :class:`~deltalora_hf.DeltaLoRACallback` or
    :class:`~deltalora_hf.DeltaLoraUpdater` after each optimizer step.
    """

    prefix: str = "lora_"

    def _check_new_adapter_config(self, config: DeltaLoraConfig) -> None:
        if not isinstance(config, DeltaLoraConfig):
            raise TypeError(f"DeltaLoraModel needs a DeltaLoraConfig, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        check_target(_base_layer(target), current_key, lora_config.base_update)
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    @staticmethod
    def _create_new_module(lora_config: DeltaLoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = _base_layer(target)
        bnb_kind = _bnb_kind(base)
        if bnb_kind is not None:
            if bnb_kind == "4bit":
                kwargs.update(
                    compute_dtype=base.compute_dtype,
                    compress_statistics=base.weight.compress_statistics,
                    quant_type=base.weight.quant_type,
                )
            else:
                kwargs.update(
                    has_fp16_weights=base.state.has_fp16_weights, threshold=base.state.threshold, index=base.index
                )
            return bnb_layer_classes()[bnb_kind](target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            lora_config.fan_in_fan_out = True  # GPT-2's Conv1D stores W as (in, out)
            return Linear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
        if isinstance(base, nn.Linear):
            lora_config.fan_in_fan_out = False
            return Linear(target, adapter_name, config=lora_config, **kwargs)
        raise ValueError(f"Delta-LoRA does not support target {type(base).__name__}.")  # checked before

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every tensor's shape before anything is loaded, so a mismatch leaves the model untouched."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        current = model.state_dict()
        mismatched = [
            f"{key}: saved {tuple(value.shape)}, model {tuple(current[key].shape)}"
            for key, value in remapped.items()
            if key in current and tuple(current[key].shape) != tuple(value.shape)
        ]
        if mismatched:
            raise ValueError(
                f"The Delta-LoRA adapter '{adapter_name}' was saved for a base model with other shapes, so it cannot "
                "be loaded into this one (nothing was changed). Load it onto the base it was trained on. "
                "Mismatches: " + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
            )
        return remapped

    def _pre_injection_hook(self, model: nn.Module, config: DeltaLoraConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        if getattr(self, "_no_updater_hook", None) is None:
            self._no_updater_hook = model.register_forward_pre_hook(_warn_if_training_without_updater)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self._remove_no_updater_hook()
        return super().merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        self._remove_no_updater_hook()
        return super().unload()

    def _remove_no_updater_hook(self) -> None:
        if getattr(self, "_no_updater_hook", None) is not None:
            self._no_updater_hook.remove()
            self._no_updater_hook = None


def _warn_if_training_without_updater(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the wrapped model: a training step with no updater attached is plain LoRA."""
    if not module.training or not torch.is_grad_enabled() or getattr(module, "_deltalora_has_updater", False):
        return
    if not getattr(module, "_deltalora_warned_no_updater", False):
        module._deltalora_warned_no_updater = True
        warnings.warn(
            "A Delta-LoRA model is training, but no DeltaLoRACallback (Trainer) or DeltaLoraUpdater (custom loop) "
            "is attached: W will never move and this is plain LoRA. Pass callbacks=[DeltaLoRACallback()] to the "
            "Trainer, or call DeltaLoraUpdater(model).step() after each optimizer.step().",
            stacklevel=2,
        )
