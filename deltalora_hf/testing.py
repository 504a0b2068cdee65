"""Tiny local models, to run the README and the docs offline (and their tests).

The examples name hub models (``HuggingFaceTB/SmolLM2-135M``). Without network, either point ``model_id`` at a folder
made by :func:`save_tiny_causal_lm`, or make the hub id itself resolve offline with :func:`cache_tiny_causal_lm`, also
from the shell (a separate cache, so that no real download is replaced)::

    export HF_HUB_CACHE=/tmp/tiny-hub HF_HUB_OFFLINE=1
    python -m deltalora_hf.testing HuggingFaceTB/SmolLM2-135M
    python quickstart.py

The model is a 2-layer Llama with random weights (it learns nothing useful): it exercises the code, not the method.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: the cache's refs/main points to it
TEXT = "Delta-LoRA moves the base weight with the low-rank update of the adapter."


def save_tiny_causal_lm(folder: str | os.PathLike[str], **config_overrides: Any) -> Path:
    """Save a tiny Llama and a byte-level BPE tokenizer (any text encodes, no unknown token) into ``folder``.

    ``config_overrides`` go to ``LlamaConfig`` (e.g. ``tie_word_embeddings=True``, as SmolLM2 has). Returns the folder,
    which ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,  # bitsandbytes' 4-bit CPU kernels need 64 (docs/guides/modes-and-quantized-bases.md)
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **config_overrides,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def cache_tiny_causal_lm(
    repo_id: str, cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any
) -> Path:
    """Make ``repo_id`` resolve offline (``HF_HUB_OFFLINE=1``) to a tiny model saved into the hub cache.

    ``cache_dir``: the cache to write, by default the one ``huggingface_hub`` uses (``HF_HUB_CACHE``, else
    ``~/.cache/huggingface/hub``). A real download of ``repo_id`` in that cache is replaced: use a separate cache
    (``HF_HUB_CACHE=/tmp/tiny-hub``) if you keep one. Returns the snapshot folder.
    """
    from huggingface_hub import constants

    repo = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = save_tiny_causal_lm(repo / "snapshots" / SNAPSHOT, **config_overrides)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m deltalora_hf.testing REPO_ID [REPO_ID ...]  (writes to HF_HUB_CACHE)")
    for name in sys.argv[1:]:
        print(f"{name} -> {cache_tiny_causal_lm(name)}")
