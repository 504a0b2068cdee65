"""Add ``DELTALORA`` to PEFT's ``PeftType`` enum and register the method with PEFT.

``PeftType`` is a ``str`` enum with no public way to add a member, yet PEFT keys all of
its method tables by that enum (``register_peft_method`` refuses names that are not
members). This module adds the member the way ``enum`` itself builds members, so that:

* ``PeftType.DELTALORA == "DELTALORA"`` like every other member, ``PeftType("DELTALORA")``
  and ``PeftType["DELTALORA"]`` work, and it appears in ``list(PeftType)``;
* ``adapter_config.json`` stores ``"peft_type": "DELTALORA"`` and PEFT's loaders map it back;
* running it again (a second import, ``importlib.reload``) changes nothing; and
* if a future PEFT defines ``PeftType.DELTALORA`` itself, that member is used as is.

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
from peft.utils import PeftType, register_peft_method

NAME = "DELTALORA"


def ensure_peft_type_member(name: str = NAME) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if PEFT does not define it."""
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    if hasattr(enum.EnumType, "_add_member_"):  # Python >= 3.13 keeps members as descriptors
        PeftType._add_member_(name, member)  # type: ignore[attr-defined]
    else:
        PeftType._member_map_[name] = member
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses member names
    PeftType._value2member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> PeftType:
    """Register Delta-LoRA with PEFT under ``PeftType.DELTALORA`` (idempotent).

    The prefix is ``"lora_"``: Delta-LoRA layers are PEFT LoRA layers, so their parameters are
    named ``lora_A``/``lora_B`` and PEFT's prefix-based helpers must look for that name.
    """
    peft_type = ensure_peft_type_member()
    tables = (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    )
    previous = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if previous is not None and not previous.__module__.startswith("deltalora_hf"):
        warnings.warn(
            f"PEFT already registers a method for {NAME} ({previous.__module__}); deltalora_hf replaces it.",
            stacklevel=2,
        )
    for table in tables:  # a reload brings new classes: replace our own earlier registration
        table.pop(peft_type, None)
    register_peft_method(name=NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="lora_")
    return peft_type
