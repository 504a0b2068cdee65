"""``DeltaLoraUpdater``: the base-weight update of Algorithm 1, for any training loop.

Call ``DeltaLoraUpdater.step`` once after every ``optimizer.step()``, and give the updater that optimizer::

    updater = DeltaLoraUpdater(model, optimizer=optimizer)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        updater.step()          # W += lambda * s * (B'A' - BA) once the adapter is anchored
        optimizer.zero_grad()

``DeltaLoRACallback`` drives the same object from ``Trainer`` (with the Trainer's optimizer).

The updater does two things. It *anchors* each active adapter at the end of its own optimizer step
``t == start_step`` (counted from 0 in the adapter's saved warm-up count ``lora_warmup_steps``, which a resumed
run, a new process or a second trainer continues), recording ``(A_K, B_K)``. And it *syncs* every
layer (``DeltaLoraLayer.sync_base_weight``): W follows the factors of every anchored in-place adapter, which
after an optimizer step is exactly ``W += lambda * s * (B'A' - BA)``. The anchor belongs to the adapter, not to
the run: once anchored, W moves on every later optimizer step of any run, resumed or new. The sync is idempotent,
so a second updater or callback on the same model changes nothing (no doubled update).

What counts as a step of an adapter's warm-up:

* With ``optimizer=``: each ``step()`` of that optimizer, seen by its own step post hook
  (``torch.optim.Optimizer.register_step_post_hook``, on that optimizer only), for the adapters whose factors it
  trains (every trainable adapter when it holds none of the model's factors, e.g. DeepSpeed's flat partitions). A
  step the optimizer did not take (a ``GradScaler`` skip) does not count; one it took does, at any learning rate,
  whatever else runs in the process. Every updater given the same optimizer shares its count, so one step counts
  once however many updaters or callbacks run for it. An optimizer that holds only one of an adapter's two factors
  is refused: with two optimizers each holding part of an adapter, a "step" of the adapter is not defined.
* Without an optimizer: a ``step()`` call after which the adapter's factors differ, by value, from what they were at
  the previous count (copies kept on the layer while the adapter warms up). It cannot tell a skipped step from a
  step that left the factors unchanged (learning rate 0, zero gradients): neither counts.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ._distributed import check_writable_base, full_values
from .functional import delta_factors, low_rank_frobenius_sq
from .invariant import read_scalars, sync_layers
from .layer import DeltaLoraLayer
from .model import delta_lora_layers


@dataclass(frozen=True)
class UpdateStats:
    """What one ``DeltaLoraUpdater.step`` did."""

    step: int = -1
    layers_moved: int = 0  # layers whose (effective) W moved at this step, both modes
    update_norm: float = 0.0  # Frobenius norm of this step's in-place W update over all layers (0 in factored mode)
    layers_skipped_nonfinite: int = 0


def find_delta_lora_layers(model: nn.Module) -> list[DeltaLoraLayer]:
    """The Delta-LoRA layers in ``model`` (a PeftModel, a transformers model with adapters, DDP/accelerate-wrapped)."""
    layers = delta_lora_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Delta-LoRA adapter. Build the model with "
            "peft.get_peft_model(model, DeltaLoraConfig(...)) after `import deltalora_hf`."
        )
    return layers


def _moving_adapters(layers: list[DeltaLoraLayer]) -> Iterator[tuple[DeltaLoraLayer, str]]:
    """``(layer, adapter)`` for every active Delta-LoRA adapter with lambda != 0 (the ones whose W moves)."""
    for layer in layers:
        for adapter in layer.active_adapters:
            settings = layer.delta_settings.get(adapter)
            if settings is not None and settings.update_ratio != 0.0:
                yield layer, adapter


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` really runs: the deepest initialised ``torch.optim.Optimizer`` in the chain of
    ``.optimizer`` attributes (accelerate's ``AcceleratedOptimizer`` and ``DeepSpeedOptimizerWrapper``, DeepSpeed's
    ZeRO optimizers keep the one they step there; the wrappers do not run ``Optimizer.__init__``, so they have no
    hooks of their own)."""
    found, current = optimizer, optimizer
    for _ in range(8):
        current = getattr(current, "optimizer", None)
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_post_hooks"):
            found = current
    return found


