"""Shared setup of the worker scripts that tests launch with ``torch.distributed.run`` (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch


def trained_state(peft_model) -> dict[str, torch.Tensor]:
    """Contiguous copies of the whole state (base weights, LoRA factors, anchors), ready for safetensors."""
    state = {}
    for key, value in peft_model.state_dict().items():
        if hasattr(value, "full_tensor"):  # a DTensor sharded by FSDP2
            value = value.full_tensor()
        state[key] = value.detach().cpu().contiguous().clone()
    return state
