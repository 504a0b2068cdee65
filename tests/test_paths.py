"""Ordinary paths outside the inventory (issue 22): each gives the trained model or a clear error before anything
changed. The reference is the independent dense model of ``reference_logits`` (no code shared with the package)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_base_model_state_dict, get_peft_model, set_base_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoraUpdater

from .helpers import (
    MODES,
    adapter_state,
    assert_close,
    delta_config,
    lm_rows,
    logits,
    move_size,
    reference,
    tiny_llama,
)


def fresh_copy(trained, mode):
    """A private copy of the session's trained model (Trainer + callback, K=2, 6 steps), W moved."""
    model = trained(mode)
    assert move_size(adapter_state(model)) > 1e-3
    return model


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_adapter_filled_through_data_after_a_no_grad_forward_is_the_copy(trained, mode):
    model = fresh_copy(trained, mode)
    tensors = adapter_state(model)
    model.add_adapter("ref", delta_config(mode))
    model.set_adapter("ref")
    logits(model)  # an eval pass with the fresh adapter: nothing may keep what it saw
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".default." in name:
            params[name.replace(".default.", ".ref.")].data.copy_(p.data)  # TRL's copy
    model.set_adapter("ref")
    assert_close(logits(model), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_data_writes_to_the_factors_are_seen_by_a_state_dict_and_the_next_check(trained, mode):
    model = fresh_copy(trained, mode)
    logits(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.get_base_layer().weight.detach().clone()
    layer.lora_B["default"].weight.data.mul_(2.0)  # no version counter change, no entry point
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a read: describes the written model
    assert torch.equal(layer.get_base_layer().weight, w)  # ... and wrote nothing
    reloaded = get_peft_model(tiny_llama(), delta_config(mode))
    reloaded.load_state_dict(state)
    assert_close(logits(reloaded), reference(adapter_state(model)))
    assert_close(logits(model), reference(adapter_state(model)))  # the state dict handed out: checked by value


@pytest.mark.parametrize("mode", MODES)
def test_set_base_model_state_dict_of_get_base_model_state_dict_changes_nothing(trained, mode):
    model = fresh_copy(trained, mode)
    tensors = adapter_state(model)
    set_base_model_state_dict(model, get_base_model_state_dict(model))
    assert_close(logits(model), reference(tensors))
    saved = {k: v.clone() for k, v in get_base_model_state_dict(model).items()}  # a copy, as read from a file
    set_base_model_state_dict(model, saved)
    assert_close(logits(model), reference(tensors))
    with model.disable_adapter():
        assert_close(logits(model), reference(None))


@pytest.mark.parametrize("source", MODES)
@pytest.mark.parametrize("target", MODES)
def test_a_state_dict_of_either_mode_loads_into_either_mode(trained, source, target):
    state = {k: v.clone() for k, v in trained(source).state_dict().items()}
    tensors = adapter_state(trained(source))
    assert any(".lora_inplace_move." in k for k in state) == (source == "inplace")  # the keys say the mode
    model = get_peft_model(tiny_llama(), delta_config(target))
    model.load_state_dict(state)
    assert_close(logits(model), reference(tensors))
    with model.disable_adapter():
        assert_close(logits(model), reference(None))


def _plain_lora(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("order", ["lora-first", "delta-first"])
def test_delta_lora_and_plain_lora_on_the_same_layers_are_refused_before_anything_is_created(trained, order, tmp_path):
    lora_path = _plain_lora(tmp_path)
    trained("inplace").save_pretrained(tmp_path / "delta")
    base = tiny_llama()
    first, second = (lora_path, tmp_path / "delta") if order == "lora-first" else (tmp_path / "delta", lora_path)
    base.load_adapter(str(first), adapter_name="first")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules_before = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match="plain LoRA|Delta-LoRA") as error:
        base.load_adapter(str(second), adapter_name="second")
    assert "export_lora" in str(error.value) or "unload" in str(error.value)
    assert [type(m) for m in base.modules()] == modules_before
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # the same through PEFT's own add_adapter
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(first))
    other = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]) if order == "delta-first" else delta_config()
    with pytest.raises(ValueError, match="different peft types"):  # PEFT's own check, before anything is created
        peft_model.add_adapter("second", other)
    assert "second" not in peft_model.peft_config


def _loop(model, rows, optimizer, updater):
    for row in rows:
        loss = model(**default_collate([row])).loss
        loss.backward()
        optimizer.step()
        updater.step()
        optimizer.zero_grad()


