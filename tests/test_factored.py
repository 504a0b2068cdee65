"""base_update="factored": same training as in-place, W never written; quantized bases; disable_adapter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, export_lora

from .helpers import SequentialTrainer, base_weights, lm_rows, tiny_llama, train_args

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _model(mode, dtype=torch.float32, **kwargs):
    values = dict(r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=2, base_update=mode)
    values.update(kwargs)
    return get_peft_model(tiny_llama(dtype=dtype), DeltaLoraConfig(**values))


def _train(model, tmp_path, steps=12, **args):
    trainer = SequentialTrainer(
        model=model,
        args=train_args(tmp_path, max_steps=steps, **args),
        train_dataset=lm_rows(steps * 4),
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train()
    return trainer


def _logits(model, seed=7, train_mode=False):
    model.train(train_mode)
    with torch.no_grad():
        return model(input_ids=default_collate(lm_rows(4, seed=seed))["input_ids"]).logits.float()


def _effective_weights(model):
    """W_eff = W + get_delta_weight: what merge_and_unload would write, per targeted layer (float32)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_anchored"):
            out[name] = module.get_base_layer().weight.float() + module.get_delta_weight("default").float()
    return out


def test_inplace_and_factored_train_identically_and_factored_never_writes_w(tmp_path):
    inplace, factored = _model("inplace"), _model("factored")
    w0 = base_weights(factored)
    trainer = _train(inplace, tmp_path / "i")
    _train(factored, tmp_path / "f")
    assert all(torch.equal(w, w0[k]) for k, w in base_weights(factored).items())  # W never written
    logit_diff = (_logits(inplace) - _logits(factored)).abs().max().item()
    eff_i, eff_f = _effective_weights(inplace), _effective_weights(factored)
    weight_diff = max((eff_i[k] - eff_f[k]).abs().max().item() for k in eff_i)
    moved = max((eff_f[k] - w0[k]).abs().max().item() for k in eff_f)
    print(
        f"\nin-place vs factored after 12 steps (K=2): max abs diff of merged weights {weight_diff:.2e}, "
        f"logits {logit_diff:.2e}; max |W_eff - W_0| = {moved:.2e}"
    )
    assert weight_diff <= 1e-5 and logit_diff <= 1e-5 and moved > 1e-2
    merged_i, merged_f = inplace.merge_and_unload(), factored.merge_and_unload()
    for (n, p), (_, q) in zip(merged_i.named_parameters(), merged_f.named_parameters()):
        assert (p - q).abs().max().item() <= 1e-5, n
    assert trainer.state.log_history[-2]["deltalora/move_norm"] > 0


@pytest.mark.parametrize("mode", ["inplace", "factored"])
def test_disable_adapter_gives_the_original_base_model(mode, tmp_path):
    reference = tiny_llama()
    model = _model(mode)
    _train(model, tmp_path)
    with torch.no_grad():
        want = reference(input_ids=default_collate(lm_rows(4, seed=7))["input_ids"]).logits
    trained = _logits(model)
    with model.disable_adapter():
        got = _logits(model)
    assert (trained - want).abs().max().item() > 1e-3  # training changed the model...
    assert (got - want).abs().max().item() <= 1e-5  # ...and the disabled adapter is the original base
    assert (_logits(model) - trained).abs().max().item() <= 1e-6  # and re-enabling restores it


def test_factored_save_load_export_merge_and_resume(tmp_path):
    model = _model("factored")
    _train(model, tmp_path / "run")
    want = _logits(model)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert (want - _logits(loaded)).abs().max().item() <= 1e-5
    export_lora(model, tmp_path / "export")
    exported = PeftModel.from_pretrained(tiny_llama(), tmp_path / "export")
    assert (want - _logits(exported)).abs().max().item() <= 1e-5
    assert (want - _logits(model.merge_and_unload())).abs().max().item() <= 1e-5

    straight = _model("factored")
    _train(straight, tmp_path / "straight", steps=10)
    first = _model("factored")
    _train(first, tmp_path / "resumed", steps=5, save_strategy="steps", save_steps=5)
    resumed = _model("factored")
    trainer = SequentialTrainer(
        model=resumed,
        args=train_args(tmp_path / "resumed", max_steps=10),
        train_dataset=lm_rows(40),
        callbacks=[DeltaLoRACallback()],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))
    got, ref = resumed.state_dict(), straight.state_dict()
    assert max((got[k].double() - v.double()).abs().max().item() for k, v in ref.items()) <= 1e-6


def _change_vs_fp32(mode, rounding, tmp_path):
    """Relative Frobenius error of (W_eff - W_0) of a bf16-base run vs the same run in float32."""
    sgd = dict(optim="sgd", learning_rate=0.2)  # SGD: the runs differ by bf16 forward noise, not Adam's sign flips
    fp32 = _model("factored")
    low = _model(mode, dtype=torch.bfloat16, base_update_rounding=rounding)
    w0 = base_weights(fp32)
    w0_low = {k: v.float() for k, v in base_weights(low).items()}
    _train(fp32, tmp_path / "32", **sgd)
    _train(low, tmp_path / mode, **sgd)
    eff32, eff16 = _effective_weights(fp32), _effective_weights(low)
    num = sum(((eff16[k] - w0_low[k]) - (eff32[k] - w0[k])).pow(2).sum() for k in w0)
    den = sum((eff32[k] - w0[k]).pow(2).sum() for k in w0)
    return (num / den).sqrt().item()


def test_bf16_base_in_factored_mode_tracks_a_float32_run(tmp_path):
    factored = _change_vs_fp32("factored", "stochastic", tmp_path / "f")
    print(
        f"\nbf16 base, factored: change of the merged model vs a float32 run, relative Frobenius error {factored:.4f}"
    )
    assert factored <= 0.01


@pytest.mark.skipif(  # this test only: a module-level importorskip here would skip the whole module
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (Linux: the test extra)"
)
@pytest.mark.parametrize(
    "quant",
    ["nf4", "fp4", "int8"],
)
def test_quantized_bases_train_in_factored_mode_and_refuse_inplace(quant, tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hidden size 64: bitsandbytes' CPU 4-bit kernels reject 32 on some CPUs (AVX512-BF16), plain PEFT LoRA too
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    if quant == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32)

    def load():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qconfig, device_map="cpu")
        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)

    with pytest.raises(ValueError, match="base_update='factored'"):
        get_peft_model(load(), DeltaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(
        load(),
        DeltaLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            update_ratio=0.5,
            start_step=2,
            base_update="factored",
        ),
    )
    # Logits in train mode: bitsandbytes' CPU backend repacks 4-bit weights on the first eval-mode forward, after
    # which training gets no gradient (plain PEFT LoRA fails the same way), so eval mode comes only after training.
    before = _logits(model, train_mode=True)
    _train(model, tmp_path / "run", steps=8)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ in ("Linear4bit", "Linear8bitLt") and layer.is_anchored("default")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_k, b_k = layer.lora_anchor_A["default"], layer.lora_anchor_B["default"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        lora_only = layer.base_layer(x) + 2.0 * (x @ a.T @ b.T)
        expected = lora_only + 0.5 * 2.0 * (x @ a.T @ b.T - x @ a_k.T @ b_k.T)  # Algorithm 1's moved W, factored
        layer.eval()
        got = layer(x)
    move = (expected - lora_only).abs().max().item()
    assert move > 1e-3  # the move is really there...
    assert (got - expected).abs().max().item() <= 0.05 * move  # ...and it is Algorithm 1's (int8 output is fp16)
    assert (before - _logits(model)).abs().max().item() > 1e-4
