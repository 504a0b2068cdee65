r"""The invariant that ties the base weight W to the adapters, and the one operation that restores it.

**The invariant** (``base_update="inplace"``), for every Delta-LoRA layer, wherever W is used::

    W == W_0 + sum over a in applied(layer) of  lambda_a * s_a * (B_a A_a - B_Ka A_Ka)

``applied(layer)``: the anchored in-place adapters with lambda != 0 that are active (the merged ones while merged);
``(A, B, A_K, B_K)`` are the adapter's CURRENT tensors. Each applied adapter has a *record* (not saved): copies of
the ``(A, B, A_K, B_K)`` whose move W holds right now, and the scale it was taken with. ``sync_layers`` moves W
from the records to the current tensors with rank-2r updates and is idempotent. After an optimizer step it is
exactly Algorithm 1 (``W += lambda s (B'A' - BA)``, the record being the factor cache); a load, an added, deleted
or (de)activated adapter, a new run, a merge or an unload are the same operation.

What an adapter is, and how it travels
--------------------------------------
A Delta-LoRA adapter is its factors, its anchors ``(A_K, B_K)``, its anchored flag and, in in-place mode, the move
W holds for it. Other libraries treat an adapter as its *parameters*: TRL builds its DPO/KTO/GRPO/RLOO reference by
copying every parameter named ``.default.`` into a new ``"ref"`` adapter, PEFT's hotswap walks a state dict and
writes through ``.data``, users copy ``p.data``. Three designs were weighed:

1. Anchors and flag as frozen parameters, so that copies by parameter name carry them. Tried, and rejected: many
   frameworks treat frozen parameters as "the base model" and leave them out of what they save. DeepSpeed ZeRO-3's
   consolidated state dict with ``exclude_frozen_parameters=True`` (what Trainer uses for PEFT models) silently
   dropped every anchor from the saved adapter; they would also change PEFT's parameter counts and be partitioned
   by ZeRO-3 and FSDP2 like the factors.
2. **Recognising a copy** (chosen): the anchors and flag stay saved buffers (every framework keeps buffers in its
   state dicts), registered as ``lora_anchor_A.<adapter>.weight`` like the factors (so hotswap finds their layer).
   At the next entry point (``set_adapter``, which is how TRL switches to its reference), an adapter that is not
   anchored but whose factors equal, bit for bit, those of an anchored adapter of the same layer is that adapter's
   copy and takes its anchors and flag (``adopt_copied_anchors``). A fresh adapter cannot match trained
   factors by chance; copying an adapter's parameters means copying the adapter.
3. Refusing: kept for what cannot be exact (``add_weighted_adapter`` over adapters whose W has moved, tensor
   scalings), always before anything is changed, with the fix in the message.

A write through ``.data`` (``p.data.copy_(t)``, ``p.data = t``) bypasses PyTorch's version counter and cannot be
seen when it happens. So the records are private copies that no such write reaches, and every entry point that
reads, saves or changes the model compares by VALUE: ``state_dict`` (a saved model is the model in memory),
``set_adapter``, merging, unloading, loading, exporting. ``state_dict()`` and a change of a layer's ``scaling``
(which PEFT's hotswap makes) also mark the layer for a value check at its next forward, since whoever holds those
tensors may write them through ``.data``. Writing W itself is not supported: W is derived state.

Where the state lives
---------------------
Modules import one way: ``layer`` -> ``persistence`` -> ``invariant`` -> ``functional``/``_distributed``; this
module knows a layer only through the ``DeltaLayer`` protocol below. Names: ``lora_*`` are an adapter's tensors,
saved in its state dict (factors, anchors, flag, warm-up count, in-place mark); ``delta_*`` is what a layer keeps
in memory only (settings, records, the flags' Python values, the warm-up comparison copies); ``_delta_state`` is
its forward check. Per adapter a layer keeps its saved tensors, its ``DeltaSettings`` and, in place, one ``Record``
(private copies, never the live tensors); the layer keeps one ``SyncState``. Factored mode keeps nothing derived:
its forward reads the live tensors on every call, so no write of any kind can leave it behind. The derived state
has ONE rule: every event that version counters cannot see (a load, a ``state_dict`` handed out, a changed
scaling, ``.to()``, new anchors, ``set_adapter``, a step of an updater's optimizer) marks the layer dirty, and a
dirty layer is compared by value at its next forward or entry point; records are trusted by stamp only while the
layer is clean. Nothing is process-wide: an optimizer's steps are counted by a hook on that optimizer alone
(``deltalora_hf.updater``). A write through ``.data`` bumps no version counter: it is seen by the next value check
(an entry point, ``DeltaLoraUpdater.step``/``sync``, or the forward after any dirtying event), not by the forward
check of a clean layer.

Derived state, all of it
------------------------
Each piece, where it is written and read, and what would catch it going stale (the rules of
``tests/test_random_operations.py``, against an independent simulator):

* ``Record`` (in place, per adapter): copies of ``(A, B, A_K, B_K)`` whose move W holds, its scale and the stamps of
  the live tensors. Written by ``set_record`` (a whole move, a load) and ``_copy_records`` (an incremental move);
  converted by the layer's ``_apply`` (``.to()``); read by ``plan``, the disabled forward and
  ``original_base_weight``. Caught: ``.data`` writes to factors and anchors, ``set_anchor``, loads, casts.
* The in-place mark ``lora_inplace_move`` (a float64 buffer): the record's scale, or 0; written only by
  ``set_record``, read by whoever reads the buffers or a state dict. Caught: state-dict round trips, merges.
* ``delta_anchored`` (the flags' Python values): written by ``set_anchor``, ``copy_anchors``, ``refresh_flags``
  (every value check); read by ``is_anchored``. Caught: ``.data`` writes to a flag, loads.
* ``SyncState`` (per layer: dirty, active adapters, merged count): written by ``mark_synced`` and every dirtying
  event (``touch``); read by the forward check and ``plan``. Caught: any rule followed by a forward pass.
* The updater's ``_OptimizerSteps`` (per optimizer: steps taken, per layer and adapter the count last counted) and,
  without an optimizer, ``delta_counted`` (copies of a warming adapter's factors). Caught: pickling, deep copies,
  skipped and lr-0 steps, second updaters, fused optimizers.
* Two one-shot flags of a load in the layer's ``__dict__``: ``_loads_original_base`` (set by the model's adapter
  remap after its last check) and ``_loads_base_weight`` (set by the load pre-hook, popped by the post-hook).

Cost
----
* The update after an optimizer step (``DeltaLoraUpdater``) plans every layer at once: the
  changed records are grouped by shape, the rank-2r factors, their norms and the comparison of the anchors with the
  records' copies come from a handful of batched ops per group, all read with ONE host sync (after one read of the
  flags), and each W gets one fused ``addmm_``. With an optimizer, a step it did not take launches nothing.
  Factored mode never writes W, and its forward builds the rank-2r factors from the live tensors on every call
  (two small concatenations per layer; nothing cached).
* In eager mode each layer's forward runs ``_ensure_synced``: a flag, the
  active adapters, and the identity and version counter of its in-place factors (a few pointer and integer
  comparisons, no tensor read); a value sync only when one of them changed. Under ``torch.compile`` the check is
  skipped (it would break the graph); the updater and the entry points still sync.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._distributed import add_low_rank_, check_writable_base, full_values, is_partitioned
from .functional import default_generator, delta_factors, low_rank_frobenius_sq


class DeltaLayer(Protocol):
    """What this module needs of a Delta-LoRA layer (``deltalora_hf.layer.DeltaLoraLayer``, which imports this
    module, never the other way round): its W, its adapters' tensors and settings, and the state kept here."""

    delta_settings: dict[str, Any]  # adapter -> config.DeltaSettings
    delta_records: dict[str, Record]  # adapter -> what W holds for it (in-place mode)
    lora_anchor_A: Any
    lora_anchor_B: Any
    lora_anchored: Any
    lora_inplace_move: Any  # persistence.InplaceMarks
    delta_anchored: dict[str, bool]
    _delta_state: SyncState
    weight_is_transposed: bool
    merged_adapters: list[str]
    adapter_layer_names: tuple[str, ...]
    _active_adapter: Any

    def get_base_layer(self) -> torch.nn.Module: ...
    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]: ...
    def lora_factor_keys(self, adapter_name: str) -> tuple[str, str]: ...
    def sync_base_weight(self, *, applied: Iterable[str] | None = None) -> int: ...
    def match_anchor_dtypes(self, adapter: str) -> None: ...
    def move_scale(self, adapter_name: str) -> float: ...
    def live_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]: ...
    def is_anchored(self, adapter_name: str) -> bool: ...
    def applied_adapters(self, adapters: Iterable[str] | None = None) -> list[str]: ...
    def copy_anchors(self, source: str, target: str) -> None: ...
    def is_partitioned(self) -> bool: ...
    def has_meta_tensors(self) -> bool: ...


