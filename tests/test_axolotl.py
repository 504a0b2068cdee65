"""``adapter: deltalora`` in Axolotl (deltalora_hf.integrations.axolotl), run as a user runs it: ``axolotl train`` and
``axolotl merge-lora`` on a YAML config, offline, on a tiny Llama made here.

Axolotl needs Python >= 3.12, so these tests run in .ci/run's Axolotl job (``pytest -m axolotl``); elsewhere the
module is skipped. What the trained model was is read from the training process itself (``ProbePlugin`` in
tests/axolotl_support.py), and the move of W is checked against Algorithm 1 computed here from the saved factors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # before Axolotl is imported: offline, telemetry hangs at exit
pytest.importorskip("axolotl", reason='Axolotl needs Python >= 3.12: pip install -e ".[axolotl]" from this clone')

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from .axolotl_support import (  # noqa: E402
    PROBE_FILE,
    PROBE_IDS,
    PROBE_LOADED_FILE,
    run_axolotl,
    save_dataset,
    save_tiny_llama,
    train_config,
    write_config,
)

pytestmark = pytest.mark.axolotl

TOL = 1e-5
START_STEP = 2  # train_config's K: W moves on optimizer steps t > 2 (the 4th step on), 6 steps in all
LAYERS = 6  # q_proj, v_proj, up_proj in 2 layers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("axolotl")
    save_tiny_llama(folder / "base")
    save_dataset(folder / "data.jsonl")
    return folder


def train(workspace: Path, name: str, **overrides) -> tuple[Path, Path]:
    """``axolotl train`` of ``train_config`` with ``overrides``; returns (config file, output dir)."""
    output = workspace / f"out-{name}"
    config = write_config(workspace / f"{name}.yml", train_config(workspace, output, **overrides))
    run_axolotl("train", str(config), cwd=workspace)
    return config, output


# The factored run also turns on gradient checkpointing and sample packing. Axolotl's model loader enables
# checkpointing only for its own adapter names; transformers' Trainer enables it from the training arguments.
MODES = {
    "inplace": {},
    "factored": {"gradient_checkpointing": True, "sample_packing": True, "pad_to_sequence_len": True},
}


def train_mode(workspace: Path, mode: str) -> dict:
    delta = {"update_ratio": 2.0, "start_step": START_STEP, "base_update": mode}
    config, output = train(workspace, mode, deltalora=delta, **MODES[mode])
    return {"mode": mode, "config": config, "output": output, "probe": torch.load(output / PROBE_FILE)}


@pytest.fixture(scope="module")
def inplace(workspace) -> dict:
    return train_mode(workspace, "inplace")


@pytest.fixture(scope="module", params=list(MODES))
def trained(request, workspace) -> dict:
    return request.getfixturevalue("inplace") if request.param == "inplace" else train_mode(workspace, request.param)


def base_model(workspace: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(workspace / "base", dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=PROBE_IDS).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_w_moves_as_algorithm_1(trained, workspace):
    """In place, every targeted W of the trained model is W_0 + lambda*s*(B A - B_K A_K), computed here from the saved
    factors and anchors (s = alpha / r); factored, W is untouched. The move is logged from step K + 1 on."""
    saved = load_file(trained["output"] / "adapter_model.safetensors")
    original = load_file(workspace / "base" / "model.safetensors")
    weights = trained["probe"]["weights"]
    assert len(weights) == LAYERS
    scale, ratio = 8 / 4, 2.0
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        prefix = f"base_model.model.{module}."
        a, b = saved[prefix + "lora_A.weight"], saved[prefix + "lora_B.weight"]
        a_k, b_k = saved[prefix + "lora_anchor_A.weight"], saved[prefix + "lora_anchor_B.weight"]
        w_0 = original[name]
        if trained["mode"] == "inplace":
            expected = w_0 + ratio * scale * (b @ a - b_k @ a_k)
            assert max_diff(w, expected) <= TOL, name
            assert max_diff(w, w_0) > 1e-3, f"{name}: W did not move"
        else:
            assert torch.equal(w, w_0), f"{name}: factored mode wrote W"
    state = json.loads((trained["output"] / "checkpoint-6" / "trainer_state.json").read_text())
    moved = {entry["step"]: entry["deltalora/layers_moved"] for entry in state["log_history"] if "loss" in entry}
    # log step n follows optimizer step t = n - 1; W moves on t > K
    assert moved == {n: (LAYERS if n - 1 > START_STEP else 0) for n in range(1, 7)}


def test_gradient_checkpointing_and_packing_reach_the_model(trained):
    assert trained["probe"]["gradient_checkpointing"] == ("gradient_checkpointing" in MODES[trained["mode"]])


def test_saved_adapter_reloads(trained, workspace):
    from peft import PeftModel

    import deltalora_hf  # noqa: F401  (PEFT learns the DELTALORA type)

    model = PeftModel.from_pretrained(base_model(workspace), trained["output"])
    assert max_diff(logits(model), trained["probe"]["logits"]) <= TOL


def test_merge_lora_is_exact(trained, workspace):
    """``axolotl merge-lora`` with the config as trained: Axolotl's default (memory-efficient) merge would ignore the
    move of W; the plugin makes it merge with PEFT's merge_and_unload."""
    run_axolotl("merge-lora", str(trained["config"]), cwd=workspace)
    merged = AutoModelForCausalLM.from_pretrained(trained["output"] / "merged", dtype=torch.float32)
    assert max_diff(logits(merged), trained["probe"]["logits"]) <= TOL


