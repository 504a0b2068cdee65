"""What PEFT's generic tests do with a LoraConfig on a custom model, with DeltaLoraConfig, in both modes.

A small MLP (no transformers), trained in a plain loop with DeltaLoraUpdater past the start step. The reference is
the independent dense one of ``tests/helpers.py`` on a fresh MLP: effective weights ``W_0 + s B A + lambda s (B A -
B_K A_K)``, and the trained head.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from deltalora_hf import DeltaLoraConfig, DeltaLoraUpdater

from .helpers import ALPHA, LAMBDA, R, adapter_state, dense_model

K = 1
MODES = ["inplace", "factored"]


class MLP(nn.Module):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0, self.lin1, self.head = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 3)
        self.to(dtype)
        self.dtype_ = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype_)
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def config(mode: str, **overrides) -> DeltaLoraConfig:
    values = dict(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["lin0", "lin1"],
        modules_to_save=["head"],
        update_ratio=LAMBDA,
        start_step=K,
        base_update=mode,
    )
    values.update(overrides)
    return DeltaLoraConfig(**values)


X = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))


def train(model: nn.Module, steps: int = 6, lr: float = 2e-2) -> None:
    updater = DeltaLoraUpdater(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        nn.functional.cross_entropy(model(X).float(), Y).backward()
        optimizer.step()
        updater.step()
        optimizer.zero_grad()


def reference(model: PeftModel, adapter: str = "default", enabled: bool = True) -> torch.Tensor:
    """The trained model from its adapter tensors, written densely on a fresh MLP (float32), with its head."""
    dense = dense_model(adapter_state(model, adapter) if enabled else None, build=MLP)
    if enabled:
        dense.head.load_state_dict(model.base_model.model.head.modules_to_save[adapter].state_dict())
    return out(dense)


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).float()


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert (got - want).abs().max().item() <= tol, (got - want).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_merge_disable_modules_to_save(mode, low_cpu_mem_usage, tmp_path):
    model = get_peft_model(MLP(), config(mode))
    train(model)
    want = reference(model)
    assert (want - reference(model, enabled=False)).abs().max().item() > 1e-3  # the adapter and head matter
    close(out(model), want)
    with model.disable_adapter():
        close(out(model), reference(model, enabled=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    close(out(loaded), want)
    loaded.merge_adapter()
    close(out(loaded), want)
    loaded.unmerge_adapter()
    close(out(loaded), want)
    close(out(loaded.merge_and_unload()), want)


@pytest.mark.parametrize("mode", MODES)
def test_add_set_delete_adapters(mode, tmp_path):
    model = get_peft_model(MLP(), config(mode))
    train(model)
    first = reference(model)
    model.add_adapter("second", config(mode))
    model.set_adapter("second")
    train(model, steps=4)
    second = reference(model, "second")
    close(out(model), second)
    model.set_adapter("default")
    close(out(model), first)
    model.delete_adapter("default")
    close(out(model), second)  # PEFT activates "second"


@pytest.mark.parametrize("mode", MODES)
def test_adapter_dtype_autocast_on_a_bf16_base(mode):
    model = get_peft_model(MLP(dtype=torch.bfloat16), config(mode), autocast_adapter_dtype=True)
    layer = model.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast: adapters in float32
    assert layer.lora_anchor_A["default"].dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    train(model)
    assert layer.is_anchored("default")
    close(out(model), reference(model), tol=0.1)  # a bf16 base: agreement to bf16 precision only
    if mode == "factored":
        assert torch.equal(layer.get_base_layer().weight, MLP(dtype=torch.bfloat16).lin0.weight)  # W never written
