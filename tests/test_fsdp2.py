"""Delta-LoRA on FSDP2-sharded bases (DTensor weights), both base-update modes, on 2 CPU processes (gloo).

Two launches of ``python -m torch.distributed.run --nproc_per_node 2``, each training every configuration in turn
(the imports dominate the cost):

* ``tests/scripts/fsdp2_native_trainer.py``: transformers loads the base already sharded
  (``from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=2))``), then ``get_peft_model`` and
  ``Trainer`` + ``DeltaLoRACallback``; plain PEFT LoRA, factored and in-place.
* ``tests/scripts/fsdp2_loop.py``: ``fully_shard`` after ``get_peft_model`` (so the factors are sharded too) in a
  plain loop with ``DeltaLoraUpdater``; factored, in-place on row shards and on column shards; plus the in-place
  update of single DTensors (uneven shards, rows or columns, transposed, float32/float64/bfloat16) against the same
  update of the whole tensor, and the refused layouts.

The tiny Llama has an ``up_proj`` of 63 rows (targeted with q_proj and v_proj), so its row shards are uneven (32 and
31). The tests check that the ranks agree bit for bit, that they match an independent single-process run without
sharding on the same global batches (W, A, B, anchors), that W moved as Algorithm 1 says (in place) or not at all
(factored), that the saved adapter reloads with ``PeftModel.from_pretrained`` on a fresh base, and that the plain
rank-2r LoRA written by ``export_lora`` from the sharded model reproduces the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from .helpers import (
    STEPS,
    VOCAB,
    WORLD,
    K,
    adapter_state_from_state_dict,
    assert_algorithm_1_moves,
    assert_ranks_bit_identical,
    dense_model,
    load_run,
    max_difference,
    tiny_llama,
    torchrun,
)
from .scripts.fsdp2_loop import MODEL

TOLERANCE = 1e-6  # float32: FSDP2's reduce-scatter sums the gradients in another order than one process
SUFFIXES = (".self_attn.q_proj", ".self_attn.v_proj", ".mlp.up_proj")
NATIVE_RUNS = ["lora", "factored", "inplace"]
LOOP_RUNS = ["factored", "inplace", "inplace-cols"]


def _has_native_fsdp() -> bool:
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    return "fsdp_size" in DistributedConfig.__dataclass_fields__


def multiprocess(test):
    """Slow (a 2-process launch), and skipped where torch has no gloo backend."""
    test = pytest.mark.slow(test)
    gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available()
    return pytest.mark.skipif(not gloo, reason="needs torch.distributed with gloo")(test)


needs_native_fsdp = pytest.mark.skipif(
    not _has_native_fsdp(), reason="this transformers has no DistributedConfig(fsdp_size=...) (added in 5.x)"
)


def check_run(directory: Path, run: str, reference: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Ranks bit-identical, equal to one process, W moved as Algorithm 1 says; returns rank 0's state."""
    states, _ = load_run(directory, run)
    assert_ranks_bit_identical(states)
    difference = max_difference(states[0], reference)
    print(f"\n{label} {run}: ranks bit-identical; vs one process (W, A, B, anchors) max |difference| {difference:.2e}")
    assert difference <= TOLERANCE
    mode = run.split("-")[0]
    if mode != "lora":
        moved = assert_algorithm_1_moves(states[0], inplace=mode == "inplace", suffixes=SUFFIXES, **MODEL)
        assert (moved > 1e-4) == (mode == "inplace")
    return states[0]


def effective_model(state: dict[str, torch.Tensor], mode: str) -> torch.nn.Module:
    """The trained model as a plain Llama: the dense reference of a trained state (independent of PEFT's merging),
    on each targeted layer W_0 + s B A (plain LoRA), plus lambda s (B A - B_K A_K) (Delta-LoRA, either mode)."""
    return dense_model(adapter_state_from_state_dict(state), build=lambda: tiny_llama(**MODEL)).eval()


