"""Delta-LoRA layers: PEFT's LoRA layers plus the anchor factors of the base-weight update.

The forward pass is LoRA's (dropout is forced off by the config). What Delta-LoRA adds per adapter:

* ``lora_anchor_A`` / ``lora_anchor_B``: the factors ``(A_K, B_K)`` when W started to move, and
* ``lora_anchored``: whether W has started to move.

By the telescoping of the W updates, ``W_T = W_0 + lambda * s * (B_T A_T - B_K A_K)``, so these buffers
(saved with the adapter) are all that is needed to rebuild a trained model from its original base.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)


class DeltaLoraLayer:
    """Mixin for a LoRA layer that carries Delta-LoRA's per-adapter anchor buffers."""

    delta_param_names: tuple[str, ...] = ("lora_anchor_A", "lora_anchor_B", "lora_anchored")

    def _init_delta_buffers(self) -> None:
        for name in self.delta_param_names:
            if not hasattr(self, name):
                setattr(self, name, BufferDict(persistent=True))
        if "lora_anchor_A" not in self.other_param_names:  # so delete_adapter/device moves include them
            self.other_param_names = (*self.other_param_names, *self.delta_param_names)

    def _add_delta_adapter(self, adapter_name: str) -> None:
        a, b = self.lora_factors(adapter_name)
        self.lora_anchor_A[adapter_name] = torch.zeros_like(a, requires_grad=False)
        self.lora_anchor_B[adapter_name] = torch.zeros_like(b, requires_grad=False)
        self.lora_anchored[adapter_name] = torch.zeros((), dtype=torch.bool, device=a.device)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of an adapter as ``r x k`` and ``d x r`` tensors such that ``delta W = s * B @ A``."""
        raise NotImplementedError

    @property
    def weight_is_transposed(self) -> bool:
        """True where the base weight is stored as ``k x d`` (Conv1D / fan_in_fan_out, Embedding)."""
        raise NotImplementedError

    def is_anchored(self, adapter_name: str) -> bool:
        return bool(self.lora_anchored[adapter_name])

    def set_anchor(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Record ``(A_K, B_K)``: the factors at the moment W starts to move."""
        self.lora_anchor_A[adapter_name].copy_(a)
        self.lora_anchor_B[adapter_name].copy_(b)
        self.lora_anchored[adapter_name].fill_(True)


class Linear(DeltaLoraLayer, lora_layer.Linear):
    """Delta-LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        self._init_delta_buffers()
        super().update_layer(adapter_name, *args, **kwargs)
        self._add_delta_adapter(adapter_name)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    @property
    def weight_is_transposed(self) -> bool:
        return bool(self.fan_in_fan_out)

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)


class Embedding(DeltaLoraLayer, lora_layer.Embedding):
    """Delta-LoRA on ``nn.Embedding``; the weight is ``num_embeddings x dim``, i.e. transposed."""

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        self._init_delta_buffers()
        super().update_layer(adapter_name, *args, **kwargs)
        self._add_delta_adapter(adapter_name)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    @property
    def weight_is_transposed(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)
