"""Helpers of tests/test_axolotl.py: a tiny offline Llama and dataset, Axolotl configs and runs, and ProbePlugin.

``ProbePlugin`` is a second Axolotl plugin, listed in the test configs' ``plugins:``: after a command loads the model,
and after training, it saves from the model in memory the logits on :data:`PROBE_IDS` and every base weight W of a
LoRA layer. The tests compare saved adapters, merges and exports against these (what the model was, not what a file
says it was).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from axolotl.integrations.base import BasePlugin

PROBE_IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 250, 42]])
PROBE_FILE = "probe.pt"  # the model after training
PROBE_LOADED_FILE = "probe-loaded.pt"  # the model as a command loaded it (train, inference, evaluate, ...)
REPO = Path(__file__).resolve().parent.parent


class ProbePlugin(BasePlugin):
    """Saves ``probe(model)`` of the model as loaded and as trained into ``output_dir`` (see the module docstring)."""

    def post_model_load(self, cfg, model):
        torch.save(probe(model), Path(cfg.output_dir) / PROBE_LOADED_FILE)

    def post_train(self, cfg, model):
        torch.save(probe(model), Path(cfg.output_dir) / PROBE_FILE)


@torch.no_grad()
def probe(model: torch.nn.Module) -> dict[str, Any]:
    """Logits on :data:`PROBE_IDS` and the base weights of the LoRA layers (``...<module>.base_layer.weight``)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=PROBE_IDS).logits.float().clone()
    model.train(was_training)
    weights = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): value.detach().float().clone()
        for name, value in model.state_dict().items()
        if name.endswith("base_layer.weight")
    }
    gradient_checkpointing = bool(getattr(model.get_base_model(), "is_gradient_checkpointing", False))
    return {"logits": logits, "weights": weights, "gradient_checkpointing": gradient_checkpointing}


def save_tiny_llama(folder: Path) -> None:
    """A 2-layer Llama (hidden 64) and a byte-level BPE tokenizer trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


SENTENCES = [
    "Delta-LoRA moves the base weight with the change of the low-rank product.",
    "The adapter learns two small matrices while the large weight stays frozen.",
    "After the start step the update ratio scales how far the base weight moves.",
    "A factored base update never writes the weight and adds the move in the forward pass.",
]


def save_dataset(path: Path, lines: int = 64) -> None:
    """``lines`` completion examples (JSON lines with a ``text`` field)."""
    with path.open("w") as file:
        for i in range(lines):
            file.write(json.dumps({"text": f"{i}: {SENTENCES[i % len(SENTENCES)]}"}) + "\n")


def train_config(workspace: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """An ``axolotl train`` config for the tiny model: 6 optimizer steps, a checkpoint every 2, W moving from 3."""
    config: dict[str, Any] = {
        "base_model": str(workspace / "base"),
        "datasets": [{"path": str(workspace / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(workspace / "prepared"),
        "val_set_size": 0,
        "output_dir": str(output_dir),
        "sequence_len": 32,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "num_epochs": 1,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "save_steps": 2,
        "logging_steps": 1,
        "seed": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "adapter": "deltalora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj", "up_proj"],
        "deltalora": {"update_ratio": 2.0, "start_step": 2, "base_update": "inplace"},
        "plugins": ["tests.axolotl_support.ProbePlugin"],
        "save_safetensors": True,
        "use_tensorboard": False,
        "dataloader_num_workers": 0,
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_axolotl(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``axolotl <args>`` from this environment (its bin/ first on PATH: ``axolotl train`` runs ``accelerate``),
    offline, without telemetry, on the CPU, with the repository importable (for ``tests.axolotl_support``)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "AXOLOTL_DO_NOT_TRACK": "1",  # offline, telemetry retries at exit and the process hangs
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [str(Path(bin_dir) / "axolotl"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"axolotl {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done
