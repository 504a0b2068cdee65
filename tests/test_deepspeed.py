"""Delta-LoRA under DeepSpeed ZeRO 1/2/3 with Trainer, on 2 CPU processes (``DS_ACCELERATOR=cpu``, gloo).

One ``torch.distributed.run`` launch of ``tests/scripts/deepspeed_trainer.py`` trains every configuration in turn
(the imports dominate the cost); each rank writes its whole (gathered) state. The tests check that the ranks agree
bit for bit, that they match an independent single-process Trainer run without DeepSpeed on the same global batches,
that W moved as Algorithm 1 says (in place) or not at all (factored), and, for ZeRO-3, that the parameters really
were partitioned, that ``trainer.save_model()`` reloads with ``PeftModel.from_pretrained`` on a fresh base, and that
the plain rank-2r LoRA written by ``export_lora`` inside the job reproduces the trained model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from .helpers import (
    STEPS,
    TOL,
    VOCAB,
    WORLD,
    K,
    adapter_state_from_state_dict,
    assert_algorithm_1_moves,
    assert_ranks_bit_identical,
    dense_model,
    load_run,
    max_difference,
    targeted,
    tiny_llama,
    torchrun,
)

ZERO12 = ["zero1-inplace", "zero2-inplace", "zero2-factored", "zero2-factored-accumulate"]
ZERO3 = [
    "zero3-factored",
    "zero3-inplace",
    "zero3-factored-offload",
    "zero3-inplace-persistent",
    "zero3-factored-pretrained",
    "zero3-inplace-pretrained",
    "zero3-inplace-accumulate",
]


def needs_deepspeed(test):
    """Skip where DeepSpeed cannot run these jobs: not Linux, or not installed."""
    test = pytest.mark.slow(test)
    for condition, reason in [
        (not sys.platform.startswith("linux"), "DeepSpeed's CPU accelerator runs on Linux only"),
        (importlib.util.find_spec("deepspeed") is None, "deepspeed is not installed (pip install -e '.[test]')"),
    ]:
        test = pytest.mark.skipif(condition, reason=reason)(test)
    return test


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> Path:
    """All configurations, trained in one 2-process launch."""
    out = tmp_path_factory.mktemp("deepspeed")
    runs = ",".join(ZERO12 + ZERO3)
    torchrun(
        "deepspeed_trainer",
        "--out",
        str(out),
        "--runs",
        runs,
        "--per-device",
        "2",
        "--steps",
        str(STEPS),
        "--start-step",
        str(K),
        timeout=400,
        DS_ACCELERATOR="cpu",
    )
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """One process, no DeepSpeed, 4 rows per step (= 2 ranks x 2 rows), per base-update mode."""
    from .scripts import deepspeed_trainer

    out = tmp_path_factory.mktemp("single")
    return {
        mode: deepspeed_trainer.train(
            str(out / mode), stage=None, mode=mode, per_device=2 * WORLD, steps=STEPS, start_step=K
        )[1]
        for mode in ("inplace", "factored")
    }


def check_run(directory: Path, run: str, reference: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Ranks bit-identical, equal to one process, W moved as Algorithm 1 says; returns rank 0's state."""
    states, _ = load_run(directory, run)
    assert_ranks_bit_identical(states)
    mode = run.split("-")[1]
    difference = max_difference(states[0], reference[mode])
    print(f"\n{run}: ranks bit-identical; vs one process max |difference| {difference:.2e}")
    assert difference <= TOL
    moved = assert_algorithm_1_moves(states[0], inplace=mode == "inplace")
    assert (moved > 1e-4) == (mode == "inplace")
    return states[0]


@needs_deepspeed
@pytest.mark.parametrize("run", ZERO12)
def test_zero1_and_zero2_match_one_process(deepspeed_runs, reference, run):
    check_run(deepspeed_runs, run, reference)


