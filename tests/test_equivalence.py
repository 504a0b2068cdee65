"""Delta-LoRA after step K is a plain LoRA with scale (1+λ)·s on the base W_0 − λ·s·B_K·A_K (docs/theory.md).

Tiny Llama in float64, a hand-written loop driving :class:`deltalora_hf.DeltaLoraUpdater`, and plain PEFT LoRA as
the reference. With Adam/AdamW the factor gradients of Delta-LoRA are those of the scaled LoRA times 1/(1+λ);
Adam's step is unchanged by a constant gradient scale once its ``eps`` is scaled by the same constant, so the
reference runs with ``eps·(1+λ)`` and the trajectories agree to rounding. With SGD the reference runs at
``lr/(1+λ)``. Every test also checks that LoRA with the *same* ``lora_alpha`` is far away, so it can fail: removing
the W update turns Delta-LoRA into exactly that LoRA, and a wrong scale moves the merged weights off the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import default_collate

from deltalora_hf import DeltaLoraConfig, DeltaLoraUpdater

from .helpers import lm_rows, tiny_llama

R, ALPHA, LAMBDA, LR, WD, EPS, BATCH, STEPS = 4, 8, 1.0, 1e-2, 0.01, 1e-8, 4, 12
TARGETS = ["q_proj", "v_proj", "down_proj"]
TIGHT = 1e-9  # float64 rounding, relative to the size of the weight change
FAR = 0.1  # same-alpha LoRA must be at least this far (relative), or the comparison cannot tell anything apart
Optimizer = Literal["adamw", "sgd"]


def _model(alpha: float, delta: bool, start_step: int = 0) -> PeftModel:
    base = tiny_llama(seed=0, dtype=torch.float64)
    torch.manual_seed(1)  # the same A initialisation in every model
    if delta:
        config = DeltaLoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=TARGETS, update_ratio=LAMBDA, start_step=start_step
        )
    else:
        config = LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(base, config)


def _optimizer(model: PeftModel, kind: Optimizer, lr: float, eps: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WD, eps=eps)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _train(model: PeftModel, optimizer: torch.optim.Optimizer, steps: range, first_lr_zero: bool) -> None:
    """``optimizer.step()`` then the Delta-LoRA W update (if the model has one), on fixed batches."""
    delta = isinstance(model.peft_config["default"], DeltaLoraConfig)
    updater = DeltaLoraUpdater(model, optimizer=optimizer) if delta else None  # counts the step at lr 0
    if updater is not None:
        updater.next_step = steps.start
    rows = lm_rows(BATCH * STEPS, seed=3)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for t in steps:
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = 0.0 if (first_lr_zero and t == 0) else lr
        model(**default_collate(rows[t * BATCH : (t + 1) * BATCH])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if updater is not None:
            updater.step(t)


def _merged(model: PeftModel) -> dict[str, torch.Tensor]:
    """W + s·B·A of every targeted linear, computed here (not by the package's merge)."""
    merged = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged[name] = module.get_base_layer().weight.detach() + module.scaling["default"] * delta.detach()
    return merged


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b − W_0‖ over all targeted weights."""
    assert a.keys() == b.keys() == w0.keys() and a
    diff = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    change = sum((b[k] - w0[k]).pow(2).sum() for k in b).sqrt()
    assert change > 0
    return float(diff / change)


def _w0() -> dict[str, torch.Tensor]:
    return _merged(_model(ALPHA, delta=False))  # B = 0 at initialisation, so this is W_0


def _run(alpha: float, delta: bool, kind: Optimizer, lr: float, eps: float = EPS) -> dict[str, torch.Tensor]:
    model = _model(alpha, delta)
    _train(model, _optimizer(model, kind, lr, eps), range(STEPS), first_lr_zero=True)
    return _merged(model)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_delta_lora_is_lora_with_scaled_alpha_when_anchor_is_zero(kind: Optimizer) -> None:
    """K=0 with learning rate 0 on step 0, so B_K·A_K = 0: Delta-LoRA ≡ LoRA with lora_alpha·(1+λ)."""
    w0 = _w0()
    delta = _run(ALPHA, True, kind, LR)
    if kind == "adamw":  # same lr; Adam's eps scales with the gradient scale 1/(1+λ)
        scaled = _run(ALPHA * (1 + LAMBDA), False, kind, LR, eps=EPS * (1 + LAMBDA))
    else:  # SGD: the gradient scale is the step size, so the learning rate absorbs it
        scaled = _run(ALPHA * (1 + LAMBDA), False, kind, LR / (1 + LAMBDA))
    same_alpha = _run(ALPHA, False, kind, LR)

    assert _distance(delta, scaled, w0) < TIGHT
    assert _distance(delta, same_alpha, w0) > FAR
    assert _distance(same_alpha, scaled, w0) > FAR


def test_adam_eps_is_the_only_difference_at_the_same_eps() -> None:
    """With the same eps on both sides only eps-sized effects remain (6e-4 here), far below same-alpha LoRA."""
    w0 = _w0()
    delta = _run(ALPHA, True, "adamw", LR)
    scaled = _run(ALPHA * (1 + LAMBDA), False, "adamw", LR)
    assert _distance(delta, scaled, w0) < 1e-2
    assert _distance(delta, _run(ALPHA, False, "adamw", LR), w0) > FAR


def _transfer(source: torch.optim.Optimizer, target: torch.optim.Optimizer, map_tensor: Callable) -> None:
    state = copy.deepcopy(source.state_dict())  # state_dict() shares its per-parameter dicts with the optimizer
    for entry in state["state"].values():
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in entry:
                entry[key] = map_tensor(key, entry[key])
    state["param_groups"] = [{**g, "eps": t["eps"]} for g, t in zip(state["param_groups"], target.param_groups)]
    target.load_state_dict(state)


def test_after_step_k_delta_lora_is_scaled_lora_on_the_shifted_base() -> None:
    """Ordinary steps 0..K (B_K·A_K ≠ 0), then LoRA(α(1+λ)) on W_0 − λ·s·B_K·A_K from the same state."""
    k, scale, c = 2, ALPHA / R, 1 + LAMBDA
    w0 = _w0()
    delta = _model(ALPHA, delta=True, start_step=k)
    delta_opt = _optimizer(delta, "adamw", LR, EPS)
    _train(delta, delta_opt, range(k + 1), first_lr_zero=False)

    scaled = _model(ALPHA * c, delta=False)
    scaled_opt = _optimizer(scaled, "adamw", LR, EPS * c)
    names = [n for n, p in scaled.named_parameters() if p.requires_grad]
    assert names == [n for n, p in delta.named_parameters() if p.requires_grad]
    with torch.no_grad():
        delta_params = dict(delta.named_parameters())
        for name, param in scaled.named_parameters():
            if param.requires_grad:
                param.copy_(delta_params[name])  # A_K, B_K
        anchor = {n: (m - w0[n]) / scale for n, m in _merged(delta).items()}  # B_K·A_K (W has not moved yet)
        for name, module in scaled.named_modules():
            if name in anchor:
                module.get_base_layer().weight.copy_(w0[name] - LAMBDA * scale * anchor[name])
    # Adam's moments of the scaled LoRA are those of Delta-LoRA with the gradient scale undone.
    _transfer(delta_opt, scaled_opt, lambda key, v: v * (c if key == "exp_avg" else c * c))

    _train(delta, delta_opt, range(k + 1, STEPS), first_lr_zero=False)
    _train(scaled, scaled_opt, range(k + 1, STEPS), first_lr_zero=False)
    same_alpha = _model(ALPHA, delta=False)
    _train(same_alpha, _optimizer(same_alpha, "adamw", LR, EPS), range(STEPS), first_lr_zero=False)

    assert any(float(a.abs().max()) > 0 for a in anchor.values())  # the base really is shifted
    assert _distance(_merged(delta), _merged(scaled), w0) < TIGHT
    assert _distance(_merged(delta), _merged(same_alpha), w0) > FAR
