"""Delta-LoRA on bitsandbytes 4-bit and 8-bit linear layers (factored mode only: a quantized W is never written).

Laid out like PEFT's ``peft/tuners/lora/bnb.py``: module-level classes and ``dispatch_*`` functions, defined
only when bitsandbytes is installed.
"""

from __future__ import annotations

from typing import Any

from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layer import DeltaLoraLayer


def _base(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    kinds: tuple[type, ...] = ()
    if is_bnb_available():
        kinds += (bnb.nn.Linear8bitLt,)
    if is_bnb_4bit_available():
        kinds += (bnb.nn.Linear4bit,)
    return bool(kinds) and isinstance(module, kinds)


def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    return None


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    return None


if is_bnb_available():
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear8bitLt as _LoraLinear8bitLt

    class Linear8bitLt(DeltaLoraLayer, _LoraLinear8bitLt):
        """Delta-LoRA (factored) on a bitsandbytes 8-bit linear layer."""

    def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
        base = _base(target)
        if not isinstance(base, bnb.nn.Linear8bitLt):
            return None
        kwargs.update(has_fp16_weights=base.state.has_fp16_weights, threshold=base.state.threshold, index=base.index)
        return Linear8bitLt(target, adapter_name, config=config, **kwargs)


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit

    class Linear4bit(DeltaLoraLayer, _LoraLinear4bit):
        """Delta-LoRA (factored) on a bitsandbytes 4-bit linear layer."""

    def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
        base = _base(target)
        if not isinstance(base, bnb.nn.Linear4bit):
            return None
        kwargs.update(
            compute_dtype=base.compute_dtype,
            compress_statistics=base.weight.compress_statistics,
            quant_type=base.weight.quant_type,
        )
        return Linear4bit(target, adapter_name, config=config, **kwargs)
