"""``benchmarks/overhead.py`` (and ``perf_gpu.py --allow-cpu``) at tiny sizes: the counters count what they say,
the models are in the state the rows claim, and the report has every row. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import overhead

    return overhead


def test_profile_counts_aten_ops_and_scalar_reads(overhead):
    x = torch.ones(4)

    def fn() -> None:
        x.add_(1)
        x.mul(2)
        x.sum().item()

    profile = overhead.profile_ops(fn)
    outermost = dict(profile.top_outermost)
    assert outermost["add_"] == 1 and outermost["mul"] == 1 and outermost["sum"] == 1
    assert outermost.get("item") == 1 and "_local_scalar_dense" not in outermost  # nested under item
    assert profile.outermost_aten_ops == 4
    assert profile.aten_ops > profile.outermost_aten_ops  # the nested ones are counted too
    assert profile.local_scalar_dense == 1
    assert profile.cuda_launches == 0 and profile.cuda_kernels == 0
    assert overhead.profile_ops(lambda: None).aten_ops == 0


def test_host_reads_count_value_reads_only(overhead):
    x, flag = torch.arange(4.0), torch.ones((), dtype=torch.bool)

    def fn() -> None:
        y = x * 2 + 1  # no read
        y.sum().item()
        bool(flag)
        y.tolist()
        float(y[0])
        torch.equal(x, y)
        y.nonzero()
        if flag:
            pass

    assert overhead.count_host_reads(fn) == {
        "item": 1,
        "__bool__": 2,
        "tolist": 1,
        "__float__": 1,
        "equal": 1,
        "nonzero": 1,
    }
    assert overhead.count_host_reads(lambda: x * 2) == {}


def test_check_method_lookup(overhead, monkeypatch):
    from deltalora_hf import DeltaLoraLayer

    assert overhead.check_method("sync_base_weight") == "sync_base_weight"  # a name given and present
    assert overhead.check_method("no_such_method_here") is None
    # without a name: the first of CHECK_METHODS the layer has, or None when it has none (set here, whatever the
    # installed core defines)
    first, *others = overhead.CHECK_METHODS
    for name in others:
        monkeypatch.setattr(DeltaLoraLayer, name, lambda self: None, raising=False)
    monkeypatch.setattr(DeltaLoraLayer, first, None, raising=False)  # present but not callable: skipped
    assert overhead.check_method(None) == others[0]
    for name in others:
        monkeypatch.setattr(DeltaLoraLayer, name, None)
    assert overhead.check_method(None) is None


@pytest.mark.parametrize("mode", ["inplace", "factored"])
def test_moved_models_are_anchored_and_moved(overhead, mode):
    """The forward and generate rows measure anchored adapters whose (effective) W has moved."""
    sizes, cpu = overhead.QUICK, overhead.Target(torch.device("cpu"))
    lora, _ = overhead.build("lora", sizes.model, sizes.r, cpu, moved=True)
    delta, _ = overhead.build(mode, sizes.model, sizes.r, cpu, moved=True)
    layers = overhead.delta_layers(delta)
    assert len(layers) == overhead.targeted_layers(lora) == 4 * sizes.model["n_layer"]
    assert all(bool(layer.lora_anchored["default"]) for layer in layers)
    lora_weights = {n: p for n, p in lora.named_parameters() if "base_layer.weight" in n}
    moved = [not torch.equal(p, lora_weights[n]) for n, p in delta.named_parameters() if n in lora_weights]
    assert len(moved) == len(layers)
    assert all(moved) if mode == "inplace" else not any(moved)  # factored: W never written
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert not torch.allclose(lora(input_ids=ids).logits, delta(input_ids=ids).logits)  # the move is used


def test_quick_run_writes_every_row(overhead, tmp_path):
    threads = torch.get_num_threads()
    results = overhead.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored
    assert json.loads((tmp_path / "overhead.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "overhead.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 7 + len(results["steps"]) + len(results["generate"])  # header, updater/check, ratios
    assert all(len(row.split(" | ")) == 5 for row in rows)  # label, in-place, factored, LoRA, goal
    assert f"{results['environment']['threads']} thread(s)" in markdown and "load average" in markdown

    sizes = overhead.QUICK
    layers = 4 * sizes.model["n_layer"]
    updater = {u["mode"]: u for u in results["updater"]}
    for mode in overhead.MODES:
        u = updater[mode]
        assert u["layers"] == layers and u["layers_moved_by_profiled_step"] == layers
        assert u["changed"]["profile"]["aten_ops"] >= u["changed"]["profile"]["outermost_aten_ops"]
        assert u["unchanged_step_s"]["n"] == results["args"]["fast_reps"]
    assert updater["inplace"]["changed"]["profile"]["aten_ops"] > 0  # the in-place update writes W
    assert updater["factored"]["changed"]["profile"]["aten_ops"] == 0  # factored: the forward adds the move
    assert results["forward_check"]["layers"] == 4 * sizes.host_bound["n_layer"]
    assert [tuple(s["batch"]) for s in results["steps"]] == list(sizes.step_batches)
    for g in results["generate"]:
        assert g["new_tokens"] == {"lora": sizes.new_tokens, "inplace": sizes.new_tokens, "factored": sizes.new_tokens}
        assert set(g["ratio"]) == set(overhead.MODES)


@pytest.mark.slow
def test_perf_gpu_allow_cpu_runs_the_overhead_rows(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import perf_gpu

    if torch.cuda.is_available():
        pytest.skip("with CUDA, --allow-cpu is ignored and the full GPU benchmark would run")
    perf_gpu.main(["--allow-cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "perf_gpu_cpucheck.json").read_text())
    assert set(saved["ratios"]) == {"deltalora", "factored", "naive"}
    assert {u["mode"] for u in saved["overhead"]["updater"]} == {"inplace", "factored"}
    assert saved["overhead"]["environment"]["dtype"] == "bfloat16"
    assert "## Host-side overhead" in (tmp_path / "perf_gpu_cpucheck.md").read_text()
