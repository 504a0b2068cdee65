"""Configuration of Delta-LoRA (Zi et al., 2023, arXiv:2309.02411)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from peft import LoraConfig

from ._peft_type import ensure_peft_type_member
from .functional import Rounding

DELTALORA = ensure_peft_type_member()

BaseUpdate = Literal["inplace", "factored"]

# LoraConfig options whose meaning conflicts with moving the base weight W in place, with the reason
# shown to the user. A value is "set" when it differs from LoraConfig's default.
_CONFLICTING_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA rescales W by a learned magnitude, so the W update of Algorithm 1 no longer equals "
    "the change of the low-rank product; use plain Delta-LoRA (use_dora=False)",
    "lora_bias": "the W update only carries the delta of B·A; a bias on lora_B would not be transferred",
    "layer_replication": "replicated layers share one W, so every copy would move the same W again",
    "target_parameters": "nn.Parameter targets (e.g. MoE experts) are not supported; target modules instead",
    "alora_invocation_tokens": "activated LoRA applies the adapter to some tokens only, but a moved W "
    "changes every token",
    "use_qalora": "QA-LoRA merges into group-quantized weights",
    "kasa_config": "KaSA truncates W itself",
    "monteclora_config": "MonteCLoRA samples the low-rank path, so W's update is not the delta of B·A",
    "velora_config": "VeLoRA changes the low-rank path's gradients",
    "arrow_config": "Arrow routes between several adapters at inference time",
    "use_bdlora": "BD-LoRA changes the structure of the low-rank factors",
    "megatron_config": "Megatron-parallel layers are not supported",
    "eva_config": "EVA initialisation is not supported",
    "corda_config": "CorDA initialisation rewrites W",
    "lora_ga_config": "LoRA-GA initialisation rewrites W",
}
_SUPPORTED_INITS = (True, False, "gaussian")


@dataclass
class DeltaLoraConfig(LoraConfig):
    """Configuration for Delta-LoRA: LoRA whose frozen base weight also moves, without gradients.

    After optimizer step ``t`` (counted from 0), if ``t > start_step``, every targeted base weight gets

        W <- W + update_ratio * s * (B' A' - B A)

    where ``A', B'`` are the LoRA factors after the step, ``A, B`` before it, and ``s`` is LoRA's scale
    (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``). The update is applied by
    ``DeltaLoRACallback`` (``Trainer``) or ``DeltaLoraUpdater`` (custom loops). All other options are LoRA's (see
    ``peft.LoraConfig``); ``lora_dropout`` must stay 0 because Delta-LoRA removes dropout from the low-rank path.
    With Adam-type optimizers, Delta-LoRA after step K trains exactly like a LoRA with ``lora_alpha * (1 +
    update_ratio)`` (docs/theory.md): compare against that LoRA, not only against the same ``lora_alpha``.

    Args:
        update_ratio: lambda, the update ratio: W moves by ``lambda * s * (B'A' - BA)`` after each optimizer step
            past ``start_step``; 0 gives plain LoRA. Default 2.0, the paper's E2E/GPT-2 setting.
        start_step: K: W moves on optimizer steps ``t > K`` (counted from 0, in the adapter's own steps, across
            runs), so the first W update is on step K + 1. Default 500, the paper's E2E/GPT-2 setting.
        base_update: ``"inplace"`` (default, Algorithm 1): W is updated after every optimizer step.
            ``"factored"``: W is never written; the forward pass adds the telescoped move
            ``lambda * s * (B A - B_K A_K)``. Both train identically in exact arithmetic; ``"factored"`` is exact
            for bfloat16/float16 bases and works on bases that cannot be written (bitsandbytes 4/8-bit, sharded).
        base_update_rounding: how an in-place update of a bfloat16/float16 W is rounded: ``"stochastic"``
            (default, unbiased) or ``"nearest"`` (a plain add, which drops most per-step updates). Ignored for
            float32 W.
    """

    update_ratio: float = field(
        default=2.0,
        metadata={
            "help": (
                "The update ratio lambda: W moves by lambda * s * (B'A' - BA) after each optimizer step past "
                "`start_step`. 0 gives plain LoRA. Default 2.0 follows the paper's E2E/GPT-2 setting "
                "(Zi et al. 2023, appendix hyper-parameter tables). With Adam, lambda acts like a larger LoRA scale "
                "(see docs/theory.md)."
            )
        },
    )
    start_step: int = field(
        default=500,
        metadata={
            "help": (
                "The start step K: W moves on optimizer steps t > K, with t counted from 0 as in Algorithm 1 "
                "of the paper, so the first W update happens on step K + 1 (the (K+2)-th step). Before that the "
                "factors warm up as in LoRA. t counts the adapter's own optimizer steps, saved with it "
                "(lora_warmup_steps), so a resumed or later run continues the count. Default 500 follows the "
                "paper's E2E/GPT-2 setting."
            )
        },
    )
    base_update: BaseUpdate = field(
        default="inplace",
        metadata={
            "help": (
                "How W moves. 'inplace' (default, Algorithm 1 of the paper): W is updated after every optimizer "
                "step. 'factored': W is never written; the forward pass adds the telescoped move "
                "lambda*s*(B A - B_K A_K) from the factors (one extra rank-r product per layer, no backward). Both "
                "train identically in exact arithmetic; 'factored' is exact for bfloat16/float16 bases and is the "
                "mode for bases that cannot be written: bitsandbytes 4/8-bit (QLoRA) and sharded (FSDP, ZeRO-3)."
            )
        },
    )
    base_update_rounding: Rounding = field(
        default="stochastic",
        metadata={
            "help": (
                "How the W update is rounded when W is stored in bfloat16/float16 (float32/float64 W is updated "
                "exactly with one fused addmm_). 'stochastic' (default) rounds each element up or down with "
                "probabilities that make the result unbiased, so the accumulated change of W tracks a float32 run; "
                "'nearest' is a plain add, which drops most per-step deltas because they are below half an ulp "
                "of W. Ignored for float32 W."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DELTALORA
        self._validate_delta_lora()

    def _validate_delta_lora(self) -> None:
        if isinstance(self.update_ratio, bool) or not isinstance(self.update_ratio, (int, float)):
            raise ValueError(f"update_ratio must be a number >= 0, got {self.update_ratio!r}.")
        if not 0 <= self.update_ratio < float("inf"):  # also rejects NaN
            raise ValueError(
                f"update_ratio (lambda) must be a finite number >= 0, got {self.update_ratio}. Use 0 for plain LoRA; "
                "the paper's E2E/GPT-2 setting is 2."
            )
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(
                f"start_step (K) must be an integer >= 0, got {self.start_step!r}. W moves on optimizer "
                "steps t > K, counted from 0."
            )
        if self.base_update not in get_args(BaseUpdate):
            raise ValueError(f"base_update must be 'inplace' or 'factored', got {self.base_update!r}.")
        if self.base_update_rounding not in get_args(Rounding):
            raise ValueError(
                f"base_update_rounding must be 'stochastic' or 'nearest', got {self.base_update_rounding!r}."
            )
        if self.lora_dropout != 0:
            raise ValueError(
                f"lora_dropout={self.lora_dropout} is not allowed with Delta-LoRA: set lora_dropout=0. Delta-LoRA "
                "updates W with the change of B·A, which equals W's own gradient step only when W and B·A "
                "see the same input; dropout on the low-rank path breaks that equality (Zi et al. 2023, Sec. 4)."
            )
        defaults = LoraConfig()
        for name, reason in _CONFLICTING_OPTIONS.items():
            value = getattr(self, name, None)
            if value != getattr(defaults, name, None) and value not in (None, False, {}, [], ()):
                raise ValueError(f"{name}={value!r} cannot be used with Delta-LoRA: {reason}.")
        if self.init_lora_weights not in _SUPPORTED_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by Delta-LoRA: initialisations "
                "such as PiSSA, OLoRA, CorDA or LoftQ rewrite W before training, so the original base no longer "
                f"reproduces the model. Use one of {_SUPPORTED_INITS}."
            )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``LoraConfig.save_pretrained``, plus a section in the folder's model card (``README.md``) that says what
        the adapter is and how to load it (PEFT writes its own card first; this section is replaced, not repeated)."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card_section(Path(save_directory), self)


@dataclass(frozen=True)
class DeltaSettings:
    """One adapter's Delta-LoRA settings, as a layer keeps them (from its ``DeltaLoraConfig``)."""

    update_ratio: float
    base_update: BaseUpdate
    start_step: int
    rounding: Rounding

    @classmethod
    def of(cls, config: DeltaLoraConfig) -> DeltaSettings:
        return cls(float(config.update_ratio), config.base_update, int(config.start_step), config.base_update_rounding)

    @property
    def in_place(self) -> bool:
        """The move lives in W (``"inplace"``, lambda != 0)."""
        return self.base_update == "inplace" and self.update_ratio != 0.0

    @property
    def factored(self) -> bool:
        """The move is added by the forward pass (``"factored"``, lambda != 0)."""
        return self.base_update == "factored" and self.update_ratio != 0.0


