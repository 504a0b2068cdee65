import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(mode="inplace", data_seed=0, targets=TARGETS)``: a private copy (``copy.deepcopy``) of a Delta-LoRA
    model trained once per session: the tiny Llama with ``delta_config(mode, target_modules=targets)``, ``STEPS``
    Trainer steps on ``lm_rows(seed=data_seed)``; anchored at step K, W moved (in place) on the steps after."""
    from peft import get_peft_model

    from .helpers import STEPS, TARGETS, delta_config, tiny_llama, train

    cache = {}

    def get(mode: str = "inplace", data_seed: int = 0, targets=TARGETS):
        key = (mode, data_seed, tuple(targets))
        if key not in cache:
            model = get_peft_model(tiny_llama(), delta_config(mode, target_modules=list(targets)))
            folder = tmp_path_factory.mktemp(f"trained-{mode}-{data_seed}")
            train(model, folder, steps=STEPS, seed=data_seed)
            cache[key] = model
        return copy.deepcopy(cache[key])

    return get