def version(t: torch.Tensor) -> int:
    """A tensor's version counter (-1 for inference tensors, which have none and cannot be changed outside it)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def stamp(tensors: Iterable[torch.Tensor]) -> tuple[tuple[torch.Tensor, int], ...]:
    """Identity and version of each tensor: equal stamps mean no in-place change that PyTorch counts."""
    return tuple((t, version(t)) for t in tensors)


def same_stamp(seen: tuple[tuple[torch.Tensor, int | None], ...], tensors: Iterable[torch.Tensor]) -> bool:
    """Whether ``tensors`` carry the stamps ``seen`` (a version of None: compared by identity only)."""
    return all(t is old and (v is None or version(t) == v) for (old, v), t in zip(seen, tensors))


def adapter_stamp(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, int | None], ...]:
    """Stamps of an adapter's ``(A, B, A_K, B_K, flag)``: the factors by identity and version, the anchors and the
    flag by identity only (they change only through the entry points, while DDP rewrites buffers in place on every
    forward pass)."""
    return (*stamp(tensors[:2]), *((t, None) for t in tensors[2:]))


class SyncState:
    """What a layer's forward check compares with, so that an unchanged layer costs a few pointer comparisons.

    ``dirty`` is set by the events that version counters cannot see (a changed scaling, ``.to()``, a load, new
    anchors, ``set_adapter``, a ``state_dict`` handed out, an optimizer step of an updater's optimizer: fused
    optimizers bump no version counter); otherwise the layer is in step while its active adapters and merged state
    are the ones of its last sync and every record's adapter still has the tensors, at the versions, that the record
    was taken from (``Record.stamp``, the one stamp system). The tensors are looked up anew on every check, so a
    factor module or anchor replaced by another object is a difference. A layer without records has nothing in W
    to keep in step (an adapter that becomes applied does so through an event that marks the layer dirty).
    """

    __slots__ = ("dirty", "active", "merged", "partitioned")

    def __init__(self) -> None:
        self.dirty, self.active, self.merged = True, None, -1
        self.partitioned = False  # W or a factor was split across ranks at the last sync (ZeRO-3, FSDP2)

    def touch(self) -> None:
        self.dirty = True

    def synced(self, layer: DeltaLayer) -> None:
        self.dirty = False
        self.partitioned = layer.is_partitioned()
        self.active, self.merged = layer._active_adapter, len(layer.merged_adapters)

    def unchanged(self, layer: DeltaLayer) -> bool:
        """The forward's check (on every call, so written out flat): the layer's partitioning is the one of its last
        sync (``partitioned``), and the callers skip partitioned layers anyway."""
        if self.dirty or layer._active_adapter is not self.active or len(layer.merged_adapters) != self.merged:
            return False
        for adapter, record in layer.delta_records.items():
            try:
                live = layer.live_tensors(adapter)
            except KeyError:  # a factor, anchor or the adapter itself is gone
                return False
            for (seen, seen_version), tensor in zip(record.stamp, live):
                if tensor is not seen or (seen_version is not None and version(tensor) != seen_version):
                    return False
        return True


@dataclass
class Move:
    """One planned change of W: ``W += alpha * U @ V``; afterwards W holds ``record`` for ``adapter``.

    ``square`` is ``||U V||_F^2`` as a 0-dim tensor (``alpha`` not applied; None where a group holds it), read for
    all moves of a sync with one host sync. An ``incremental`` move takes W from the record to the current factors
    (same anchors and scale); when its square is exactly 0 the factors did not change (or the change underflows):
    W and the record stay. ``oriented``: U and V are already the left and right factors of W as stored.
    """

    layer: DeltaLayer
    adapter: str
    u: torch.Tensor
    v: torch.Tensor
    alpha: float
    record: tuple[torch.Tensor, ...] | None
    incremental: bool
    square: torch.Tensor | None
    oriented: bool = False


@dataclass
class SyncResult:
    """What ``sync_layers`` did: the moves that wrote W, their total squared norm, the non-finite ones skipped."""

    written: list[Move]
    norm_sq: float
    skipped_nonfinite: int


# -- the record -------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """What W holds for one in-place adapter: its move ``scale * (B A - B_K A_K)`` with these tensors.

    ``a``, ``b``, ``a_k``, ``b_k``: private copies, never the adapter's live tensors, so that any write to a live
    tensor (in place, through ``.data``, by a load) is a difference that the next value check sees. ``stamp``: the
    identities and versions of the adapter's live tensors when the record was taken (see ``record_unchanged``).
    """

    a: torch.Tensor
    b: torch.Tensor
    a_k: torch.Tensor
    b_k: torch.Tensor
    scale: float
    stamp: tuple

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a, self.b, self.a_k, self.b_k


def current_tensors(layer: DeltaLayer, adapter: str) -> tuple[torch.Tensor, ...]:
    """``(A, B, A_K, B_K)`` now, whole: what the record becomes once W holds this adapter's move (read under
    ``torch.no_grad``; the record stores copies)."""
    a, b = full_values(*layer.lora_factors(adapter))
    return a, b, layer.lora_anchor_A[adapter], layer.lora_anchor_B[adapter]  # buffers: never partitioned


def live_tensors(layer: DeltaLayer, adapter: str) -> tuple[torch.Tensor, ...]:
    """The adapter's own ``(A, B, A_K, B_K, flag)`` tensors (not gathered), for stamps."""
    return layer.live_tensors(adapter)


