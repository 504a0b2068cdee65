"""What other libraries do to an adapter gives the trained model or a clear error (issue 16), both modes.

Each test compares with the independent dense reference of ``tests/helpers.py``: a fresh base whose targeted weights
are ``W_0 + s B A + lambda s (B A - B_K A_K)``. The trained models are the session's (``trained`` in
``conftest.py``), each test working on its own copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

from deltalora_hf import DeltaLoraLayer

from .helpers import (
    MODES,
    adapter_state,
    assert_close,
    delta_config,
    delta_layers,
    logits,
    reference,
    tiny_llama,
    train,
)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode", MODES)
def test_anchors_are_saved_buffers_named_like_the_factors(mode, trained):
    model = trained(mode)
    buffers = [n for n, _ in model.named_buffers() if ".lora_anchor" in n]
    assert buffers and all(n.endswith(".default.weight") for n in buffers)
    assert not any(".lora_anchor" in n for n, _ in model.named_parameters())  # PEFT's counts are LoRA's
    state = get_peft_model_state_dict(model)
    assert {k.rsplit(".", 2)[-2] for k in state if ".lora_anchor" in k} == {
        "lora_anchor_A",
        "lora_anchor_B",
        "lora_anchored",
    }


@pytest.mark.parametrize("mode", MODES)
def test_a_copy_by_parameter_names_carries_the_whole_adapter(mode, trained):
    """TRL's reference adapter: add an adapter, copy every ``.default.`` parameter into it through ``.data``; the
    anchors (buffers) are not copied, and the copy is recognised at set_adapter."""
    model = trained(mode)
    tensors = adapter_state(model)
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.set_adapter("ref")
    assert_close(logits(model), reference(tensors))
    model.set_adapter("default")
    assert_close(logits(model), reference(tensors))


@pytest.mark.parametrize("how", ["copy_", "assign"])
def test_data_writes_never_leave_a_saved_model_that_differs_from_memory(how, trained, tmp_path):
    model = trained("inplace")
    other = adapter_state(trained("inplace", data_seed=5))
    for name, layer in delta_layers(model).items():
        for param, value in (
            (layer.lora_A["default"].weight, other[name]["a"]),
            (layer.lora_B["default"].weight, other[name]["b"]),
        ):
            if how == "copy_":
                param.data.copy_(value)
            else:
                param.data = value.clone()
    model.save_pretrained(tmp_path / "saved")  # compares by value: W is brought in step before it is saved
    want = reference(adapter_state(model))
    assert_close(logits(model), want)
    assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")), want)


@pytest.mark.parametrize("mode", MODES)
def test_hotswap_from_state_dict_gives_the_swapped_in_adapter(mode, trained):
    model = trained(mode)
    second = trained(mode, data_seed=5)
    want = reference(adapter_state(second))
    state = {k.replace(".weight", ".default.weight"): v for k, v in get_peft_model_state_dict(second).items()}
    hotswap_adapter_from_state_dict(model, state, "default", model.peft_config["default"])
    assert_close(logits(model), want)
    with model.disable_adapter():
        assert_close(logits(model), reference(None))


@pytest.mark.parametrize("mode", MODES)
def test_compiled_hotswap_preparation_is_refused_and_changes_nothing(mode, trained):
    model = trained(mode)
    before = state_of(model)
    with pytest.raises(TypeError, match="tensor scalings.*not changed"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert_same_state(model, before)
    assert all(
        not isinstance(s, torch.Tensor)
        for m in model.modules()
        if isinstance(m, DeltaLoraLayer)
        for s in m.scaling.values()
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_add_weighted_adapter_over_moved_adapters_is_refused_and_changes_nothing(mode, combination, trained):
    model = trained(mode)
    before, configs = state_of(model), dict(model.peft_config)
    with pytest.raises(ValueError, match="add_weighted_adapter cannot combine.*default.*export_lora"):
        model.add_weighted_adapter(["default"], [1.0], "mix", combination_type=combination)
    assert dict(model.peft_config) == configs
    assert_same_state(model, before)


@pytest.mark.parametrize("mode", MODES)
def test_add_weighted_adapter_over_unmoved_adapters_is_plain_lora(mode, tmp_path):
    model = get_peft_model(tiny_llama(), delta_config(mode, start_step=100))  # trains, never anchors
    train(model, tmp_path / "run")
    tensors = adapter_state(model)
    assert tensors and not any(t["anchored"] for t in tensors.values())
    model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    assert_close(logits(model), reference(tensors))


@pytest.mark.parametrize("mode", MODES)
def test_rank_mismatch_names_r_and_leaves_nothing_behind(mode, trained, tmp_path):
    model = trained(mode)
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["r"] = 8  # the tensors have rank 4
    path.write_text(json.dumps(config))
    host = trained(mode, data_seed=5)
    want = reference(adapter_state(host))
    before = state_of(host)
    for _ in range(2):  # a second try meets the same clear error, not a leftover adapter
        with pytest.raises(ValueError, match="gives rank 8.*saved tensors have rank 4.*left as it was"):
            host.load_adapter(tmp_path / "saved", adapter_name="other")
        assert list(host.peft_config) == ["default"]
        assert_same_state(host, before)
    assert_close(logits(host), want)
    base = tiny_llama()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="gives rank 8"):
        PeftModel.from_pretrained(base, tmp_path / "saved")
    assert [n for n, _ in base.named_modules()] == names  # the base is not left wrapped
    assert_close(logits(base), reference(None))


def test_adapters_saved_by_v0_2_still_load(trained, tmp_path):
    """v0.2 saved ``peft_type: "DELTALORA"`` and the anchors as buffers (``...lora_anchor_A``, a bool flag)."""
    from safetensors.torch import load_file, save_file

    model = trained("inplace")
    tensors = adapter_state(model)
    model.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "saved"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "DELTALORA"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(folder / "adapter_model.safetensors")
    old = {}
    for key, value in state.items():
        if key.endswith(".lora_anchored.weight"):
            old[key.removesuffix(".weight")] = value.reshape(()).bool()
        elif ".lora_anchor_" in key:
            old[key.removesuffix(".weight")] = value
        else:
            old[key] = value
    save_file(old, folder / "adapter_model.safetensors")
    assert_close(logits(PeftModel.from_pretrained(tiny_llama(), folder)), reference(tensors))


def test_the_model_card_says_what_the_adapter_is_and_how_to_load_it(trained, tmp_path):
    model = trained("factored")
    model.save_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "saved")  # saving again does not repeat the section
    card = (tmp_path / "saved" / "README.md").read_text()
    assert card.count("## Delta-LoRA adapter") == 1
    for text in (
        "deltalora-hf",
        "lambda = 0.5",
        "start step K = 2",
        "`factored`",
        "import deltalora_hf",
        "export_lora",
    ):
        assert text in card, text
    assert "library_name: peft" in card  # PEFT's own card is kept


LOADERS = {
    "PeftModel.from_pretrained": "from peft import PeftModel\nPeftModel.from_pretrained(base, ADAPTER)",
    "AutoPeftModelForCausalLM": "import peft\npeft.AutoPeftModelForCausalLM.from_pretrained(ADAPTER)",
    "transformers AutoModelForCausalLM": "AutoModelForCausalLM.from_pretrained(ADAPTER)",
    "transformers load_adapter": "base.load_adapter(ADAPTER)",
}


@pytest.mark.slow
def test_every_loader_without_the_import_says_what_to_install_and_import(trained, tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_llama(), delta_config("inplace"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    for name, code in LOADERS.items():
        script = "\n".join(
            [
                "import sys",
                "from transformers import AutoModelForCausalLM",
                f"ADAPTER = {str(tmp_path / 'adapter')!r}",
                f"base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})",
                "try:",
                textwrap.indent(code, "    "),
                "except Exception as error:",
                "    print('ERROR', type(error).__name__, error)",
                "assert 'deltalora_hf' not in sys.modules",
            ]
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        assert "ERROR" in out, f"{name} loaded a Delta-LoRA adapter without deltalora_hf: {out}"
        assert "pip install deltalora-hf" in out and "import deltalora_hf" in out, f"{name}: {out}"
