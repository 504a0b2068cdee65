"""``DeltaLoRACallback``: runs ``DeltaLoraUpdater`` inside a transformers ``Trainer``."""

from __future__ import annotations

import warnings
from typing import Any

from transformers import Trainer, TrainerCallback

from .updater import DeltaLoraUpdater

LOG_UPDATE_NORM = "deltalora/update_norm"
LOG_LAYERS_MOVED = "deltalora/layers_moved"
LOG_MOVE_NORM = "deltalora/move_norm"


class DeltaLoRACallback(TrainerCallback):
    """Applies Delta-LoRA's base-weight update after every optimizer step of a ``Trainer``.

    ``Trainer(..., callbacks=[DeltaLoRACallback()])``. After optimizer step ``t`` (``state.global_step``, counted
    from 0) it calls ``DeltaLoraUpdater.step``, so gradient accumulation gives one update per optimizer
    step and evaluation none. At the start of every run it brings W in step with the adapters (whatever was
    loaded, added or changed since). Training logs get ``deltalora/update_norm`` (Frobenius norm of the last
    in-place W update over all layers), ``deltalora/layers_moved`` (layers whose W moved at the last step) and
    ``deltalora/move_norm`` (norm of the whole change of W so far).

    ``Trainer`` calls the reporting integrations (TensorBoard, W&B, ...) before the callbacks passed to it, so
    those see the metrics only if this callback runs first: pass ``trainer=`` (as TRL's callbacks do), which puts
    the callback first in that trainer, through the public ``Trainer.pop_callback`` / ``add_callback``::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        DeltaLoRACallback(trainer=trainer)

    Without it the metrics still reach ``trainer.state.log_history`` and the console.

    Args:
        seed: seed of the stochastic rounding of bfloat16/float16 weights (see ``DeltaLoraUpdater``).
        trainer: optional ``Trainer`` to join, ahead of its reporting callbacks.
    """

    def __init__(self, seed: int = 0, trainer: Trainer | None = None) -> None:
        self.seed = seed
        self.updater: DeltaLoraUpdater | None = None
        if trainer is not None:
            self._join(trainer)

    def _join(self, trainer: Trainer) -> None:
        trainer.pop_callback(self)
        others = list(trainer.callback_handler.callbacks)
        for callback in others:
            trainer.pop_callback(callback)
        trainer.add_callback(self)
        for callback in others:
            trainer.add_callback(callback)
        self._attach(trainer.model)

    def _attach(self, model: Any, optimizer: Any = None) -> DeltaLoraUpdater:
        if model is None:
            raise ValueError("DeltaLoRACallback needs the Trainer's model.")
        if self.updater is None or self.updater.model is not model:
            self.updater = DeltaLoraUpdater(model, optimizer, seed=self.seed)
        elif optimizer is not None:
            self.updater.watch(optimizer)  # the warm-up counts the steps of the optimizer that trains this run
        return self.updater

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._attach(model)  # fail at Trainer(...) time when the model has no Delta-LoRA adapter

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # After a checkpoint is loaded, or on a model changed since the last run: W in step with the adapters.
        self._attach(model, optimizer).start_run()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer increments global_step after this event, so it is the 0-based index of this step.
        self.updater.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.updater is None or "learning_rate" not in logs:
            return  # only training logs carry the W-update metrics
        stats = {
            LOG_UPDATE_NORM: self.updater.last.update_norm,
            LOG_LAYERS_MOVED: self.updater.last.layers_moved,
            LOG_MOVE_NORM: self.updater.move_norm(),
        }
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        if self.updater is None:
            return
        starts = self.updater.start_steps()
        if starts and self.updater.moves_in_run == 0:
            warnings.warn(
                f"Delta-LoRA: training ended after {state.global_step} optimizer steps and W never moved: no adapter "
                f"passed its start_step ({', '.join(map(str, starts))}), so this run was plain LoRA. Lower start_step "
                "(W moves on the adapter's own steps t > start_step, counted from 0 and across runs) or train "
                "longer.",
                stacklevel=2,
            )
