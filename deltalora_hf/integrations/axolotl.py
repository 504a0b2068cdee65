"""Delta-LoRA in Axolotl: ``adapter: deltalora`` in a YAML config, through Axolotl's public plugin API.

``pip install -e ".[axolotl]"`` from a clone of deltalora-hf (Axolotl >= 0.21, Python >= 3.12) registers
:class:`DeltaLoraPlugin` under Axolotl's ``axolotl.plugins`` entry point, so Axolotl loads it for every config; it
acts only when ``adapter: deltalora``. The YAML is Axolotl's LoRA keys plus::

    adapter: deltalora
    deltalora:            # optional; the defaults are DeltaLoraConfig's
      update_ratio: 2.0   # lambda
      start_step: 10      # K
      base_update: inplace  # or factored

The plugin uses these hooks of ``axolotl.integrations.base.BasePlugin`` and, to read the LoRA keys, Axolotl's LoRA
loader in its config-only mode (``axolotl.loaders.adapter.load_lora(..., config_only=True)``); nothing is patched:

- ``get_input_args``: :class:`DeltaLoraArgs`, the ``deltalora:`` block, merged into Axolotl's schema; its validator
  refuses, when the config loads, what would train or merge a different model than the one asked for
  (:func:`refusal`);
- ``register``: with the raw config, before Axolotl validates it: a misspelt adapter name (``deltaLoRA``) is
  refused with the spelling (:func:`near_miss`);
- ``get_adapter_capabilities``: the adapter name ``deltalora``;
- ``load_adapter``: the ``LoraConfig`` that Axolotl's own loader builds from the LoRA keys, turned into a
  ``DeltaLoraConfig``; then ``get_peft_model``, or ``PeftModel.from_pretrained`` when ``lora_model_dir`` is set;
- ``post_trainer_create``: ``DeltaLoRACallback(trainer=trainer)``, once (not also through Axolotl's callback hooks,
  which would move W twice per step).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

try:
    from axolotl.integrations.base import AdapterCapabilities, BasePlugin
    from axolotl.loaders.adapter import load_lora
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "deltalora_hf.integrations.axolotl needs Axolotl >= 0.21, which needs Python >= 3.12: "
        'pip install -e ".[axolotl]" from a clone of deltalora-hf'
    ) from error

from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..callback import DeltaLoRACallback
from ..config import BaseUpdate, DeltaLoraConfig
from ..functional import Rounding

ADAPTER = "deltalora"
LOG = logging.getLogger(__name__)

_DEFAULTS = {f.name: f for f in fields(DeltaLoraConfig)}


def _option(name: str) -> Any:
    """A schema field with the default and help text of ``DeltaLoraConfig.<name>`` (one source for both)."""
    return Field(default=_DEFAULTS[name].default, description=_DEFAULTS[name].metadata["help"])


class DeltaLoraOptions(BaseModel):
    """The ``deltalora:`` block: the options of ``DeltaLoraConfig`` that LoRA does not have."""

    model_config = ConfigDict(extra="forbid")

    update_ratio: float = _option("update_ratio")
    start_step: int = _option("start_step")
    base_update: BaseUpdate = _option("base_update")
    base_update_rounding: Rounding = _option("base_update_rounding")


# Axolotl config keys -> the LoraConfig field Axolotl's loader passes them to; DeltaLoraConfig validates those.
_LORA_KEYS = {
    "lora_dropout": "lora_dropout",
    "peft_use_dora": "use_dora",
    "peft_layer_replication": "layer_replication",
    "lora_target_parameters": "target_parameters",
    "peft_init_lora_weights": "init_lora_weights",
    "peft_use_rslora": "use_rslora",
}


# Axolotl's fused LoRA kernels: they compute LoRA layers' forward pass themselves.
_LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def refusal(data: dict[str, Any]) -> str | None:
    """Why Axolotl cannot run this ``adapter: deltalora`` config as asked, with what to do instead; ``None`` if it can.

    Every reason is a silent wrong result that Axolotl 0.21 would otherwise give.
    """
    for key in ("load_in_4bit", "load_in_8bit", "gptq"):
        if data.get(key):
            return (
                f"{key}: true cannot be used with adapter: deltalora. Axolotl quantizes the base model only for its "
                "own adapter names (lora, qlora), so the model would load in full precision without a word. "
                "Remove it, or train a quantized base from Python with deltalora-hf and base_update='factored' "
                "(docs/guides/modes-and-quantized-bases.md)."
            )
    if data.get("merge_method") == "memory_efficient":
        return (
            "merge_method: memory_efficient cannot merge a Delta-LoRA adapter: it adds s*B*A to the base shard by "
            "shard and ignores the move of W (lambda*s*(B*A - B_K*A_K)), so the merged model would be wrong. Remove "
            "merge_method (adapter: deltalora merges with 'legacy', PEFT's merge_and_unload, which is exact)."
        )
    kernels = [key for key in _LORA_KERNEL_KEYS if data.get(key)]
    if kernels:
        return (
            f"{', '.join(kernels)} cannot be used with adapter: deltalora: Axolotl's LoRA "
            "kernels replace the forward pass of LoRA layers, which would skip the move of W in factored mode. "
            "Remove them."
        )
    saved_type = _saved_adapter_type(data.get("lora_model_dir"))
    if saved_type is not None and not saved_type.startswith("DELTALORA"):
        return (
            f"lora_model_dir {data['lora_model_dir']} holds a {saved_type} adapter, not a Delta-LoRA one: adapter: "
            "deltalora continues only Delta-LoRA adapters. Use the adapter type it was trained with, or remove "
            "lora_model_dir to start a new Delta-LoRA adapter."
        )
    try:
        options = DeltaLoraOptions.model_validate(data.get(ADAPTER) or {})
    except ValidationError:
        return None  # the schema reports it, at deltalora.<option>
    lora_options = {field: data[key] for key, field in _LORA_KEYS.items() if data.get(key) is not None}
    if (data.get("peft") or {}).get("loftq_config"):
        lora_options["init_lora_weights"] = "loftq"
    try:
        DeltaLoraConfig(**lora_options, **options.model_dump())
    except ValueError as error:
        keys = [key for key, field in _LORA_KEYS.items() if str(error).startswith(field)]
        where = f" (in the Axolotl config: {keys[0]})" if keys else ""
        return f"adapter: deltalora: {error}{where}"
    return None


def _saved_adapter_type(model_dir: Any) -> str | None:
    """The ``peft_type`` in ``model_dir``'s ``adapter_config.json`` when it is a local folder (a hub id is checked
    when the adapter loads, in :meth:`DeltaLoraPlugin.load_adapter`)."""
    path = Path(model_dir) / "adapter_config.json" if isinstance(model_dir, str) and model_dir else None
    if path is None or not path.is_file():
        return None
    return str(json.loads(path.read_text()).get("peft_type"))


def near_miss(adapter: Any) -> str | None:
    """Why ``adapter`` is refused if it is a misspelling of ``deltalora`` (``deltaLoRA``, ``delta-lora``,
    ``Delta_LoRA``: the same letters in another case or with separators); ``None`` otherwise."""
    if not isinstance(adapter, str) or adapter == ADAPTER or re.sub(r"[^a-z]", "", adapter.lower()) != ADAPTER:
        return None
    return (
        f"adapter: {adapter} is not an adapter name; the deltalora-hf plugin's is spelled `deltalora` (lower case, "
        "one word): set adapter: deltalora. The plugin is installed and needs nothing in `plugins:`."
    )


class DeltaLoraArgs(BaseModel):
    """The plugin's part of Axolotl's config schema."""

    deltalora: DeltaLoraOptions | None = Field(
        default=None,
        description="Delta-LoRA options, used with adapter: deltalora (deltalora_hf.integrations.axolotl).",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_deltalora(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        misspelt = near_miss(data.get("adapter"))
        if misspelt is not None:
            raise ValueError(misspelt)
        if data.get("adapter") != ADAPTER:
            if data.get(ADAPTER) is not None:
                raise ValueError(
                    f"a `deltalora:` block is set but adapter is {data.get('adapter')!r}: set adapter: deltalora"
                )
            return data
        reason = refusal(data)
        if reason is not None:
            raise ValueError(reason)
        if data.get("merge_method") is None:
            data = {**data, "merge_method": "legacy"}  # merge-lora: the exact merge (see refusal)
        return data


def delta_lora_config(lora_config: LoraConfig, options: DeltaLoraOptions) -> DeltaLoraConfig:
    """The ``DeltaLoraConfig`` with the LoRA settings of ``lora_config`` and the Delta-LoRA ``options``."""
    lora = {f.name: getattr(lora_config, f.name) for f in fields(LoraConfig) if f.init and f.name != "peft_type"}
    return DeltaLoraConfig(**lora, **options.model_dump())


class DeltaLoraPlugin(BasePlugin):
    """``adapter: deltalora`` for Axolotl; inert for every other adapter (see the module docstring)."""

    def register(self, cfg: dict) -> None:
        """Before Axolotl validates the config (its own check of the adapter name comes first there): a misspelt
        ``adapter: deltaLoRA`` is refused with the spelling, instead of "add the plugin ... to `plugins:`"."""
        misspelt = near_miss(cfg.get("adapter"))
        if misspelt is not None:
            raise ValueError(misspelt)

    def get_input_args(self) -> str:
        return f"{DeltaLoraArgs.__module__}.{DeltaLoraArgs.__name__}"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER)]

    def load_adapter(self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False) -> Any:
        if cfg.adapter != ADAPTER:
            return None
        _, lora_config = load_lora(model, cfg, config_only=True)  # Axolotl's own reading of the LoRA keys
        config = delta_lora_config(lora_config, DeltaLoraOptions.model_validate(cfg.deltalora or {}))
        if config_only:
            return None, config
        if config.fan_in_fan_out:
            LOG.warning(
                "lora_fan_in_fan_out: true is turned off: deltalora-hf sets fan_in_fan_out from each targeted layer's "
                "own weight layout (False for nn.Linear, True for GPT-2's Conv1D), as PEFT's LoRA does for nn.Linear; "
                "remove the key to silence this line."
            )
            config.fan_in_fan_out = False
        if cfg.lora_model_dir:
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference)
            saved = model.peft_config["default"]
            if not isinstance(saved, DeltaLoraConfig):
                raise ValueError(
                    f"lora_model_dir {cfg.lora_model_dir} holds a {type(saved).__name__} adapter, not a Delta-LoRA "
                    "one: adapter: deltalora continues only Delta-LoRA adapters. Use the adapter type it was trained "
                    "with, or remove lora_model_dir to start a new Delta-LoRA adapter."
                )
            LOG.info(
                "Loaded the Delta-LoRA adapter of %s; its saved settings govern (update_ratio=%s, start_step=%s, "
                "base_update=%s)",
                cfg.lora_model_dir,
                saved.update_ratio,
                saved.start_step,
                saved.base_update,
            )
            return model, saved
        return get_peft_model(model, config), config

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if cfg.adapter == ADAPTER:
            DeltaLoRACallback(seed=cfg.seed or 0, trainer=trainer)
