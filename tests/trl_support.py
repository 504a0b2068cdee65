"""Tiny models, data and TRL runs for the TRL matrix (``test_trl_matrix.py``), and its reference.

The reference is the independent dense one of ``tests/helpers.py`` on a fresh base (same seed and config): the
targeted weights set, densely, to ``W_0 + s B A + lambda s (B A - B_K A_K)`` (the last term only for an anchored
adapter), plus the adapter's ``modules_to_save`` copies written into their modules. Nothing of PEFT or deltalora_hf
is in it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
)

from deltalora_hf import DeltaLoraConfig

from . import helpers
from .helpers import TINY_LLAMA, TOL, VOCAB  # noqa: F401 (TOL: the matrix's tolerance, ts.TOL)

STEPS = 3  # optimizer steps of every run in the matrix
START_STEP = 0  # of a fresh adapter: W moves on steps 1 and 2 of the run

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


# -- tokenizer, models, data ---------------------------------------------------------------------------------


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over exactly VOCAB tokens (no download, no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def _llama_config(**overrides: Any) -> LlamaConfig:
    tok = tokenizer()
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    values = {**TINY_LLAMA, **special, **overrides}
    return LlamaConfig(**values)


def causal_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config())


def reward_model(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(num_labels=1))


def delta_config(mode: str, start_step: int = START_STEP, **overrides: Any) -> DeltaLoraConfig:
    return helpers.delta_config(mode, start_step=start_step, **overrides)


def _text(seed: int, n: int, length: int, completion: bool = False) -> list[str]:
    """Random words; a completion starts with a space, since TRL appends it to the prompt as is."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n, length), generator=g)
    return [" " * completion + " ".join(WORDS[i] for i in row) for row in ids.tolist()]


def probe_ids(n: int = 4, length: int = 10) -> torch.Tensor:
    """Fixed token ids without special tokens, for comparing a model with its reference."""
    return torch.randint(len(SPECIAL), VOCAB, (n, length), generator=torch.Generator().manual_seed(7))


# -- the independent dense reference ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Copies of one adapter's tensors: ``helpers.adapter_state`` of its Delta-LoRA layers, and its modules_to_save,
    keyed by module name relative to the transformers model."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def snapshot(peft_model: nn.Module, adapter: str = "default") -> Snapshot:
    """The adapter's A, B, A_K, B_K, anchored flag and modules_to_save copies, read through the public layout."""
    from peft.utils import ModulesToSaveWrapper

    out = Snapshot(layers=helpers.adapter_state(peft_model, adapter))
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            state = module.modules_to_save[adapter].state_dict()
            out.modules_to_save[name.removeprefix("base_model.model.")] = {
                k: v.detach().clone() for k, v in state.items()
            }
    return out


