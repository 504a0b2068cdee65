r"""Delta-LoRA layers: PEFT's LoRA layers plus the state that ties the base weight W to the adapters.

Per adapter (dropout is forced off by the config) a layer keeps:

* ``lora_anchor_A`` / ``lora_anchor_B`` and the flag ``lora_anchored`` (saved with the adapter): the factors
  ``(A_K, B_K)`` when W started to move. The W updates telescope, so an anchored adapter's whole change of W is
  its *move* ``lambda * s * (B A - B_K A_K)``.
* in ``"inplace"`` mode, the *applied record* (not saved): ``lora_applied_A`` / ``lora_applied_B``, copies of the
  factors whose move W holds right now (what the next update starts from: the factor cache of Algorithm 1), and
  references to the anchor tensors that move was taken with.

**The invariant** (in-place mode), for every layer at every point where W is used::

    W == W_0 + sum over the in-place adapters a in applied(layer) of  lambda_a * s_a * (B_a A_a - B_Ka A_Ka)

where ``applied`` is the set of anchored in-place adapters that are active (the merged ones while merged), and
``(A, B, A_K, B_K)`` are the adapter's CURRENT tensors. :meth:`DeltaLoraLayer.sync_base_weight` restores it from
any state: it moves W from the applied record to the current factors, as rank-2r updates, and is idempotent. An
optimizer step followed by a sync is exactly Algorithm 1 of the paper; a loaded, added, deleted or (de)activated
adapter, a new run, a merge or an unload are all the same operation. It runs after every optimizer step (the
updater), after every ``load_state_dict``, before every ``state_dict``, on adapter changes, and, in eager mode,
at the start of the forward pass whenever the layer's tensors are not the ones (identity and version counter)
it last synced, so that a loader that assigns tensors directly still ends right. Under ``torch.compile`` that
check is skipped (it would break the graph); the updater and the entry points still sync.

In ``"factored"`` mode W is never written; the forward pass adds the move, which needs only one ``B A x``:
``s (1 + lambda g) B' A' x - lambda s B_K A_K x`` with ``g = anchored`` and ``A', B'`` the factors with their
gradient scaled by ``1 / (1 + lambda g)``: the value and the gradients of x, A and B are those of a moved W plus
LoRA. With adapters disabled the output is the ORIGINAL base model's in both modes.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._distributed import (
    add_low_rank_,
    check_writable_in_place,
    full_values,
    gathered,
    is_partitioned,
    used_in_forward,
)
from .config import BaseUpdate
from .functional import (
    Rounding,
    default_generator,
    delta_factors,
    low_rank_frobenius_sq,
    scale_grad,
)

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be changed outside it)
        return -1


@dataclass
class BaseMove:
    """One planned change of W: ``W += alpha * U @ V``, after which ``record`` is what W holds for ``adapter``.

    ``square`` is ``||alpha U V||_F^2`` as a 0-dim tensor (read for all moves of a step with one host sync).
    ``incremental`` moves take W from the applied factors to the current ones; when their square is exactly 0
    the factors did not change (or the change underflows), so W and the record stay as they are.
    """

    layer: DeltaLoraLayer
    adapter: str
    u: torch.Tensor
    v: torch.Tensor
    alpha: float
    record: tuple[torch.Tensor, ...] | None
    incremental: bool
    square: torch.Tensor


class DeltaLoraLayer:
    """Mixin for a LoRA layer that carries Delta-LoRA's anchors and keeps W in step with them."""

    delta_param_names: tuple[str, ...] = (
        "lora_anchor_A",
        "lora_anchor_B",
        "lora_anchored",
        "lora_applied_A",
        "lora_applied_B",
        "delta_update_ratio",
        "delta_base_update",
        "delta_start_step",
        "delta_rounding",
        "delta_applied_scale",
        "delta_applied_anchors",
    )

    # -- setup --------------------------------------------------------------------------------------------

    def _init_delta_state(self) -> None:
        if hasattr(self, "lora_anchored"):
            return
        self.lora_anchor_A = BufferDict(persistent=True)
        self.lora_anchor_B = BufferDict(persistent=True)
        self.lora_anchored = BufferDict(persistent=True)
        self.lora_applied_A = BufferDict(persistent=False)
        self.lora_applied_B = BufferDict(persistent=False)
        self.delta_update_ratio: dict[str, float] = {}
        self.delta_base_update: dict[str, BaseUpdate] = {}
        self.delta_start_step: dict[str, int] = {}
        self.delta_rounding: dict[str, Rounding] = {}
        self.delta_applied_scale: dict[str, float] = {}
        # the anchor tensors of the applied move: references to the live anchors, not copies (see _snapshot_anchors)
        self.delta_applied_anchors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._delta_seen: tuple | None = None  # what the last sync saw; see _is_synced
        self._delta_partitioned = False  # W was partitioned at the last sync; see _ensure_synced
        self._anchored_cache: dict[str, tuple[weakref.ref, bool]] = {}
        self.delta_driven = False  # set by an updater: someone anchors this layer's adapters
        self._delta_warned = False
        self.other_param_names = (*self.other_param_names, *self.delta_param_names)  # delete_adapter, .to()
        self.register_state_dict_pre_hook(DeltaLoraLayer._sync_before_state_dict)
        self.register_load_state_dict_pre_hook(DeltaLoraLayer._note_loaded_keys)
        self.register_load_state_dict_post_hook(DeltaLoraLayer._sync_after_load)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._init_delta_state()
        super().update_layer(adapter_name, *args, **kwargs)
        config = kwargs["config"]
        self.delta_update_ratio[adapter_name] = float(config.update_ratio)
        self.delta_base_update[adapter_name] = config.base_update
        self.delta_start_step[adapter_name] = int(config.start_step)
        self.delta_rounding[adapter_name] = config.base_update_rounding
        a, b = self.lora_factors(adapter_name)
        # On W's device even when the factors are created on "meta" (low_cpu_mem_usage): PEFT moves the adapter's
        # modules to W's device unless they hold meta *parameters*, and these are buffers.
        device = self.get_base_layer().weight.device
        self.lora_anchor_A[adapter_name] = torch.zeros(a.shape, dtype=a.dtype, device=device)
        self.lora_anchor_B[adapter_name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        self.lora_anchored[adapter_name] = torch.zeros((), dtype=torch.bool, device=device)
        self._delta_seen = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # the sync bookkeeping holds weak references: start afresh after unpickling
        state["_delta_seen"], state["_anchored_cache"] = None, {}
        return state

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

    # -- anchors ------------------------------------------------------------------------------------------------

    def is_anchored(self, adapter_name: str) -> bool:
        """Whether W moves for this adapter (its anchors are recorded). Read from the tensor only when it changed."""
        flag = self.lora_anchored[adapter_name]
        cached = self._anchored_cache.get(adapter_name)
        if cached is None or cached[0]() is not flag:
            cached = (weakref.ref(flag), bool(flag))
            self._anchored_cache[adapter_name] = cached
        return cached[1]

    def set_anchor(self, adapter_name: str) -> None:
        """Record ``(A_K, B_K)``: the adapter's current factors, from which W starts to move (move = 0 now)."""
        if self._moves_w(adapter_name):
            check_writable_in_place(self.get_base_layer().weight, f"a layer of adapter '{adapter_name}'")
        with torch.no_grad(), gathered(*self.lora_factors(adapter_name)) as (a, b):
            self.lora_anchor_A[adapter_name].copy_(a)
            self.lora_anchor_B[adapter_name].copy_(b)
            self.lora_anchored[adapter_name].fill_(True)
        self._anchored_cache[adapter_name] = (weakref.ref(self.lora_anchored[adapter_name]), True)

    def move_scale(self, adapter_name: str) -> float:
        """``lambda * s``: the factor of ``B A - B_K A_K`` in the change of W."""
        return self.delta_update_ratio[adapter_name] * self.scaling[adapter_name]

    def _moves_w(self, adapter: str) -> bool:
        """Whether this adapter's move lives in W (in-place mode, lambda != 0)."""
        return self.delta_base_update.get(adapter) == "inplace" and self.delta_update_ratio.get(adapter, 0.0) != 0.0

    def _factored(self, adapter: str) -> bool:
        return self.delta_base_update.get(adapter) == "factored" and self.delta_update_ratio.get(adapter, 0.0) != 0.0

    # -- the invariant ----------------------------------------------------------------------------------------

    def applied_adapters(self, adapters: Iterable[str] | None = None) -> list[str]:
        """Of ``adapters`` (default: the active ones, the merged ones while merged), those whose move W must hold:
        anchored in-place adapters with lambda != 0."""
        if adapters is None:
            adapters = self.merged_adapters if self.merged else self.active_adapters
        return [a for a in adapters if self._moves_w(a) and self.is_anchored(a)]

    def _tracked(self) -> tuple[tuple, list[torch.Tensor], list[torch.Tensor]]:
        """What the invariant depends on: plain values, tensors compared by identity + version, by identity only.

        Anchors and flags are compared by identity only: they change in place only through our own code and
        ``load_state_dict`` (both sync), while DDP rewrites buffers in place on every forward pass.
        """
        adapters = [a for a in self.delta_base_update if self._moves_w(a)]
        values = (tuple(self.active_adapters), tuple(self.merged_adapters))
        values += tuple((a, self.move_scale(a)) for a in adapters)
        versioned = [t for a in adapters for t in self.lora_factors(a)] + [self.get_base_layer().weight]
        identity = [t for a in adapters for t in (self.lora_anchor_A[a], self.lora_anchor_B[a], self.lora_anchored[a])]
        return values, versioned, identity

    def _record_synced(self) -> None:
        self._delta_partitioned = is_partitioned(self.get_base_layer().weight)
        values, versioned, identity = self._tracked()
        self._delta_seen = (
            values,
            [(weakref.ref(t), _version(t)) for t in versioned],
            [weakref.ref(t) for t in identity],
        )

    def _is_synced(self) -> bool:
        """Cheap (no tensor read): are the tracked tensors the ones, unchanged, that the last sync left?"""
        seen = self._delta_seen
        if seen is None:
            return False
        values, versioned, identity = self._tracked()
        if values != seen[0] or len(versioned) != len(seen[1]) or len(identity) != len(seen[2]):
            return False
        return all(ref() is t and v == _version(t) for (ref, v), t in zip(seen[1], versioned)) and all(
            ref() is t for ref, t in zip(seen[2], identity)
        )

    def _current_record(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """``(A, B, A_K, B_K)`` now: what the applied record becomes once W holds this adapter's move."""
        a, b = (t.detach() for t in full_values(*self.lora_factors(adapter)))
        return a, b, self.lora_anchor_A[adapter], self.lora_anchor_B[adapter]

    def _applied_record(self, adapter: str) -> tuple[torch.Tensor, ...] | None:
        if adapter not in self.lora_applied_A:
            return None
        return (self.lora_applied_A[adapter], self.lora_applied_B[adapter], *self.delta_applied_anchors[adapter])

    def _same_anchors(self, adapter: str, record: tuple[torch.Tensor, ...]) -> bool:
        """Whether the applied move was taken with the current anchors.

        The record holds the anchor tensors themselves. They are written in place only by ``load_state_dict``
        (which snapshots the record first, see :meth:`_snapshot_anchors`) and by DDP's buffer broadcast (same
        values); a loader that assigns new tensors leaves the old ones here, so their values can be compared.
        """
        anchors = (self.lora_anchor_A[adapter], self.lora_anchor_B[adapter])
        if record[2] is anchors[0] and record[3] is anchors[1]:
            return True
        return all(torch.equal(old.to(new), new) for old, new in zip(record[2:], anchors))

    def plan_base_moves(self, *, applied: Iterable[str] | None = None) -> list[BaseMove]:
        """The moves that bring W to the invariant (for the adapters in ``applied``, default: applied_adapters())."""
        target = list(self.applied_adapters() if applied is None else applied)
        moves: list[BaseMove] = []
        for adapter in dict.fromkeys([*self.lora_applied_A.keys(), *target]):
            record = self._applied_record(adapter)
            if adapter in target:
                new = a, b, a_k, b_k = self._current_record(adapter)
                scale = self.move_scale(adapter)
                if record is not None and self.delta_applied_scale[adapter] == scale:
                    if self._same_anchors(adapter, record):
                        moves.append(self._move(adapter, a, b, record[0], record[1], scale, new, incremental=True))
                        continue
                if record is not None:  # other anchors or scale: take the old move out, then put the new one in
                    moves.append(self._removal(adapter, record))
                moves.append(self._move(adapter, a, b, a_k, b_k, scale, new, incremental=False))
            elif record is not None:
                moves.append(self._removal(adapter, record))
        return moves

    def _move(self, adapter, a, b, a_old, b_old, scale, record, incremental) -> BaseMove:
        u, v = delta_factors(a, b, a_old, b_old)
        square = low_rank_frobenius_sq(u, v) * scale**2
        return BaseMove(self, adapter, u, v, scale, record, incremental, square)

    def _removal(self, adapter: str, record: tuple[torch.Tensor, ...]) -> BaseMove:
        scale = self.delta_applied_scale[adapter]
        return self._move(adapter, record[2], record[3], record[0], record[1], scale, None, incremental=False)

    def apply_base_move(self, move: BaseMove, square: float, *, generator: torch.Generator | None = None) -> bool:
        """Carry out a planned move given its squared norm; return whether W was written."""
        if move.incremental and square == 0.0:
            return False  # nothing changed: W and the record stay
        if not math.isfinite(square):
            warnings.warn(
                f"Delta-LoRA: the W update of a layer for adapter '{move.adapter}' is not finite; skipped, W "
                "untouched (it is retried when the factors change).",
                stacklevel=3,
            )
            return False
        written = square != 0.0
        if written:
            weight = self.get_base_layer().weight
            check_writable_in_place(weight, f"a layer of adapter '{move.adapter}'")
            add_low_rank_(
                weight,
                move.u,
                move.v,
                move.alpha,
                transposed=self.weight_is_transposed,
                rounding=self.delta_rounding[move.adapter],
                generator=generator if generator is not None else default_generator(weight.device),
            )
        self._set_record(move.adapter, move.record, move.alpha)
        return written

    def _set_record(self, adapter: str, record: tuple[torch.Tensor, ...] | None, scale: float) -> None:
        stores = (self.lora_applied_A, self.lora_applied_B)
        if record is None:
            for store in stores:
                if adapter in store:
                    del store[adapter]
            self.delta_applied_scale.pop(adapter, None)
            self.delta_applied_anchors.pop(adapter, None)
            return
        self.delta_applied_anchors[adapter] = (record[2], record[3])
        for store, value in zip(stores, record[:2]):
            old = store[adapter] if adapter in store else None
            if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
                old.copy_(value)
            else:
                store[adapter] = value.detach().clone()
        self.delta_applied_scale[adapter] = scale

    def sync_base_weight(
        self, *, applied: Iterable[str] | None = None, generator: torch.Generator | None = None
    ) -> int:
        """Bring W to the invariant (for ``applied`` adapters, default: applied_adapters()); return W writes."""
        return len(sync_layers([self], generator_for=lambda _: generator, applied=applied).written)

    def _ensure_synced(self) -> None:
        if not self.lora_applied_A and not any(self._moves_w(a) for a in self.delta_base_update):
            return  # no in-place adapter: W is the original base weight
        if self._delta_partitioned or is_partitioned(self.get_base_layer().weight):
            # ZeRO-3 swaps the data of partitioned tensors around every forward, FSDP2 swaps in a whole copy of W that
            # is dropped after it (a write there would be lost): the updater syncs the partitions
            return
        if not self._is_synced():
            self.sync_base_weight()

    # -- entry points ---------------------------------------------------------------------------------------------

    @staticmethod
    def _sync_before_state_dict(module: DeltaLoraLayer, prefix: str, keep_vars: bool) -> None:
        module._ensure_synced()  # a saved W must be the W the saved factors describe

    @staticmethod
    def _note_loaded_keys(module: DeltaLoraLayer, state_dict, prefix: str, *args: Any) -> None:
        module._loads_base_weight = f"{prefix}base_layer.weight" in state_dict
        module._snapshot_anchors()

    def _snapshot_anchors(self) -> None:
        """Copy the applied record's anchors before a load may overwrite the live anchor tensors in place."""
        for adapter, anchors in self.delta_applied_anchors.items():
            self.delta_applied_anchors[adapter] = tuple(t.detach().clone() for t in anchors)

    @staticmethod
    def _sync_after_load(module: DeltaLoraLayer, incompatible_keys: Any) -> None:
        if module.__dict__.pop("_loads_base_weight", False):
            # W itself was loaded (e.g. PEFT's save_embedding_layers): it was saved synced, so it already holds the
            # moves of the loaded factors. Record that instead of moving it.
            with torch.no_grad():
                for adapter in list(module.lora_applied_A.keys()):
                    module._set_record(adapter, None, 0.0)
                for adapter in module.applied_adapters():
                    module._set_record(adapter, module._current_record(adapter), module.move_scale(adapter))
            module._anchored_cache.clear()
            module._record_synced()
            return
        module._anchored_cache.clear()
        module.sync_base_weight()

    def set_adapter(self, adapter_names: str | list[str], *args: Any, **kwargs: Any) -> None:
        super().set_adapter(adapter_names, *args, **kwargs)
        self.sync_base_weight()

    def delete_adapter(self, adapter_name: str) -> None:
        keep = [a for a in self.applied_adapters() if a != adapter_name]
        self.sync_base_weight(applied=keep)  # take its move out of W before its factors are gone
        super().delete_adapter(adapter_name)
        self._anchored_cache.pop(adapter_name, None)
        self.sync_base_weight()  # PEFT may have activated another adapter

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = lora_layer.check_adapters_to_merge(self, adapter_names)
        if names:
            self.sync_base_weight(applied=self.applied_adapters([*self.merged_adapters, *names]))
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self._record_synced()

    def unmerge(self) -> None:
        super().unmerge()
        self.sync_base_weight()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """LoRA's ``s B A``, plus the telescoped W move in factored mode (so merging gives the trained model)."""
        delta = super().get_delta_weight(adapter)
        if not self._factored(adapter) or not self.is_anchored(adapter):
            return delta
        a, b = self.lora_factors(adapter)
        u, v = delta_factors(a, b, self.lora_anchor_A[adapter], self.lora_anchor_B[adapter])
        move = self.move_scale(adapter) * (u.float() @ v.float())
        return delta + (move.T if self.weight_is_transposed else move).to(delta.dtype)

    # -- forward ------------------------------------------------------------------------------------------------

    def _applied_output(self, x: torch.Tensor) -> torch.Tensor | float:
        """``sum over applied records of lambda s (B_p A_p - B_Kp A_Kp) x``: what the in-place moves add to W x."""
        out: torch.Tensor | float = 0.0
        for adapter in self.lora_applied_A.keys():
            a, b, a_k, b_k = self._applied_record(adapter)
            scale = self.delta_applied_scale[adapter]
            out = out + scale * (self._factor_path(x, a, b) - self._factor_path(x, a_k, b_k))
        return out

    def _lora_path(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` with the adapter's current factors, through its own modules (so ZeRO-3 gathers them)."""
        return self.lora_B[adapter](self.lora_A[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)))

    def _adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``adapter`` adds to the base output: ``s B A x``, plus the move in factored mode.

        Factored: ``(1 + lambda g) s B A x - lambda s B_K A_K x`` as ONE rank-2r product,
        ``[(1 + lambda g) s B', -lambda s B_K] [A'; A_K] x``, where ``A', B'`` are the factors with their gradient
        scaled by ``1 / (1 + lambda g)`` (:func:`~deltalora_hf.functional.scale_grad`): A and B get LoRA's gradients,
        x gets the whole layer's, and no activation-sized tensor is added beyond LoRA's.
        """
        s = self.scaling[adapter]
        if not self._factored(adapter):
            return s * self._lora_path(adapter, x)
        a, b = used_in_forward(self, *self.lora_factors(adapter))
        ratio = self.delta_update_ratio[adapter]
        grow = 1.0 + ratio * self.lora_anchored[adapter].to(a.dtype)
        a_cat = torch.cat([scale_grad(a, 1.0 / grow), self.lora_anchor_A[adapter].to(a.dtype)], dim=0)
        b_moving = scale_grad(b, 1.0 / grow) * (s * grow).to(b.dtype)
        b_cat = torch.cat([b_moving, (-ratio * s) * self.lora_anchor_B[adapter].to(b.dtype)], dim=1)
        return self._factor_path(x, a_cat, b_cat)

    def _warn_if_not_driven(self) -> None:
        if self.delta_driven or self._delta_warned or not self.training or not torch.is_grad_enabled():
            return
        if any(self.delta_update_ratio.get(a, 0.0) != 0.0 for a in self.active_adapters):
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
            moved = [a for a in self.delta_base_update if self.delta_update_ratio[a] != 0 and self.is_anchored(a)]
            if moved:
                raise ValueError(
                    "adapter_names (mixed-batch inference) is not supported with Delta-LoRA adapters whose W has "
                    f"moved ({', '.join(moved)}); run one adapter at a time (set_adapter) or merge it."
                )
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            result = super().forward(x, *args, **kwargs)  # W x: take the applied moves out to get the ORIGINAL base
            return result - self._applied_output(x).to(result.dtype) if len(self.lora_applied_A) else result
        if self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.delta_base_update:
                result = result + self._adapter_output(adapter, x).to(dtype)
        return result


@dataclass
class SyncResult:
    """What :func:`sync_layers` did: the moves that wrote W, their total squared norm, the non-finite ones skipped."""

    written: list[BaseMove]
    norm_sq: float
    skipped_nonfinite: int


def sync_layers(
    layers: Iterable[DeltaLoraLayer],
    *,
    generator_for: Callable[[DeltaLoraLayer], torch.Generator | None] = lambda _: None,
    applied: Iterable[str] | None = None,
) -> SyncResult:
    """Bring every layer's W to its invariant, reading the norms of all planned moves with ONE host sync.

    The one code path of every W change; the update after an optimizer step is this call (see the updater).
    """
    layers = list(layers)
    with torch.no_grad(), torch.inference_mode(False):
        moves = [move for layer in layers for move in layer.plan_base_moves(applied=applied)]
        squares = torch.stack([m.square for m in moves]).tolist() if moves else []
        wrote = [m.layer.apply_base_move(m, sq, generator=generator_for(m.layer)) for m, sq in zip(moves, squares)]
    for layer in layers:
        layer._record_synced()
    return SyncResult(
        written=[m for m, w in zip(moves, wrote) if w],
        norm_sq=sum(sq for sq, w in zip(squares, wrote) if w),
        skipped_nonfinite=sum(not math.isfinite(sq) for sq in squares),
    )


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

    def _lora_path(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        # the factors are parameters of no submodule with a forward: ZeRO-3 must be told to gather them with this one
        return self._factor_path(x, *used_in_forward(self, *self.lora_factors(adapter)))

    def _factor_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self._embed(x, a.T) @ b.T
        embed_scale = self._get_embed_scale()
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def __repr__(self) -> str:
        return "deltalora." + nn.Module.__repr__(self)
