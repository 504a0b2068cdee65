"""Delta-LoRA under DDP with Trainer on CPU (gloo), and the helpers of every multi-process test (FSDP2 in
``test_fsdp2.py``, DeepSpeed in ``test_deepspeed.py``).

Each distributed job is launched with ``python -m torch.distributed.run --standalone --nproc_per_node 2`` running a
worker from ``tests/scripts/``; every rank writes its final state (W, A, B, anchors) to a safetensors file. The
tests check that the ranks agree bit for bit and that they match an independent single-process run on the same
global batches (run here, in-process, with the worker's own ``train`` function).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import tiny_llama

REPO_ROOT = Path(__file__).parent.parent

WORLD = 2
STEPS, START_STEP, RATIO, SCALE = 6, 2, 0.5, 8 / 4  # as in the workers: lambda = 0.5, s = lora_alpha / r
TOLERANCE = 1e-5
TARGET_SUFFIXES = (".self_attn.q_proj", ".self_attn.v_proj")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
    ),
]


def torchrun(script: str, *args: str, timeout: float = 150, **env_extra: str) -> None:
    """Run the module ``tests.scripts.<script>`` on WORLD processes; fail with the job's output if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m"]
    module = f"tests.scripts.{script.removesuffix('.py')}"
    done = subprocess.run(
        [*command, module, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


def load_ranks(directory: Path, prefix: str = "") -> list[dict[str, torch.Tensor]]:
    return [load_file(directory / f"{prefix}rank{r}.safetensors") for r in range(WORLD)]


def assert_ranks_bit_identical(states: list[dict[str, torch.Tensor]]) -> None:
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        differ = [k for k in state if not torch.equal(state[k], states[0][k])]
        assert not differ, f"rank {rank} differs from rank 0 in {differ[:5]}"


def max_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def targeted(state: dict[str, torch.Tensor], suffixes: tuple[str, ...] = TARGET_SUFFIXES) -> list[str]:
    """Module prefixes (``base_model.model.model.layers.0.self_attn.q_proj``) of the Delta-LoRA layers: one per
    suffix in each of the tiny Llama's 2 decoder layers."""
    prefixes = sorted(k[: -len(".base_layer.weight")] for k in state if k.endswith(".base_layer.weight"))
    assert len(prefixes) == 2 * len(suffixes) and all(p.endswith(suffixes) for p in prefixes), prefixes
    return prefixes


def initial_weights(suffixes: tuple[str, ...] = TARGET_SUFFIXES, **model_overrides) -> dict[str, torch.Tensor]:
    """The base model's weights before any training, keyed as in the PEFT model's state dict."""
    state = {f"base_model.model.{k}": v for k, v in tiny_llama(**model_overrides).state_dict().items()}
    for key in list(state):
        module = key.rsplit(".", 1)[0]
        if module.endswith(suffixes):
            state[f"{module}.base_layer.{key.rsplit('.', 1)[1]}"] = state.pop(key)
    return state


def assert_algorithm_1_moves(
    state: dict[str, torch.Tensor], *, inplace: bool, suffixes: tuple[str, ...] = TARGET_SUFFIXES, **model_overrides
) -> float:
    """W_T - W_0 == lambda*s*(B_T A_T - B_K A_K) (in place) or W_T == W_0 (factored); untargeted weights unchanged.

    Returns the largest |W_T - W_0| over the targeted layers, so callers can check that W really moved.
    """
    w0 = initial_weights(suffixes, **model_overrides)
    moved = 0.0
    for prefix in targeted(state, suffixes):
        assert bool(state[f"{prefix}.lora_anchored.default.weight"]), f"{prefix}: anchors were never recorded"
        a, b = state[f"{prefix}.lora_A.default.weight"].double(), state[f"{prefix}.lora_B.default.weight"].double()
        a_k, b_k = state[f"{prefix}.lora_anchor_A.default.weight"].double(), state[f"{prefix}.lora_anchor_B.default.weight"].double()
        change = state[f"{prefix}.base_layer.weight"].double() - w0[f"{prefix}.base_layer.weight"].double()
        expected = RATIO * SCALE * (b @ a - b_k @ a_k) if inplace else torch.zeros_like(change)
        assert (change - expected).abs().max().item() <= TOLERANCE, prefix
        assert (RATIO * SCALE * (b @ a - b_k @ a_k)).abs().max().item() > 1e-4, f"{prefix}: B A never changed"
        moved = max(moved, change.abs().max().item())
    for key, value in w0.items():  # everything Delta-LoRA does not target stays as it was
        if ".base_layer." not in key:
            assert torch.equal(state[key], value), key
    return moved


# -- DDP: Trainer + DeltaLoRACallback -------------------------------------------------------------------------


def test_ddp_trainer_ranks_are_bit_identical_and_match_one_process_on_the_same_global_batches(tmp_path):
    from .scripts import ddp_trainer

    torchrun(
        "ddp_trainer.py",
        "--out",
        str(tmp_path / "ddp"),
        "--per-device",
        "2",
        "--steps",
        str(STEPS),
        "--start-step",
        str(START_STEP),
    )
    ranks = load_ranks(tmp_path / "ddp")
    assert_ranks_bit_identical(ranks)

    _, reference = ddp_trainer.train(str(tmp_path / "single"), per_device=2 * WORLD, steps=STEPS, start_step=START_STEP)
    difference = max_difference(ranks[0], reference)
    print(f"\nDDP (2 ranks x 2 rows) vs one process (4 rows), {STEPS} steps: max |difference| {difference:.2e}")
    assert difference <= TOLERANCE

    moved = assert_algorithm_1_moves(ranks[0], inplace=True)
    assert moved > 1e-4  # W did move, on every rank alike
