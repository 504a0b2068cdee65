"""Delta-LoRA layers: PEFT's LoRA layers plus the anchor factors of the base-weight update.

The forward pass is LoRA's (dropout is forced off by the config). What Delta-LoRA adds per adapter:

* ``lora_anchor_A`` / ``lora_anchor_B``: the factors ``(A_K, B_K)`` when W started to move, and
* ``lora_anchored``: whether W has started to move.

By the telescoping of the W updates, ``W_T = W_0 + lambda * s * (B_T A_T - B_K A_K)``, so these buffers
(saved with the adapter) are all that is needed to rebuild a trained model from its original base.
Loading an adapter's state dict therefore also moves W: from the change the adapter in memory had
applied to the change the loaded one describes (:meth:`DeltaLoraLayer._apply_loaded_moves`), unless
the state dict carries W itself.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .functional import add_low_rank_, delta_factors

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)


class DeltaLoraLayer:
    """Mixin for a LoRA layer that carries Delta-LoRA's per-adapter anchor buffers."""

    delta_param_names: tuple[str, ...] = ("lora_anchor_A", "lora_anchor_B", "lora_anchored", "delta_update_ratio")

    def _init_delta_buffers(self) -> None:
        if hasattr(self, "lora_anchored"):
            return
        self.lora_anchor_A = BufferDict(persistent=True)
        self.lora_anchor_B = BufferDict(persistent=True)
        self.lora_anchored = BufferDict(persistent=True)
        self.delta_update_ratio: dict[str, float] = {}
        self.other_param_names = (*self.other_param_names, *self.delta_param_names)  # for delete_adapter, .to()
        self.register_load_state_dict_pre_hook(DeltaLoraLayer._remember_moves_before_load)
        self.register_load_state_dict_post_hook(DeltaLoraLayer._apply_loaded_moves)

    def _add_delta_adapter(self, adapter_name: str, update_ratio: float) -> None:
        self.delta_update_ratio[adapter_name] = float(update_ratio)
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

    def base_move(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(U, V, c)`` with ``W - W_0 == c * U @ V`` for this adapter, or None if W has not moved.

        ``U @ V = B A - B_K A_K`` and ``c = lambda * s``: the telescoped sum of all W updates so far.
        """
        if not self.is_anchored(adapter_name):
            return None
        a, b = self.lora_factors(adapter_name)
        u, v = delta_factors(a, b, self.lora_anchor_A[adapter_name], self.lora_anchor_B[adapter_name])
        return u, v, self.delta_update_ratio[adapter_name] * self.scaling[adapter_name]

    def _move_base_weight(self, u: torch.Tensor, v: torch.Tensor, alpha: float) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            add_low_rank_(weight, u, v, alpha, transposed=self.weight_is_transposed, rounding="nearest")

    @staticmethod
    def _remember_moves_before_load(module: DeltaLoraLayer, state_dict, prefix: str, *args) -> None:
        module._loads_base_weight = f"{prefix}base_layer.weight" in state_dict
        module._moves_before_load = {}
        for adapter in module.lora_anchored:
            move = module.base_move(adapter)
            module._moves_before_load[adapter] = None if move is None else tuple(
                x.detach().clone() if torch.is_tensor(x) else x for x in move
            )

    @staticmethod
    def _apply_loaded_moves(module: DeltaLoraLayer, incompatible_keys) -> None:
        before_all = module.__dict__.pop("_moves_before_load", {})
        if module.__dict__.pop("_loads_base_weight", False):
            return  # W itself was loaded: it already holds its moved value
        for adapter, before in before_all.items():
            after = module.base_move(adapter)
            if before is not None and after is not None and all(
                torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(before, after)
            ):
                continue  # this adapter was not part of the load
            if before is not None:
                module._move_base_weight(before[0], before[1], -before[2])
            if after is not None:
                module._move_base_weight(*after)


class Linear(DeltaLoraLayer, lora_layer.Linear):
    """Delta-LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        self._init_delta_buffers()
        super().update_layer(adapter_name, *args, **kwargs)
        self._add_delta_adapter(adapter_name, kwargs["config"].update_ratio)

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
        self._add_delta_adapter(adapter_name, kwargs["config"].update_ratio)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    @property
    def weight_is_transposed(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)
