"""Add ``DELTALORA`` to PEFT's ``PeftType`` enum and register the method with PEFT.

``PeftType`` is a ``str`` enum with no public way to add a member, yet PEFT keys all of
its method tables by that enum (``register_peft_method`` refuses names that are not
members). This module adds the member the way ``enum`` itself builds members, so that:

* ``PeftType.DELTALORA`` and ``PeftType["DELTALORA"]`` work, and it appears in ``list(PeftType)``;
* its value, which ``adapter_config.json`` stores as ``"peft_type"``, says what a process needs to load it:
  ``"DELTALORA: pip install deltalora-hf, then import deltalora_hf"``. Without the import, every PEFT and
  transformers loader stops at the lookup of that value in PEFT's tables, and the error it raises
  (``KeyError: 'DELTALORA: pip install deltalora-hf, then import deltalora_hf'``) is then the instruction
  itself: nothing of ours runs in such a process, so the saved file is the only place to say it;
* adapters saved by deltalora-hf 0.2 (``"peft_type": "DELTALORA"``) still load (the old value is an alias);
* running it again (a second import, ``importlib.reload``) changes nothing; and
* if a future PEFT defines ``PeftType.DELTALORA`` itself, that member is used as is, and the values saved by 0.2
  and 0.3 stay aliases of it, so every adapter saved so far still loads.

Everything here touches PEFT's private tables: it is kept in this one small module.
"""

from __future__ import annotations

import enum
import warnings

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType

NAME = "DELTALORA"
VALUE = "DELTALORA: pip install deltalora-hf, then import deltalora_hf"
LEGACY_VALUES = ("DELTALORA",)  # what earlier versions saved
_TABLES = (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
)
PREFIX = "lora_"  # Delta-LoRA layers are LoRA layers: their parameters are lora_A, lora_B, lora_anchor_A, ...


def ensure_peft_type_member(name: str = NAME, value: str = VALUE) -> PeftType:
    """Return ``PeftType[name]``, adding it (with ``value``) to the enum first if PEFT does not define it."""
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    if hasattr(enum.EnumType, "_add_member_"):  # Python >= 3.13 keeps members as descriptors
        PeftType._add_member_(name, member)  # type: ignore[attr-defined]
    else:
        PeftType._member_map_[name] = member
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses member names
    PeftType._value2member_map_[value] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> PeftType:
    """Register Delta-LoRA with PEFT under ``PeftType.DELTALORA`` (idempotent).

    The tables are filled as ``peft.utils.register_peft_method`` fills them (which cannot be used: it looks the
    method up by comparing its name with the members' values). The prefix is ``"lora_"``: Delta-LoRA layers are
    PEFT LoRA layers, so PEFT's prefix-based helpers must look for that name.
    """
    peft_type = ensure_peft_type_member()
    previous = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if previous is not None and not previous.__module__.startswith("deltalora_hf"):
        warnings.warn(
            f"PEFT already registers a method for {NAME} ({previous.__module__}); deltalora_hf replaces it.",
            stacklevel=2,
        )
    # the lookups are by the saved string: the member, this version's sentence and the earlier value, whichever of them
    # the member's own value is (a PEFT that defines DELTALORA itself gives it another value than the sentence)
    keys = [peft_type, *(v for v in dict.fromkeys((VALUE, *LEGACY_VALUES)) if v != peft_type.value)]
    for key in keys:
        PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
        PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(key, None)
        if key is not peft_type:
            PeftType._value2member_map_.setdefault(key, peft_type)
    return peft_type