def test_a_custom_loop_resumed_in_a_new_process_anchors_at_the_same_step(tmp_path):
    rows = lm_rows(6, seed=1)

    def start():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), delta_config())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer

    whole, opt = start()
    _loop(whole, rows, opt, DeltaLoraUpdater(whole))

    first, opt = start()
    _loop(first, rows[:2], opt, DeltaLoraUpdater(first))  # 2 steps: not anchored yet (K=2)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt = start()  # "a new process": a fresh model, optimizer and updater
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    _loop(resumed, rows[2:], opt, DeltaLoraUpdater(resumed))
    assert_close(logits(resumed), logits(whole))
    assert_close(logits(resumed), reference(adapter_state(resumed)))


def test_a_checkpoint_of_the_trainable_parameters_only_warns_and_names_what_is_missing(trained):
    model = fresh_copy(trained, "inplace")
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    target = get_peft_model(tiny_llama(), delta_config())
    with pytest.warns(UserWarning, match="lora_anchor_A.*lora_warmup_steps|anchors"):
        target.load_state_dict(trainable, strict=False)


def _saved(trained, tmp_path, mode):
    folder = tmp_path / f"saved-{mode}"
    trained(mode).save_pretrained(folder)
    return folder, folder / "adapter_model.safetensors"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["no-anchors", "no-flag", "nan-anchor"])
def test_a_damaged_adapter_file_is_refused_at_load_naming_the_keys(trained, mode, damage, tmp_path):
    folder, file = _saved(trained, tmp_path, mode)
    tensors = load_file(file)
    if damage == "no-anchors":
        tensors = {k: v for k, v in tensors.items() if "lora_anchor_" not in k}
    elif damage == "no-flag":
        tensors = {k: v for k, v in tensors.items() if "lora_anchored" not in k}
    else:
        key = next(k for k in tensors if "lora_anchor_A" in k)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    save_file(tensors, file)
    with pytest.raises(ValueError, match="lora_anchor|lora_anchored") as error:
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert "q_proj" in str(error.value)


def test_adapter_files_carry_the_step_count_and_k_means_the_adapters_own_steps(trained, tmp_path):
    folder, file = _saved(trained, tmp_path, "inplace")
    steps = {k: v for k, v in load_file(file).items() if ".lora_warmup_steps." in k}
    assert steps and all(int(v) == 3 for v in steps.values())  # K + 1 = 3 warm-up steps, then anchored
    assert json.loads((folder / "adapter_config.json").read_text())["start_step"] == 2


def test_saved_adapters_load_when_peft_defines_deltalora_itself(trained, tmp_path):
    """A future PEFT with its own ``PeftType.DELTALORA`` (simulated before the import): adapters saved with this
    version's peft_type value still load, with the package imported."""
    import subprocess
    import sys
    from pathlib import Path

    import deltalora_hf

    trained("inplace").save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["peft_type"]
    assert saved.startswith("DELTALORA: pip install deltalora-hf")
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pt", {str(Path(deltalora_hf.__file__).parent / "_peft_type.py")!r})
pt = importlib.util.module_from_spec(spec); spec.loader.exec_module(pt)
pt.ensure_peft_type_member("DELTALORA", "DELTALORA")  # what PEFT itself would define
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
import deltalora_hf
from peft import PeftModel, PeftType
from tests.helpers import tiny_llama
assert PeftType.DELTALORA.value == "DELTALORA"
model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "saved")!r})
print(type(model.base_model).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("DeltaLoraModel")


def test_peft_lora_target_guards_apply():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="out_proj.*incompatible with Mamba"):
        get_peft_model(mamba, delta_config(target_modules=["out_proj"]))
    get_peft_model(mamba, delta_config(target_modules=["in_proj"]))  # a compatible target is fine


@pytest.mark.parametrize("mode", MODES)
def test_files_and_state_dicts_of_0_3_still_load(trained, mode, tmp_path):
    """0.3 wrote no step counts and no in-place marks: its adapter files load as before, and a whole-model state dict
    of an in-place model is read as 0.3 wrote it (W with the moves of the in-place adapters)."""
    tensors = adapter_state(trained(mode))
    folder, file = _saved(trained, tmp_path, mode)
    old = {
        k: v for k, v in load_file(file).items() if ".lora_warmup_steps." not in k and ".lora_inplace_move." not in k
    }
    save_file(old, file)
    assert_close(logits(PeftModel.from_pretrained(tiny_llama(), folder)), reference(tensors))
    state = {
        k: v.clone()
        for k, v in trained(mode).state_dict().items()
        if ".lora_warmup_steps." not in k and "inplace_move" not in k
    }
    model = get_peft_model(tiny_llama(), delta_config(mode))
    model.load_state_dict(state, strict=False)
    assert_close(logits(model), reference(tensors))
