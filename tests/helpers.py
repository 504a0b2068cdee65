"""Tiny models, data and a Trainer with a fixed batch order, shared by the tests (no downloads)."""

from __future__ import annotations

import torch
from torch.utils.data import SequentialSampler
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

VOCAB = 97


TINY_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    values = {**TINY_LLAMA, **config_overrides}
    return LlamaForCausalLM(LlamaConfig(**values)).to(dtype)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def lm_rows(n: int, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token sequences with a learnable pattern (each token predicts the next by a fixed rule)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + 7 * torch.arange(length)) % VOCAB
    labels = ids.clone()
    labels[:, 0] = -100  # no loss term for it anyway: Trainer's token count then equals the loss's
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def cls_rows(n: int, length: int = 10, num_labels: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = ids[:, 0] % num_labels
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


class SequentialTrainer(Trainer):
    """Trainer that feeds batches in dataset order, so a hand-written loop can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def train_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """Copies of every targeted base weight, keyed by module name."""
    from deltalora_hf import DeltaLoraLayer

    return {
        name: module.get_base_layer().weight.detach().clone()
        for name, module in peft_model.named_modules()
        if isinstance(module, DeltaLoraLayer)
    }
