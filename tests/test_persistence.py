"""Save, load, resume, merge and export without losing the moved base weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, export_lora

from .helpers import (
    SequentialTrainer,
    base_weights,
    cls_rows,
    lm_rows,
    tiny_bert,
    tiny_llama,
    train_args,
)

TARGETS = ["q_proj", "v_proj"]


def _config(**kwargs):
    values = dict(r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=2)
    values.update(kwargs)
    return DeltaLoraConfig(**values)


def _train(model, tmp_path, steps, rows, **args):
    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, **args),
        train_dataset=rows,
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train()
    return trainer


def _logits(model, rows):
    model.eval()
    with torch.no_grad():
        batch = default_collate(rows)
        batch.pop("labels")
        return model(**batch).logits


def _max_w_change(model, w0):
    return max((w - w0[k]).abs().max().item() for k, w in base_weights(model).items())


def test_save_load_causal_lm_reproduces_the_trained_model(tmp_path):
    model = get_peft_model(tiny_llama(), _config())
    w0 = base_weights(model)
    _train(model, tmp_path / "run", 10, lm_rows(40))
    assert _max_w_change(model, w0) > 1e-3  # past the start step: W moved
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    diff = (_logits(model, lm_rows(4, seed=1)) - _logits(loaded, lm_rows(4, seed=1))).abs().max().item()
    w_diff = max((base_weights(loaded)[k] - w).abs().max().item() for k, w in base_weights(model).items())
    print(f"\ncausal LM save/load: max abs logit diff {diff:.2e}, max abs W diff {w_diff:.2e}")
    assert diff <= 1e-5 and w_diff <= 1e-5


def test_save_load_sequence_classifier_with_head(tmp_path):
    config = _config(task_type="SEQ_CLS", target_modules=["query", "value"])
    model = get_peft_model(tiny_bert(), config)
    rows = cls_rows(40)
    _train(model, tmp_path / "run", 10, rows)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    diff = (_logits(model, rows[:8]) - _logits(loaded, rows[:8])).abs().max().item()
    print(f"\nsequence classifier save/load: max abs logit diff {diff:.2e}")
    assert diff <= 1e-5
    auto = _saved_base_and_adapter(tiny_bert(), config, tmp_path / "auto", rows, AutoPeftModelForSequenceClassification)
    assert auto <= 1e-5


def _saved_base_and_adapter(base, config, tmp_path, rows, auto_cls):
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(type(base).from_pretrained(tmp_path / "base"), config)
    _train(model, tmp_path / "run", 8, rows)
    model.save_pretrained(tmp_path / "adapter")
    loaded = auto_cls.from_pretrained(tmp_path / "adapter")
    return (_logits(model, rows[:4]) - _logits(loaded, rows[:4])).abs().max().item()


def test_auto_peft_model_for_causal_lm_loads_a_delta_lora_adapter(tmp_path):
    assert _saved_base_and_adapter(tiny_llama(), _config(), tmp_path, lm_rows(32), AutoPeftModelForCausalLM) <= 1e-5


def test_save_before_the_start_step_and_with_two_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), _config(start_step=100), adapter_name="early")
    _train(model, tmp_path / "run", 4, lm_rows(16))  # never reaches the start step: nothing to add to W
    model.add_adapter("late", _config(start_step=0))
    model.set_adapter("late")
    _train(model, tmp_path / "run2", 6, lm_rows(24))
    model.save_pretrained(tmp_path / "adapters")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapters" / "late", adapter_name="late")
    loaded.load_adapter(tmp_path / "adapters" / "early", adapter_name="early")
    loaded.set_adapter("late")
    rows = lm_rows(4, seed=3)
    assert (_logits(model, rows) - _logits(loaded, rows)).abs().max().item() <= 1e-5
    model.set_adapter("early")
    loaded.set_adapter("early")
    assert (_logits(model, rows) - _logits(loaded, rows)).abs().max().item() <= 1e-5


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    rows = lm_rows(48)
    straight = get_peft_model(tiny_llama(), _config(start_step=2))
    _train(straight, tmp_path / "straight", 12, rows)

    first = get_peft_model(tiny_llama(), _config(start_step=2))
    _train(first, tmp_path / "resumed", 6, rows, save_strategy="steps", save_steps=6)
    checkpoint = tmp_path / "resumed" / "checkpoint-6"
    assert checkpoint.is_dir()
    resumed = get_peft_model(tiny_llama(), _config(start_step=2))  # fresh base: W at its original value
    trainer = SequentialTrainer(
        model=resumed,
        args=train_args(tmp_path / "resumed", max_steps=12),
        train_dataset=rows,
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    got, want = resumed.state_dict(), straight.state_dict()
    diff = max((got[k].double() - v.double()).abs().max().item() for k, v in want.items())
    print(f"\nresume after the start step: max abs diff of W, A, B vs a straight run {diff:.2e}")
    assert diff <= 1e-6


def test_merge_and_unload_gives_a_plain_model_with_the_whole_change(tmp_path):
    model = get_peft_model(tiny_llama(), _config())
    w0 = base_weights(model)
    _train(model, tmp_path, 10, lm_rows(40))
    rows = lm_rows(4, seed=2)
    before = _logits(model, rows)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_k, b_k = layer.lora_anchor_A["default"], layer.lora_anchor_B["default"]
    expected = w0[next(k for k in w0 if k.endswith("layers.1.self_attn.v_proj"))] + 2.0 * (
        0.5 * (b @ a - b_k @ a_k) + b @ a
    )
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (merged.model.layers[1].self_attn.v_proj.weight - expected).abs().max().item() <= 1e-5
    assert (before - _logits(merged, rows)).abs().max().item() <= 1e-5


def test_export_loads_with_plain_peft_in_a_process_without_deltalora(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(type(base).from_pretrained(tmp_path / "base"), _config())
    _train(model, tmp_path / "run", 10, lm_rows(40))
    export_lora(model, tmp_path / "export")
    rows = lm_rows(4, seed=5)
    save_file(
        {"input_ids": default_collate(rows)["input_ids"], "logits": _logits(model, rows)},
        str(tmp_path / "io.safetensors"),
    )
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        io = load_file({str(tmp_path / "io.safetensors")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "export")!r})
        model.eval()
        with torch.no_grad():
            diff = (model(input_ids=io["input_ids"]).logits - io["logits"]).abs().max().item()
        config = json.load(open({str(tmp_path / "export" / "adapter_config.json")!r}))
        assert "deltalora_hf" not in sys.modules
        print(config["peft_type"], config["r"], diff)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peft_type, rank, diff = out.stdout.split()[-3:]
    print(
        f"\nexported LoRA in a plain-PEFT process: type {peft_type}, rank {rank}, max abs logit diff {float(diff):.2e}"
    )
    assert peft_type == "LORA" and int(rank) == 8 and float(diff) <= 1e-5
    a = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in a.items() if "lora_A" in k} == {8}


def test_adapter_is_about_twice_a_lora_adapter(tmp_path):
    delta = get_peft_model(tiny_llama(), _config(start_step=0))
    _train(delta, tmp_path / "d", 3, lm_rows(12))
    delta.save_pretrained(tmp_path / "delta")
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lora.save_pretrained(tmp_path / "lora")
    sizes = {n: os.path.getsize(tmp_path / n / "adapter_model.safetensors") for n in ("delta", "lora")}
    full = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    print(
        f"\nadapter sizes: Delta-LoRA {sizes['delta']} B, LoRA {sizes['lora']} B "
        f"(ratio {sizes['delta'] / sizes['lora']:.2f}); full model {full} B"
    )
    assert 1.8 <= sizes["delta"] / sizes["lora"] <= 2.3


def test_loading_into_a_base_with_other_shapes_fails_clearly_and_changes_nothing(trained, tmp_path):
    model = trained()  # the session's: _config(), 6 steps on lm_rows(24)
    model.save_pretrained(tmp_path / "adapter")
    other = tiny_llama(hidden_size=48)  # same architecture, other shapes
    w_other = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="other shapes"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    for name, param in other.named_parameters():
        key = name.replace("base_layer.", "")
        if key in w_other:
            assert torch.equal(param, w_other[key])


def test_damaged_adapter_file_fails_and_leaves_the_model_unchanged(trained, tmp_path):
    model = trained()  # the session's: _config(), 6 steps on lm_rows(24)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # truncated download
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="(?i)(safetensor|deserializ|header|incomplete)"):
        model.load_adapter(tmp_path / "adapter", adapter_name="default2")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