class _OptimizerSteps:
    """The steps one optimizer has taken since an updater was first given it, counted by that optimizer's own step
    post hook, and, per layer and adapter, the count at which the adapter's warm-up last counted them. Shared by all
    updaters given the same optimizer (``_STEPS``), so one step counts once; the models whose layers each step
    marks for a value check (fused optimizers bump no version counter) are held weakly."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.taken = 0
        self.counted: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
        self.models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.handles = (
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        )

    @torch.compiler.disable
    def _before_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """Refuse the step, before it changes anything, where the W update that follows could not be written (a base
        weight parametrized since the updater was made)."""
        for model in list(self.models):
            for layer in delta_lora_layers(model):
                if any(s.in_place for s in layer.delta_settings.values()):
                    check_writable_base(layer.get_base_layer(), f"layer {type(layer).__name__}")

    @torch.compiler.disable
    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # GradScaler with a fused optimizer: the kernel skipped
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.any()):
            return  # the step it did not take
        self.taken += 1
        for model in list(self.models):
            _touch_in_place(delta_lora_layers(model))


def _touch_in_place(layers: list[DeltaLoraLayer]) -> None:
    """Mark the layers whose W follows an in-place adapter for a value check (factored layers hold nothing)."""
    for layer in layers:
        if layer.delta_records or any(s.in_place for s in layer.delta_settings.values()):
            layer._delta_state.touch()


# Optimizer -> its step count, weakly keyed: it counts that optimizer's steps only and goes with it. It registers
# nothing process-wide; each counter is one hook on one optimizer.
_STEPS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptimizerSteps] = weakref.WeakKeyDictionary()


def _steps_of(optimizer: torch.optim.Optimizer) -> _OptimizerSteps:
    optimizer = _innermost(optimizer)
    if optimizer not in _STEPS:
        _STEPS[optimizer] = _OptimizerSteps(optimizer)
    return _STEPS[optimizer]


def _factor_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in _innermost(optimizer).param_groups for p in group["params"]}


class DeltaLoraUpdater:
    """Moves every targeted base weight after each optimizer step, as in Algorithm 1 of Zi et al. (2023).

    The update is one fused rank-2r in-place GEMM per layer (``deltalora_hf.functional.add_low_rank_``) from
    the factors the layer's record holds (``r (d + k)`` numbers, never the product ``B A``). A step that
    left the factors unchanged (e.g. skipped by the fp16 grad scaler) moves nothing; a non-finite delta is skipped
    with a warning and W is untouched. In ``base_update="factored"`` mode the updater only anchors (the forward
    pass adds the move, W is never written). Two host reads per step (the flags, then the norms of the moves).

    Args:
        model: the PEFT model (or any module containing Delta-LoRA layers).
        optimizer: the optimizer that trains the adapters' factors. Its own steps are the adapters' warm-up steps
            (see the module docstring); without it, a ``step()`` after which the factors changed counts.
        seed: seed of the stochastic rounding used for bfloat16/float16 weights; every process of a
            data-parallel job must use the same seed so that the weights stay identical.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self.next_step = 0
        self.last = UpdateStats()
        self.moves_in_run = 0  # steps that moved some (effective) W since the last start_run()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._steps: _OptimizerSteps | None = None
        self._held: set[int] = set()
        self._last_taken = 0
        layers = find_delta_lora_layers(model)
        for layer in layers:
            layer.delta_driven = True  # silences the "training without an updater" warning
            if any(a in layer.delta_settings and layer.delta_settings[a].in_place for a in layer.active_adapters):
                # refuse before any step, not at step K + 1
                check_writable_base(layer.get_base_layer(), f"layer {type(layer).__name__}")
        if optimizer is not None:
            self.watch(optimizer)
        self._remember_factors(layers)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the warm-up in ``optimizer``'s steps from now on (``DeltaLoRACallback`` passes the Trainer's)."""
        if self._steps is not None and _STEPS.get(_innermost(optimizer)) is self._steps:
            return
        held = _factor_ids(optimizer)
        for layer, adapter in _moving_adapters(self.layers()):
            inside = [id(t) in held for t in layer.lora_factors(adapter)]
            if any(inside) and not all(inside):
                raise ValueError(
                    f"The optimizer given to DeltaLoraUpdater holds only one of the two factors of Delta-LoRA adapter "
                    f"'{adapter}': with two optimizers each holding part of an adapter, one warm-up step of it is not "
                    "defined. Put both factors (lora_A and lora_B) in one optimizer. Nothing was changed."
                )
        self._steps = _steps_of(optimizer)
        self._steps.models.add(self.model)
        self._held = held
        self._last_taken = self._steps.taken

    def layers(self) -> list[DeltaLoraLayer]:
        """The model's Delta-LoRA layers, found anew on every call (adapters may have been added or deleted)."""
        layers = find_delta_lora_layers(self.model)
        for layer in layers:
            layer.delta_driven = True  # silences the "training without an updater" warning
        return layers

    def start_run(self) -> int:
        """Start a new run (step counter at 0) with W in step with the adapters; return the number of W writes."""
        self.next_step = 0
        self.moves_in_run = 0
        return self.sync()

    def sync(self) -> int:
        """Bring every layer to its invariant (see ``deltalora_hf.invariant``); return the number of W writes."""
        return len(sync_layers(self.layers(), generator_for=self._generator).written)

    def _remember_factors(self, layers: list[DeltaLoraLayer]) -> None:
        """Without an optimizer: copies of the warming adapters' factors, which the next count compares with."""
        if self._steps is not None:
            return
        with torch.no_grad():
            for layer, adapter in _moving_adapters(layers):
                if not layer.is_anchored(adapter) and adapter not in layer.delta_counted:
                    layer.delta_counted[adapter] = tuple(
                        t.detach().clone() for t in full_values(*layer.lora_factors(adapter))
                    )

    def _steps_taken(self, warming: list[tuple[DeltaLoraLayer, str]]) -> list[int]:
        """How many of its warm-up steps each warming adapter took since its count last counted (module docstring)."""
        trained = [any(t.requires_grad for t in layer.lora_factors(adapter)) for layer, adapter in warming]
        if self._steps is not None:
            steps, taken = self._steps, self._steps.taken
            holds_any = any(id(t) in self._held for layer, a in warming for t in layer.lora_factors(a))
            out = []
            for (layer, adapter), train in zip(warming, trained):
                counted = steps.counted.setdefault(layer, {})
                since = counted.get(adapter, self._last_taken)
                counted[adapter] = taken
                held = not holds_any or id(layer.lora_factors(adapter)[0]) in self._held
                out.append(taken - since if train and held else 0)
            self._last_taken = taken
            return out
        with torch.no_grad():
            pairs = [(layer, adapter, full_values(*layer.lora_factors(adapter))) for layer, adapter in warming]
            seen = [layer.delta_counted.get(adapter) for layer, adapter in warming]
            changed = [
                torch.ones((), dtype=torch.bool)
                if old is None or any(o.shape != n.shape for o, n in zip(old, now))
                else (old[0] != now[0]).any() | (old[1] != now[1]).any()
                for (_, _, now), old in zip(pairs, seen)
            ]
            flags = read_scalars([c.reshape(1).float() for c in changed]) if changed else []
            out = []
            for (layer, adapter, now), old, flag, train in zip(pairs, seen, flags, trained):
                layer.delta_counted[adapter] = tuple(t.detach().clone() for t in now)
                out.append(int(flag != 0.0 and old is not None and train))
            return out

    def step(self, step: int | None = None) -> UpdateStats:
        """Count the optimizer step that was just taken, anchor where due, then move W for it.

        Every active Delta-LoRA adapter that is not anchored yet counts the warm-up steps it took (module
        docstring) in its own saved counter (``lora_warmup_steps``); it anchors once it has taken
        ``start_step + 1`` steps, so W moves on its steps ``t > K`` (``t`` counted from 0), however the training was
        split into runs, processes or trainers. Once anchored the count stays at ``K + 1`` (nothing is launched for
        it any more).

        Args:
            step: a label for ``UpdateStats.step`` (``Trainer`` passes ``state.global_step``); defaults to one more
                than the previous call. It does not decide when W starts to move: the adapter's own count does.
        """
        t = self.next_step if step is None else int(step)
        self.next_step = t + 1
        layers = self.layers()
        moving = list(_moving_adapters(layers))
        anchored_before = [(layer, adapter) for layer, adapter in moving if layer.is_anchored(adapter)]
        warming = [(layer, adapter) for layer, adapter in moving if not layer.is_anchored(adapter)]
        taken = self._steps_taken(warming) if warming else []
        pending = [(pair, n) for pair, n in zip(warming, taken) if n > 0]
        if pending:  # one op and one host sync per step, only until every adapter is anchored
            with torch.no_grad():
                for (layer, adapter), n in pending:
                    layer.lora_warmup_steps[adapter].add_(n)
            counts = read_scalars([layer.lora_warmup_steps[adapter] for (layer, adapter), _ in pending])  # int64
            for ((layer, adapter), _), count in zip(pending, counts):
                if count > layer.delta_settings[adapter].start_step:
                    layer.set_anchor(adapter)
                    layer.delta_counted.pop(adapter, None)
        # in place: W += lambda s (B'A' - BA). With an optimizer, its hook marked the layers of every step it took
        # (fused optimizers bump no version counter); without one, every in-place layer is read by value.
        if self._steps is None:
            _touch_in_place(layers)
        result = sync_layers(layers, generator_for=self._generator, trust_stamps=True)
        self.moves_in_run += bool(anchored_before)
        factored_moved = sum(layer.delta_settings[adapter].factored for layer, adapter in anchored_before)
        self.last = UpdateStats(
            step=t,
            layers_moved=len({id(m.layer) for m in result.written}) + factored_moved,
            update_norm=math.sqrt(result.norm_sq),
            layers_skipped_nonfinite=result.skipped_nonfinite,
        )
        return self.last

    def move_norm(self) -> float:
        """Frobenius norm of the whole change of the targeted weights so far, ``W_eff - W_0`` (both modes)."""
        total = 0.0
        with torch.no_grad():
            for layer, adapter in _moving_adapters(self.layers()):
                if layer.is_anchored(adapter):
                    a, b = full_values(*layer.lora_factors(adapter))
                    a_k, b_k = layer.lora_anchor_A[adapter], layer.lora_anchor_B[adapter]
                    u, v = delta_factors(a, b, a_k.to(a.dtype), b_k.to(b.dtype))
                    total += float(low_rank_frobenius_sq(u, v)) * layer.move_scale(adapter) ** 2
        return math.sqrt(total)

    def has_moved(self) -> bool:
        """Whether some active adapter is anchored with lambda > 0, i.e. its (effective) W moves."""
        return any(layer.is_anchored(a) for layer, a in _moving_adapters(self.layers()))

    def start_steps(self) -> list[int]:
        """The start steps of the active adapters whose W moves (lambda > 0)."""
        return sorted({layer.delta_settings[a].start_step for layer, a in _moving_adapters(self.layers())})

    def _generator(self, layer: DeltaLoraLayer) -> torch.Generator:
        device = layer.get_base_layer().weight.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