_CARD_START, _CARD_END = "<!-- deltalora-hf -->", "<!-- /deltalora-hf -->"


def model_card_section(config: DeltaLoraConfig) -> str:
    """The model-card text of a saved Delta-LoRA adapter: the library, its settings, how to load, how to export."""
    return f"""{_CARD_START}
## Delta-LoRA adapter (deltalora-hf)

Trained with [deltalora-hf](https://pypi.org/project/deltalora-hf/): Delta-LoRA (Zi et al., 2023, arXiv:2309.02411),
LoRA whose base weight W also moves. The file holds the LoRA factors `A`, `B` and the anchors `A_K`, `B_K`; the
trained model is `W_0 + s*B*A + lambda*s*(B*A - B_K*A_K)` on the original base model (`s = lora_alpha / r`).

- update ratio lambda = {config.update_ratio}, start step K = {config.start_step}, base update mode
  `{config.base_update}`, r = {config.r}, lora_alpha = {config.lora_alpha}

Load it with the library imported (plain PEFT stops with `KeyError: '{config.peft_type.value}'`):

```python
import deltalora_hf  # pip install deltalora-hf
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")
```

For tools that only know LoRA (plain PEFT, vLLM, TGI), export the same model as a standard LoRA adapter of rank
`2r`: `deltalora_hf.export_lora(model, "adapter-lora")`. Do not change `peft_type` to `LORA` by hand: plain LoRA
would ignore the anchors and give a different model.
{_CARD_END}
"""


def write_model_card_section(folder: Path, config: DeltaLoraConfig) -> None:
    card = folder / "README.md"
    text = card.read_text() if card.exists() else ""
    text = re.sub(re.escape(_CARD_START) + r".*?" + re.escape(_CARD_END) + r"\n?", "", text, flags=re.S)
    card.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + model_card_section(config))
