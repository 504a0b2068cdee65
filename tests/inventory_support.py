"""What ``test_inventory`` needs besides its table: the API surface read from the installed libraries, the kinds of
entry, and the trained models (the session's, ``trained`` in ``conftest.py``) with what the independent dense
reference of ``tests/helpers.py`` gives for them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import peft
import torch
from packaging.version import Version
from peft import PeftModel
from torch import nn

from .helpers import SCALE, TARGETS, adapter_state, delta_config, delta_layers, logits, reference, tiny_llama

# -- the surface, read from the installed libraries --------------------------------------------------------------

# Every public name of these classes is classified; names inherited unchanged from nn.Module go under "nn.Module".
CLASS_SURFACES: dict[str, tuple[str, ...]] = {
    "PeftModel": ("peft.PeftModel", "peft.PeftModelForCausalLM"),
    "DeltaLoraModel": ("deltalora_hf.DeltaLoraModel",),
    "layer": ("deltalora_hf.layer.Linear", "deltalora_hf.layer.Embedding"),
    "PeftAdapterMixin": ("transformers.integrations.peft.PeftAdapterMixin",),
}
# PEFT's modules whose public functions that take a model or an adapter state are classified.
FUNCTION_MODULES = (
    "peft",
    "peft.functional",
    "peft.helpers",
    "peft.mapping",
    "peft.mapping_func",
    "peft.tuners.lora",
    "peft.utils",
    "peft.utils.hotswap",
    "peft.utils.save_and_load",
)
# A function "takes a model or an adapter state" when one of its parameters has one of these names.
MODEL_OR_STATE_PARAMETERS = frozenset(
    {
        "model",
        "peft_model",
        "base_model",
        "module",
        "layer",
        "base_layer",
        "state_dict",
        "peft_model_state_dict",
        "eva_state_dict",
        "adapter_name",
        "adapter_names",
    }
)


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_module_api(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is nn.Module's own attribute, not overridden on the way."""
    return (
        issubclass(cls, nn.Module)
        and hasattr(nn.Module, name)
        and inspect.getattr_static(cls, name) is inspect.getattr_static(nn.Module, name)
    )


def class_surface() -> set[str]:
    """``<surface>.<name>`` for every public name of the classes in CLASS_SURFACES (``nn.Module.<name>`` when the
    name is nn.Module's, inherited unchanged)."""
    names = set()
    for surface, dotted_classes in CLASS_SURFACES.items():
        for cls in map(_resolve, dotted_classes):
            for name in dir(cls):
                if not name.startswith("_"):
                    names.add(f"nn.Module.{name}" if _is_module_api(cls, name) else f"{surface}.{name}")
    return names


def function_surface() -> set[str]:
    """``<defining module>.<qualname>`` of every public PEFT function in FUNCTION_MODULES that takes a model or an
    adapter state (a parameter named in MODEL_OR_STATE_PARAMETERS); re-exports are counted once."""
    names = set()
    for module_name in FUNCTION_MODULES:
        module = importlib.import_module(module_name)
        for name in dir(module):
            obj = getattr(module, name)
            if name.startswith("_") or not inspect.isfunction(obj) or not obj.__module__.startswith("peft"):
                continue
            if MODEL_OR_STATE_PARAMETERS & set(inspect.signature(obj).parameters):
                names.add(f"{obj.__module__}.{obj.__qualname__}")
    return names


def installed_surface() -> set[str]:
    return class_surface() | function_surface()


