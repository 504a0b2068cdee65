"""Delta-LoRA under DDP with Trainer on CPU (gloo). The helpers of every multi-process test (this one, FSDP2 in
``test_fsdp2.py``, DeepSpeed in ``test_deepspeed.py``) are in ``tests/helpers.py``.

Each distributed job is launched with ``python -m torch.distributed.run --standalone --nproc_per_node 2`` running a
worker from ``tests/scripts/``; every rank writes its final state (W, A, B, anchors) to a safetensors file. The
tests check that the ranks agree bit for bit and that they match an independent single-process run on the same
global batches (run here, in-process, with the worker's own ``train`` function).
"""

from __future__ import annotations

import pytest
import torch

from .helpers import (
    STEPS,
    TOL,
    WORLD,
    K,
    assert_algorithm_1_moves,
    assert_ranks_bit_identical,
    load_ranks,
    max_difference,
    torchrun,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
    ),
]


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
        str(K),
    )
    ranks = load_ranks(tmp_path / "ddp")
    assert_ranks_bit_identical(ranks)

    _, reference = ddp_trainer.train(str(tmp_path / "single"), per_device=2 * WORLD, steps=STEPS, start_step=K)
    difference = max_difference(ranks[0], reference)
    print(f"\nDDP (2 ranks x 2 rows) vs one process (4 rows), {STEPS} steps: max |difference| {difference:.2e}")
    assert difference <= TOL

    moved = assert_algorithm_1_moves(ranks[0], inplace=True)
    assert moved > 1e-4  # W did move, on every rank alike
