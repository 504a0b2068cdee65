"""Delta-LoRA under Trainer vs an independent, hand-written Algorithm 1.

The reference shares no code with the package: plain PEFT LoRA, a plain PyTorch AdamW loop, and the
W update of Algorithm 1 written out densely: after step t > K, W += lambda * (alpha / r) * (B'A' - BA).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig

from .helpers import SequentialTrainer, base_weights, lm_rows, tiny_gpt2, tiny_llama, train_args

STEPS, K, LAMBDA, R, ALPHA, LR, BATCH = 24, 5, 0.5, 4, 8, 1e-2, 4


def _lora_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _dense_delta(module) -> torch.Tensor:
    """The LoRA product without scale, oriented like the stored base weight (written independently)."""
    if "default" in module.lora_embedding_A:  # nn.Embedding: weight is (num_embeddings, dim)
        return (module.lora_embedding_B["default"] @ module.lora_embedding_A["default"]).T
    delta = module.lora_B["default"].weight @ module.lora_A["default"].weight  # (out, in)
    return delta.T if module.fan_in_fan_out else delta


def reference_algorithm_1(base, targets, init_state, rows, steps, start_step, update_ratio):
    ref = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets))
    missing = ref.load_state_dict(init_state, strict=False)
    delta_only = ("lora_anchor", "lora_warmup_steps", "lora_inplace_move")  # what plain LoRA has no place for
    assert all(any(part in k for part in delta_only) for k in missing.unexpected_keys)
    params = [p for p in ref.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    scale = ALPHA / R
    modules = _lora_modules(ref)
    for t in range(steps):
        batch = default_collate(rows[t * BATCH : (t + 1) * BATCH])
        before = {n: _dense_delta(m).detach().clone() for n, m in modules.items()}
        ref(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if t > start_step:
            with torch.no_grad():
                for n, m in modules.items():
                    m.base_layer.weight += update_ratio * scale * (_dense_delta(m) - before[n])
    return ref


def _train_delta(model_fn, targets, tmp_path, rows, steps, start_step=K, update_ratio=LAMBDA, **args):
    model = get_peft_model(
        model_fn(),
        DeltaLoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, update_ratio=update_ratio, start_step=start_step
        ),
    )
    init_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, learning_rate=LR, per_device_train_batch_size=BATCH, **args),
        train_dataset=rows,
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train()
    return model, init_state, trainer


def _assert_close_to_reference(model, ref, w0, tol=1e-5):
    got, want = model.state_dict(), ref.state_dict()
    checked, moved = 0, 0.0
    for key, value in want.items():
        if "lora_A" in key or "lora_B" in key or "lora_embedding" in key or "base_layer.weight" in key:
            diff = (got[key] - value).abs().max().item()
            assert diff <= tol, f"{key}: max abs diff {diff:.2e} > {tol}"
            checked += 1
    for name, weight in base_weights(model).items():
        moved = max(moved, (weight - w0[name]).abs().max().item())
    assert checked > 0 and moved > 1e-3, f"W barely moved ({moved}); the comparison would prove nothing"
    return moved


@pytest.mark.parametrize(
    "model_fn,targets",
    [(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]), (tiny_gpt2, ["c_attn", "c_fc"])],
    ids=["llama-linear-embedding", "gpt2-conv1d"],
)
def test_trainer_matches_hand_written_algorithm_1(model_fn, targets, tmp_path):
    rows = lm_rows(STEPS * BATCH)
    w0 = base_weights(get_peft_model(model_fn(), DeltaLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)))
    model, init_state, _ = _train_delta(model_fn, targets, tmp_path, rows, STEPS)
    ref = reference_algorithm_1(model_fn(), targets, init_state, rows, STEPS, K, LAMBDA)
    moved = _assert_close_to_reference(model, ref, w0)
    max_diff = max(
        (model.state_dict()[k] - v).abs().max().item() for k, v in ref.state_dict().items() if k in model.state_dict()
    )
    print(
        f"\n{model_fn.__name__}: {STEPS} steps, K={K}: max |W_T - W_0| = {moved:.3e}, "
        f"max abs diff vs reference = {max_diff:.2e}"
    )


def test_reference_detects_a_wrong_delta(tmp_path):
    """The comparison above can fail: the (A'-A)(B'-B) delta of some public implementations differs."""
    rows = lm_rows(STEPS * BATCH)
    targets = ["q_proj", "v_proj"]
    model, init_state, _ = _train_delta(tiny_llama, targets, tmp_path, rows, STEPS)
    wrong = reference_algorithm_1(tiny_llama(), targets, init_state, rows, STEPS, K, 0.0)  # no W update at all
    with pytest.raises(AssertionError):
        _assert_close_to_reference(model, wrong, base_weights(model))


def test_update_ratio_zero_is_exactly_peft_lora(tmp_path):
    rows = lm_rows(12 * BATCH)
    targets = ["q_proj", "v_proj"]
    delta, init_state, _ = _train_delta(tiny_llama, targets, tmp_path / "d", rows, 12, start_step=0, update_ratio=0.0)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets))
    lora.load_state_dict(init_state, strict=False)
    SequentialTrainer(
        model=lora,
        args=train_args(tmp_path / "l", max_steps=12, learning_rate=LR, per_device_train_batch_size=BATCH),
        train_dataset=rows,
    ).train()
    got, want = delta.state_dict(), lora.state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
