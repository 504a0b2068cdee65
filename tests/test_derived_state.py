"""The paths of issue 28's table: each is exact against the independent dense reference, or refused with the model
unchanged, in both modes; each of these failed on 0.4.0 (457770f) in at least one mode.

Also: no process-wide hook, and the warm-up counts the steps of the optimizer that owns the adapter's factors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.optim.optimizer as optimizer_module
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoraLayer, DeltaLoraUpdater

from .helpers import (
    MODES,
    REPO_ROOT,
    K,
    adapter_state,
    assert_close,
    delta_config,
    lm_rows,
    logits,
    move_size,
    reference,
    tiny_llama,
)


def loop(model, steps: int, *, optimizer=None, updater=None, fused: bool = False, give_optimizer: bool = True):
    """``steps`` hand-written AdamW steps on a fixed batch, each followed by ``updater.step()``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-2, fused=fused)
    if updater is None:
        updater = DeltaLoraUpdater(model, optimizer=optimizer) if give_optimizer else DeltaLoraUpdater(model)
    batch = default_collate(lm_rows(4, seed=1))
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        updater.step()
        optimizer.zero_grad()
    return optimizer, updater


def first_layer(model) -> DeltaLoraLayer:
    return model.base_model.model.model.layers[0].self_attn.q_proj


def exact(model) -> float:
    return assert_close(logits(model), reference(adapter_state(model)))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"changed by a refused operation: {changed[:4]}"


def counts(model) -> list[int]:
    return [int(layer.lora_warmup_steps["default"]) for layer in model.modules() if isinstance(layer, DeltaLoraLayer)]


def test_no_process_wide_hook_is_installed():
    model = get_peft_model(tiny_llama(), delta_config())
    loop(model, K + 2)
    module_globals = torch.nn.modules.module
    for table in (
        module_globals._global_module_registration_hooks,
        module_globals._global_parameter_registration_hooks,
        module_globals._global_buffer_registration_hooks,
        optimizer_module._global_optimizer_post_hooks,
        optimizer_module._global_optimizer_pre_hooks,
    ):
        assert not table


@pytest.mark.parametrize("mode", MODES)
def test_set_anchor_after_a_custom_loop(mode):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 3)
    assert move_size(adapter_state(model)) > 1e-3
    first_layer(model).set_anchor("default")  # a public method: the move starts again from the current factors
    exact(model)
    model.state_dict()
    exact(model)


SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import deltalora_hf
from deltalora_hf import DeltaLoraUpdater
from torch.utils.data import default_collate
from tests.helpers import lm_rows
model = torch.load({path!r}, weights_only=False)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
updater = DeltaLoraUpdater(model{optimizer_arg})
batch = default_collate(lm_rows(4, seed=1))
for _ in range({steps}):
    model(**batch).loss.backward()
    optimizer.step()
    updater.step()
    optimizer.zero_grad()