def check_saved(directory: Path, run: str, reference: dict[str, torch.Tensor], label: str) -> None:
    """The saved adapter and (Delta-LoRA) the exported plain LoRA, each on a fresh base, against the trained model."""
    mode = run.split("-")[0]
    ids = torch.arange(24).reshape(2, 12) % VOCAB
    with torch.no_grad():
        expected = effective_model(reference, mode)(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(**MODEL), directory / run / "adapter").eval()
        reload_difference = (reloaded(ids).logits - expected).abs().max().item()
        line = f"\n{label} {run}: saved adapter on a fresh base, logits vs one process {reload_difference:.2e}"
        assert reload_difference <= TOLERANCE
        if mode == "lora":
            print(line)
            return
        saved = load_file(directory / run / "adapter" / "adapter_model.safetensors")
        assert any(k.endswith("lora_anchor_A.weight") for k in saved) and any(
            k.endswith("lora_anchored.weight") for k in saved
        )
        exported = PeftModel.from_pretrained(tiny_llama(**MODEL), directory / run / "export").eval()  # plain LoRA
        export_difference = (exported(ids).logits - expected).abs().max().item()
    print(f"{line}; export_lora (plain LoRA, rank 8) {export_difference:.2e}")
    config = exported.peft_config["default"]
    assert type(config).__name__ == "LoraConfig" and config.r == 2 * 4
    assert export_difference <= TOLERANCE


# -- transformers' native FSDP2 loading + Trainer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def native_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_native")
    tiny_llama(**MODEL).save_pretrained(out / "base")
    runs = ",".join(NATIVE_RUNS)
    args = ["--base", str(out / "base"), "--out", str(out), "--runs", runs, "--per-device", "2"]
    torchrun("fsdp2_native_trainer", *args, "--steps", str(STEPS), "--start-step", str(K), timeout=300)
    return out


@pytest.fixture(scope="module")
def native_reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """One process, no sharding, 4 rows per step (= 2 ranks x 2 rows), per run."""
    from .scripts import fsdp2_native_trainer

    out = tmp_path_factory.mktemp("fsdp2_native_single")
    return {
        run: fsdp2_native_trainer.train(str(out / run), run, 2 * WORLD, STEPS, K, save=False)[1] for run in NATIVE_RUNS
    }


@multiprocess
@needs_native_fsdp
@pytest.mark.parametrize("run", NATIVE_RUNS)
def test_native_fsdp2_trainer_matches_one_process(native_runs, native_reference, run):
    check_run(native_runs, run, native_reference[run], "native FSDP2 + Trainer")
    for report in load_run(native_runs, run)[1]:  # the base really was sharded when PEFT wrapped it
        placements = report["placements"]
        assert len(placements) == 6 and set(placements.values()) == {"(Shard(dim=0),)"}, placements
        assert report["delta_lora_layers"] == (0 if run == "lora" else 6)


@multiprocess
@needs_native_fsdp
@pytest.mark.parametrize("run", NATIVE_RUNS)
def test_native_fsdp2_save_model_and_export_reload_on_a_fresh_base(native_runs, native_reference, run):
    check_saved(native_runs, run, native_reference[run], "native FSDP2 + Trainer")


# -- fully_shard in a plain loop with DeltaLoraUpdater --------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_loop")
    args = ["--out", str(out), "--runs", ",".join(LOOP_RUNS), "--shard-checks"]
    torchrun("fsdp2_loop", *args, "--steps", str(STEPS), "--start-step", str(K), timeout=300)
    return out


@pytest.fixture(scope="module")
def loop_reference() -> dict[str, dict[str, torch.Tensor]]:
    from .scripts import fsdp2_loop

    references = {}
    for mode in ("factored", "inplace"):
        _, references[mode], report = fsdp2_loop.train(mode, STEPS, K, distributed=False)
        assert report["error"] is None, report["error"]
    return references


