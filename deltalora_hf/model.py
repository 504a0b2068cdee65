"""``DeltaLoraModel``: PEFT's ``LoraModel`` with Delta-LoRA layers and checks on what may be targeted."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.utils.parametrize
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import invariant, persistence
from ._distributed import check_writable_base, in_place_problem, is_dtensor
from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit, is_bnb_layer
from .config import BaseUpdate, DeltaLoraConfig
from .layer import SUPPORTED_BASE_LAYERS, DeltaLoraLayer, Embedding, Linear

_NO_INIT_CONVERSION = (
    "path_initial_model_for_weight_conversion / subtract_mutated_init convert PiSSA-like initialisations to LoRA; "
    "Delta-LoRA refuses those initialisations, and its trained model is not a LoRA of the saved base. Nothing was "
    "written. Use deltalora_hf.export_lora(model, path) for an exact rank-2r LoRA of the original base."
)

# v0.2 saved the anchors without the ".weight" of the holder modules they are in now
_LEGACY_ANCHOR_KEYS = ("lora_anchor_A", "lora_anchor_B", "lora_anchored")


def _base_layer(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def check_target(base: nn.Module, name: str, base_update: BaseUpdate) -> None:
    """Raise a ``ValueError`` naming ``name`` unless Delta-LoRA can target it in this base-update mode."""
    if is_bnb_layer(base):
        if base_update == "factored":
            return
        raise ValueError(
            f"Target module '{name}' ({type(base).__name__}) is not supported by Delta-LoRA with "
            "base_update='inplace': a bitsandbytes quantized weight cannot be written in place. Use "
            "DeltaLoraConfig(base_update='factored'), which never writes W and supports 4-bit and 8-bit bases."
        )
    weight = getattr(base, "weight", None)
    kinds = ", ".join(f"{c.__module__}.{c.__name__}" for c in SUPPORTED_BASE_LAYERS)
    if not isinstance(base, SUPPORTED_BASE_LAYERS) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"Target module '{name}' ({type(base).__name__}) is not supported by Delta-LoRA: supported targets are "
            f"{kinds} with a floating-point weight (and bitsandbytes 4/8-bit linears with base_update='factored'). "
            "Remove this module from target_modules."
        )
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"Target module '{name}' is not supported by Delta-LoRA: its weight has dtype {weight.dtype}, not a "
            "floating-point dtype (a quantized or integer weight), in either base-update mode. Remove it from "
            "target_modules."
        )
    if type(weight) not in (nn.Parameter, torch.Tensor) and not is_dtensor(weight):
        raise ValueError(
            f"Target module '{name}' is not supported by Delta-LoRA: its weight is a {type(weight).__name__}, a "
            "tensor subclass Delta-LoRA does not know (e.g. a quantized weight); plain tensors and DTensors (FSDP2) "
            "are supported. Remove it from target_modules."
        )
    if base_update == "inplace" and torch.nn.utils.parametrize.is_parametrized(base, "weight"):
        raise ValueError(
            f"Delta-LoRA cannot target '{name}' with base_update='inplace': its weight is parametrized "
            "(torch.nn.utils.parametrize), so a write to W would be lost. Use DeltaLoraConfig(base_update='factored'), "
            "which never writes W, or remove the parametrization first."
        )
    problem = in_place_problem(weight) if base_update == "inplace" and is_dtensor(weight) else None
    if problem is not None:  # e.g. a tensor-parallel layout: refused now rather than at the first W update
        raise ValueError(
            f"Target module '{name}' is not supported by Delta-LoRA with base_update='inplace': its sharded base "
            f"weight cannot be updated in place: {problem}. Use DeltaLoraConfig(base_update='factored'), which "
            "never writes W."
        )


def check_not_tied(model: nn.Module, base: nn.Module, name: str) -> None:
    """Refuse a target whose weight is shared with another module (tied input/output embeddings)."""
    weight = getattr(base, "weight", None)
    if weight is None:
        return
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(owners) > 1:
        raise ValueError(
            f"Delta-LoRA cannot target '{name}': its weight is tied to {', '.join(owners)}. Moving W would move every "
            "tied copy (in-place mode) but only this layer's output (factored mode and export), so the two would "
            "differ. Remove it from target_modules, or untie the weights first (e.g. load the model with "
            "tie_word_embeddings=False)."
        )


def dispatch_default(target: nn.Module, adapter_name: str, config: DeltaLoraConfig, **kwargs: Any) -> nn.Module | None:
    base = _base_layer(target)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, config=config, **kwargs)
    if isinstance(base, Conv1D):
        config.fan_in_fan_out = True  # GPT-2's Conv1D stores W as (in, out)
        return Linear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    if isinstance(base, nn.Linear):
        config.fan_in_fan_out = False
        return Linear(target, adapter_name, config=config, **kwargs)
    return None


DISPATCHERS = (dispatch_bnb_8bit, dispatch_bnb_4bit, dispatch_default)


def delta_lora_layers(model: nn.Module) -> list[DeltaLoraLayer]:
    """Every Delta-LoRA layer in ``model``, in ``model.modules()`` order, found anew on every call (the updater calls
    it after every step): a walk of the modules' own dicts that does not descend into the Delta-LoRA layers (nothing
    nests in them), so it costs about one dict read per module outside them."""
    found, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, DeltaLoraLayer):
            found.append(module)
            continue
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


class DeltaLoraModel(LoraModel):
    """Creates a Delta-LoRA model from a pretrained transformers model (see ``DeltaLoraConfig``).

    The layers are PEFT's LoRA layers (same parameter names) that also carry the anchor factors of the base-weight
    update and keep W in step with them (see ``deltalora_hf.layer``). W itself is moved after each optimizer
    step by ``DeltaLoRACallback`` or ``DeltaLoraUpdater``.
    """

    prefix: str = "lora_"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(_check_whole_load)

    def _check_new_adapter_config(self, config: DeltaLoraConfig) -> None:
        if not isinstance(config, DeltaLoraConfig):
            raise TypeError(f"DeltaLoraModel needs a DeltaLoraConfig, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    def _prepare_model(self, peft_config: DeltaLoraConfig, model: nn.Module) -> None:
        """Refuse, before any layer is created, targets where another PEFT method's layers already sit."""
        for key, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and not isinstance(module, DeltaLoraLayer):
                if self._check_target_module_exists(peft_config, key):
                    raise ValueError(_other_type_message(key, module))
        super()._prepare_model(peft_config, model)

    def _check_target_module_compatiblity(self, peft_config, model: nn.Module, target_name: str) -> None:
        """PEFT's guards for LoRA targets (e.g. Mamba's ``out_proj``) apply to Delta-LoRA layers, which are LoRA's."""
        as_lora = copy.copy(peft_config)
        as_lora.peft_type = PeftType.LORA
        super()._check_target_module_compatiblity(as_lora, model, target_name)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BaseTunerLayer) and not isinstance(target, DeltaLoraLayer):
            raise ValueError(_other_type_message(current_key, target))
        base = _base_layer(target)
        check_target(base, current_key, lora_config.base_update)
        check_not_tied(self.model, base, current_key)
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    @staticmethod
    def _create_new_module(lora_config: DeltaLoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        for dispatch in DISPATCHERS:
            module = dispatch(target, adapter_name, config=lora_config, **kwargs)
            if module is not None:
                return module
        raise ValueError(f"Delta-LoRA does not support target {type(_base_layer(target)).__name__}.")  # checked before

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every tensor's shape before anything is loaded; on a mismatch, take the half-created adapter out
        again (and unwrap the base if it was the only one) and name what differs: the rank or the base."""
        state_dict = {_current_anchor_key(k): _current_anchor_value(k, v) for k, v in state_dict.items()}
        problems = _damaged_adapter_keys(state_dict)
        if problems:
            remove_adapter_if_fresh(model, adapter_name)
            raise ValueError(
                f"The Delta-LoRA adapter '{adapter_name}' cannot be loaded: its file is incomplete or damaged "
                f"({'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}). Without its anchors and "
                "anchored flag, or with non-finite values, it would load as another model. Save the adapter again "
                "from the trained model (save_pretrained writes factors, anchors, flag and step count). Nothing was "
                f"loaded (an adapter '{adapter_name}' created for this load was taken out again)."
            )
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        current = model.state_dict()
        mismatched = [
            (key, tuple(value.shape), tuple(current[key].shape))
            for key, value in remapped.items()
            if key in current and tuple(current[key].shape) != tuple(value.shape)
        ]
        if mismatched:
            remove_adapter_if_fresh(model, adapter_name)
            raise ValueError(_mismatch_message(adapter_name, config, mismatched))
        for name, layer in model.named_modules():  # an adapter file's base weights are the original base's
            key = f"{name}.base_layer.weight"  # PEFT maps it to the model later when the model is not a PeftModel
            if isinstance(layer, DeltaLoraLayer) and (key in remapped or f"base_model.model.{key}" in remapped):
                layer._loads_original_base = True  # read (and dropped) by the layer's load hook
        return remapped

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of what an adapter file holds. The embedding weights PEFT adds to it (when an embedding
        is targeted) are written as the ORIGINAL base's: an adapter file never carries the move of another adapter."""
        # in place: PEFT reads the embedding weights from this same dict afterwards (save_embedding_layers)
        for key in [k for k in state_dict if ".lora_inplace_move." in k]:  # W is not saved, or is the original
            del state_dict[key]
        for name, layer in model.named_modules():
            key = f"{name}.base_layer.weight"
            if isinstance(layer, Embedding) and key in state_dict:  # whatever W the state dict handed out holds
                state_dict[key] = layer.original_base_weight()
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _convert_state_dict_for_initial_model(cls, peft_model, peft_config, path, output_state_dict, kwargs):
        raise ValueError(_NO_INIT_CONVERSION)

    def subtract_mutated_init(self, output_state_dict, adapter_name, kwargs=None):
        raise ValueError(_NO_INIT_CONVERSION)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's cast of the adapter's factors (to float32 on a low-precision base); the anchors follow them."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for layer in delta_lora_layers(self.model):
            if adapter_name in layer.lora_anchored:
                layer.match_anchor_dtypes(adapter_name)

    def set_adapter(self, adapter_name, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``set_adapter``; then W holds exactly the new active adapters' moves (one grouped sync)."""
        super().set_adapter(adapter_name, *args, **kwargs)
        invariant.sync_layers(delta_lora_layers(self.model))

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
        """PEFT's ``add_weighted_adapter`` for adapters whose W has not moved; refused (nothing changed) otherwise.

        PEFT combines the low-rank products ``s B A``. An adapter whose W has moved (anchored, ``update_ratio`` > 0)
        is more than that product, so the combination would silently differ from the trained adapters.
        """
        layers = delta_lora_layers(self.model)
        invariant.refresh_flags(layers)
        moved = sorted({a for layer in layers for a in adapters if layer.has_moved(a)})
        if moved:
            raise ValueError(
                f"add_weighted_adapter cannot combine the Delta-LoRA adapter(s) {', '.join(moved)}: their W has moved "
                "(anchored, update_ratio > 0), so each one is W_0 + s*B*A + lambda*s*(B*A - B_K*A_K), not the plain "
                "LoRA product s*B*A that add_weighted_adapter combines. Nothing was changed. Export each adapter with "
                "deltalora_hf.export_lora(model, path, adapter_name=...) (a plain LoRA of rank 2r on the original "
                "base), load the exports into a plain PEFT model of the original base, and combine those."
            )
        return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    def _check_mergeable(self) -> None:
        """Merging writes every W: refuse before the first layer merges if any W cannot be written (parametrized)."""
        for layer in delta_lora_layers(self.model):
            if torch.nn.utils.parametrize.is_parametrized(layer.get_base_layer(), "weight"):
                check_writable_base(layer.get_base_layer(), f"a layer of {type(layer).__name__} (merge)")

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._check_mergeable()
        super().merge_adapter(*args, **kwargs)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """PEFT's ``merge_and_unload``; W first holds exactly the moves of the adapters being merged."""
        self._check_mergeable()
        for layer in delta_lora_layers(self.model):
            names = layer.active_adapters if adapter_names is None else adapter_names
            layer.sync_base_weight(applied=layer.applied_adapters(names))
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """PEFT's ``unload``: the ORIGINAL base model (every in-place move taken out of W)."""
        for layer in delta_lora_layers(self.model):
            if layer.merged:
                layer.unmerge()
            layer.sync_base_weight(applied=[])
        return super().unload()


def _check_whole_load(module: nn.Module, state_dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` through the PeftModel or this model checks every Delta-LoRA layer's values
    (``persistence.loaded_value_problems``) before any tensor is copied, so a refusal leaves the model as it was. (The
    key check of ``strict=True`` is PyTorch's, after it has copied: a pre-hook is not told the caller's ``strict``;
    a W that would hold a move no adapter owns is refused here by value, in both cases.)"""
    problems = []
    for name, layer in module.named_modules():
        if isinstance(layer, DeltaLoraLayer):
            problems += persistence.loaded_value_problems(layer, state_dict, f"{prefix}{name}.")
    persistence.check_loaded_values_message(problems)


def _other_type_message(key: str, module: nn.Module) -> str:
    adapters = ", ".join(getattr(module, "active_adapters", []) or ["?"])
    return (
        f"Cannot add a Delta-LoRA adapter to '{key}': it already holds adapter(s) {adapters} of another PEFT type "
        f"({type(module).__module__}.{type(module).__name__}, e.g. plain LoRA). One layer holds adapters of one PEFT "
        "type, or the Delta-LoRA adapter would be served by the other type's layer. Nothing was created. Load the "
        "Delta-LoRA adapter into a model without those adapters (unload() them first), or export it as a plain "
        "LoRA with deltalora_hf.export_lora(model, path) and load both as LoRA."
    )


_PER_LAYER = ("lora_A", "lora_B", "lora_anchor_A", "lora_anchor_B", "lora_anchored")
_PER_EMBEDDING = ("lora_embedding_A", "lora_embedding_B", "lora_anchor_A", "lora_anchor_B", "lora_anchored")


def _damaged_adapter_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """What makes an adapter file unusable, checked by value before anything is loaded: a layer with some of its
    factors, anchors and flag but not all, a factor or anchor that is not floating point, a flag that is not exactly
    0 or 1, a warm-up count that is not a non-negative integer, or non-finite values."""
    problems = []
    layers = {k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_" in k}
    for layer in sorted(layers):
        present = {k.removeprefix(f"{layer}.").split(".")[0] for k in state_dict if k.startswith(f"{layer}.lora_")}
        wanted = _PER_EMBEDDING if "lora_embedding_A" in present or "lora_embedding_B" in present else _PER_LAYER
        if present & set(wanted):
            problems += [f"missing {layer}.{name}" for name in wanted if name not in present]
    for key, value in state_dict.items():
        if ".lora_" not in key or value.is_meta:
            continue
        name = key.rsplit(".lora_", 1)[1].split(".")[0]
        if name in ("A", "B", "embedding_A", "embedding_B", "anchor_A", "anchor_B") and not value.is_floating_point():
            problems.append(f"{key} has dtype {value.dtype}, not a floating-point dtype")
        elif name == "anchored" and (value.numel() != 1 or float(value.reshape(-1)[0]) not in (0.0, 1.0)):
            problems.append(f"{key} is {value.reshape(-1)[:4].tolist()}, not exactly 0 or 1")
        elif name == "warmup_steps" and not _is_count(value):
            problems.append(f"{key} is not a non-negative integer count")
        elif value.is_floating_point() and not torch.isfinite(value).all():
            problems.append(f"non-finite values in {key}")
    return problems


def _is_count(value: torch.Tensor) -> bool:
    if value.numel() != 1:
        return False
    number = float(value.reshape(-1)[0])
    return math.isfinite(number) and number >= 0 and number == int(number)


def _current_anchor_key(key: str) -> str:
    return f"{key}.weight" if key.rsplit(".", 1)[-1] in _LEGACY_ANCHOR_KEYS else key


def _current_anchor_value(key: str, value: torch.Tensor) -> torch.Tensor:
    if key.rsplit(".", 1)[-1] == "lora_anchored":
        return value.reshape(1).float()  # v0.2: a 0-dim bool buffer
    return value


def _mismatch_message(adapter_name: str, config, mismatched: list[tuple[str, tuple, tuple]]) -> str:
    """Name what differs: the rank the config gives against the saved tensors', or the base's shapes."""
    ranks = set()
    for key, saved, model in mismatched:
        name = key.rsplit(".", 3)
        factor = next((part for part in name if part.startswith("lora_")), "")
        if len(saved) == 2 and len(model) == 2:
            rank_dim = 1 if factor in ("lora_B", "lora_anchor_B", "lora_embedding_B") else 0
            other = 1 - rank_dim
            if saved[other] == model[other] and saved[rank_dim] != model[rank_dim]:
                ranks.add((saved[rank_dim], model[rank_dim]))
                continue
        ranks.add(None)
    details = "; ".join(f"{k}: saved {s}, here {m}" for k, s, m in mismatched[:5]) + (
        " ..." if len(mismatched) > 5 else ""
    )
    if None not in ranks:
        saved_ranks = sorted({saved for saved, _ in ranks})
        model_ranks = sorted({model for _, model in ranks})
        return (
            f"The Delta-LoRA adapter '{adapter_name}' cannot be loaded: its adapter_config.json gives rank "
            f"{', '.join(map(str, model_ranks))} (r / rank_pattern) but the saved tensors have rank "
            f"{', '.join(map(str, saved_ranks))}. Fix r in adapter_config.json (or save the adapter again). The model "
            f"was left as it was (no adapter '{adapter_name}' was added). Mismatches: {details}"
        )
    return (
        f"The Delta-LoRA adapter '{adapter_name}' was saved for a base model with other shapes, so it cannot be "
        f"loaded into this one. Load it onto the base it was trained on. The model was left as it was (no adapter "
        f"'{adapter_name}' was added). Mismatches: {details}"
    )


def remove_adapter_if_fresh(model: nn.Module, adapter_name: str) -> None:
    """After a refused load: undo the adapter the load created (``remove_adapter_everywhere``), but keep an adapter
    that held a model before (PEFT loads into an existing adapter of that name): trained or loaded, i.e. some layer
    has a non-zero ``lora_B``, a warm-up count or a flag."""
    with torch.no_grad():
        for layer in delta_lora_layers(model):
            if adapter_name not in layer.delta_settings:
                continue
            b = layer.lora_factors(adapter_name)[1]
            if b.is_meta:
                continue
            used = bool(b.any()) or bool(layer.lora_warmup_steps[adapter_name].any())
            if used or bool(layer.lora_anchored[adapter_name].any()):
                return
    remove_adapter_everywhere(model, adapter_name)


def remove_adapter_everywhere(model: nn.Module, adapter_name: str) -> None:
    """Undo a half-created adapter: delete it from every layer, unwrap layers left without adapters, drop its config.

    For a failed load, so that the model (or the user's base, for ``PeftModel.from_pretrained``) is as before.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, DeltaLoraLayer) or adapter_name not in module.delta_settings:
            continue
        module.delete_adapter(adapter_name)
        if not module.delta_settings:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