torch.save(model, {out!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_optimizer", [True, False])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "mid-warm-up"])
@pytest.mark.parametrize("mode", MODES)
def test_a_pickled_model_trains_exactly_in_a_new_process_with_a_fused_optimizer(
    tmp_path, mode, anchored, with_optimizer
):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 2 if anchored else 1)
    torch.save(model, tmp_path / "model.pt")
    script = SCRIPT.format(
        root=str(REPO_ROOT),
        path=str(tmp_path / "model.pt"),
        out=str(tmp_path / "after.pt"),
        steps=4,
        optimizer_arg=", optimizer=optimizer" if with_optimizer else "",
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = torch.load(tmp_path / "after.pt", weights_only=False)
    assert counts(after) == [K + 1] * len(counts(after))  # anchored at its own step K, across the processes
    assert move_size(adapter_state(after)) > 1e-3
    exact(after)


def test_the_count_is_the_optimizers_own_steps():
    model = get_peft_model(tiny_llama(), delta_config())
    other = get_peft_model(tiny_llama(seed=1), delta_config())
    optimizer, updater = loop(model, 1)
    loop(other, 3)  # another model's optimizer steps in the same process
    updater.step()  # no step of this model's optimizer since the last call
    DeltaLoraUpdater(model, optimizer=optimizer).step()  # a second updater of the same optimizer counts nothing
    assert counts(model) == [1] * len(counts(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    batch = default_collate(lm_rows(4, seed=1))
    loss = model(**batch).loss * float("inf")  # inf gradients: the scaler skips the optimizer's step
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    updater.step()
    optimizer.zero_grad()
    assert counts(model) == [1] * len(counts(model))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    loop(model, 1, optimizer=optimizer, updater=updater)  # a step it took, at learning rate 0: counts
    assert counts(model) == [2] * len(counts(model))


def test_an_optimizer_with_half_an_adapter_is_refused():
    model = get_peft_model(tiny_llama(), delta_config())
    half = [p for n, p in model.named_parameters() if "lora_A" in n]
    with pytest.raises(ValueError, match="only one of the two factors"):
        DeltaLoraUpdater(model, optimizer=torch.optim.AdamW(half, lr=1e-2))


def test_without_an_optimizer_a_call_after_which_the_factors_changed_counts():
    model = get_peft_model(tiny_llama(), delta_config())
    optimizer, updater = loop(model, 2, give_optimizer=False, fused=True)  # fused: no version counter moves
    assert counts(model) == [2] * len(counts(model))
    updater.step()  # nothing changed since the last count
    assert counts(model) == [2] * len(counts(model))


@pytest.mark.parametrize("flag", [2.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_an_adapter_file_whose_flag_is_not_0_or_1_is_refused(tmp_path, mode, flag):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 2)
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    state = load_file(file)
    key = next(k for k in state if ".lora_anchored." in k)
    state[key] = torch.tensor([flag])
    save_file(state, file)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="not exactly 0 or 1"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


@pytest.mark.parametrize(
    "damage",
    ["missing lora_B", "missing lora_A", "int64 anchors"],
)
@pytest.mark.parametrize("mode", MODES)
def test_a_damaged_adapter_file_is_refused(tmp_path, mode, damage):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 2)
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    state = load_file(file)
    if damage.startswith("missing"):
        del state[next(k for k in state if f".{damage.split()[1]}." in k)]
    else:
        for key in [k for k in state if ".lora_anchor_" in k]:
            state[key] = (state[key] * 1000).to(torch.int64)
    save_file(state, file)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="cannot be loaded"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_a_state_dict_of_another_adapter_name_is_refused_or_exact(mode, strict):
    trained = get_peft_model(tiny_llama(), delta_config(mode))
    loop(trained, K + 3)
    other = get_peft_model(tiny_llama(seed=0), delta_config(mode), adapter_name="sft")
    before = snapshot(other)
    try:
        other.load_state_dict(trained.state_dict(), strict=strict)
    except (ValueError, RuntimeError):
        if mode == "inplace" or strict:
            base_keys = [k for k in before if "base_layer" in k]
            assert all(torch.equal(other.state_dict()[k], before[k]) for k in base_keys)  # W as it was
    with other.disable_adapter():
        assert_close(logits(other), reference(None))  # no move that no adapter owns
    assert_close(logits(other), reference(adapter_state(other, "sft")))


@pytest.mark.parametrize("cast", ["double", "float"])
@pytest.mark.parametrize("mode", MODES)
def test_a_state_dict_cast_to_another_dtype_loads_back_exactly(mode, cast):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 3)
    state = {k: getattr(v, cast)() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    fresh = get_peft_model(tiny_llama(), delta_config(mode))
    fresh.load_state_dict(state)
    assert_close(logits(fresh), reference(adapter_state(fresh)))  # the model its tensors say
    assert_close(logits(fresh), logits(model))


@pytest.mark.parametrize("mode", MODES)
def test_a_state_dict_loaded_then_read_back_is_the_same(mode):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    loop(model, K + 3)
    for merged in (False, True):
        if merged:
            model.merge_adapter()
        state = snapshot(model)
        model.load_state_dict(state)
        back = model.state_dict()
        assert back.keys() == state.keys()
        for key, value in state.items():
            assert back[key].dtype == value.dtype, key
            assert torch.equal(back[key], value), key


@pytest.mark.parametrize("mode", MODES)
def test_marks_in_memory_say_what_w_holds(mode):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    marks = {n: b for n, b in model.named_buffers() if ".lora_inplace_move." in n}
    assert bool(marks) == (mode == "inplace")
    assert all(float(b) == 0.0 for b in marks.values())
    loop(model, K + 2)
    layer = first_layer(model)
    assert all(float(b) == layer.move_scale("default") for b in marks.values())
    with model.disable_adapter():
        pass
    model.half()  # a dtype cast keeps the marks' float64 values
    assert all(b.dtype == torch.float64 and float(b) == layer.move_scale("default") for b in marks.values())


@pytest.mark.parametrize("mode", MODES)
def test_a_parametrized_base_weight_is_refused_in_place(mode):
    model = get_peft_model(tiny_llama(), delta_config(mode))
    optimizer, updater = loop(model, K + 2)

    class Identity(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * 1.0

    parametrize.register_parametrization(first_layer(model).get_base_layer(), "weight", Identity())
    before = snapshot(model)
    if mode == "inplace":
        with pytest.raises(RuntimeError, match="parametrized"):
            loop(model, 1, optimizer=optimizer, updater=updater)
        assert_unchanged(model, before)  # refused before the optimizer's step changed anything
    else:
        loop(model, 2, optimizer=optimizer, updater=updater)
        exact(model)
    with pytest.raises(ValueError, match="parametrized"):
        base = tiny_llama()
        parametrize.register_parametrization(base.model.layers[0].self_attn.q_proj, "weight", Identity())
        get_peft_model(base, delta_config("inplace"))
