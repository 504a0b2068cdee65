"""What a Delta-LoRA layer's state dict says, and how a load of one is read (the layer registers these hooks).

A layer's state dict holds its factors, anchors, anchored flags and warm-up step counts (saved buffers), W, and, for an
in-place adapter, ``lora_inplace_move.<adapter>.weight``: the scale at which that W holds the adapter's move (0:
none). So a state dict says which mode wrote it, and a load knows what the W it brings holds:

* in-place marks present: W holds those moves, of the tensors loaded with it;
* a W equal to the one in memory: nothing changes (``set_base_model_state_dict(m, get_base_model_state_dict(m))``);
* a whole-model state dict of 0.3 or older (no ``lora_warmup_steps``): the moves of the layer's in-place adapters;
* anything else (factored layers, base models, adapter files): the original base.

After the load the records say exactly that, and one sync brings W to the invariant of the layer's own mode (see
``deltalora_hf.invariant``). A state dict that brings factors without their anchors, flag or step count warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import invariant
from ._distributed import is_partitioned
from .invariant import DeltaLayer


class _Anchor(nn.Module):
    """One saved buffer, named ``weight`` like the factors' parameters (its key is ``<container>.<adapter>.weight``)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", value, persistent=True)


class AnchorDict(nn.Module):
    """Adapter name -> saved buffer, registered as ``<adapter>.weight``; indexing gives the tensor.

    Buffers, not frozen parameters: frameworks keep buffers in every state dict they build, while many leave frozen
    parameters out as "the base model" (e.g. DeepSpeed's ZeRO-3 save with ``exclude_frozen_parameters``, which
    Trainer uses for PEFT models). The names follow PEFT's ``lora_A.<adapter>.weight``, so that a state-dict walk
    (PEFT's hotswap) finds the layer of every key.
    """

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._modules[adapter].weight

    def __setitem__(self, adapter: str, value: torch.Tensor) -> None:
        self.add_module(adapter, _Anchor(value.detach()))

    def __delitem__(self, adapter: str) -> None:
        del self._modules[adapter]

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> list[str]:
        return list(self._modules)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, m.weight) for k, m in self._modules.items()]


class _Mark(_Anchor):
    """A mark is written from the records when a state dict is taken and read by the layer's load hook
    (``before_load``), never loaded into: a state dict without it (factored mode, a base model, an older version)
    reports no missing key."""

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        return


class InplaceMarks(AnchorDict):
    """``lora_inplace_move.<adapter>.weight`` of in-place adapters: the scale at which W, in a state dict, holds the
    adapter's move (0: none), stored as the bits of a float64 in an int64 (``encode_scale``) so that dtype casts such
    as ``model.half()`` leave it exact. So a state dict says which mode wrote it. Buffers, so that every key of a
    state dict is an attribute path (PEFT's hotswap, ``get_base_model_state_dict``'s adapter keys)."""

    def __setitem__(self, adapter: str, value: torch.Tensor) -> None:
        self.add_module(adapter, _Mark(value.detach()))


