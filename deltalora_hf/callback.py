"""``DeltaLoRACallback``: runs :class:`~deltalora_hf.DeltaLoraUpdater` inside a transformers ``Trainer``."""

from __future__ import annotations

import sys
import warnings

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .updater import DeltaLoraUpdater

LOG_UPDATE_NORM = "deltalora/update_norm"
LOG_LAYERS_MOVED = "deltalora/layers_moved"
LOG_MOVE_NORM = "deltalora/move_norm"


class DeltaLoRACallback(TrainerCallback):
    """Applies Delta-LoRA's base-weight update after every optimizer step of a ``Trainer``.

    ``Trainer(..., callbacks=[DeltaLoRACallback()])``. After optimizer step ``t`` (``state.global_step``, counted
    from 0) it calls :meth:`DeltaLoraUpdater.step`, so gradient accumulation gives one update per optimizer
    step and evaluation none. Training logs get ``deltalora/update_norm`` (Frobenius norm of the last in-place
    W update over all layers), ``deltalora/layers_moved`` (layers whose W moved at the last step) and
    ``deltalora/move_norm`` (norm of the whole change of W so far), so TensorBoard, W&B and the console show them.

    Args:
        seed: seed of the stochastic rounding of bfloat16/float16 weights (see :class:`DeltaLoraUpdater`).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.updater: DeltaLoraUpdater | None = None

    def _attach(self, model) -> DeltaLoraUpdater:
        if model is None:
            raise ValueError("DeltaLoRACallback needs the Trainer's model.")
        if self.updater is None or self.updater.tuner not in model.modules():
            self.updater = DeltaLoraUpdater(model, seed=self.seed)
        return self.updater

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._attach(model)  # fail at Trainer(...) time when the model has no Delta-LoRA adapter
        _run_before_other_callbacks(self)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # After a checkpoint is loaded: the factors now in the model are those before the next step.
        self._attach(model).snapshot()

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
        starts = sorted({config.start_step for _, _, config in self.updater.targets()})
        if starts and state.global_step - 1 <= starts[0]:  # the last step t never passed any start step
            warnings.warn(
                f"Delta-LoRA: training ended after {state.global_step} optimizer steps without passing start_step "
                f"({', '.join(map(str, starts))}), so W never moved and this run was plain LoRA. Lower start_step "
                "(W moves on steps t > start_step, counted from 0) or train longer.",
                stacklevel=2,
            )


def _run_before_other_callbacks(callback: TrainerCallback) -> None:
    """Put ``callback`` first in the calling Trainer's callback list.

    Trainer places user callbacks after the reporting integrations (TensorBoard, W&B, ...), which would then
    log before :meth:`DeltaLoRACallback.on_log` adds its metrics. The handler is the ``self`` of the
    ``CallbackHandler.call_event`` frame that is calling us; a new list is assigned so the loop in progress
    is not disturbed. If the handler cannot be found the metrics still reach ``state.log_history``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            handler.callbacks = [callback] + [c for c in handler.callbacks if c is not callback]
            return
        frame = frame.f_back
