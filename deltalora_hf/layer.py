"""Delta-LoRA layers: PEFT's LoRA layers plus the anchor factors of the base-weight update.

What Delta-LoRA adds per adapter (dropout is forced off by the config):

* ``lora_anchor_A`` / ``lora_anchor_B``: the factors ``(A_K, B_K)`` when W starts to move (after step K);
* ``lora_anchored``: whether they have been recorded.

The W updates telescope: ``W_t = W_0 + lambda * s * (B_t A_t - B_K A_K)``. The two base-update modes use it:

* ``"inplace"`` (Algorithm 1): W itself is updated after every step; the forward pass is LoRA's.
* ``"factored"``: W is never written; the forward pass adds the telescoped move from the factors,
  ``W_0 x + s B A x + lambda s (B A)_detached x - lambda s B_K A_K x``, which has the same value and the
  same gradients for A and B, and works on bases that cannot be written (quantized, sharded).

The anchors are saved with the adapter, so a trained model is rebuilt from its original base. Loading an
adapter's state dict moves an in-place W from the change the adapter in memory had applied to the one the
loaded adapter describes (:meth:`DeltaLoraLayer._apply_loaded_moves`), unless the state dict carries W itself.
With adapters disabled (``model.disable_adapter()``), the output is the ORIGINAL base model's in both modes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _distributed
from .functional import add_low_rank_, delta_factors

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) DTensor parameter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class DeltaLoraLayer:
    """Mixin for a LoRA layer that carries Delta-LoRA's per-adapter anchors and base-update mode."""

    delta_param_names: tuple[str, ...] = (
        "lora_anchor_A",
        "lora_anchor_B",
        "lora_anchored",
        "delta_update_ratio",
        "delta_base_update",
    )

    # -- setup --------------------------------------------------------------------------------------------

    def _init_delta_buffers(self) -> None:
        if hasattr(self, "lora_anchored"):
            return
        self.lora_anchor_A = BufferDict(persistent=True)
        self.lora_anchor_B = BufferDict(persistent=True)
        self.lora_anchored = BufferDict(persistent=True)
        self.delta_update_ratio: dict[str, float] = {}
        self.delta_base_update: dict[str, str] = {}
        self.other_param_names = (*self.other_param_names, *self.delta_param_names)  # for delete_adapter, .to()
        self.register_load_state_dict_pre_hook(DeltaLoraLayer._remember_moves_before_load)
        self.register_load_state_dict_post_hook(DeltaLoraLayer._apply_loaded_moves)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._init_delta_buffers()
        super().update_layer(adapter_name, *args, **kwargs)
        config = kwargs["config"]
        self.delta_update_ratio[adapter_name] = float(config.update_ratio)
        self.delta_base_update[adapter_name] = config.base_update
        a, b = self.lora_factors(adapter_name)
        self.lora_anchor_A[adapter_name] = torch.zeros_like(a, requires_grad=False)
        self.lora_anchor_B[adapter_name] = torch.zeros_like(b, requires_grad=False)
        self.lora_anchored[adapter_name] = torch.zeros((), dtype=torch.bool, device=a.device)

    # -- what each layer type defines -----------------------------------------------------------------------

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of an adapter as ``r x k`` and ``d x r`` tensors such that ``delta W = s * B @ A``."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    @property
    def weight_is_transposed(self) -> bool:
        """True where the base weight is stored as ``k x d`` (Conv1D / fan_in_fan_out, Embedding)."""
        return bool(getattr(self, "fan_in_fan_out", False))

    def _factor_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A x`` for this layer type (no scale)."""
        x = self._cast_input_dtype(x, a.dtype)
        return F.linear(F.linear(x, a), b)

    # -- anchors and moves ------------------------------------------------------------------------------------

    def is_anchored(self, adapter_name: str) -> bool:
        return bool(self.lora_anchored[adapter_name])

    def set_anchor(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Record ``(A_K, B_K)``: the factors at the moment W starts to move."""
        with _distributed.gathered(a, b) as (a_full, b_full):
            self.lora_anchor_A[adapter_name].copy_(a_full)
            self.lora_anchor_B[adapter_name].copy_(b_full)
        self.lora_anchored[adapter_name].fill_(True)

    def move_scale(self, adapter_name: str) -> float:
        """``lambda * s``: the factor of ``B A - B_K A_K`` in the change of W."""
        return self.delta_update_ratio[adapter_name] * self.scaling[adapter_name]

    def base_move(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(U, V, c)`` with ``W - W_0 == c * U @ V`` for an in-place adapter whose W has moved, else None.

        ``U @ V = B A - B_K A_K`` and ``c = lambda * s``: the telescoped sum of all W updates so far.
        """
        if self.delta_base_update[adapter_name] != "inplace" or not self.is_anchored(adapter_name):
            return None
        a, b = self.lora_factors(adapter_name)
        u, v = delta_factors(a, b, self.lora_anchor_A[adapter_name], self.lora_anchor_B[adapter_name])
        return u, v, self.move_scale(adapter_name)

    def _move_base_weight(self, u: torch.Tensor, v: torch.Tensor, alpha: float) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            add_low_rank_(weight, u, v, alpha, transposed=self.weight_is_transposed, rounding="nearest")

    @staticmethod
    def _remember_moves_before_load(module: DeltaLoraLayer, state_dict, prefix: str, *args: Any) -> None:
        module._loads_base_weight = f"{prefix}base_layer.weight" in state_dict
        module._moves_before_load = {}
        for adapter in module.lora_anchored:
            move = module.base_move(adapter)
            module._moves_before_load[adapter] = None if move is None else (move[0].clone(), move[1].clone(), move[2])

    @staticmethod
    def _apply_loaded_moves(module: DeltaLoraLayer, incompatible_keys: Any) -> None:
        before_all = module.__dict__.pop("_moves_before_load", {})
        if module.__dict__.pop("_loads_base_weight", False):
            return  # W itself was loaded: it already holds its moved value
        for adapter, before in before_all.items():
            after = module.base_move(adapter)
            if before is not None and after is not None and before[2] == after[2]:
                if torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]):
                    continue  # this adapter was not part of the load
            if before is not None:
                module._move_base_weight(before[0], before[1], -before[2])
            if after is not None:
                module._move_base_weight(*after)

    # -- forward and merge ---------------------------------------------------------------------------------------

    def _moves_output(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor | float:
        """``sum over adapters of lambda * s * (B A - B_K A_K) x``.

        The factors are detached (no gradient for A or B through this path), but x keeps its gradient: the layer
        must pass on the same input gradient as a W that really moved.
        """
        out: torch.Tensor | float = 0.0
        for adapter in adapters:
            a, b = (f.detach() for f in _distributed.used_in_forward(self, *self.lora_factors(adapter)))
            a_k, b_k = self.lora_anchor_A[adapter], self.lora_anchor_B[adapter]
            out = out + self.move_scale(adapter) * (self._factor_path(x, a, b) - self._factor_path(x, a_k, b_k))
        return out

    def _moved_adapters(self, mode: str, adapters) -> list[str]:
        return [
            a
            for a in adapters
            if a in self.lora_anchored and self.delta_base_update[a] == mode and self.is_anchored(a)
        ]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None and self._moved_adapters("factored", self.lora_anchored.keys()):
            raise ValueError(
                "adapter_names (mixed-batch inference) is not supported with factored Delta-LoRA adapters whose "
                "W has moved; merge the adapter or run one adapter at a time."
            )
        result = super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            # W holds W_0 plus every in-place adapter's move: take those out to get the original base.
            undo = self._moved_adapters("inplace", self.lora_anchored.keys())
            return result - self._moves_output(x, undo).to(result.dtype) if undo else result
        if self.merged or kwargs.get("adapter_names") is not None:
            return result
        factored = self._moved_adapters("factored", self.active_adapters)
        return result + self._moves_output(x, factored).to(result.dtype) if factored else result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """LoRA's ``s B A``, plus the telescoped W move in factored mode (so merging gives the trained model)."""
        delta = super().get_delta_weight(adapter)
        if self.delta_base_update.get(adapter) != "factored" or not self.is_anchored(adapter):
            return delta
        a, b = self.lora_factors(adapter)
        u, v = delta_factors(a, b, self.lora_anchor_A[adapter], self.lora_anchor_B[adapter])
        move = self.move_scale(adapter) * (u.float() @ v.float())
        return delta + (move.T if self.weight_is_transposed else move).to(delta.dtype)


class Linear(DeltaLoraLayer, lora_layer.Linear):
    """Delta-LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)


class Embedding(DeltaLoraLayer, lora_layer.Embedding):
    """Delta-LoRA on ``nn.Embedding``; the weight is ``num_embeddings x dim``, i.e. transposed."""

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    @property
    def weight_is_transposed(self) -> bool:
        return True

    def _factor_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self._embed(x, a.T) @ b.T
        embed_scale = self._get_embed_scale()
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)


@functools.cache
def bnb_layer_classes() -> dict[str, type[nn.Module]]:
    """Delta-LoRA versions of PEFT's bitsandbytes LoRA layers (factored mode only), if bitsandbytes is there."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    classes: dict[str, type[nn.Module]] = {}
    if is_bnb_available():
        from peft.tuners.lora.bnb import Linear8bitLt as _Lora8bit

        class Linear8bitLt(DeltaLoraLayer, _Lora8bit):
            """Delta-LoRA (factored) on a bitsandbytes 8-bit linear layer."""

        Linear8bitLt.__qualname__ = "Linear8bitLt"

        classes["8bit"] = Linear8bitLt
    if is_bnb_4bit_available():
        from peft.tuners.lora.bnb import Linear4bit as _Lora4bit

        class Linear4bit(DeltaLoraLayer, _Lora4bit):
            """Delta-LoRA (factored) on a bitsandbytes 4-bit linear layer."""

        Linear4bit.__qualname__ = "Linear4bit"

        classes["4bit"] = Linear4bit
    return classes
