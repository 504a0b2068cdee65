"""Execute the example notebooks headless in SMOKE mode (offline, CPU, tiny models) and check what they produce.

The notebooks assert their own results (the reloaded adapter reproduces the trained logits, the exported plain LoRA
adapter reproduces them in a process without ``deltalora_hf``) and print ``RELOAD_OK`` / ``EXPORT_OK``; these tests
run them with papermill, ``SMOKE=True``, and check those markers and the files the notebooks write.

They are skipped only where papermill (which brings nbclient) or ipykernel is not installed.

Committed notebooks carry no outputs; after editing one in Jupyter, strip it with::

    python tests/test_notebooks.py --strip notebooks/*.ipynb
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL_NOTEBOOKS = ("quickstart_glue.ipynb", "instruction_tuning_causal_lm.ipynb")
KERNEL_NAME = "deltalora-hf-notebook-tests"
CELL_TIMEOUT_S = 600


# -- stripping ---------------------------------------------------------------------------------------------------


def strip_notebook(nb: dict) -> dict:
    """Drop outputs, execution counts and run-specific metadata, keeping cell tags (``parameters``)."""
    for cell in nb.get("cells", []):
        cell.pop("id", None)
        if isinstance(cell.get("source"), str):  # one JSON string per line, as Jupyter saves it: readable diffs
            cell["source"] = cell["source"].splitlines(keepends=True)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        metadata = cell.get("metadata", {})
        cell["metadata"] = {k: v for k, v in metadata.items() if k == "tags" and v}
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k not in ("papermill", "widgets", "execution")}
    nb["nbformat"], nb["nbformat_minor"] = 4, 4  # 4.4: no cell ids, so re-saving does not churn the diff
    return nb


def dumps_notebook(nb: dict) -> str:
    """The text a stripped notebook is committed as: nbformat's own layout (indent 1, sorted keys)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


# -- static checks (no Jupyter needed) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_is_committed_stripped(name):
    path = NOTEBOOKS / name
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert text == dumps_notebook(strip_notebook(json.loads(text))), (
        f"{name} carries outputs or run metadata: python tests/test_notebooks.py --strip {path}"
    )
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "pip" in "".join(code[0]["source"]), "the first code cell installs the package (Colab)"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "SMOKE = False" in "".join(tagged[0]["source"])


# -- execution ---------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec for *this* interpreter, so the notebooks run against the environment under test."""
    pytest.importorskip("papermill")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "deltalora-hf tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # smoke mode must not touch the network
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    return KERNEL_NAME


def run_notebook(name: str, workdir: Path, kernel_name: str, **parameters) -> str:
    """Execute a notebook with papermill in ``workdir``; return the text of all its stream outputs."""
    import papermill

    executed = workdir / f"executed-{name}"
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(executed),
        parameters={"SMOKE": True, **parameters},
        kernel_name=kernel_name,
        cwd=str(workdir),
        execution_timeout=CELL_TIMEOUT_S,
        progress_bar=False,
        log_output=False,
    )
    nb = json.loads(executed.read_text(encoding="utf-8"))
    texts = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append("".join(output["text"]))
            elif "text/plain" in output.get("data", {}):
                texts.append("".join(output["data"]["text/plain"]))
    return "\n".join(texts)


@pytest.mark.slow
def test_quickstart_glue_smoke(tmp_path, kernel):
    out = tmp_path / "out"
    log = run_notebook("quickstart_glue.ipynb", tmp_path, kernel, OUTPUT_DIR=str(out))
    plot = out / "lora_vs_deltalora.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the accuracy/loss plot was not written"
    assert plot.stat().st_size > 10_000
    assert "RELOAD_OK" in log, "the reloaded adapter did not reproduce the trained logits"
    for run in ("lora", "lora-scaled", "delta-lora"):  # the control arm runs too: LoRA with lora_alpha·(1+λ)
        assert re.search(rf"^{run} \{{'eval_", log, re.M), f"no final scores of the {run} run"
    assert (out / "deltalora-mrpc-adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "deltalora-mrpc-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"].startswith("DELTALORA")


@pytest.mark.slow
def test_instruction_tuning_causal_lm_smoke(tmp_path, kernel):
    out = tmp_path / "out"
    log = run_notebook("instruction_tuning_causal_lm.ipynb", tmp_path, kernel, OUTPUT_DIR=str(out))
    assert "--- before:" in log and "--- after:" in log, "no before/after generations"
    assert "EXPORT_OK" in log, "the exported plain LoRA adapter did not reproduce the trained logits"
    config = json.loads((out / "plain-lora-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32  # rank 2r for r = 16


# -- command line: strip notebooks in place ----------------------------------------------------------------------

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--strip":
        sys.exit(f"usage: python {sys.argv[0]} --strip NOTEBOOK.ipynb ...")
    for arg in sys.argv[2:]:
        path = Path(arg)
        path.write_text(dumps_notebook(strip_notebook(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
        print("stripped", path)
