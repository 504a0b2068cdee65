"""W stays in step with the adapters on every path a user takes (issue 9), in both base-update modes.

The reference is the independent dense one of ``tests/helpers.py``: a fresh base whose targeted weights are set,
densely, to ``W_0 + s B A + lambda s (B A - B_K A_K)`` from the adapter's tensors. The trained models are the
session's (``trained`` in ``conftest.py``), each test working on its own copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer

from deltalora_hf import DeltaLoRACallback, DeltaLoraUpdater

from .helpers import (
    MODES,
    SequentialTrainer,
    adapter_state,
    assert_close,
    base_weights,
    delta_config,
    lm_rows,
    logits,
    move_size,
    reference,
    tiny_llama,
    train,
    train_args,
)

# -- one test per path of the issue --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_transformers_load_adapter_gives_the_trained_model(mode, trained, tmp_path):
    model = trained(mode)
    tensors = adapter_state(model)
    assert move_size(tensors) > 1e-3
    assert_close(logits(model), reference(tensors))
    model.save_pretrained(tmp_path / "saved")
    base = tiny_llama()
    base.load_adapter(str(tmp_path / "saved"))  # transformers' own integration (its own loader)
    assert_close(logits(base), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_low_cpu_mem_usage_loading(mode, trained, tmp_path):
    model = trained(mode)
    tensors = adapter_state(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", low_cpu_mem_usage=True)
    assert_close(logits(loaded), reference(tensors))
    other = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    other.load_adapter(tmp_path / "saved", adapter_name="again", low_cpu_mem_usage=True)
    other.set_adapter("again")
    assert_close(logits(other), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["train-again", "new-trainer", "is-trainable"])
def test_a_second_run_keeps_w_in_step(mode, how, trained, tmp_path):
    model = trained(mode)
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
    tensors = adapter_state(model)
    assert_close(logits(model), reference(tensors))
    with model.disable_adapter():
        assert_close(logits(model), reference(None))
    model.save_pretrained(tmp_path / "final")
    assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_a_second_adapter_gives_each_adapter_alone(mode, trained, tmp_path):
    first = trained(mode)
    second = trained(mode, data_seed=5)
    first_t, second_t = adapter_state(first), adapter_state(second)
    second.save_pretrained(tmp_path / "other")
    first.load_adapter(tmp_path / "other", adapter_name="other")
    assert_close(logits(first), reference(first_t))  # "default" unchanged by the load
    first.set_adapter("other")
    assert_close(logits(first), reference(second_t))  # "other" alone on the original base
    first.set_adapter("default")
    assert_close(logits(first), reference(first_t))
    with first.disable_adapter():
        assert_close(logits(first), reference(None))


@pytest.mark.parametrize("mode", MODES)
def test_delete_adapter_takes_its_move_out(mode, trained, tmp_path):
    first = trained(mode)
    second = trained(mode, data_seed=5)
    second.save_pretrained(tmp_path / "other")
    first.load_adapter(tmp_path / "other", adapter_name="other")
    second_t = adapter_state(first, "other")
    first.delete_adapter("default")  # PEFT makes "other" active
    assert_close(logits(first), reference(second_t))
    with first.disable_adapter():
        assert_close(logits(first), reference(None))
    first.save_pretrained(tmp_path / "after-delete", selected_adapters=["other"])
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "after-delete" / "other")
    assert_close(logits(reloaded), reference(second_t))
    assert_close(logits(first.unload()), reference(None))


@pytest.mark.parametrize("mode", MODES)
def test_unload_returns_the_original_base(mode, trained):
    model = trained(mode)
    assert move_size(adapter_state(model)) > 1e-3
    assert_close(logits(model.unload()), reference(None))


@pytest.mark.parametrize("mode", MODES)
def test_merge_unmerge_and_merge_and_unload(mode, trained):
    model = trained(mode)
    tensors = adapter_state(model)
    model.merge_adapter()
    assert_close(logits(model), reference(tensors))
    model.unmerge_adapter()
    assert_close(logits(model), reference(tensors))
    assert_close(logits(model.merge_and_unload()), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_are_refused_by_name(mode):
    base = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied to .*lm_head.weight.*tie_word_embeddings=False"):
        get_peft_model(base, delta_config(mode, target_modules=["embed_tokens", "q_proj"]))


def test_two_callbacks_or_two_updaters_apply_each_update_once(trained, tmp_path):
    once = trained("inplace")
    twice = get_peft_model(tiny_llama(), delta_config())
    train(twice, tmp_path / "twice", callbacks=[DeltaLoRACallback(), DeltaLoRACallback()])
    for (name, a), (_, b) in zip(once.named_parameters(), twice.named_parameters()):
        assert torch.equal(a, b), name
    before = base_weights(twice)
    assert DeltaLoraUpdater(twice).step().update_norm == 0.0  # nothing left to do: W unchanged
    assert all(torch.equal(w, before[name]) for name, w in base_weights(twice).items())
    assert_close(logits(twice), reference(adapter_state(twice)))


@pytest.mark.parametrize("ratio", [float("inf"), float("-inf"), float("nan"), -1.0])
def test_update_ratio_must_be_finite_and_non_negative(ratio):
    with pytest.raises(ValueError, match="finite number >= 0"):
        delta_config(update_ratio=ratio)


def test_plain_trainer_without_callback_warns(tmp_path):
    model = get_peft_model(tiny_llama(), delta_config())
    with pytest.warns(UserWarning, match="no DeltaLoRACallback"):
        Trainer(model=model, args=train_args(tmp_path, max_steps=1), train_dataset=lm_rows(4)).train()


@pytest.mark.parametrize("mode", MODES)
def test_dtype_conversion_and_deepcopy_keep_w_in_step(mode, trained, tmp_path):
    model = trained(mode)
    tensors = adapter_state(model)
    twin = copy.deepcopy(model)  # what TRL does to build a reference model
    assert_close(logits(twin), reference(tensors))
    model.double()  # every tensor replaced: W, factors, anchors and the applied record
    assert_close(logits(model), reference(tensors))
    model.float()
    train(model, tmp_path / "after", steps=2, seed=3)  # and it keeps training right
    assert_close(logits(model), reference(adapter_state(model)))