@multiprocess
@pytest.mark.parametrize("run", LOOP_RUNS)
def test_fully_shard_loop_matches_one_process(loop_runs, loop_reference, run):
    states, reports = load_run(loop_runs, run)
    for report in reports:
        assert report["error"] is None, report["error"]["tb"]
        want = "(Shard(dim=1),)" if run.endswith("-cols") else "(Shard(dim=0),)"
        assert set(report["placements"].values()) == {want}, report["placements"]
        up_rows = {shape[0] for name, shape in report["local_shapes"].items() if name.endswith("up_proj")}
        assert run.endswith("-cols") or up_rows in ({32}, {31})  # uneven row shards: 63 = 32 + 31
    check_run(loop_runs, run, loop_reference[run.split("-")[0]], "fully_shard loop")


@multiprocess
@pytest.mark.parametrize("run", LOOP_RUNS)
def test_fully_shard_loop_save_pretrained_and_export_reload_on_a_fresh_base(loop_runs, loop_reference, run):
    check_saved(loop_runs, run, loop_reference[run.split("-")[0]], "fully_shard loop")


@multiprocess
def test_local_shard_update_equals_the_update_of_the_whole_tensor(loop_runs):
    """Each rank's block of a DTensor (found from placements and mesh, as torch.chunk splits) gets exactly its part
    of alpha * U V: uneven and empty shards, rows or columns, W stored transposed, float32/float64/bfloat16."""
    for rank in range(WORLD):
        checks = json.loads((loop_runs / f"shard_checks.rank{rank}.json").read_text())
        assert len(checks["cases"]) == 72
        for name, case in checks["cases"].items():
            assert case["block_is_torch_reference"] and case["local_is_distribute_tensor_block"], (rank, name, case)
            assert case["shard_equals_functional_on_slice"], (rank, name)  # same rounding as functional.add_low_rank_
            assert case["moved"] > 0.1, (rank, name)
            if name.endswith("nearest"):  # as the update of the whole tensor, to the last bit here
                assert case["ulps_from_full_update"] <= 1.0, (rank, name, case)
            else:  # stochastic rounding: one of the two bfloat16 neighbours of the exact value
                assert case["ulps_from_exact"] <= 1.0, (rank, name, case)
        empty = [c["block"] for n, c in checks["cases"].items() if n.startswith("(1, 7)-S(0)")]
        assert all(b[0][0] == b[0][1] for b in empty) == (rank == 1)  # 1 row on 2 ranks: rank 1 holds nothing
        assert checks["copy_from_full_exact"]
        refusals = checks["refusals"]
        assert "Partial" in refusals["partial"] or "P(sum)" in refusals["partial"]
        assert "tensor-parallel" in refusals["tp"]
        assert refusals.pop("check_target_tp_factored") is None  # factored mode never writes W: any float DTensor
        assert all("base_update='factored'" in message for message in refusals.values()), refusals


# -- what get_peft_model refuses (one process) -------------------------------------------------------------------


class _UnknownSubclass(torch.Tensor):
    """A tensor subclass Delta-LoRA knows nothing about (as a quantized weight would be)."""


@pytest.mark.parametrize("mode", ["factored", "inplace"])
def test_check_target_names_what_is_wrong_with_a_weight(mode):
    from deltalora_hf.model import check_target

    integer = torch.nn.Linear(4, 4)
    integer.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"dtype torch\.int8, not a floating-point dtype"):
        check_target(integer, "integer", mode)
    subclass = torch.nn.Linear(4, 4)
    subclass.weight = torch.nn.Parameter(torch.zeros(4, 4).as_subclass(_UnknownSubclass), requires_grad=False)
    with pytest.raises(ValueError, match="_UnknownSubclass, a tensor subclass Delta-LoRA does not know"):
        check_target(subclass, "subclass", mode)
    check_target(torch.nn.Linear(4, 4), "plain", mode)  # a float DTensor passes too: the launches above
