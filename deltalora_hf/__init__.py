"""Delta-LoRA (Zi et al., 2023, arXiv:2309.02411) for transformers + PEFT.

``import deltalora_hf`` registers the method with PEFT (``PeftType.DELTALORA``), so
``peft.get_peft_model(model, DeltaLoraConfig(...))`` and ``PeftModel.from_pretrained`` work as for LoRA.
"""

from ._peft_type import register as _register
from .callback import DeltaLoRACallback
from .config import DeltaLoraConfig
from .export import export_lora
from .functional import add_low_rank_, delta_factors, stochastic_round
from .layer import DeltaLoraLayer
from .model import DeltaLoraModel
from .updater import DeltaLoraUpdater, UpdateStats

__version__ = "0.5.0"  # 0.5: warm-up counted per optimizer, loaded values checked, export allow-listed

_register(DeltaLoraConfig, DeltaLoraModel)

__all__ = [
    "DeltaLoRACallback",
    "DeltaLoraConfig",
    "DeltaLoraLayer",
    "DeltaLoraModel",
    "DeltaLoraUpdater",
    "UpdateStats",
    "add_low_rank_",
    "delta_factors",
    "export_lora",
    "stochastic_round",
]