def set_record(layer: DeltaLayer, adapter: str, tensors: tuple[torch.Tensor, ...] | None, scale: float) -> None:
    """Record that W holds ``adapter``'s move with ``tensors`` ``(A, B, A_K, B_K)`` at ``scale`` (all four
    copied); None: W holds nothing for it. The adapter's in-place mark follows (``persistence.InplaceMarks``)."""
    if tensors is None:
        layer.delta_records.pop(adapter, None)
    else:
        old = layer.delta_records.get(adapter)
        held = old.tensors() if old is not None else (None,) * 4
        copies = []
        for mine, value in zip(held, tensors):
            if mine is not None and (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device):
                mine.copy_(value)
                copies.append(mine)
            else:
                copies.append(value.detach().clone())
        layer.delta_records[adapter] = Record(*copies, scale, adapter_stamp(live_tensors(layer, adapter)))
    if adapter in layer.lora_inplace_move:
        layer.lora_inplace_move.set_scale(adapter, 0.0 if tensors is None else scale)


def mark_synced(layer: DeltaLayer) -> None:
    """The layer is at its invariant now: its forward check compares with this moment (see ``SyncState``)."""
    layer._delta_state.synced(layer)


def record_unchanged(layer: DeltaLayer, adapter: str, parts: slice = slice(None)) -> bool:
    """Whether the adapter's live tensors (``parts`` of ``(A, B, A_K, B_K, flag)``) are the ones, unchanged, that
    its record was taken from: identities and version counters, no tensor read. Writes that bump no version counter
    (``.data``, fused optimizers) are not seen here: the updater marks its layers dirty after every step of its
    optimizer, and the entry points compare by value.

    Always False for partitioned factors: every rank must then take part in the same gathers.
    """
    record = layer.delta_records.get(adapter)
    if record is None:
        return False
    try:
        live = layer.live_tensors(adapter)
    except KeyError:  # a factor, anchor or the adapter itself is gone
        return False
    return same_stamp(record.stamp[parts], live[parts]) and not is_partitioned(live[0])


