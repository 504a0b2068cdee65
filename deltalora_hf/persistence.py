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

import math
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
    """An in-place mark: a float64 value that no dtype cast changes (``model.half()`` converts every floating buffer;
    the mark is the scale of a move, kept exact). Written only through ``InplaceMarks.set_scale`` when a record
    changes, and never loaded into: the layer's load hook reads it from the state dict (``before_load``), so a state
    dict without it (factored mode, a base model, an older version) reports no missing key."""

    def _apply(self, fn, recurse: bool = True):
        value = self.weight
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float64:  # a cast: the value stays, in float64, on the new device
            self.weight = value.to(device=self.weight.device, dtype=torch.float64)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        return


class InplaceMarks(AnchorDict):
    """``lora_inplace_move.<adapter>.weight`` of in-place adapters: the scale at which W holds the adapter's move
    (0: none), a float64 value kept current by ``invariant.set_record`` (every record change), so that a state dict,
    ``named_buffers()`` or any other reader sees what W holds now. So a state dict says which mode wrote it. Buffers,
    so that every key of a state dict is an attribute path (PEFT's hotswap, ``get_base_model_state_dict``)."""

    def __setitem__(self, adapter: str, value: torch.Tensor) -> None:
        self.add_module(adapter, _Mark(value.detach()))

    def set_scale(self, adapter: str, scale: float) -> None:
        self[adapter].fill_(scale)


def mark(scale: float, device: torch.device | str | None = None) -> torch.Tensor:
    """A mark's value: ``scale`` as a 1-element float64 tensor."""
    return torch.tensor([scale], dtype=torch.float64, device=device)


def decode_mark(value: torch.Tensor) -> float:
    """A loaded mark's value, in any floating dtype. A 1-element int64 mark is 0.4's format: the bits of a float64."""
    if value.dtype == torch.int64 and value.numel() == 1:
        return float(value.reshape(1).view(torch.float64))
    return float(value.reshape(-1)[0])


def before_state_dict(module: DeltaLayer, prefix: str, keep_vars: bool) -> None:
    """Before a state dict is taken: whoever receives it holds the live tensors and may write them through
    ``.data``, so the layer's next forward compares by value. Nothing is written."""
    module._delta_state.touch()


