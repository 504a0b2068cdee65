"""torch.compile (no graph break, no recompile per step), the order of the logged metrics, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerCallback

from deltalora_hf import DeltaLoRACallback
from deltalora_hf.callback import LOG_LAYERS_MOVED, LOG_MOVE_NORM, LOG_UPDATE_NORM

from .helpers import (
    SequentialTrainer,
    adapter_state,
    assert_close,
    delta_config,
    lm_rows,
    logits,
    reference,
    tiny_llama,
    train_args,
)

STEPS = 12


def _trainer(model, tmp_path, callbacks, **args):
    return SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=STEPS, **args),
        train_dataset=lm_rows(4 * STEPS),
        callbacks=callbacks,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inplace", "factored"])
def test_compiled_training_has_one_graph_and_matches_eager(mode, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = get_peft_model(tiny_llama(), delta_config(mode))
    _trainer(
        compiled, tmp_path / "c", [DeltaLoRACallback()], torch_compile=True, torch_compile_backend="aot_eager"
    ).train()
    graph_breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    print(f"\n{mode}: {STEPS} compiled steps (K=2): {graph_breaks} graph breaks, {graphs} graph(s)")
    assert graph_breaks == 0 and graphs == 1  # one graph, never recompiled, although W moves on steps 3..11
    torch._dynamo.reset()

    eager = get_peft_model(tiny_llama(), delta_config(mode))
    _trainer(eager, tmp_path / "e", [DeltaLoRACallback()]).train()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (a - b).abs().max().item() <= 1e-5, name
    assert_close(logits(compiled), reference(adapter_state(compiled)))


class Recorder(TrainerCallback):
    """A reporting integration stand-in: registered before DeltaLoRACallback, it keeps what on_log gives it."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_a_reporting_callback_registered_first_receives_the_metrics(tmp_path):
    recorder = Recorder()
    trainer = _trainer(get_peft_model(tiny_llama(), delta_config()), tmp_path, [recorder], logging_steps=4)
    DeltaLoRACallback(trainer=trainer)  # joins the trainer ahead of every callback it already has
    trainer.train()
    train_logs = [log for log in recorder.logs if "learning_rate" in log]
    assert len(train_logs) == 3
    assert all({LOG_UPDATE_NORM, LOG_LAYERS_MOVED, LOG_MOVE_NORM} <= log.keys() for log in train_logs)
    assert train_logs[-1][LOG_MOVE_NORM] > 0 and train_logs[-1][LOG_LAYERS_MOVED] == 4


def test_without_trainer_argument_the_metrics_reach_log_history(tmp_path):
    recorder = Recorder()
    trainer = _trainer(
        get_peft_model(tiny_llama(), delta_config()), tmp_path, [recorder, DeltaLoRACallback()], logging_steps=4
    )
    trainer.train()
    history = [log for log in trainer.state.log_history if "learning_rate" in log]
    assert len(history) == 3 and all(LOG_MOVE_NORM in log for log in history)
    received = [log for log in recorder.logs if "learning_rate" in log]
    assert len(received) == 3  # the recorder got every training log,
    assert not any(LOG_MOVE_NORM in log for log in received)  # but without the metrics: it ran first, why trainer=


@pytest.mark.parametrize("mode", ["inplace", "factored"])
def test_trained_model_pickles_and_stays_right(mode, trained):
    model = trained(mode)
    copy = pickle.loads(pickle.dumps(model))
    assert_close(logits(copy), logits(model), tol=0.0)
    assert_close(logits(copy), reference(adapter_state(copy)))


def test_bitsandbytes_layer_classes_pickle_by_reference():
    bnb_layers = pytest.importorskip("deltalora_hf.bnb")
    classes = [getattr(bnb_layers, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(bnb_layers, n)]
    assert classes, "bitsandbytes is installed by the test extra, so both classes must exist"
    for cls in classes:
        assert pickle.loads(pickle.dumps(cls)) is cls
