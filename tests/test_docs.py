"""The documentation: every Python code block of README.md and docs/ runs, the links resolve, the site builds.

Code blocks are found with pytest-examples and run in order, the blocks of one page sharing their globals (a page
reads as one script), in a temporary folder, offline: the hub ids they name resolve to tiny models saved into a
temporary Hugging Face cache (:data:`HUB_MODELS`). A block that cannot run here carries an HTML comment on the line
just above its fence, visible in the source, with the reason::

    <!-- not run by the tests: launched with torchrun, two processes -->
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest_examples = pytest.importorskip("pytest_examples")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP_MARK = re.compile(r"<!-- not run by the tests: (?P<reason>[^>]*\S) -->")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: the cache maps refs/main to it
# Hub ids named in the docs -> what their tiny Llama stand-in shares with them (SmolLM2 ties its word embeddings).
HUB_MODELS = {"HuggingFaceTB/SmolLM2-135M": {"tie_word_embeddings": True}}


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def python_blocks(path: Path) -> list[tuple[object, str | None]]:
    """``(example, reason)`` per Python block of ``path``; ``reason`` is set when the block is marked not to run."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = []
    for example in pytest_examples.find_examples(path):
        above = lines[example.start_line - 2].strip() if example.start_line >= 2 else ""
        mark = SKIP_MARK.fullmatch(above)
        blocks.append((example, mark["reason"] if mark else None))
    return blocks


def test_marks_sit_on_python_blocks_and_give_a_reason():
    """Every mark is directly above a Python fence, and every Python fence is ```python (so that it is found)."""
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if "not run by the tests" in line:
                assert SKIP_MARK.fullmatch(line.strip()), f"{page_id(path)}:{number + 1}: malformed mark {line!r}"
                following = lines[number + 1].strip() if number + 1 < len(lines) else ""
                assert following == "```python", f"{page_id(path)}:{number + 1}: a mark must sit above ```python"
            fence = re.match(r"\s*```\s*(\S+)", line)
            if fence and fence[1].lower().lstrip("{.").startswith("py"):
                assert line == "```python", f"{page_id(path)}:{number + 1}: write Python blocks as ```python: {line}"
        found = len(python_blocks(path))
        assert found == lines.count("```python"), f"{page_id(path)}: pytest-examples found {found} Python blocks"


def test_relative_links_resolve():
    """README.md and docs/ link to each other by relative path, so that they also read on GitHub."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    for path in PAGES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#", 1)[0]).resolve()
            assert file.exists(), f"{page_id(path)} links to {target}, which does not exist"


# -- running the code blocks -------------------------------------------------------------------------------------


def save_tiny_causal_lm(folder: Path, **config_overrides) -> None:
    """A tiny Llama and a byte-level BPE tokenizer trained on a few sentences (any text encodes, no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["Delta-LoRA moves the base weight with the low-rank update of the adapter."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
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


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache in which every id of :data:`HUB_MODELS` resolves, offline, to a tiny model."""
    cache = tmp_path_factory.mktemp("hub")
    for repo_id, overrides in HUB_MODELS.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        save_tiny_causal_lm(repo / "snapshots" / SNAPSHOT, **overrides)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SNAPSHOT)
    return cache


@pytest.fixture
def docs_env(hub_cache, tmp_path, monkeypatch):
    """Offline, in a temporary folder, with the tiny hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    return tmp_path


def run_block(example, namespace: dict) -> None:
    """Run one block in ``namespace``, compiled under the page's name and line numbers: a traceback shows the page.

    (pytest-examples' own runner builds a traceback that pytest 9 cannot print, so only its finder is used.)
    """
    code = compile("\n" * (example.start_line) + example.source, str(example.path), "exec")
    exec(code, namespace)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in PAGES if "```python" in p.read_text(encoding="utf-8")], ids=page_id)
def test_code_blocks_run(path, docs_env):
    """The unmarked blocks of the page, in order, sharing globals (a page reads as one script)."""
    namespace: dict = {"__name__": "__main__"}
    for example, reason in python_blocks(path):
        if reason is None:
            run_block(example, namespace)


# -- the site ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: no broken link, no missing page, every API object found (mkdocstrings)."""
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # no banner about MkDocs 2.0
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    import deltalora_hf

    for name in deltalora_hf.__all__:
        assert f'id="deltalora_hf.{name}"' in api, f"{name} is missing from the API reference"