def after_state_dict(module: DeltaLayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A state dict's W is the W the saved tensors describe: where W in memory is behind them (a write through
    ``.data`` since the last check), the state dict gets the W they describe, and marks to match, computed without
    writing the model (``invariant.weight_in_step``). ZeRO-3/FSDP: taken inside the framework's own gather; the
    updater syncs."""
    key = f"{prefix}base_layer.weight"
    if key not in state_dict or module.is_partitioned() or not len(module.lora_inplace_move):
        return
    weight = invariant.weight_in_step(module)
    if weight is None:
        return
    state_dict[key] = weight
    applied = module.applied_adapters()
    for adapter in module.lora_inplace_move:
        scale = module.move_scale(adapter) if adapter in applied else 0.0
        state_dict[f"{prefix}lora_inplace_move.{adapter}.weight"] = mark(scale, weight.device)


def loaded_value_problems(layer: DeltaLayer, state_dict: dict, prefix: str) -> list[str]:
    """Every reason why the values ``state_dict`` brings for ``layer`` (keys under ``prefix``) cannot be loaded, by
    value, whatever their dtype: factors and anchors floating, finite and of the layer's shapes; a flag exactly 0 or
    1; a warm-up count a non-negative integer; an adapter's factors, anchors and flag all present once any of its
    anchors or its flag is; a mark a finite number that is 0 or the adapter's scale here, and 0 for an adapter that
    this model lacks (W would hold a move that no adapter owns)."""
    problems = []
    for adapter in layer.delta_settings:
        a_key, b_key = layer.lora_factor_keys(adapter)
        live = dict(zip((a_key, b_key), layer.lora_factors(adapter)))
        own = {name: f"{name}.{adapter}.weight" for name in ("lora_anchor_A", "lora_anchor_B", "lora_anchored")}
        live[own["lora_anchor_A"]], live[own["lora_anchor_B"]] = (
            layer.lora_anchor_A[adapter],
            layer.lora_anchor_B[adapter],
        )
        for name, like in live.items():
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if not value.is_floating_point():
                problems.append(f"{prefix}{name} has dtype {value.dtype}, not a floating-point dtype")
            elif tuple(value.shape) != tuple(like.shape) and not like.is_meta and not _is_partitioned_value(like):
                problems.append(f"{prefix}{name} has shape {tuple(value.shape)}, the layer's is {tuple(like.shape)}")
            elif not value.is_meta and not torch.isfinite(value).all():
                problems.append(f"{prefix}{name} has non-finite values")
        flag = state_dict.get(prefix + own["lora_anchored"])
        if flag is not None and not flag.is_meta:
            if flag.numel() != 1 or float(flag.reshape(-1)[0]) not in (0.0, 1.0):
                problems.append(f"{prefix}{own['lora_anchored']} is {flag.reshape(-1)[:4].tolist()}, not 0 or 1")
        count = state_dict.get(f"{prefix}lora_warmup_steps.{adapter}.weight")
        if count is not None and not count.is_meta:
            number = float(count.reshape(-1)[0]) if count.numel() == 1 else math.nan
            if not (math.isfinite(number) and number >= 0 and number == int(number)):
                problems.append(f"{prefix}lora_warmup_steps.{adapter}.weight is not a non-negative integer count")
        wanted = [a_key, b_key, *own.values()]
        if any(prefix + own[name] in state_dict for name in own):
            missing = [name for name in wanted if prefix + name not in state_dict]
            if missing:
                problems.append(f"{prefix}: adapter '{adapter}' comes without {', '.join(missing)}")
    for key in [k for k in state_dict if k.startswith(f"{prefix}lora_inplace_move.")]:
        adapter = key.removeprefix(f"{prefix}lora_inplace_move.").removesuffix(".weight")
        value = state_dict[key]
        scale = decode_mark(value) if value.numel() == 1 and not value.is_meta else math.nan
        if not math.isfinite(scale):
            problems.append(f"{key} is not one finite number")
        elif scale != 0.0 and adapter not in layer.delta_settings:
            problems.append(
                f"{key} says W holds the move of adapter '{adapter}', which this model does not have (a state dict "
                "of another adapter's model?): no adapter would own that move"
            )
        elif scale != 0.0 and not _same_scale(scale, layer.move_scale(adapter), value.dtype):
            problems.append(
                f"{key} says W holds adapter '{adapter}''s move at scale {scale:g}, but its scale here is "
                f"{layer.move_scale(adapter):g} (a mark cast to another dtype, or a changed scaling)"
            )
    return problems


def _same_scale(saved: float, here: float, dtype: torch.dtype) -> bool:
    """Whether a mark saved in ``dtype`` (rounded there) is this scale."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 2.0**-52
    return abs(saved - here) <= 4 * eps * max(abs(here), 1e-30)


def _is_partitioned_value(t: torch.Tensor) -> bool:
    return is_partitioned(t) or t.numel() == 0  # ZeRO-3 keeps an empty placeholder


def check_loaded_values(layer: DeltaLayer, state_dict: dict, prefix: str) -> None:
    """Raise before anything is written if ``loaded_value_problems`` finds any."""
    problems = loaded_value_problems(layer, state_dict, prefix)
    if problems:
        check_loaded_values_message(problems)


def check_loaded_values_message(problems: list[str]) -> None:
    """Raise the refusal of a load for ``problems``."""
    if problems:
        raise ValueError(
            f"Delta-LoRA: this state dict cannot be loaded: {'; '.join(problems[:6])}"
            f"{' ...' if len(problems) > 6 else ''}. Nothing was loaded. Load a state dict saved from "
            "a model with the same adapters (model.state_dict() / save_pretrained), unchanged."
        )


def before_load(module: DeltaLayer, state_dict, prefix: str, *args: Any) -> None:
    """Before a load: check every value, read the marks, decide what a loaded W holds, warn about a partial one."""
    check_loaded_values(module, state_dict, prefix)
    marks = {
        key.removeprefix(f"{prefix}lora_inplace_move.").removesuffix(".weight"): decode_mark(state_dict.pop(key))
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
            for adapter in list(module.delta_records):
                invariant.set_record(module, adapter, None, 0.0)
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