def encode_scale(scale: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``scale`` as the bits of a float64 in a 1-element int64 tensor."""
    return torch.tensor([scale], dtype=torch.float64, device=device).view(torch.int64)


def decode_scale(value: torch.Tensor) -> float:
    """The inverse of ``encode_scale``."""
    return float(value.reshape(1).view(torch.float64))


def before_state_dict(module: DeltaLayer, prefix: str, keep_vars: bool) -> None:
    """Before a state dict is taken: W in step with the adapters, and the marks say what it holds."""
    # A saved W is the W the saved tensors describe: compare by value (sees .data writes). Whoever receives the
    # state dict holds the live tensors and may write them through .data: check again before the next forward.
    if not module.is_partitioned():  # ZeRO-3/FSDP: taken inside the framework's own gather; the updater syncs
        module.sync_base_weight()
        invariant.snapshot_anchors(module)
        module._delta_state.touch()
    with torch.no_grad():
        for adapter in module.lora_inplace_move:
            record = module.delta_records.get(adapter)
            mark = module.lora_inplace_move[adapter]
            mark.copy_(encode_scale(0.0 if record is None else record.scale, mark.device))


def before_load(module: DeltaLayer, state_dict, prefix: str, *args: Any) -> None:
    """Before a load: read the marks, decide what a loaded W holds, warn about a partial state dict."""
    invariant.snapshot_anchors(module)  # the load writes the live anchors in place
    marks = {
        key.removeprefix(f"{prefix}lora_inplace_move.").removesuffix(".weight"): decode_scale(state_dict.pop(key))
        for key in [k for k in state_dict if k.startswith(f"{prefix}lora_inplace_move.")]
    }
    original = module.__dict__.pop("_loads_original_base", False)
    weight_key = f"{prefix}base_layer.weight"
    if weight_key in state_dict:
        module._loads_base_weight = _what_loaded_w_holds(module, state_dict, prefix, marks, original)
    _warn_if_partial(module, state_dict, prefix)
    for adapter in module.lora_anchored.keys():  # loaded anchors keep the factors' dtype (and precision)
        module.match_anchor_dtypes(adapter)


def after_load(module: DeltaLayer, incompatible_keys: Any) -> None:
    """After a load: record what the loaded W holds, then bring W to the invariant."""
    module._delta_state.touch()
    holds = module.__dict__.pop("_loads_base_weight", None)
    if holds is not None and holds != "unchanged":  # W was replaced: record what the loaded W holds
        with torch.no_grad():
            invariant.refresh_flags([module])
            module.delta_records.clear()
            if holds == "legacy":
                holds = {adapter: module.move_scale(adapter) for adapter in module.applied_adapters()}
            for adapter, scale in holds.items():
                if scale != 0.0 and adapter in module.delta_settings:
                    invariant.set_record(module, adapter, invariant.current_tensors(module, adapter), scale)
    module.sync_base_weight()


def _what_loaded_w_holds(
    layer: DeltaLayer, state_dict: dict, prefix: str, marks: dict[str, float], from_adapter_file: bool
) -> dict[str, float] | str:
    """What the W being loaded into ``layer`` holds: ``{adapter: scale}`` of the moves in it, ``"unchanged"``, or
    ``"legacy"`` (the moves of the layer's applied adapters, read after the load).

    * A state dict written by an in-place layer says so itself (``lora_inplace_move.<adapter>`` keys, the moves of
      the tensors it carries); any other W is the original base (factored layers, base models, adapter files).
    * A W equal to the one in memory changes nothing (``set_base_model_state_dict(m, get_base_model_state_dict(m))``).
    * A whole-model state dict of deltalora-hf <= 0.3 (adapter keys, no ``lora_warmup_steps``) held the moves of
      its in-place adapters, as that version's ``state_dict()`` gave W.
    """
    if marks:
        return marks
    incoming, current = state_dict[f"{prefix}base_layer.weight"], layer.get_base_layer().weight
    plain = not (is_partitioned(current) or current.is_meta or is_partitioned(incoming))
    if plain and incoming.shape == current.shape and incoming.dtype == current.dtype:
        with torch.no_grad():
            if torch.equal(incoming.to(current.device), current):
                return "unchanged"
    own = tuple(f"{prefix}{name}." for name in (*layer.adapter_layer_names, "lora_anchor_A"))
    legacy = any(k.startswith(own) for k in state_dict) and not any(
        k.startswith(f"{prefix}lora_warmup_steps.") for k in state_dict
    )
    return "legacy" if legacy and not from_adapter_file else {}


def _warn_if_partial(layer: DeltaLayer, state_dict: dict, prefix: str) -> None:
    """Warn when a state dict brings an adapter's factors without its anchors, flag or step count."""
    for adapter in layer.delta_settings:
        factor = f"{prefix}{layer.lora_factor_keys(adapter)[0]}"
        if factor not in state_dict:
            continue
        wanted = [f"{prefix}{name}.{adapter}.weight" for name in ("lora_anchor_A", "lora_anchor_B", "lora_anchored")]
        flag = state_dict.get(wanted[-1])
        if flag is None or not bool(flag.reshape(-1)[0]):  # the step count matters until the adapter is anchored
            wanted.append(f"{prefix}lora_warmup_steps.{adapter}.weight")
        missing = [key.removeprefix(prefix) for key in wanted if key not in state_dict]
        if missing:
            warnings.warn(
                f"Delta-LoRA: a state dict loaded the factors of adapter '{adapter}' without {', '.join(missing)} "
                "(e.g. a checkpoint of the trainable parameters only). The factors are loaded; the anchors, flag "
                "and step count stay as they were in this model, so W may move from other anchors, or start at "
                "another step, than in the run that wrote the checkpoint. Save and load model.state_dict() whole, "
                "or save_pretrained / PeftModel.from_pretrained (see docs/guides/custom-loops.md).",
                stacklevel=4,
            )