def dense_model(snap: Snapshot | None, build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """A fresh base from ``build`` with the adapter written densely into it (``helpers.dense_model``) and its
    modules_to_save copies loaded into their modules (the base itself for ``None``)."""
    model = helpers.dense_model(snap.layers if snap is not None else None, build=build)
    if snap is not None:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, state in snap.modules_to_save.items():
                modules[name].load_state_dict(state)
    return model.eval()


def moved(snap: Snapshot) -> float:
    """Largest entry of the adapter's move lambda s (B A - B_K A_K) (0 when no layer is anchored)."""
    return helpers.move_size(snap.layers)


def output(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (causal LM) or scores (sequence classification) in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids).logits.float()
    model.train(was_training)
    return out


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


# -- what TRL uses as the reference, at every step -------------------------------------------------------------


def _adapter_state(peft_model: nn.Module) -> str:
    """``"disabled"`` or the comma-joined active adapters of the model's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in peft_model.modules() if isinstance(m, LoraLayer))
    return "disabled" if layer.disable_adapters else ",".join(layer.active_adapters)


def backbone(model: PreTrainedModel) -> nn.Module:
    """The decoder under the LM head: what every TRL forward (plain or fused LM head) runs."""
    return getattr(model, model.base_model_prefix)


@dataclass
class ReferenceCall:
    step: int
    state: str
    diff: float


class ReferenceProbe(TrainerCallback):
    """Checks every forward TRL runs as its reference: the logits must be those of ``expected`` on the same inputs.

    Reference forwards are those of the policy with its training adapter off (``disable_adapter()``, or another
    adapter such as ``"ref"`` active), and every forward of a separate ``trainer.ref_model`` (a copy TRL made).
    A forward hook on the decoder sees TRL's own forward, whichever mechanism the trainer uses, with TRL's inputs;
    it replays the same call on ``expected``'s decoder and compares the logits that the two LM heads give, at the
    positions the attention mask keeps. ``watch(trainer)`` before ``trainer.train()``.
    """

    def __init__(self, expected: PreTrainedModel, policy_adapter: str = "default") -> None:
        self.expected = expected.eval()
        self.policy_adapter = policy_adapter
        self.calls: list[ReferenceCall] = []
        self.step = -1
        self._handles: list[Any] = []

    def watch(self, trainer: Trainer) -> None:
        policy = trainer.model
        self._hook(policy.get_base_model(), lambda: _adapter_state(policy))
        ref_model = getattr(trainer, "ref_model", None)
        if ref_model is not None:
            self._hook(ref_model.get_base_model() if hasattr(ref_model, "get_base_model") else ref_model, "ref_model")

    def _hook(self, model: PreTrainedModel, state: Callable[[], str] | str) -> None:
        def check(module, args, kwargs, out) -> None:
            name = state() if callable(state) else state
            if name != self.policy_adapter:
                self._compare(model, name, args, kwargs, out)

        self._handles.append(backbone(model).register_forward_hook(check, with_kwargs=True))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()

    def _compare(self, model: PreTrainedModel, state: str, args, kwargs, out) -> None:
        with torch.no_grad():
            want = backbone(self.expected)(*args, **kwargs).last_hidden_state
            got_logits = model.get_output_embeddings()(out.last_hidden_state).float()
            want_logits = self.expected.get_output_embeddings()(want).float()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == got_logits.shape[:2]:
            got_logits, want_logits = got_logits[mask.bool()], want_logits[mask.bool()]
        self.calls.append(ReferenceCall(self.step, state, max_diff(got_logits, want_logits)))

    def worst(self) -> float:
        return max((c.diff for c in self.calls), default=float("nan"))


# -- the runs: one builder per trainer -------------------------------------------------------------------------


def _common_args(output_dir: str, batch_size: int) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=STEPS,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )


def _reward_fn(completions: list[str], **kwargs: Any) -> list[float]:
    """Tiny reward for GRPO/RLOO: how many words of the completion are in the first half of the vocabulary."""
    half = set(WORDS[: len(WORDS) // 2])
    return [float(sum(word in half for word in str(c).split())) for c in completions]


def _dataset(rows: dict[str, list]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(rows)


def run_sft(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import SFTConfig, SFTTrainer

    n = 4 * STEPS
    return SFTTrainer(
        model=model,
        args=SFTConfig(**_common_args(output_dir, 4), max_length=16),
        train_dataset=_dataset({"text": _text(1, n, 10)}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def run_dpo(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import DPOConfig, DPOTrainer

    n = 2 * STEPS
    return DPOTrainer(
        model=model,
        args=DPOConfig(**_common_args(output_dir, 2), max_length=24, beta=0.1),
        train_dataset=_dataset(
            {"prompt": _text(2, n, 5), "chosen": _text(3, n, 4, True), "rejected": _text(4, n, 4, True)}
        ),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def run_kto(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import KTOConfig, KTOTrainer

    n = 4 * STEPS
    return KTOTrainer(
        model=model,
        args=KTOConfig(**_common_args(output_dir, 4), max_length=24, beta=0.1),
        train_dataset=_dataset(
            {"prompt": _text(5, n, 5), "completion": _text(6, n, 4, True), "label": [i % 2 == 0 for i in range(n)]}
        ),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def _online_args(output_dir: str) -> dict[str, Any]:
    return dict(
        **_common_args(output_dir, 2),
        num_generations=2,
        max_completion_length=4,
        beta=0.1,  # GRPO's default 0.0 uses no reference model at all
        use_vllm=False,
    )


def _run_online(trainer_cls, config_cls, seed: int, model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    """GRPO and RLOO: the same tiny setup (prompts, reward function, generation without vLLM)."""
    return trainer_cls(
        model=model,
        reward_funcs=_reward_fn,
        args=config_cls(**_online_args(output_dir)),
        train_dataset=_dataset({"prompt": _text(seed, STEPS, 5)}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def run_grpo(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import GRPOConfig, GRPOTrainer

    return _run_online(GRPOTrainer, GRPOConfig, 7, model, peft_config, output_dir, callbacks)


def run_rloo(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import RLOOConfig, RLOOTrainer

    return _run_online(RLOOTrainer, RLOOConfig, 8, model, peft_config, output_dir, callbacks)


def run_online_dpo(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    return OnlineDPOTrainer(
        model=model,
        reward_funcs=_reward_fn,
        args=OnlineDPOConfig(**_common_args(output_dir, 1), max_new_tokens=4, beta=0.1, use_vllm=False),
        train_dataset=_dataset({"prompt": _text(11, STEPS, 5)}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def run_distillation(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import DistillationConfig, DistillationTrainer

    return DistillationTrainer(
        model=model,
        teacher_model=causal_lm(seed=1),  # a separate model: the teacher is not built from the student's adapter
        args=DistillationConfig(**_common_args(output_dir, 2), max_completion_length=4),
        train_dataset=_dataset({"prompt": _text(12, 2 * STEPS, 5)}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def run_reward(model, peft_config, output_dir: str, callbacks: list) -> Trainer:
    from trl import RewardConfig, RewardTrainer

    n = 2 * STEPS
    return RewardTrainer(
        model=model,
        args=RewardConfig(**_common_args(output_dir, 2), max_length=16),
        train_dataset=_dataset({"chosen": _text(9, n, 6), "rejected": _text(10, n, 6)}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


# -- which trainers the installed TRL has ---------------------------------------------------------------------


def installed_trainers() -> tuple[dict[str, type], dict[str, str]]:
    """Every ``transformers.Trainer`` subclass defined in ``trl.trainer`` and ``trl.experimental`` (by qualified
    name), and the modules there that could not be imported (with the error)."""
    found: dict[str, type] = {}
    failed: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package_name in ("trl.trainer", "trl.experimental"):
            package = importlib.import_module(package_name)
            for info in pkgutil.walk_packages(package.__path__, package_name + "."):
                try:
                    module = importlib.import_module(info.name)
                except Exception as error:  # an optional dependency of an experimental trainer
                    failed[info.name] = f"{type(error).__name__}: {error}"
                    continue
                for value in vars(module).values():
                    if inspect.isclass(value) and issubclass(value, Trainer) and value.__module__.startswith("trl."):
                        found[f"{value.__module__}.{value.__qualname__}"] = value
    return found, failed


def accepts_peft(cls: type) -> bool:
    """Whether the trainer takes ``peft_config`` (its own ``__init__`` or, through ``**kwargs``, a base's) or its
    docstrings say it takes a ``PeftModel``."""
    for klass in cls.__mro__:
        if klass is Trainer or not issubclass(klass, Trainer):
            break
        if "PeftModel" in (klass.__doc__ or "") + (klass.__init__.__doc__ or ""):
            return True
        parameters = inspect.signature(klass.__init__).parameters
        if "peft_config" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False
