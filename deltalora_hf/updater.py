"""``DeltaLoraUpdater``: the base-weight update of Algorithm 1, for any training loop.

Call :meth:`DeltaLoraUpdater.step` once after every ``optimizer.step()``::

    updater = DeltaLoraUpdater(model)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        updater.step()          # W += lambda * s * (B'A' - BA) if t > start_step
        optimizer.zero_grad()

:class:`~deltalora_hf.DeltaLoRACallback` drives the same object from ``Trainer``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import _distributed
from .config import DeltaLoraConfig
from .functional import delta_factors, low_rank_frobenius_sq
from .layer import DeltaLoraLayer
from .model import DeltaLoraModel


@dataclass(frozen=True)
class UpdateStats:
    """What one :meth:`DeltaLoraUpdater.step` did."""

    step: int = -1
    layers_moved: int = 0  # layers whose (effective) W moved at this step, both modes
    update_norm: float = 0.0  # Frobenius norm of this step's in-place W update over all layers (0 in factored mode)
    layers_skipped_nonfinite: int = 0


def find_delta_lora_model(model: nn.Module) -> DeltaLoraModel:
    """The :class:`DeltaLoraModel` inside ``model`` (a PeftModel, possibly wrapped by DDP/accelerate)."""
    for module in model.modules():
        if isinstance(module, DeltaLoraModel):
            return module
    raise ValueError(
        f"{type(model).__name__} has no Delta-LoRA adapter. Build the model with "
        "peft.get_peft_model(model, DeltaLoraConfig(...)) after `import deltalora_hf`."
    )


class DeltaLoraUpdater:
    """Moves every targeted base weight after each optimizer step, as in Algorithm 1 of Zi et al. (2023).

    For each Delta-LoRA layer and active adapter with ``update_ratio > 0`` it keeps a copy of the factors
    ``(A, B)`` (not their product) and, after optimizer step ``t > start_step``, applies
    ``W += update_ratio * s * (B'A' - BA)`` as one fused rank-2r in-place update
    (:func:`deltalora_hf.functional.add_low_rank_`). A step that left the factors unchanged (e.g. skipped
    by the fp16 grad scaler) moves nothing; a non-finite delta is skipped with a warning and W is untouched.
    At step ``t == start_step`` it records the anchor factors ``(A_K, B_K)`` on each layer; in
    ``base_update="factored"`` mode that is all it does (the forward pass adds the move, W is never written).

    Args:
        model: the PEFT model (or any module containing a :class:`DeltaLoraModel`).
        seed: seed of the stochastic rounding used for bfloat16/float16 weights; every process of a
            data-parallel job must use the same seed so that the weights stay identical.
    """

    def __init__(self, model: nn.Module, *, seed: int = 0) -> None:
        self.tuner = find_delta_lora_model(model)
        self.tuner.model._deltalora_has_updater = True  # silences the plain-LoRA warning of DeltaLoraModel
        self.seed = seed
        self.next_step = 0
        self.last = UpdateStats()
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self.snapshot()

    def targets(self) -> Iterator[tuple[DeltaLoraLayer, str, DeltaLoraConfig]]:
        """``(layer, adapter, config)`` for every active Delta-LoRA adapter whose W moves (lambda > 0)."""
        configs = self.tuner.peft_config
        for module in self.tuner.model.modules():
            if not isinstance(module, DeltaLoraLayer):
                continue
            for adapter in module.active_adapters:
                config = configs.get(adapter)
                if isinstance(config, DeltaLoraConfig) and config.update_ratio > 0 and adapter in module.lora_anchored:
                    yield module, adapter, config

    def snapshot(self) -> None:
        """Cache the current factors as "before the next step" (done at construction and at train start)."""
        with torch.no_grad():
            for layer, adapter, config in self.targets():
                if config.base_update == "inplace":
                    _distributed.check_writable_in_place(
                        layer.get_base_layer().weight, f"a layer of adapter '{adapter}'"
                    )
                self._store(layer, adapter)

    def step(self, step: int | None = None) -> UpdateStats:
        """Apply the W update for the optimizer step that was just taken.

        Args:
            step: the 0-based index ``t`` of that optimizer step (``Trainer``'s ``state.global_step`` before it
                is incremented). Defaults to one more than the previous call, starting at 0.
        """
        t = self.next_step if step is None else int(step)
        self.next_step = t + 1
        with torch.no_grad():
            pending, factored_moved = [], 0
            for layer, adapter, config in self.targets():
                if t < config.start_step:
                    continue
                if config.base_update == "factored":
                    if not layer.is_anchored(adapter):  # the only state factored mode needs
                        layer.set_anchor(adapter, *layer.lora_factors(adapter))
                    factored_moved += t > config.start_step
                    continue
                key = (id(layer), adapter)
                if t == config.start_step and not layer.is_anchored(adapter):
                    layer.set_anchor(adapter, *layer.lora_factors(adapter))
                if t > config.start_step and key in self._cache:
                    pending.append((layer, adapter, config, *self._cache[key]))
                else:
                    self._store(layer, adapter)  # the factors that step t + 1 starts from
            stats = self._apply(t, pending)
        self.last = dataclasses.replace(stats, layers_moved=stats.layers_moved + factored_moved)
        return self.last

    def move_norm(self) -> float:
        """Frobenius norm of the whole change of the targeted weights so far, ``W_eff - W_0`` (both modes)."""
        total = 0.0
        with torch.no_grad():
            for layer, adapter, _ in self.targets():
                if layer.is_anchored(adapter):
                    a, b = _distributed.full_values(*layer.lora_factors(adapter))
                    u, v = delta_factors(a, b, layer.lora_anchor_A[adapter], layer.lora_anchor_B[adapter])
                    total += float(low_rank_frobenius_sq(u, v)) * layer.move_scale(adapter) ** 2
        return math.sqrt(total)

    def _apply(self, t: int, pending: list) -> UpdateStats:
        if not pending:
            return UpdateStats(step=t)
        # One host sync per step: the squared norm of each layer's delta. It is exactly 0 when the factors did
        # not change (a step skipped by the grad scaler) and non-finite when the delta is. (U, V) are rebuilt
        # below rather than kept, so that no more than one layer's (U, V) is alive at a time.
        squares = []
        for layer, adapter, config, a_old, b_old in pending:
            _distributed.check_writable_in_place(layer.get_base_layer().weight, f"a layer of adapter '{adapter}'")
            a, b = _distributed.full_values(*layer.lora_factors(adapter))
            squares.append(low_rank_frobenius_sq(*delta_factors(a, b, a_old, b_old)) * layer.move_scale(adapter) ** 2)
        moved, skipped, norm_sq = 0, 0, 0.0
        for (layer, adapter, config, a_old, b_old), sq in zip(pending, torch.stack(squares).tolist()):
            if sq == 0.0:
                continue  # the factors did not change: nothing to move
            if not math.isfinite(sq):
                skipped += 1
                warnings.warn(
                    f"Delta-LoRA: the W update of a layer for adapter '{adapter}' at step {t} is not finite; "
                    "skipped for this step, W untouched.",
                    stacklevel=3,
                )
                continue
            if layer.merged:
                raise RuntimeError("Delta-LoRA cannot update a merged adapter; call model.unmerge_adapter() first.")
            a, b = _distributed.full_values(*layer.lora_factors(adapter))
            if not layer.is_anchored(adapter):  # attached after the start step: W starts moving from here
                layer.set_anchor(adapter, a_old, b_old)
            weight = layer.get_base_layer().weight
            _distributed.add_low_rank_(
                weight,
                *delta_factors(a, b, a_old, b_old),
                layer.move_scale(adapter),
                transposed=layer.weight_is_transposed,
                rounding=config.base_update_rounding,
                generator=self._generator(weight.device),
            )
            a_old.copy_(a)
            b_old.copy_(b)
            moved += 1
            norm_sq += sq
        return UpdateStats(step=t, layers_moved=moved, update_norm=math.sqrt(norm_sq), layers_skipped_nonfinite=skipped)

    def has_moved(self) -> bool:
        """Whether the last step taken was past some adapter's start step, i.e. some W has moved."""
        return any(self.next_step - 1 > config.start_step for _, _, config in self.targets())

    def _store(self, layer: DeltaLoraLayer, adapter: str) -> None:
        a, b = _distributed.full_values(*layer.lora_factors(adapter))
        cached = self._cache.get((id(layer), adapter))
        if cached is None or cached[0].shape != a.shape or cached[0].dtype != a.dtype:
            self._cache[(id(layer), adapter)] = (a.detach().clone(), b.detach().clone())
        else:
            cached[0].copy_(a)
            cached[1].copy_(b)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