# -- planning -------------------------------------------------------------------------------------------------


def _move(layer, adapter, a, b, a_old, b_old, scale, record, incremental) -> Move:
    u, v = delta_factors(a, b, a_old, b_old)
    return Move(layer, adapter, u, v, scale, record, incremental, low_rank_frobenius_sq(u, v))


def _removal(layer: DeltaLayer, adapter: str, record: Record) -> Move:
    """Take the recorded move out of W: ``W -= lambda s (B_p A_p - B_Kp A_Kp)``."""
    return _move(layer, adapter, record.a_k, record.b_k, record.a, record.b, record.scale, None, incremental=False)


def plan(
    layers: list[DeltaLayer], applied: Iterable[str] | None, *, trust_stamps: bool
) -> tuple[list[Move], list[tuple[DeltaLayer, str, tuple[torch.Tensor, ...]]], list[DeltaLayer]]:
    """The moves that bring every layer's W to the invariant for its applied adapters.

    Returns the moves planned one by one (removals, whole moves), the incremental candidates ``(layer, adapter,
    current tensors)``, whose rank-2r factors ``_group_incremental`` builds across layers (and whose anchors it
    compares with the record's copies, by value, in the same host read), and the layers looked at. With
    ``trust_stamps`` a clean layer whose forward check passes is not looked at, and an adapter whose tensors all
    carry their record's stamps is left alone; a layer marked dirty is never trusted.
    """
    moves, incremental, visited = [], [], []
    for layer in layers:
        state = layer._delta_state
        trust = trust_stamps and not state.dirty
        if trust and applied is None and not state.partitioned and state.unchanged(layer):
            continue  # no event, the same factors at the same versions since its last sync
        if state.dirty and layer.has_meta_tensors():
            continue  # created empty and not loaded yet (low_cpu_mem_usage): it stays dirty until it is
        visited.append(layer)
        if not (layer.delta_records or any(s.in_place for s in layer.delta_settings.values())):
            continue
        target = layer.applied_adapters() if applied is None else layer.applied_adapters(applied)
        for adapter in dict.fromkeys([*layer.delta_records, *target]):
            record = layer.delta_records.get(adapter)
            if adapter not in target:
                if record is not None:
                    moves.append(_removal(layer, adapter, record))
                continue
            if record is not None and record.scale == layer.move_scale(adapter):
                if trust and record_unchanged(layer, adapter):
                    continue
                now = current_tensors(layer, adapter)
                if all(_alike(held, live) for held, live in zip(record.tensors(), now)):
                    incremental.append((layer, adapter, now))
                    continue
            moves += _replacement(layer, adapter, record)
    return moves, incremental, visited


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


