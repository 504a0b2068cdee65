"""W stays in step with the adapters on every path a user takes (issue 9), in both base-update modes.

The reference shares no code with the package: a fresh base whose targeted weights are set, densely, to
``W_0 + lambda * s * (B A - B_K A_K)`` for the adapter under test, wrapped in plain PEFT LoRA with the same factors.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import default_collate
from transformers import Trainer

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, DeltaLoraUpdater

from .helpers import SequentialTrainer, lm_rows, tiny_llama, train_args

R, ALPHA, LAMBDA, K = 4, 8, 0.5, 2
SCALE = ALPHA / R
TARGETS = ["q_proj", "v_proj"]
TOL = 1e-5
MODES = ["inplace", "factored"]


def delta_config(mode: str = "inplace", **overrides) -> DeltaLoraConfig:
    values = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, update_ratio=LAMBDA, start_step=K, base_update=mode)
    values.update(overrides)
    return DeltaLoraConfig(**values)


def train(model, tmp_path, steps: int = 6, seed: int = 0, callbacks=None, lr: float = 1e-2):
    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, learning_rate=lr),
        train_dataset=lm_rows(4 * steps, seed=seed),
        callbacks=[DeltaLoRACallback()] if callbacks is None else callbacks,
    )
    trainer.train()
    return trainer


def logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=default_collate(lm_rows(4, seed=7))["input_ids"]).logits.float()
    model.train(was_training)
    return out


def adapter_tensors(model, adapter: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """Per targeted module (name relative to the transformers model): A, B, A_K, B_K, anchored (copies)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_anchor_A") and adapter in module.lora_anchor_A:
            key = name.removeprefix("base_model.model.")
            out[key] = dict(
                a=module.lora_A[adapter].weight.detach().clone(),
                b=module.lora_B[adapter].weight.detach().clone(),
                a_k=module.lora_anchor_A[adapter].clone(),
                b_k=module.lora_anchor_B[adapter].clone(),
                anchored=bool(module.lora_anchored[adapter]),
            )
    return out


def reference_logits(tensors: dict[str, dict[str, torch.Tensor]] | None, seed: int = 0) -> torch.Tensor:
    """Logits of W_0 + lambda s (B A - B_K A_K) + s B A, written densely on a fresh base (plain PEFT LoRA)."""
    base = tiny_llama(seed)
    if tensors is None:
        return logits(base)
    lora = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    modules = dict(lora.base_model.model.named_modules())
    with torch.no_grad():
        for name, t in tensors.items():
            module = modules[name]
            module.lora_A["default"].weight.copy_(t["a"])
            module.lora_B["default"].weight.copy_(t["b"])
            if t["anchored"]:
                module.base_layer.weight += LAMBDA * SCALE * (t["b"] @ t["a"] - t["b_k"] @ t["a_k"])
    return logits(lora)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max abs logit difference {diff:.3e} > {tol}"
    return diff


def trained(tmp_path, mode: str = "inplace", seed: int = 0, steps: int = 6, data_seed: int = 0):
    model = get_peft_model(tiny_llama(seed), delta_config(mode))
    train(model, tmp_path / f"run-{mode}-{data_seed}", steps=steps, seed=data_seed)
    return model


def moved_far(tensors) -> float:
    return max((LAMBDA * SCALE * (t["b"] @ t["a"] - t["b_k"] @ t["a_k"])).abs().max().item() for t in tensors.values())


