"""``DeltaLoraUpdater``: the base-weight update of Algorithm 1, for any training loop.

Call ``DeltaLoraUpdater.step`` once after every ``optimizer.step()``::

    updater = DeltaLoraUpdater(model)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        updater.step()          # W += lambda * s * (B'A' - BA) once the adapter is anchored
        optimizer.zero_grad()

``DeltaLoRACallback`` drives the same object from ``Trainer``.

The updater does two things. It *anchors* each active adapter at the end of its own optimizer step
``t == start_step`` (counted from 0 in the adapter's saved warm-up count ``lora_warmup_steps``, which a resumed
run, a new process or a second trainer continues), recording ``(A_K, B_K)``. And it *syncs* every
layer (``DeltaLoraLayer.sync_base_weight``): W follows the factors of every anchored in-place adapter, which
after an optimizer step is exactly ``W += lambda * s * (B'A' - BA)``. The anchor belongs to the adapter, not to
the run: once anchored, W moves on every later optimizer step of any run, resumed or new. The sync is idempotent,
so a second updater or callback on the same model changes nothing (no doubled update). All state that survives a
step lives on the layers (the step counts included); the updater holds only a label for its statistics and the
random generator of the stochastic rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ._distributed import check_writable_in_place, full_values
from .functional import delta_factors, low_rank_frobenius_sq
from .invariant import optimizer_steps, read_scalars, sync_layers, version
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


def _adapters_key(model: nn.Module) -> tuple | None:
    """What changes when adapters (and so Delta-LoRA layers) are added or removed: the names in ``peft_config``."""
    for owner in (model, getattr(model, "module", None)):
        config = getattr(owner, "peft_config", None)
        if isinstance(config, dict):
            return id(owner), id(config), tuple(config)
    return None


def _moving_adapters(layers: list[DeltaLoraLayer]) -> Iterator[tuple[DeltaLoraLayer, str]]:
    """``(layer, adapter)`` for every active Delta-LoRA adapter with lambda != 0 (the ones whose W moves)."""
    for layer in layers:
        for adapter in layer.active_adapters:
            settings = layer.delta_settings.get(adapter)
            if settings is not None and settings.update_ratio != 0.0:
                yield layer, adapter


def _took_a_step(layer: DeltaLoraLayer, adapter: str) -> bool:
    """Whether the adapter took an optimizer step since its count last counted one: its factors are trained, and the
    process's optimizer-step count (fused optimizers bump no version counter) or the factors' versions (a hand-made
    update) moved. So a second updater or callback on the same model, called for the same step, counts nothing, and
    a frozen adapter (a reference) takes no steps."""
    a, b = layer.lora_factors(adapter)
    if not (a.requires_grad or b.requires_grad):
        return False
    now = (optimizer_steps(), version(a), version(b))
    if layer.delta_counted.get(adapter) == now:
        return False
    layer.delta_counted[adapter] = now
    return True


class DeltaLoraUpdater:
    """Moves every targeted base weight after each optimizer step, as in Algorithm 1 of Zi et al. (2023).

    The update is one fused rank-2r in-place GEMM per layer (``deltalora_hf.functional.add_low_rank_``) from
    the factors the layer cached at its last sync (``r (d + k)`` numbers, never the product ``B A``). A step that
    left the factors unchanged (e.g. skipped by the fp16 grad scaler) moves nothing; a non-finite delta is skipped
    with a warning and W is untouched. In ``base_update="factored"`` mode the updater only anchors (the forward
    pass adds the move, W is never written). One host synchronisation per step.

    Args:
        model: the PEFT model (or any module containing Delta-LoRA layers).
        seed: seed of the stochastic rounding used for bfloat16/float16 weights; every process of a
            data-parallel job must use the same seed so that the weights stay identical.
    """

    def __init__(self, model: nn.Module, *, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self.next_step = 0
        self.last = UpdateStats()
        self.moves_in_run = 0  # steps that moved some (effective) W since the last start_run()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._layers: list[DeltaLoraLayer] = []
        self._layers_key: tuple | None = None
        for layer in find_delta_lora_layers(model):
            layer.delta_driven = True  # silences the "training without an updater" warning
            if any(a in layer.delta_settings and layer.delta_settings[a].in_place for a in layer.active_adapters):
                # refuse before any step, not at step K + 1
                check_writable_in_place(layer.get_base_layer().weight, f"layer {type(layer).__name__}")

    def layers(self) -> list[DeltaLoraLayer]:
        """The model's Delta-LoRA layers; walked again only when its set of adapters changed."""
        key = _adapters_key(self.model)
        if key is None or key != self._layers_key:
            self._layers, self._layers_key = find_delta_lora_layers(self.model), key
            for layer in self._layers:
                layer.delta_driven = True  # silences the "training without an updater" warning
        return self._layers

    def start_run(self) -> int:
        """Start a new run (step counter at 0) with W in step with the adapters; return the number of W writes."""
        self.next_step = 0
        self.moves_in_run = 0
        return self.sync()

    def sync(self) -> int:
        """Bring every layer to its invariant (see ``deltalora_hf.invariant``); return the number of W writes."""
        return len(sync_layers(self.layers(), generator_for=self._generator).written)

    def step(self, step: int | None = None) -> UpdateStats:
        """Count the optimizer step that was just taken, anchor where due, then move W for it.

        Every active Delta-LoRA adapter that is not anchored yet and whose factors are trained counts the step in
        its own saved counter (``lora_warmup_steps``); it anchors once it has taken ``start_step + 1`` steps, so W
        moves on its steps ``t > K`` (``t`` counted from 0), however the training was split into runs, processes or
        trainers. Once anchored the count stays at ``K + 1`` (nothing is launched for it any more).

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
        pending = [(layer, adapter) for layer, adapter in warming if _took_a_step(layer, adapter)]
        if pending:  # one op and one host sync per step, only until every adapter is anchored
            with torch.no_grad():
                torch._foreach_add_([layer.lora_warmup_steps[adapter] for layer, adapter in pending], 1)
            counts = read_scalars([layer.lora_warmup_steps[adapter] for layer, adapter in pending])  # int64, 1 each
            for (layer, adapter), count in zip(pending, counts):
                if count > layer.delta_settings[adapter].start_step:
                    layer.set_anchor(adapter)
        # in place: W += lambda s (B'A' - BA); factors whose version counters did not change are not read
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