def test_export_loads_in_plain_peft(trained, workspace, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    from deltalora_hf import DeltaLoraLayer, export_lora

    export_lora(PeftModel.from_pretrained(base_model(workspace), trained["output"]), tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    plain = PeftModel.from_pretrained(base_model(workspace), tmp_path / "lora")
    layers = [m for m in plain.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == LAYERS and not any(isinstance(m, DeltaLoraLayer) for m in layers)
    assert max_diff(logits(plain), trained["probe"]["logits"]) <= TOL


@pytest.mark.parametrize("step", [2, 4], ids=["before-K", "after-K"])
def test_resume_matches_the_uninterrupted_run(inplace, workspace, step):
    """``resume_from_checkpoint`` at step 2 (before the adapter is anchored at the end of step K = 2) or 4 (W has
    moved once) ends where the uninterrupted in-place run ends."""
    checkpoint = workspace / f"resume-from-{step}"
    shutil.copytree(inplace["output"] / f"checkpoint-{step}", checkpoint)
    _, output = train(workspace, f"resumed-{step}", resume_from_checkpoint=str(checkpoint))
    resumed = torch.load(output / PROBE_FILE)
    assert max_diff(resumed["logits"], inplace["probe"]["logits"]) <= TOL
    for name, w in inplace["probe"]["weights"].items():
        assert max_diff(resumed["weights"][name], w) <= TOL, name


def test_continue_from_lora_model_dir(inplace, workspace):
    """``lora_model_dir``: training starts from the saved model (W moved as saved), and W moves on from there."""
    _, output = train(workspace, "continued", lora_model_dir=str(inplace["output"]), max_steps=2)
    loaded, after = torch.load(output / PROBE_LOADED_FILE), torch.load(output / PROBE_FILE)
    assert max_diff(loaded["logits"], inplace["probe"]["logits"]) <= TOL
    assert all(max_diff(after["weights"][name], w) > 1e-4 for name, w in loaded["weights"].items())


@pytest.mark.parametrize("command", ["inference", "evaluate"])
def test_inference_and_evaluate_load_the_trained_model(inplace, workspace, command):
    """``axolotl inference`` (no prompt given: it loads the model and stops) and ``axolotl evaluate``, each with
    ``--lora-model-dir``, use the trained model."""
    loaded = inplace["output"] / PROBE_LOADED_FILE
    loaded.unlink(missing_ok=True)
    extra = ["--val-set-size", "0.25"] if command == "evaluate" else []
    run_axolotl(command, str(inplace["config"]), "--lora-model-dir", str(inplace["output"]), *extra, cwd=workspace)
    assert max_diff(torch.load(loaded)["logits"], inplace["probe"]["logits"]) <= TOL
    if command == "evaluate":
        assert (inplace["output"] / "eval_summary.csv").is_file()


# -- the config schema: what is refused when the config loads, before a model is built -----------------------------


def load_config(workspace: Path, **overrides):
    """Axolotl's own loading and validation of a config (``axolotl.cli.config.load_cfg``), in this process."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    config = train_config(workspace, workspace / "out-schema", **overrides)
    config.pop("plugins")  # the Delta-LoRA plugin is found through its entry point
    return load_cfg(DictDefault({k: v for k, v in config.items() if v is not None}))


def test_schema_fills_in_defaults_and_the_exact_merge(workspace):
    cfg = load_config(workspace, deltalora=None)
    assert cfg.merge_method == "legacy"
    assert cfg.deltalora is None  # the plugin reads DeltaLoraConfig's defaults then; see the next test


def test_plain_lora_configs_are_left_alone(workspace):
    cfg = load_config(workspace, adapter="lora", deltalora=None)
    assert cfg.merge_method is None and cfg.deltalora is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"load_in_4bit": True}, "load_in_4bit: true cannot be used with adapter: deltalora"),
        ({"load_in_8bit": True}, "load_in_8bit: true cannot be used with adapter: deltalora"),
        ({"merge_method": "memory_efficient"}, "merge_method: memory_efficient cannot merge a Delta-LoRA adapter"),
        ({"lora_mlp_kernel": True}, "lora_mlp_kernel cannot be used with adapter: deltalora"),
        ({"lora_dropout": 0.1}, "(in the Axolotl config: lora_dropout)"),
        ({"peft_use_dora": True}, "(in the Axolotl config: peft_use_dora)"),
        ({"peft_init_lora_weights": "pissa"}, "(in the Axolotl config: peft_init_lora_weights)"),
        ({"deltalora": {"update_ratio": -1.0}}, "update_ratio (lambda) must be a finite number >= 0"),
        ({"deltalora": {"base_update": "both"}}, "Input should be 'inplace' or 'factored'"),
        ({"deltalora": {"start_stp": 3}}, "Extra inputs are not permitted"),
        ({"adapter": "lora"}, "a `deltalora:` block is set but adapter is 'lora'"),
    ],
)
def test_schema_refuses_with_the_fix(workspace, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(workspace, **overrides)


def test_defaults_are_delta_lora_config_defaults():
    from deltalora_hf import DeltaLoraConfig
    from deltalora_hf.integrations.axolotl import DeltaLoraOptions

    defaults = DeltaLoraConfig()
    assert DeltaLoraOptions().model_dump() == {name: getattr(defaults, name) for name in DeltaLoraOptions.model_fields}


def test_lora_model_dir_with_a_plain_lora_is_refused(workspace, tmp_path):
    """A local folder is refused when the config loads; an adapter that only loading reveals (a hub id), at load."""
    from peft import LoraConfig, get_peft_model

    from deltalora_hf.integrations.axolotl import DeltaLoraPlugin

    get_peft_model(base_model(workspace), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a LORA adapter, not a Delta-LoRA"):
        load_config(workspace, lora_model_dir=str(tmp_path))
    cfg = load_config(workspace)
    cfg.lora_model_dir = str(tmp_path)  # as if a hub id: nothing to read when the config loads
    with pytest.raises(ValueError, match="holds a LoraConfig adapter, not a Delta-LoRA"):
        DeltaLoraPlugin().load_adapter(base_model(workspace), cfg)


@pytest.mark.parametrize("name", ["deltaLoRA", "delta-lora", "Delta_LoRA"])
def test_a_misspelt_adapter_name_is_caught_with_the_spelling(workspace, name):
    with pytest.raises(ValueError, match=re.escape(f"adapter: {name} is not an adapter name; the deltalora-hf")):
        load_config(workspace, adapter=name, deltalora=None)


def test_lora_fan_in_fan_out_is_turned_off_with_a_log_line(workspace, caplog):
    import logging

    from deltalora_hf import DeltaLoraLayer
    from deltalora_hf.integrations.axolotl import DeltaLoraPlugin

    cfg = load_config(workspace, lora_fan_in_fan_out=True)
    with caplog.at_level(logging.WARNING, logger="deltalora_hf.integrations.axolotl"):
        model, _ = DeltaLoraPlugin().load_adapter(base_model(workspace), cfg)
    assert "lora_fan_in_fan_out: true is turned off" in caplog.text
    layers = [m for m in model.modules() if isinstance(m, DeltaLoraLayer)]
    assert len(layers) == LAYERS and not any(m.fan_in_fan_out for m in layers)


def guide_example() -> dict:
    """The first YAML block of docs/guides/axolotl.md, as a user copies it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "axolotl.md").read_text()
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


def test_the_guides_example_moves_w_in_its_own_steps(workspace):
    """The guide's YAML with only the model, the data and the folders pointed at the tiny ones here: W moves (its
    steps go past its K), and the callback's "W never moved" warning does not come."""
    example = guide_example()
    ours = train_config(workspace, workspace / "out-guide")
    paths = ("base_model", "datasets", "dataset_prepared_path", "output_dir", "plugins", "val_set_size")
    config = write_config(workspace / "guide.yml", {**example, **{key: ours[key] for key in paths}})
    assert example["max_steps"] > example["deltalora"]["start_step"] + 1
    done = run_axolotl("train", str(config), cwd=workspace)
    assert "never moved" not in done.stdout + done.stderr
    probe = torch.load(workspace / "out-guide" / PROBE_FILE)
    original = load_file(workspace / "base" / "model.safetensors")
    targets = [name for name in probe["weights"] if name.split(".")[-2] in example["lora_target_modules"]]
    assert targets and all(max_diff(probe["weights"][name], original[name]) > 0 for name in targets)