# -- one test per path of the issue --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_transformers_load_adapter_gives_the_trained_model(mode, tmp_path):
    model = trained(tmp_path, mode)
    tensors = adapter_tensors(model)
    assert moved_far(tensors) > 1e-3
    assert_close(logits(model), reference_logits(tensors))
    model.save_pretrained(tmp_path / "saved")
    base = tiny_llama()
    base.load_adapter(str(tmp_path / "saved"))  # transformers' own integration (its own loader)
    assert_close(logits(base), reference_logits(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_low_cpu_mem_usage_loading(mode, tmp_path):
    model = trained(tmp_path, mode)
    tensors = adapter_tensors(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", low_cpu_mem_usage=True)
    assert_close(logits(loaded), reference_logits(tensors))
    other = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    other.load_adapter(tmp_path / "saved", adapter_name="again", low_cpu_mem_usage=True)
    other.set_adapter("again")
    assert_close(logits(other), reference_logits(tensors))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["train-again", "new-trainer", "is-trainable"])
def test_a_second_run_keeps_w_in_step(mode, how, tmp_path):
    model = trained(tmp_path, mode, steps=6)
    if how == "train-again":
        trainer = SequentialTrainer(
            model=model,
            args=train_args(tmp_path / "again", max_steps=2),
            train_dataset=lm_rows(8, seed=3),
            callbacks=[DeltaLoRACallback()],
        )
        trainer.train()
        trainer.train()  # a second train() on the same Trainer restarts global_step at 0 (< K)
    elif how == "new-trainer":
        train(model, tmp_path / "second", steps=2, seed=3)  # steps 0, 1 < K: the anchored adapter still moves W
    else:
        model.save_pretrained(tmp_path / "first")
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "first", is_trainable=True)
        train(model, tmp_path / "second", steps=2, seed=3)
    tensors = adapter_tensors(model)
    assert_close(logits(model), reference_logits(tensors))
    with model.disable_adapter():
        assert_close(logits(model), reference_logits(None))
    model.save_pretrained(tmp_path / "final")
    assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")), reference_logits(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_a_second_adapter_gives_each_adapter_alone(mode, tmp_path):
    first = trained(tmp_path, mode, data_seed=0)
    second = trained(tmp_path, mode, data_seed=5)
    first_t, second_t = adapter_tensors(first), adapter_tensors(second)
    second.save_pretrained(tmp_path / "other")
    first.load_adapter(tmp_path / "other", adapter_name="other")
    assert_close(logits(first), reference_logits(first_t))  # "default" unchanged by the load
    first.set_adapter("other")
    assert_close(logits(first), reference_logits(second_t))  # "other" alone on the original base
    first.set_adapter("default")
    assert_close(logits(first), reference_logits(first_t))
    with first.disable_adapter():
        assert_close(logits(first), reference_logits(None))


@pytest.mark.parametrize("mode", MODES)
def test_delete_adapter_takes_its_move_out(mode, tmp_path):
    first = trained(tmp_path, mode, data_seed=0)
    second = trained(tmp_path, mode, data_seed=5)
    second.save_pretrained(tmp_path / "other")
    first.load_adapter(tmp_path / "other", adapter_name="other")
    second_t = adapter_tensors(first, "other")
    first.delete_adapter("default")  # PEFT makes "other" active
    assert_close(logits(first), reference_logits(second_t))
    with first.disable_adapter():
        assert_close(logits(first), reference_logits(None))
    first.save_pretrained(tmp_path / "after-delete", selected_adapters=["other"])
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "after-delete" / "other")
    assert_close(logits(reloaded), reference_logits(second_t))
    assert_close(logits(first.unload()), reference_logits(None))


@pytest.mark.parametrize("mode", MODES)
def test_unload_returns_the_original_base(mode, tmp_path):
    model = trained(tmp_path, mode)
    assert moved_far(adapter_tensors(model)) > 1e-3
    assert_close(logits(model.unload()), reference_logits(None))


@pytest.mark.parametrize("mode", MODES)
def test_merge_unmerge_and_merge_and_unload(mode, tmp_path):
    model = trained(tmp_path, mode)
    tensors = adapter_tensors(model)
    model.merge_adapter()
    assert_close(logits(model), reference_logits(tensors))
    model.unmerge_adapter()
    assert_close(logits(model), reference_logits(tensors))
    assert_close(logits(model.merge_and_unload()), reference_logits(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_are_refused_by_name(mode):
    base = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied to .*lm_head.weight.*tie_word_embeddings=False"):
        get_peft_model(base, delta_config(mode, target_modules=["embed_tokens", "q_proj"]))


def test_two_callbacks_or_two_updaters_apply_each_update_once(tmp_path):
    once = trained(tmp_path, "inplace")
    twice = get_peft_model(tiny_llama(), delta_config())
    train(twice, tmp_path / "twice", callbacks=[DeltaLoRACallback(), DeltaLoRACallback()])
    for (name, a), (_, b) in zip(once.named_parameters(), twice.named_parameters()):
        assert torch.equal(a, b), name
    extra = DeltaLoraUpdater(twice)
    assert extra.step() == extra.last and extra.last.update_norm == 0.0  # nothing left to do
    assert_close(logits(twice), reference_logits(adapter_tensors(twice)))


@pytest.mark.parametrize("ratio", [float("inf"), float("-inf"), float("nan"), -1.0])
def test_update_ratio_must_be_finite_and_non_negative(ratio):
    with pytest.raises(ValueError, match="finite number >= 0"):
        delta_config(update_ratio=ratio)


def test_plain_trainer_without_callback_warns(tmp_path):
    model = get_peft_model(tiny_llama(), delta_config())
    with pytest.warns(UserWarning, match="no DeltaLoRACallback"):
        Trainer(model=model, args=train_args(tmp_path, max_steps=1), train_dataset=lm_rows(4)).train()


@pytest.mark.parametrize("mode", MODES)
def test_dtype_conversion_and_deepcopy_keep_w_in_step(mode, tmp_path):
    import copy

    model = trained(tmp_path, mode)
    tensors = adapter_tensors(model)
    twin = copy.deepcopy(model)  # what TRL does to build a reference model
    assert_close(logits(twin), reference_logits(tensors))
    model.double()  # every tensor replaced: W, factors, anchors and the applied record
    assert_close(logits(model), reference_logits(tensors))
    model.float()
    train(model, tmp_path / "after", steps=2, seed=3)  # and it keeps training right
    assert_close(logits(model), reference_logits(adapter_tensors(model)))
