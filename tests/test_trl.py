"""TRL's SFTTrainer builds a Delta-LoRA model from ``peft_config`` and moves W as in Algorithm 1 (offline, fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from deltalora_hf import DeltaLoRACallback, DeltaLoraConfig, DeltaLoraLayer

from .helpers import base_weights, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS, START_STEP, RATIO, R, ALPHA = 8, 3, 0.5, 4, 8

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a bird sang in the tree",
    "the sun rises in the east",
    "the moon shines at night",
    "a fish swims in the sea",
    "the wind blows over the hill",
    "a child plays in the park",
    "the rain falls on the roof",
    "the train runs on the track",
    "a cat chases the small mouse",
    "the dog barks at the cat",
    "the tree grows by the river",
    "a boat sails on the lake",
    "the snow covers the hill",
    "the bird flies over the sea",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained here on SENTENCES (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def _tiny_llama(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class RecordW(TrainerCallback):
    """Copies of every targeted W at the start of training and of W, A, B after each optimizer step."""

    def __init__(self):
        self.initial, self.steps, self.factors = None, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = base_weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(base_weights(model))
        self.factors.append(
            {
                name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
                for name, m in model.named_modules()
                if isinstance(m, DeltaLoraLayer)
            }
        )


def test_sft_trainer_moves_w_as_in_algorithm_1(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = _tokenizer()
    model = _tiny_llama(tokenizer)
    w0 = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }
    record = RecordW()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=STEPS,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_length=16,
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=datasets.Dataset.from_dict({"text": SENTENCES}),
        processing_class=tokenizer,
        peft_config=DeltaLoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], update_ratio=RATIO, start_step=START_STEP
        ),
        callbacks=[DeltaLoRACallback(), record],
    )
    peft_model = trainer.model
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, DeltaLoraLayer)}
    assert len(layers) == 4
    assert all(m.get_base_layer().weight.dtype == torch.float32 for m in layers.values())
    trainer.train()
    assert trainer.state.global_step == STEPS and len(record.steps) == STEPS

    # W is untouched by SFTTrainer's setup and stays bit-identical through optimizer steps t = 0..K
    for name, w in record.initial.items():
        key = name.removeprefix("base_model.model.")
        assert torch.equal(w, w0[key]), name
    for t in range(START_STEP + 1):
        assert all(torch.equal(record.steps[t][k], record.initial[k]) for k in record.initial), f"W moved at t={t}"
    for t in range(START_STEP + 1, STEPS):  # then every optimizer step moves every W
        assert all(not torch.equal(record.steps[t][k], record.steps[t - 1][k]) for k in record.initial), t

    # W_T - W_0 == lambda * s * (B_T A_T - B_K A_K), from the layer's factors and its recorded anchors
    scale = RATIO * ALPHA / R
    worst, moved = 0.0, 0.0
    for name, layer in layers.items():
        assert layer.is_anchored("default")
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        a_k, b_k = layer.lora_anchor_A["default"], layer.lora_anchor_B["default"]
        # the anchors are the factors after optimizer step K, as recorded independently by RecordW
        a_after_k, b_after_k = record.factors[START_STEP][name]
        assert torch.equal(a_k, a_after_k) and torch.equal(b_k, b_after_k), name
        expected = scale * (b @ a - b_k @ a_k)
        change = layer.get_base_layer().weight.detach() - record.initial[name]
        worst = max(worst, (change - expected).abs().max().item())
        moved = max(moved, change.abs().max().item())
    print(f"\nSFTTrainer, {STEPS} steps, K={START_STEP}: max |W_T - W_0| {moved:.2e}, error vs Algorithm 1 {worst:.2e}")
    assert moved > 1e-4
    assert worst <= 1e-5
