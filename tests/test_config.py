"""Config validation, PEFT registration and adapter_config.json round trip."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn

import deltalora_hf
from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig

from .helpers import tiny_llama


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"use_dora": True}, "use_dora"),
        ({"update_ratio": -0.5}, "update_ratio"),
        ({"update_ratio": float("nan")}, "update_ratio"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 1.5}, "start_step"),
        ({"base_update_rounding": "up"}, "base_update_rounding"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [(0, 2), (1, 2)]}, "layer_replication"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ],
)
def test_bad_config_raises_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaLoraConfig(target_modules=["q_proj"], **kwargs)


def test_defaults_follow_the_paper_and_dropout_is_off():
    config = DeltaLoraConfig(target_modules=["q_proj"])
    assert (config.update_ratio, config.start_step, config.lora_dropout) == (2.0, 500, 0.0)
    assert config.peft_type is PeftType.DELTALORA


def test_peft_type_member_behaves_like_the_others_and_its_value_says_how_to_load_it():
    member = PeftType.DELTALORA
    assert PeftType["DELTALORA"] is member and PeftType(member.value) is member
    assert PeftType("DELTALORA") is member  # what deltalora-hf 0.2 saved
    assert member in list(PeftType) and isinstance(member, str)
    assert "pip install deltalora-hf" in member.value and "import deltalora_hf" in member.value
    assert json.loads(json.dumps({"peft_type": member})) == {"peft_type": member.value}


def test_import_and_reload_are_idempotent():
    importlib.reload(deltalora_hf)
    importlib.reload(deltalora_hf)
    assert [m for m in PeftType if m.name == "DELTALORA"] == [PeftType.DELTALORA]
    model = get_peft_model(tiny_llama(), deltalora_hf.DeltaLoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(model.base_model, deltalora_hf.DeltaLoraModel)


def test_adapter_config_round_trips(tmp_path):
    config = DeltaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], update_ratio=0.25, start_step=7)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == PeftType.DELTALORA.value
    assert (saved["update_ratio"], saved["start_step"], saved["base_update_rounding"]) == (0.25, 7, "stochastic")
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is DeltaLoraConfig and loaded.peft_type == PeftType.DELTALORA
    assert (loaded.update_ratio, loaded.start_step, loaded.r, loaded.lora_alpha) == (0.25, 7, 4, 8)
    assert set(loaded.target_modules) == {"q_proj", "v_proj"}
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(reloaded.peft_config["default"], DeltaLoraConfig)


class _IntLinear(nn.Linear):
    """A Linear whose weight is int8, like a quantized layer."""

    def __init__(self):
        super().__init__(4, 4, bias=False)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


class _Net(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("layer", [_IntLinear(), nn.Conv2d(2, 2, 1)], ids=["int8-weight", "conv2d"])
def test_target_that_cannot_be_written_in_place_names_the_layer(layer):
    with pytest.raises(ValueError, match="'proj'"):
        get_peft_model(_Net(layer), DeltaLoraConfig(r=2, target_modules=["proj"]))


def test_callback_without_delta_lora_adapter_fails_at_trainer_creation(tmp_path):
    from transformers import Trainer

    from .helpers import lm_rows, train_args

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no Delta-LoRA adapter"):
        Trainer(
            model=lora,
            args=train_args(tmp_path, max_steps=1),
            train_dataset=lm_rows(4),
            callbacks=[DeltaLoRACallback()],
        )
