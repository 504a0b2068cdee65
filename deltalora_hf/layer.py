r"""Delta-LoRA layers: PEFT's LoRA layers plus the anchors of the base-weight update.

Per adapter (dropout is forced off by the config) a layer keeps, besides LoRA's ``lora_A``/``lora_B``:

* ``lora_anchor_A`` / ``lora_anchor_B`` and the flag ``lora_anchored``: buffers (saved with the adapter) holding
  the factors ``(A_K, B_K)`` when W started to move, and 1 once it did. The W updates telescope, so an
  anchored adapter's whole change of W is its *move* ``lambda * s * (B A - B_K A_K)``.
* in ``"inplace"`` mode, the record of the move W holds (not saved); see ``deltalora_hf.invariant``, which
  keeps W in step with the adapters on every path.

In ``"factored"`` mode W is never written; the forward pass adds the move, which needs only one ``B A x``:
``s (1 + lambda g) B' A' x - lambda g s B_K A_K x`` with ``g = anchored`` and ``A', B'`` the factors with their
gradient scaled by ``1 / (1 + lambda g)``: the value and the gradients of x, A and B are those of a moved W plus
LoRA. With adapters disabled the output is the ORIGINAL base model's in both modes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import functional, invariant, persistence
from ._distributed import check_writable_base, gathered, is_partitioned, used_in_forward
from .config import DeltaSettings
from .functional import delta_factors, scale_grad

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)


class ScalingDict(dict):
    """PEFT's per-adapter ``scaling`` dict, observed: any change marks the layer for a value sync.

    PEFT changes scalings from several places (``set_scale``, ``scale_layer``, ``rescale_adapter_scale``, hotswap),
    and the move in W depends on them. Tensor scalings (``prepare_model_for_compiled_hotswap``) are refused.
    """

    def __init__(self, state: invariant.SyncState, values: dict | None = None) -> None:
        super().__init__()
        self.state = state
        for key, value in (values or {}).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            raise TypeError(
                "Delta-LoRA adapters need their scaling as a number (the W update is lambda * scaling * ...), so "
                "tensor scalings (peft's prepare_model_for_compiled_hotswap) are not supported; the model was not "
                "changed. Hot-swap Delta-LoRA adapters without compiling, or export them with "
                "deltalora_hf.export_lora and hot-swap the exported LoRA adapters."
            )
        self.state.touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.state.touch()
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def pop(self, *args: Any) -> Any:
        self.state.touch()
        return super().pop(*args)

    def clear(self) -> None:
        self.state.touch()
        super().clear()

    def __reduce__(self):
        return (ScalingDict, (self.state, dict(self)))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without dispatching a no-op conversion when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


class DeltaLoraLayer:
    """Mixin for a LoRA layer that carries Delta-LoRA's anchors and keeps W in step with them."""

    delta_param_names: tuple[str, ...] = (
        "lora_anchor_A",
        "lora_anchor_B",
        "lora_anchored",
        "lora_warmup_steps",
        "lora_inplace_move",
        "delta_settings",
        "delta_counted",
        "delta_records",
        "delta_anchored",
    )

    # -- setup --------------------------------------------------------------------------------------------

    @property
    def scaling(self) -> ScalingDict:
        return self.__dict__["_delta_scaling"]

    @scaling.setter
    def scaling(self, values: dict) -> None:
        if "_delta_state" not in self.__dict__:
            self.__dict__["_delta_state"] = invariant.SyncState()
        self.__dict__["_delta_scaling"] = ScalingDict(self._delta_state, values)

    def _init_delta_state(self) -> None:
        if hasattr(self, "lora_anchored"):
            return
        self.lora_anchor_A = persistence.AnchorDict()
        self.lora_anchor_B = persistence.AnchorDict()
        self.lora_anchored = persistence.AnchorDict()
        self.lora_warmup_steps = persistence.AnchorDict()  # optimizer steps before anchoring (int64): K counts them
        self.lora_inplace_move = persistence.InplaceMarks()  # in-place adapters: what W holds, for state dicts
        self.delta_counted: dict[str, tuple] = {}  # updater without optimizer: factor copies at the last count
        self.delta_settings: dict[str, DeltaSettings] = {}
        self.delta_records: dict[str, invariant.Record] = {}  # in-place mode: what W holds, per adapter (not saved)
        self.delta_anchored: dict[str, bool] = {}  # the flags' values, read only when they may have changed
        self.delta_driven = False  # set by an updater: someone anchors this layer's adapters
        self._delta_warned = False
        self.other_param_names = (*self.other_param_names, *self.delta_param_names)  # delete_adapter, .to()
        self.register_state_dict_pre_hook(persistence.before_state_dict)
        self.register_state_dict_post_hook(persistence.after_state_dict)
        self.register_load_state_dict_pre_hook(persistence.before_load)
        self.register_load_state_dict_post_hook(persistence.after_load)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("config")
        if not hasattr(config, "update_ratio"):  # PEFT's LoraModel adding a plain LoRA adapter to this layer
            raise ValueError(
                f"Cannot add the plain LoRA adapter '{adapter_name}' ({type(config).__name__}) to a layer that holds "
                f"the Delta-LoRA adapter(s) {', '.join(self.delta_settings)}: one layer holds adapters of one PEFT "
                "type. Nothing was added to this layer. Export the Delta-LoRA adapter as a plain LoRA with "
                "deltalora_hf.export_lora(model, path) and load both as LoRA, or load the LoRA adapter into a model "
                "without Delta-LoRA adapters (model.unload() gives the original base)."
            )
        self._init_delta_state()
        super().update_layer(adapter_name, *args, **kwargs)
        self.delta_settings[adapter_name] = DeltaSettings.of(config)
        a, b = self.lora_factors(adapter_name)
        # On W's device even when the factors are created on "meta" (low_cpu_mem_usage), then filled by the load.
        device = self.get_base_layer().weight.device
        self.lora_anchor_A[adapter_name] = torch.zeros(a.shape, dtype=a.dtype, device=device)
        self.lora_anchor_B[adapter_name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        self.lora_anchored[adapter_name] = torch.zeros(1, dtype=a.dtype, device=device)
        self.lora_warmup_steps[adapter_name] = torch.zeros(1, dtype=torch.int64, device=device)
        if self.delta_settings[adapter_name].in_place:
            self.lora_inplace_move[adapter_name] = persistence.mark(0.0, device)
        self.delta_anchored[adapter_name] = False
        self._delta_state.touch()

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): new tensors everywhere
        result = super()._apply(fn, recurse)
        for record in self.__dict__.get("delta_records", {}).values():  # the records' copies follow
            record.a, record.b, record.a_k, record.b_k = (fn(t) for t in record.tensors())
        self._delta_state.touch()
        return result

    # -- what each layer type defines -----------------------------------------------------------------------

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of an adapter as ``r x k`` and ``d x r`` tensors such that ``delta W = s * B @ A``."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def lora_factor_keys(self, adapter_name: str) -> tuple[str, str]:
        """The state-dict keys of ``lora_factors`` relative to the layer."""
        return f"lora_A.{adapter_name}.weight", f"lora_B.{adapter_name}.weight"

    def live_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """The adapter's ``(A, B, A_K, B_K, flag)`` as registered now, looked up in the modules' own dicts (the
        forward check runs this on every call: no ``nn.Module.__getattr__``). Raises ``KeyError`` if one is gone."""
        modules = self._modules
        return (
            modules["lora_A"]._modules[adapter]._parameters["weight"],
            modules["lora_B"]._modules[adapter]._parameters["weight"],
            modules["lora_anchor_A"]._modules[adapter]._buffers["weight"],
            modules["lora_anchor_B"]._modules[adapter]._buffers["weight"],
            modules["lora_anchored"]._modules[adapter]._buffers["weight"],
        )

    @property
    def weight_is_transposed(self) -> bool:
        """True where the base weight is stored as ``k x d`` (Conv1D / fan_in_fan_out, Embedding)."""
        return bool(getattr(self, "fan_in_fan_out", False))

    def _factor_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A x`` for this layer type (no scale)."""
        x = self._cast_input_dtype(x, a.dtype)
        return F.linear(F.linear(x, a), b)

    # -- anchors ------------------------------------------------------------------------------------------------

    def is_anchored(self, adapter_name: str) -> bool:
        """Whether W moves for this adapter (its anchors are recorded)."""
        return self.delta_anchored.get(adapter_name, False)

    def set_anchor(self, adapter_name: str) -> None:
        """Record ``(A_K, B_K)``: the adapter's current factors, from which W starts to move (move = 0 now)."""
        if self.delta_settings[adapter_name].in_place:
            check_writable_base(self.get_base_layer(), f"a layer of adapter '{adapter_name}'")
        with torch.no_grad(), gathered(*self.lora_factors(adapter_name)) as (a, b):
            for store, value in ((self.lora_anchor_A, a), (self.lora_anchor_B, b)):  # buffers: never partitioned
                anchor = store[adapter_name]
                if anchor.dtype != value.dtype or anchor.shape != value.shape:
                    store[adapter_name] = torch.zeros_like(value, device=anchor.device)  # in the factors' dtype
                store[adapter_name].copy_(value)
            self.lora_anchored[adapter_name].fill_(1.0)
        self.delta_anchored[adapter_name] = True
        self._delta_state.touch()

    def copy_anchors(self, source: str, target: str) -> None:
        """Give adapter ``target`` the anchors and flag of adapter ``source`` (see ``adopt_copied_anchors``)."""
        with torch.no_grad():
            for store in (self.lora_anchor_A, self.lora_anchor_B, self.lora_anchored, self.lora_warmup_steps):
                if store[target].shape != store[source].shape or store[target].dtype != store[source].dtype:
                    store[target] = torch.zeros_like(store[source])
                store[target].copy_(store[source])
        self.delta_anchored[target] = self.delta_anchored.get(source, False)
        self._delta_state.touch()

    def move_scale(self, adapter_name: str) -> float:
        """``lambda * s``: the factor of ``B A - B_K A_K`` in the change of W."""
        return self.delta_settings[adapter_name].update_ratio * self.scaling[adapter_name]

    def has_moved(self, adapter_name: str) -> bool:
        """THE predicate: whether this adapter's W has moved (lambda != 0 and anchored), in either mode, so that the
        adapter is more than LoRA's ``s B A``."""
        settings = self.delta_settings.get(adapter_name)
        return settings is not None and settings.update_ratio != 0.0 and self.is_anchored(adapter_name)

    def is_partitioned(self) -> bool:
        """Whether W or a factor is split across ranks (ZeRO-3, FSDP2)."""
        factors = (t for a in self.delta_settings for t in self.lora_factors(a))
        return is_partitioned(self.get_base_layer().weight) or any(is_partitioned(t) for t in factors)

    def has_meta_tensors(self) -> bool:
        """Whether some adapter tensor is still on "meta" (created empty, e.g. low_cpu_mem_usage, not loaded yet)."""
        return any(t.is_meta for a in self.delta_settings for t in invariant.live_tensors(self, a))

    # -- the invariant (see deltalora_hf.invariant) -------------------------------------------------------------

    def applied_adapters(self, adapters: Iterable[str] | None = None) -> list[str]:
        """Of ``adapters`` (default: the active ones, the merged ones while merged), those whose move W must hold:
        anchored in-place adapters with lambda != 0."""
        if adapters is None:
            adapters = self.merged_adapters if self.merged else self.active_adapters
        settings = self.delta_settings
        return [a for a in adapters if a in settings and settings[a].in_place and self.has_moved(a)]

    def sync_base_weight(
        self, *, applied: Iterable[str] | None = None, generator: torch.Generator | None = None
    ) -> int:
        """Bring W to the invariant by value (for ``applied`` adapters, default: applied_adapters()); return the
        number of W writes."""
        return len(invariant.sync_layers([self], generator_for=lambda _: generator, applied=applied).written)

    def _ensure_synced(self) -> None:
        """The forward's check: O(1) unless something changed (see ``SyncState``)."""
        state = self._delta_state
        if state.unchanged(self):
            return
        if state.partitioned or self.is_partitioned():
            # ZeRO-3 and FSDP2 swap whole copies of partitioned tensors in around every forward (a write there would
            # be lost): the updater and the entry points sync these layers, outside the forward
            return
        self.sync_base_weight()  # by value: whatever changed (a loader may have replaced factors, anchors and flags)

    # -- entry points ---------------------------------------------------------------------------------------------

    def match_anchor_dtypes(self, adapter: str) -> None:
        """Keep the anchors and the flag in their factors' dtype (PEFT casts the factors after creating them)."""
        a, b = self.lora_factors(adapter)
        for store, like in ((self.lora_anchor_A, a), (self.lora_anchor_B, b), (self.lora_anchored, a)):
            anchor = store[adapter]
            if anchor.dtype != like.dtype and like.dtype.is_floating_point:
                store[adapter] = anchor.to(like.dtype)
                self._delta_state.touch()

    def set_adapter(self, adapter_names: str | list[str], *args: Any, **kwargs: Any) -> None:
        super().set_adapter(adapter_names, *args, **kwargs)
        self._delta_state.touch()  # synced by the model's set_adapter, or at this layer's next forward

    def delete_adapter(self, adapter_name: str) -> None:
        keep = [a for a in self.applied_adapters() if a != adapter_name]
        self.sync_base_weight(applied=keep)  # take its move out of W before its factors are gone
        super().delete_adapter(adapter_name)
        self.sync_base_weight()  # PEFT may have activated another adapter

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = lora_layer.check_adapters_to_merge(self, adapter_names)
        if names and torch.nn.utils.parametrize.is_parametrized(self.get_base_layer(), "weight"):
            # merging writes W in both modes: refused, before anything changes, where the write would be lost
            check_writable_base(self.get_base_layer(), f"a layer of adapter(s) {', '.join(names)} (merge)")
            self.sync_base_weight(applied=self.applied_adapters([*self.merged_adapters, *names]))
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        invariant.mark_synced(self)

    def unmerge(self) -> None:
        super().unmerge()
        self.sync_base_weight()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's check before ``convert_to_lora``/``save_as_lora``: False for an in-place adapter whose W has moved,
        whose trained model is not ``W + get_delta_weight`` on the original base (use ``export_lora``)."""
        if self.delta_settings[adapter_name].in_place and self.has_moved(adapter_name):
            warnings.warn(
                f"Delta-LoRA: adapter '{adapter_name}' (base_update='inplace') has moved W, so PEFT's LoRA conversion "
                "would miss the move. Use deltalora_hf.export_lora(model, path), which writes the trained model as "
                "an exact rank-2r LoRA of the original base.",
                stacklevel=2,
            )
            return False
        return super().supports_lora_conversion(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """LoRA's ``s B A``, plus the telescoped W move in factored mode (so merging gives the trained model)."""
        delta = super().get_delta_weight(adapter)
        if not self.delta_settings[adapter].factored or not self.has_moved(adapter):
            return delta
        a, b = self.lora_factors(adapter)
        u, v = delta_factors(a, b, self.lora_anchor_A[adapter], self.lora_anchor_B[adapter])
        move = self.move_scale(adapter) * (u.float() @ v.float())
        return delta + (move.T if self.weight_is_transposed else move).to(delta.dtype)

    # -- forward ------------------------------------------------------------------------------------------------

    def original_base_weight(self) -> torch.Tensor:
        """A copy of W without the moves it holds: the original base weight (up to rounding in bf16/fp16)."""
        with torch.no_grad():
            weight = self.get_base_layer().weight.detach().clone()
            for record in self.delta_records.values():
                u, v = delta_factors(*record.tensors())
                transposed = self.weight_is_transposed
                functional.add_low_rank_(weight, u, v, -record.scale, transposed=transposed, rounding="nearest")
        return weight

    def _applied_output(self, x: torch.Tensor) -> torch.Tensor | float:
        """``sum over records of lambda s (B_p A_p - B_Kp A_Kp) x``: what the in-place moves add to W x."""
        out: torch.Tensor | float = 0.0
        for record in self.delta_records.values():
            paths = self._factor_path(x, record.a, record.b) - self._factor_path(x, record.a_k, record.b_k)
            out = out + record.scale * paths
        return out

    def _lora_path(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` with the adapter's current factors, through its own modules (so ZeRO-3 gathers them)."""
        return self.lora_B[adapter](self.lora_A[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)))

    def _factored_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(1 + lambda g) s B', -lambda g s B_K]`` and ``[A'; A_K]`` (see ``_adapter_output``), from the live
        tensors. ``g``, the anchored flag, is read as a number where that costs no device sync (on the CPU, in
        eager mode); the gradient scaling is applied only where autograd records the factors."""
        a, b = used_in_forward(self, *self.lora_factors(adapter))
        stores = (self.lora_anchor_A, self.lora_anchor_B, self.lora_anchored)  # buffers: whole on every rank
        a_k, b_k, flag = (_as(store[adapter], a.dtype) for store in stores)
        s, ratio = self.scaling[adapter], self.delta_settings[adapter].update_ratio
        if flag.device.type == "cpu" and not torch.compiler.is_compiling():
            g: torch.Tensor | float = float(flag)
        else:
            g = flag.reshape(())
        grow = 1.0 + ratio * g
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            a, b = scale_grad(a, 1.0 / grow), scale_grad(b, 1.0 / grow)
        return torch.cat([a, a_k], dim=0), torch.cat([b * (s * grow), (-ratio * s * g) * b_k], dim=1)

    def _adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``adapter`` adds to the base output: ``s B A x``, plus the move in factored mode.

        Factored: ``(1 + lambda g) s B A x - lambda g s B_K A_K x`` as ONE rank-2r product,
        ``[(1 + lambda g) s B', -lambda g s B_K] [A'; A_K] x``, where ``A', B'`` are the factors with their gradient
        scaled by ``1 / (1 + lambda g)`` (``scale_grad``): A and B get LoRA's gradients,
        x gets the whole layer's, and no activation-sized tensor is added beyond LoRA's. The rank-2r factors are
        built from the live tensors on every call (two small concatenations): nothing is cached, so no write of
        any kind (``.data`` included) can leave the forward behind.
        """
        if not self.delta_settings[adapter].factored:
            return self.scaling[adapter] * self._lora_path(adapter, x)
        return self._factor_path(x, *self._factored_factors(adapter))

    def _warn_if_not_driven(self) -> None:
        if self.delta_driven or self._delta_warned or not self.training or not torch.is_grad_enabled():
            return
        if any(a in self.delta_settings and self.delta_settings[a].update_ratio != 0.0 for a in self.active_adapters):
            self._delta_warned = True
            warnings.warn(
                "A Delta-LoRA model is training, but no DeltaLoRACallback (Trainer) or DeltaLoraUpdater (custom "
                "loop) is attached: adapters that are not anchored yet never start to move W, which is plain LoRA. "
                "Pass callbacks=[DeltaLoRACallback()] to the Trainer, or call DeltaLoraUpdater(model).step() after "
                "each optimizer.step().",
                stacklevel=3,
            )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._ensure_synced()
            self._warn_if_not_driven()
        if kwargs.get("adapter_names") is not None:
            moved = [a for a in self.delta_settings if self.has_moved(a)]
            if moved:
                raise ValueError(
                    "adapter_names (mixed-batch inference) is not supported with Delta-LoRA adapters whose W has "
                    f"moved ({', '.join(moved)}); run one adapter at a time (set_adapter) or merge it."
                )
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            result = super().forward(x, *args, **kwargs)  # W x: take the applied moves out to get the ORIGINAL base
            return result - self._applied_output(x).to(result.dtype) if self.delta_records else result
        if self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.delta_settings:
                out = self._adapter_output(adapter, x)
                result = result + (out if out.dtype == dtype else out.to(dtype))
        return result


class Linear(DeltaLoraLayer, lora_layer.Linear):
    """Delta-LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)


class Embedding(DeltaLoraLayer, lora_layer.Embedding):
    """Delta-LoRA on ``nn.Embedding``; the weight is ``num_embeddings x dim``, i.e. transposed."""

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def lora_factor_keys(self, adapter_name: str) -> tuple[str, str]:
        return f"lora_embedding_A.{adapter_name}", f"lora_embedding_B.{adapter_name}"

    def live_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        modules = self._modules
        return (
            modules["lora_embedding_A"]._parameters[adapter],
            modules["lora_embedding_B"]._parameters[adapter],
            modules["lora_anchor_A"]._modules[adapter]._buffers["weight"],
            modules["lora_anchor_B"]._modules[adapter]._buffers["weight"],
            modules["lora_anchored"]._modules[adapter]._buffers["weight"],
        )

    @property
    def weight_is_transposed(self) -> bool:
        return True

    def _lora_path(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        # the factors are parameters of no submodule with a forward: ZeRO-3 must be told to gather them with this one
        return self._factor_path(x, *used_in_forward(self, *self.lora_factors(adapter)))

    def _factor_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self._embed(x, a.T) @ b.T
        embed_scale = self._get_embed_scale()
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)