# -- kinds of entry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    """``check(case)`` does what a user does and returns ``(got, want)``: tensors (logits) that must agree to 1e-5,
    ``want`` from the dense reference. ``linear_only``: on models that target only Linear layers (the operation is
    PEFT's for LoRA Linear layers only, e.g. conversion to LoRA)."""

    check: Callable[[Case], tuple[torch.Tensor, torch.Tensor]]
    linear_only: bool = False


@dataclass(frozen=True)
class Refused:
    """``call(case)`` must raise an error whose message matches ``match`` (which names Delta-LoRA or the fix), and
    leave ``case.model`` (or whatever ``target(case)`` returns) exactly as it was."""

    call: Callable[[Case], Any]
    match: str
    target: Callable[[Case], nn.Module] | None = None
    linear_only: bool = False


@dataclass(frozen=True)
class Unrelated:
    reason: str


@dataclass(frozen=True)
class ByMode:
    """A name whose classification depends on the base-update mode (e.g. exact in factored mode, refused in place)."""

    inplace: Exact | Refused
    factored: Exact | Refused

    def of(self, mode: str) -> Exact | Refused:
        return getattr(self, mode)


# -- the trained models and their reference ----------------------------------------------------------------------

TARGETS_WITH_EMBEDDING = [*TARGETS, "embed_tokens"]


def with_weights(weights: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh base whose weights named in ``weights`` (module name -> W) are replaced: a model derived from W's."""
    model = tiny_llama()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
    return model


@dataclass
class Trained:
    """One base-update mode's trained models (each trained once per module) and their saved adapters."""

    mode: str
    targets: list[str]
    model: PeftModel  # adapter "default", trained and anchored
    other_model: PeftModel  # another one, trained on other data
    saved: Path  # as save_pretrained writes it: with the embedding W when embed_tokens is targeted
    other_saved: Path
    plain: Path  # without any W (save_embedding_layers=False)
    other_plain: Path
    state: dict
    other_state: dict
    want: torch.Tensor  # reference logits of "default"
    want_other: torch.Tensor
    want_base: torch.Tensor


def train_models(mode: str, folder: Path, targets: list[str], trained: Callable[..., PeftModel]) -> Trained:
    """Copies of the session's trained models for ``mode`` and ``targets`` (data seeds 0 and 5), saved in ``folder``
    with and without W."""
    models = []
    for data_seed in (0, 5):
        model = trained(mode, data_seed=data_seed, targets=targets)
        model.save_pretrained(folder / f"saved-{data_seed}")
        model.save_pretrained(folder / f"plain-{data_seed}", save_embedding_layers=False)
        models.append(model)
    state, other_state = adapter_state(models[0]), adapter_state(models[1])
    assert state and all(t["anchored"] for t in state.values())
    return Trained(
        mode,
        targets,
        *models,
        folder / "saved-0",
        folder / "saved-5",
        folder / "plain-0",
        folder / "plain-5",
        state,
        other_state,
        reference(state),
        reference(other_state),
        reference(None),
    )


class Case:
    """What one check works on: a private copy of a mode's trained model (already run once, as a user's model is),
    and a folder of its own."""

    def __init__(self, trained: Trained, tmp: Path) -> None:
        self.trained, self.tmp, self.mode = trained, tmp, trained.mode
        self.model: PeftModel = copy.deepcopy(trained.model)
        if (logits(self.model) - trained.want).abs().max() > 1e-5:
            raise AssertionError("the copy of the trained model is not the trained model")

    def config(self, **overrides: Any):
        return delta_config(self.mode, target_modules=self.trained.targets, **overrides)

    # Loading a folder that carries W (PEFT saves the embedding W when embed_tokens is targeted) is the load
    # checks' own subject; the other checks load folders without W, so that each shows its own operation.

    def with_other(self) -> PeftModel:
        """The model with the other trained adapter loaded as "other" ("default" stays active)."""
        self.model.load_adapter(self.trained.other_plain, adapter_name="other")
        return self.model

    def transformers_model(self, folder: Path | None = None) -> nn.Module:
        """A fresh base with the adapter loaded by transformers' own integration (PeftAdapterMixin)."""
        model = tiny_llama()
        model.load_adapter(str(folder or self.trained.plain))
        return model

    def other_copy(self) -> PeftModel:
        return copy.deepcopy(self.trained.other_model)


def both(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (got, want) checks as one."""
    return torch.stack([g for g, _ in pairs]), torch.stack([w for _, w in pairs])


def scale_multipliers(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """Each layer's scaling as PEFT has set it now, relative to the trained one (s = lora_alpha / r)."""
    return {name: layer.scaling[adapter] / SCALE for name, layer in delta_layers(model).items()}


@contextlib.contextmanager
def transformers_integration() -> Iterator[None]:
    """transformers 5 asks for a newer PEFT in most PeftAdapterMixin methods (a version check before anything
    happens). With an older PEFT that check is lifted here, so that the integration's own code is what runs."""
    import transformers.integrations.peft as integration

    needed = getattr(integration, "MIN_PEFT_VERSION", "0")
    if Version(peft.__version__) >= Version(needed):
        yield
        return
    with mock.patch.object(integration, "check_peft_version", lambda min_version: None):
        yield
