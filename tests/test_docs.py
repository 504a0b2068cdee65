"""The documentation: every Python code block of README.md and docs/ runs, the links resolve, the site builds.

Code blocks are found with pytest-examples and run in order, the blocks of one page sharing their globals (a page
reads as one script), in a temporary folder, offline: the hub ids they name resolve to tiny models saved into a
temporary Hugging Face cache (:data:`HUB_MODELS`) by :func:`deltalora_hf.testing.cache_tiny_causal_lm`, the helper
the docs give users for running them offline. A block that cannot run here carries an HTML comment on the line just
above its fence, visible in the source, with the reason::

    <!-- not run by the tests: launched with torchrun, two processes -->
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deltalora_hf.testing import cache_tiny_causal_lm

pytest_examples = pytest.importorskip("pytest_examples")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP_MARK = re.compile(r"<!-- not run by the tests: (?P<reason>[^>]*\S) -->")
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


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache in which every id of :data:`HUB_MODELS` resolves, offline, to a tiny model."""
    cache = tmp_path_factory.mktemp("hub")
    for repo_id, overrides in HUB_MODELS.items():
        cache_tiny_causal_lm(repo_id, cache, **overrides)  # the helper the docs give users for offline runs
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


# -- what the docs say about the installed versions -------------------------------------------------------------


def test_transformers_adapter_methods_unpatched(tmp_path):
    """What a user of the installed versions gets, with no patch (tests/inventory_support.py lifts the check to test
    the integration's own code): transformers 5.x asks for PEFT >= 0.22 in most ``PeftAdapterMixin`` methods and
    refuses them with an older PEFT, for every adapter type (docs/versions.md); transformers 4.x and a new enough
    PEFT run them. ``load_adapter`` works either way."""
    import peft
    import transformers.integrations.peft as integration
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    import deltalora_hf
    from deltalora_hf.testing import save_tiny_causal_lm

    folder = save_tiny_causal_lm(tmp_path / "base")
    config = deltalora_hf.DeltaLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], start_step=0)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config).save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="default")

    needed = Version(getattr(integration, "MIN_PEFT_VERSION", "0"))
    calls = {
        "add_adapter": lambda: model.add_adapter(config, adapter_name="other"),
        "set_adapter": lambda: model.set_adapter("default"),
        "active_adapters": model.active_adapters,
        "disable_adapters": model.disable_adapters,
        "enable_adapters": model.enable_adapters,
        "get_adapter_state_dict": model.get_adapter_state_dict,
        "delete_adapter": lambda: model.delete_adapter("other"),
    }
    for call in calls.values():
        if Version(peft.__version__) < needed:
            with pytest.raises(ValueError, match=f"version >= {needed}"):
                call()
        else:
            call()
    if Version(peft.__version__) >= needed:
        assert model.active_adapters() == ["default"]
    docs = (ROOT / "docs" / "versions.md").read_text(encoding="utf-8")
    assert (
        "PEFT ≥ 0.22" in docs and "tests/inventory_support.py" in docs and "test_transformers_adapter_methods" in docs
    )


CAPPED = ("torch", "transformers", "peft", "accelerate", "trl")


def declared_ranges() -> dict[str, tuple[str, str]]:
    """``name -> (floor, cap)`` of every capped dependency, as pyproject.toml declares it (the same everywhere)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    ranges: dict[str, set[tuple[str, str]]] = {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.name in CAPPED:
            specs = {s.operator: s.version for s in requirement.specifier}
            ranges.setdefault(requirement.name, set()).add((specs.get(">="), specs.get("<")))
    assert set(ranges) == set(CAPPED), f"not declared: {set(CAPPED) - set(ranges)}"
    for name, found in ranges.items():
        assert len(found) == 1 and None not in next(iter(found)), f"{name}: one floor and one cap everywhere: {found}"
    return {name: next(iter(found)) for name, found in ranges.items()}


def test_the_version_pages_say_what_pyproject_declares():
    """README's "Supported:" line and docs/versions.md give pyproject.toml's floor and cap of every capped dependency,
    and the installed versions are inside them (the newest job installs what a newcomer gets)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    supported = next(line for line in readme.split("\n\n") if line.startswith("Supported:"))
    table = (ROOT / "docs" / "versions.md").read_text(encoding="utf-8").split("\n\n")[1]
    for name, (floor, cap) in declared_ranges().items():
        assert f"{name} ≥ {floor} and < {cap}" in supported, f"README's Supported line on {name}: {supported}"
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert f">= {floor}, < {cap}" in row, f"docs/versions.md on {name}: {row}"
        try:
            installed = Version(version(name)).release
        except PackageNotFoundError:  # trl is optional outside the test extra
            continue
        assert Version(floor).release <= installed < Version(cap).release, f"{name} {version(name)} installed"
