"""What Delta-LoRA needs to know about sharded and partitioned parameters, in one place.

* :func:`gathered` gives the full values of parameters that may be sharded (torch FSDP2 ``DTensor``).
* :func:`check_writable_in_place` refuses, with a clear error, a base weight that cannot be written in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` holds only part of its values on this process (DTensor, DeepSpeed ZeRO-3)."""
    return hasattr(t, "full_tensor") or hasattr(t, "ds_id")


@contextlib.contextmanager
def gathered(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The full values of ``tensors`` (a DTensor's ``full_tensor()``; plain tensors as they are)."""
    if any(hasattr(t, "ds_id") for t in tensors):
        raise RuntimeError(
            "Delta-LoRA does not support DeepSpeed ZeRO-3 (parameters are partitioned across ranks). Use ZeRO-2 or "
            "DDP, or torch FSDP2 with DeltaLoraConfig(base_update='factored')."
        )
    yield tuple(t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors)


def check_writable_in_place(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a plain tensor that an in-place W update can write."""
    if type(weight.data) is not torch.Tensor or is_partitioned(weight):
        raise RuntimeError(
            f"Delta-LoRA cannot update a {type(weight.data).__name__} base weight in place (sharded by FSDP/ZeRO-3, "
            "or quantized). Use DeltaLoraConfig(base_update='factored'), which never writes W."
        )