def _replacement(layer, adapter, record, now=None) -> list[Move]:
    """Take the recorded move (if any) out of W and put the adapter's whole current move in."""
    now = current_tensors(layer, adapter) if now is None else now
    removal = [] if record is None else [_removal(layer, adapter, record)]
    scale = layer.move_scale(adapter)
    return removal + [_move(layer, adapter, now[0], now[1], now[2], now[3], scale, now, incremental=False)]


def _read_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Boolean 0-dim tensors to Python, one host sync per device."""
    return [x != 0.0 for x in read_scalars([t.reshape(1).float() for t in tensors])]


def _group_incremental(
    candidates: list[tuple[DeltaLayer, str, tuple[torch.Tensor, ...]]],
) -> tuple[list[Move], list[torch.Tensor], list[torch.Tensor]]:
    """Incremental moves for many layers at once: ``U = [B' - B_p, B_p]``, ``V = [A'; A' - A_p]`` per layer.

    Layers whose factors have the same shapes, dtype and device are stacked, so that the factors and the norms of
    a whole group take a fixed number of batched ops; each move's U and V are views into its group's tensors
    (already transposed where W is stored transposed). Returns the moves, one tensor of squares per group, and one
    tensor per group that is 1 where the adapter's live anchors still equal its record's copies (by value: any
    write to an anchor, ``.data`` included, makes it 0, and ``sync_layers`` then replaces the move whole).
    """
    groups: dict[tuple, list[tuple[DeltaLayer, str, tuple[torch.Tensor, ...]]]] = {}
    for item in candidates:
        layer, a, b = item[0], item[2][0], item[2][1]
        a_k, b_k = item[2][2], item[2][3]
        kind = (a.shape, b.shape, a_k.shape, b_k.shape, a.dtype, b.dtype, a_k.dtype, b_k.dtype, a.device)
        groups.setdefault((*kind, layer.weight_is_transposed), []).append(item)
    moves, squares, same_anchors = [], [], []
    for (*_, transposed), items in groups.items():
        records = [layer.delta_records[adapter] for layer, adapter, _ in items]
        a_new = torch.stack([now[0] for _, _, now in items])
        b_new = torch.stack([now[1] for _, _, now in items])
        a_old = torch.stack([r.a for r in records])
        b_old = torch.stack([r.b for r in records])
        u = torch.cat([b_new - b_old, b_old], dim=2)  # G x d x 2r
        v = torch.cat([a_new, a_new - a_old], dim=1)  # G x 2r x k
        u32, v32 = (u, v) if u.dtype in (torch.float32, torch.float64) else (u.float(), v.float())
        squares.append(((u32.mT @ u32) * (v32 @ v32.mT)).sum(dim=(1, 2)))  # ||U_i V_i||_F^2 from 2r x 2r Grams
        same = [
            (torch.stack([now[i] for _, _, now in items]) == torch.stack([r.tensors()[i] for r in records]))
            .flatten(1)
            .all(dim=1)
            for i in (2, 3)
        ]
        same_anchors.append(same[0] & same[1])
        left, right = (v.mT, u.mT) if transposed else (u, v)  # W += alpha * left_i @ right_i
        # the record's new factors are views of the stacks (torch._foreach_copy_ from a parameter would make the
        # record require grad, even under no_grad)
        views = zip(left.unbind(0), right.unbind(0), a_new.unbind(0), b_new.unbind(0))
        for (layer, adapter, now), record, (left_i, right_i, a_i, b_i) in zip(items, records, views):
            scale = record.scale
            moves.append(Move(layer, adapter, left_i, right_i, scale, (a_i, b_i, *now[2:]), True, None, oriented=True))
    return moves, squares, same_anchors


# -- carrying out ---------------------------------------------------------------------------------------------


def _apply(move: Move, square: float, generator: torch.Generator | None) -> bool:
    """Carry out a planned move given its squared norm (alpha not applied); return whether W was written."""
    layer = move.layer
    if move.incremental and square == 0.0:
        return False  # nothing changed: W and the record stay
    if not math.isfinite(square):
        warnings.warn(
            f"Delta-LoRA: the W update of a layer for adapter '{move.adapter}' is not finite; skipped, W "
            "untouched (it is retried when the factors change).",
            stacklevel=4,
        )
        return False
    written = square != 0.0
    if written:
        weight = layer.get_base_layer().weight
        check_writable_base(layer.get_base_layer(), f"a layer of adapter '{move.adapter}'")
        add_low_rank_(
            weight,
            move.u,
            move.v,
            move.alpha,
            transposed=layer.weight_is_transposed and not move.oriented,
            rounding=layer.delta_settings[move.adapter].rounding,
            generator=generator if generator is not None else default_generator(weight.device),
        )
    if not move.incremental:  # incremental records are copied for all layers at once (sync_layers)
        set_record(layer, move.adapter, move.record, move.alpha)
    return written


def read_scalars(parts: list[torch.Tensor]) -> list[float]:
    """The values of 1-D tensors of one dtype (float, or the int64 warm-up counts), concatenated, with one host sync
    per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(i)
    values: list[list[float]] = [[] for _ in parts]
    for indices in by_device.values():
        flat = torch.cat([parts[i] for i in indices]).tolist()
        for i in indices:
            values[i], flat = flat[: parts[i].numel()], flat[parts[i].numel() :]
    return [x for chunk in values for x in chunk]


def _copy_records(moves: list[Move]) -> None:
    """Records of the incremental moves carried out or found empty: the factors are copied (one grouped op per
    dtype/device) and the stamps taken anew; the anchors' copies stay (the anchors were found equal to them)."""
    by_kind: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for m in moves:
        record = m.layer.delta_records[m.adapter]
        for held, value in zip((record.a, record.b), m.record[:2]):
            dst, src = by_kind.setdefault((held.dtype, held.device), ([], []))
            dst.append(held)
            src.append(value)
        record.stamp = adapter_stamp(live_tensors(m.layer, m.adapter))
    for dst, src in by_kind.values():
        torch._foreach_copy_(dst, src)


def refresh_flags(layers: list[DeltaLayer]) -> None:
    """Read every anchored flag by value (one host sync per device): a ``.data`` write may have changed one."""
    flags = [
        (layer, adapter, flag)
        for layer in layers
        for adapter, flag in layer.lora_anchored.items()
        if not flag.is_meta  # not loaded yet (low_cpu_mem_usage): read after the load
    ]
    values = read_scalars([flag.reshape(1).float() for _, _, flag in flags])
    for (layer, adapter, _), value in zip(flags, values):
        layer.delta_anchored[adapter] = value != 0.0


def adopt_copied_anchors(layers: list[DeltaLayer]) -> None:
    """Give an adapter copied parameter by parameter from an anchored one the anchors and flag it lacks.

    TRL builds the reference of DPO, KTO, GRPO and RLOO by adding an adapter and copying every parameter of
    ``"default"`` into it, which leaves out the anchors (buffers). An adapter that is not anchored but whose factors
    equal, bit for bit, those of an anchored adapter of the same layer added BEFORE it is such a copy: it takes that
    adapter's anchors and flag (an earlier adapter is never taken for the copy of a later one). One host sync for
    all layers; nothing is compared unless a layer holds both kinds.
    """
    pairs, same = [], []
    for layer in layers:
        moving = [a for a, settings in layer.delta_settings.items() if settings.update_ratio != 0.0]
        anchored = [a for a in moving if layer.is_anchored(a)]
        fresh = [a for a in moving if not layer.is_anchored(a)]
        if not anchored or not fresh or layer.is_partitioned() or layer.has_meta_tensors():
            continue
        order = list(layer.delta_settings)
        for copy in fresh:
            xa, xb = layer.lora_factors(copy)
            for source in [a for a in anchored if order.index(a) < order.index(copy)]:  # a copy comes after
                ya, yb = layer.lora_factors(source)
                if (xa.shape, xb.shape, xa.dtype, xb.dtype) == (ya.shape, yb.shape, ya.dtype, yb.dtype):
                    pairs.append((layer, copy, source))
                    same.append((xa == ya).all() & (xb == yb).all())
    for (layer, copy, source), equal in zip(pairs, _read_flags(same) if same else []):
        if equal and not layer.is_anchored(copy):
            layer.copy_anchors(source, copy)


def _planned(
    layers: list[DeltaLayer], applied: Iterable[str] | None, trust_stamps: bool
) -> tuple[list[Move], list[float], list[DeltaLayer]]:
    """``plan`` and the squared norms of its moves (``alpha`` applied), read with ONE host sync (a second one only
    where an anchor was found written behind the layer's back: that adapter's move is then replaced whole)."""
    moves, candidates, visited = plan(layers, applied, trust_stamps=trust_stamps)
    grouped, group_squares, group_same = _group_incremental(candidates)
    parts = [m.square.reshape(1).float() for m in moves if m.square is not None] + group_squares
    n, g = len(moves), len(grouped)
    values = read_scalars(parts + [same.float() for same in group_same])  # the one host read
    kept = [(m, sq) for m, sq, same in zip(grouped, values[n : n + g], values[n + g :]) if same]
    stale = [m for m, same in zip(grouped, values[n + g :]) if not same]
    extra = [move for m in stale for move in _replacement(m.layer, m.adapter, m.layer.delta_records[m.adapter])]
    extra_squares = read_scalars([m.square.reshape(1).float() for m in extra]) if extra else []
    moves = moves + extra + [m for m, _ in kept]
    unscaled = values[:n] + extra_squares + [sq for _, sq in kept]
    return moves, [sq * m.alpha**2 for m, sq in zip(moves, unscaled)], visited


def weight_in_step(layer: DeltaLayer) -> torch.Tensor | None:
    """W as the invariant says it is now, computed WITHOUT writing anything (a ``state_dict`` is a read): None when
    W already is (the usual case), else a corrected copy. Used where a state dict is taken."""
    with torch.inference_mode(False), torch.no_grad():
        refresh_flags([layer])  # the flags' values, as a loader may have assigned them (a cache, not the model)
        moves, squares, _ = _planned([layer], None, trust_stamps=False)
        writes = [(m, sq) for m, sq in zip(moves, squares) if sq != 0.0 and math.isfinite(sq)]
        if not writes:
            return None
        weight = layer.get_base_layer().weight.detach().clone()
        for m, _ in writes:
            transposed = layer.weight_is_transposed and not m.oriented
            add_low_rank_(weight, m.u, m.v, m.alpha, transposed=transposed, rounding="nearest")
        return weight


def sync_layers(
    layers: Iterable[DeltaLayer],
    *,
    generator_for: Callable[[DeltaLayer], torch.Generator | None] = lambda _: None,
    applied: Iterable[str] | None = None,
    trust_stamps: bool = False,
) -> SyncResult:
    """Bring every layer's W to its invariant, reading the norms of all planned moves with ONE host sync (a second
    one only where an anchor was found written behind the layer's back).

    The one code path of every W change. ``applied``: the adapters whose moves W must hold (default: each layer's
    ``applied_adapters``). ``trust_stamps`` (the updater after an optimizer
    step): clean layers and adapters whose tensors carry their record's identities and version counters are
    skipped without a read; otherwise the factors and anchors are compared by value with the records' copies,
    which also sees writes through ``.data``.
    """
    layers = list(layers)
    with torch.inference_mode(False), torch.no_grad():  # this order: inference_mode(False) turns grad mode on
        checked = layers if not trust_stamps else [layer for layer in layers if layer._delta_state.dirty]
        refresh_flags(checked)
        adopt_copied_anchors(checked)
        moves, squares, visited = _planned(layers, applied, trust_stamps)
        wrote = [_apply(m, sq, generator_for(m.layer)) for m, sq in zip(moves, squares)]
        _copy_records([m for m, sq in zip(moves, squares) if m.incremental and math.isfinite(sq)])
    for layer in visited:
        mark_synced(layer)
    return SyncResult(
        written=[m for m, w in zip(moves, wrote) if w],
        norm_sq=sum(sq for sq, w in zip(squares, wrote) if w),
        skipped_nonfinite=sum(not math.isfinite(sq) for sq in squares),
    )
