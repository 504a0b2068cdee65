"""Trainer integration: when W moves, logging, warnings, skipped and non-finite steps, custom loops, bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import default_collate
from transformers import TrainerCallback

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, DeltaLoraUpdater

from .helpers import SequentialTrainer, base_weights, lm_rows, tiny_llama, train_args

TARGETS = ["q_proj", "v_proj"]


class RecordW(TrainerCallback):
    """Copies of every targeted W after each optimizer step and after each accumulation micro-step."""

    def __init__(self, model):
        self.model, self.steps, self.substeps = model, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(base_weights(self.model))

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps.append(base_weights(self.model))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _delta_model(start_step=2, update_ratio=0.5, **kwargs):
    config = DeltaLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=update_ratio, start_step=start_step, **kwargs
    )
    return get_peft_model(tiny_llama(), config)


def _train(model, tmp_path, steps, rows=None, **args):
    record = RecordW(model)
    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, **args),
        train_dataset=rows or lm_rows(64),
        callbacks=[DeltaLoRACallback(), record],
    )
    trainer.train()
    return trainer, record


@pytest.mark.parametrize("accumulation", [1, 4])
def test_w_is_bit_identical_up_to_step_k_then_moves_once_per_optimizer_step(tmp_path, accumulation):
    model = _delta_model(start_step=3)
    w0 = base_weights(model)
    _, record = _train(model, tmp_path, 8, gradient_accumulation_steps=accumulation, per_device_train_batch_size=2)
    assert len(record.steps) == 8
    for t in range(4):  # optimizer steps t = 0..K
        assert _same(record.steps[t], w0), f"W moved at step {t} <= K"
    for t in range(4, 8):  # t > K: every optimizer step moves every W
        assert all(not torch.equal(record.steps[t][k], record.steps[t - 1][k]) for k in w0), t
    # micro-steps of gradient accumulation never move W
    for i, sub in enumerate(record.substeps):
        step_index = i // (accumulation - 1) if accumulation > 1 else None
        if step_index is not None:
            expected = record.steps[step_index - 1] if step_index > 0 else w0
            assert _same(sub, expected)
    assert len(record.substeps) == 8 * (accumulation - 1)


def test_logs_report_the_norm_of_the_last_w_update_and_layers_moved(tmp_path):
    model = _delta_model(start_step=1)
    trainer, record = _train(model, tmp_path, 10, logging_steps=5)
    logged = [h for h in trainer.state.log_history if "deltalora/update_norm" in h]
    assert [h["step"] for h in logged] == [5, 10]
    for entry in logged:
        t = entry["step"] - 1  # the last optimizer step before this log
        before, after = record.steps[t - 1], record.steps[t]
        norm = sum((after[k] - before[k]).double().pow(2).sum() for k in after).sqrt().item()
        assert entry["deltalora/update_norm"] == pytest.approx(norm, rel=1e-3)
        assert entry["deltalora/layers_moved"] == 4  # q_proj and v_proj in 2 layers


def test_warns_when_a_delta_lora_model_trains_without_the_callback(tmp_path):
    model = _delta_model()
    with pytest.warns(UserWarning, match="plain LoRA"):
        SequentialTrainer(model=model, args=train_args(tmp_path, max_steps=2), train_dataset=lm_rows(16)).train()


def test_warns_at_the_end_when_training_never_passed_the_start_step(tmp_path):
    model = _delta_model(start_step=5)
    w0 = base_weights(model)
    with pytest.warns(UserWarning, match="never moved"):
        _train(model, tmp_path, 6)  # steps 0..5 are all <= K
    assert _same(base_weights(model), w0)


def test_no_end_warning_when_w_moved(tmp_path):
    model = _delta_model(start_step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(?!Delta-LoRA).*", category=FutureWarning)
        trainer = SequentialTrainer(
            model=model,
            args=train_args(tmp_path, max_steps=4),
            train_dataset=lm_rows(32),
            callbacks=[DeltaLoRACallback()],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    assert not [w for w in caught if "Delta-LoRA" in str(w.message)]


def _loop(model, rows, steps, updater, batch=4, lr=1e-2, scaler=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for t in range(steps):
        loss = model(**default_collate(rows[t * batch : (t + 1) * batch])).loss
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        updater.step()
        optimizer.zero_grad()
    return optimizer


def test_custom_loop_api_matches_trainer(tmp_path):
    rows = lm_rows(48)
    trained = _delta_model(start_step=2)
    _train(trained, tmp_path, 12)
    looped = _delta_model(start_step=2)
    _loop(looped, rows, 12, DeltaLoraUpdater(looped))
    got, want = looped.state_dict(), trained.state_dict()
    assert max((got[k].double() - v.double()).abs().max().item() for k, v in want.items()) <= 1e-6


def test_step_skipped_by_the_grad_scaler_moves_nothing():
    model = _delta_model(start_step=0)
    rows = lm_rows(32)
    updater = DeltaLoraUpdater(model)
    _loop(model, rows, 3, updater)
    w = base_weights(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # scaled gradients overflow: optimizer.step is skipped
    _loop(model, rows, 1, updater, scaler=scaler)
    assert scaler.get_scale() < 1e38  # the scaler did skip and back off
    assert updater.last.layers_moved == 0 and _same(base_weights(model), w)


def test_non_finite_delta_is_skipped_with_a_warning_and_w_untouched():
    model = _delta_model(start_step=0)
    updater = DeltaLoraUpdater(model)
    _loop(model, lm_rows(32), 3, updater)
    w = base_weights(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="not finite"):
        stats = updater.step()
    assert stats.layers_skipped_nonfinite == 1
    after = base_weights(model)
    name = next(k for k in w if k.endswith("layers.0.self_attn.q_proj"))
    assert torch.equal(after[name], w[name]) and not torch.isnan(after[name]).any()


def _bf16_share(rounding: str, tmp_path) -> tuple[float, float]:
    """Train a bf16-base model; compare W_T - W_0 with lambda*s*(B_T A_T - B_a A_a) computed in float32."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(dtype=torch.bfloat16),
        DeltaLoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=1.0, start_step=5, base_update_rounding=rounding
        ),
    )
    w0 = {k: v.float() for k, v in base_weights(model).items()}
    _train(model, tmp_path, 60, rows=lm_rows(240), learning_rate=2e-4)
    dot, norm, err = 0.0, 0.0, 0.0
    for name, module in model.named_modules():
        if name not in w0:
            continue
        a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
        a0, b0 = module.lora_anchor_A["default"].float(), module.lora_anchor_B["default"].float()
        expected = 1.0 * (8 / 4) * (b @ a - b0 @ a0)
        got = module.base_layer.weight.float() - w0[name]
        dot += (got * expected).sum().item()
        norm += expected.pow(2).sum().item()
        err += (got - expected).pow(2).sum().item()
    return dot / norm, (err / norm) ** 0.5


def test_bf16_weights_receive_the_whole_expected_change_with_stochastic_rounding(tmp_path):
    share_sr, error_sr = _bf16_share("stochastic", tmp_path / "sr")
    share_rn, error_rn = _bf16_share("nearest", tmp_path / "rn")
    print(
        f"\nbf16 W, 60 steps, lr 2e-4: stochastic rounding received {share_sr:.3f} of the expected change "
        f"(relative error {error_sr:.3f}); plain bf16 add received {share_rn:.3f} (relative error {error_rn:.3f})"
    )
    assert abs(share_sr - 1) <= 0.05
    assert share_rn < 0.9  # the problem the default solves is real in this setting


def test_deepspeed_zero3_weights_that_cannot_be_written_in_place_are_refused_naming_factored_mode():
    model = _delta_model()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    weight.ds_id, weight.ds_shape = 7, weight.shape  # as ZeRO-3 marks them; this partition is offloaded to NVMe
    weight.ds_tensor = torch.zeros(weight.numel() // 2)
    weight.ds_tensor.final_location = "nvme"
    with pytest.raises(RuntimeError, match=r"ZeRO-3 .*NVMe.*base_update='factored'"):
        DeltaLoraUpdater(model)