@needs_deepspeed
@pytest.mark.parametrize("run", ZERO3)
def test_zero3_matches_one_process_with_parameters_partitioned_or_persistent(deepspeed_runs, reference, run):
    """Every parameter split across the ranks, or (``persistent``) the base weights kept whole by ZeRO-3's default
    ``stage3_param_persistence_threshold``: the two paths of the in-place update (a slice of W, or all of it).
    ``pretrained``: the base loaded with ``from_pretrained`` after ``TrainingArguments``, i.e. partitioned by
    ``deepspeed.zero.Init`` before PEFT wraps it (how large models are loaded)."""
    state = check_run(deepspeed_runs, run, reference)
    _, reports = load_run(deepspeed_runs, run)
    for report in reports:
        partitioned = set(report["partitioned"])
        for prefix in targeted(state):
            assert {f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"} <= partitioned, prefix
            assert (f"{prefix}.base_layer.weight" in partitioned) != run.endswith("-persistent"), prefix
        assert report["loaded_partitioned"] == run.endswith("-pretrained")  # from_pretrained under zero.Init


@needs_deepspeed
@pytest.mark.parametrize("run", ["zero3-factored", "zero3-inplace"])
def test_zero3_save_model_reloads_on_a_fresh_base_and_export_lora_reproduces_it(deepspeed_runs, reference, run):
    saved = load_file(deepspeed_runs / run / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_anchor_A.weight") for k in saved) and any(
        k.endswith("lora_anchored.weight") for k in saved
    )

    ids = torch.arange(24).reshape(2, 12) % VOCAB
    want = dense_model(adapter_state_from_state_dict(reference[run.split("-")[1]]))  # the one-process model, densely
    with torch.no_grad():
        expected = want(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), deepspeed_runs / run / "adapter").eval()
        exported = PeftModel.from_pretrained(tiny_llama(), deepspeed_runs / run / "export").eval()  # plain LoRA
        reload_difference = (reloaded(ids).logits - expected).abs().max().item()
        export_difference = (exported(ids).logits - expected).abs().max().item()
    print(
        f"\n{run}: save_model -> from_pretrained logits vs one process {reload_difference:.2e}; "
        f"export_lora (rank {2 * 4}) {export_difference:.2e}"
    )
    assert exported.peft_config["default"].r == 2 * 4 and type(exported.peft_config["default"]).__name__ == "LoraConfig"
    assert reload_difference <= 1e-4
    assert export_difference <= 1e-4


# -- the ZeRO-3 in-place update of one rank's slice, without DeepSpeed ---------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    ("world", "dtype"), [(2, torch.float32), (3, torch.float32), (5, torch.bfloat16), (4, torch.float64)]
)
def test_zero3_slices_updated_separately_join_into_the_full_update(monkeypatch, world, dtype, transposed):
    """Each rank's flat partition (padded at the end: 7 x 9 = 63 elements on 5 ranks are 5 x 13, the last with 11
    real ones) gets exactly its elements of alpha * U V, whatever the row boundaries."""
    from deltalora_hf import _distributed

    g = torch.Generator().manual_seed(0)
    d, k, r, alpha = 7, 9, 2, 0.75
    w = torch.randn(d, k, generator=g).to(dtype)
    u, v = torch.randn(d, 2 * r, generator=g), torch.randn(2 * r, k, generator=g)
    stored = w.T.contiguous() if transposed else w  # as an Embedding or Conv1D stores W
    size = -(-stored.numel() // world)
    flat = torch.cat([stored.reshape(-1), torch.zeros(size * world - stored.numel(), dtype=dtype)])
    slices = []
    for rank in range(world):
        param = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)  # as ZeRO-3 leaves it
        param.ds_id, param.ds_numel, param.ds_shape, param.ds_process_group = 1, stored.numel(), stored.shape, None
        param.ds_tensor = flat[rank * size : (rank + 1) * size].clone()
        param.ds_tensor.ds_numel = size
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        _distributed.check_writable_in_place(param, "w")
        _distributed.add_low_rank_(param, u, v, alpha, transposed=transposed, rounding="nearest")
        slices.append(param.ds_tensor)
    got = torch.cat(slices)[: stored.numel()].reshape(stored.shape).double()
    want = (w.double() + alpha * u.double() @ v.double()).to(dtype).double()
    want = want.T if transposed else want
    ulp = {torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-50}[dtype]  # rounding, relative
    assert ((got - want).abs() <= ulp * want.abs().clamp(min=1.0)).all()
    assert (got - (stored.double())).abs().max() > 0.1  # it did move
