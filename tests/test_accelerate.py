"""A custom accelerate loop with gradient accumulation and DeltaLoraUpdater matches Trainer + DeltaLoRACallback."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader, default_collate

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, DeltaLoraUpdater

from .helpers import SequentialTrainer, lm_rows, tiny_llama, train_args

accelerate = pytest.importorskip("accelerate")

ACCUMULATION, MICRO_BATCH, STEPS, START_STEP = 2, 2, 8, 2
RATIO, SCALE = 0.5, 8 / 4


def _delta_model():
    config = DeltaLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], update_ratio=RATIO, start_step=START_STEP
    )
    return get_peft_model(tiny_llama(), config)


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and Accelerator share accelerate's process-wide singletons: start and end with clean ones."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    yield
    reset()


def _accelerate_loop(rows) -> tuple[torch.nn.Module, list[int]]:
    """Returns the model and the optimizer steps t at which the updater ran."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    model = _delta_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loader = DataLoader(rows, batch_size=MICRO_BATCH, shuffle=False, collate_fn=default_collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updater = DeltaLoraUpdater(model)
    stepped = []
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()  # accelerate skips it on accumulation micro-steps
            if accelerator.sync_gradients:  # a real optimizer step was taken: move W
                stepped.append(updater.step().step)
            optimizer.zero_grad()
    return accelerator.unwrap_model(model), stepped


def test_accelerate_loop_with_gradient_accumulation_matches_trainer(tmp_path, fresh_accelerate_state):
    rows = lm_rows(ACCUMULATION * MICRO_BATCH * STEPS)
    looped, stepped = _accelerate_loop(rows)
    assert stepped == list(range(STEPS))  # one W update per optimizer step, none per micro-step

    trained = _delta_model()
    w0 = {k: v.clone() for k, v in trained.state_dict().items() if k.endswith("base_layer.weight")}
    trainer = SequentialTrainer(
        model=trained,
        args=train_args(
            tmp_path, max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION
        ),
        train_dataset=rows,
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train()
    assert trainer.state.global_step == STEPS

    got, want = looped.state_dict(), trained.state_dict()
    assert got.keys() == want.keys()
    difference = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    print(f"\naccelerate loop vs Trainer (accumulation {ACCUMULATION}, {STEPS} steps): max |diff| {difference:.2e}")
    assert difference <= 1e-5
    for key, w in w0.items():  # the comparison is not vacuous: W moved as Algorithm 1 says
        prefix = key[: -len(".base_layer.weight")]
        a, b = want[f"{prefix}.lora_A.default.weight"], want[f"{prefix}.lora_B.default.weight"]
        a_k, b_k = want[f"{prefix}.lora_anchor_A.default.weight"], want[f"{prefix}.lora_anchor_B.default.weight"]
        expected = RATIO * SCALE * (b @ a - b_k @ a_k)
        assert expected.abs().max() > 1e-4
        assert (want[key] - w - expected).abs().max() <= 1e-5
