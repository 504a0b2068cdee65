"""Random sequences of ordinary operations on an in-place Delta-LoRA model never give a silently different model.

After every operation: the logits equal an independent dense reference built from the active adapter's current
tensors on a fresh base (``W_0 + s B A + lambda s (B A - B_K A_K)``, ``tests/helpers.py``), and ``disable_adapter()``
gives the original base model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from peft import PeftModel, get_peft_model

from .helpers import adapter_state, assert_close, delta_config, logits, reference, tiny_llama, train

pytestmark = pytest.mark.slow


class InPlaceModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="deltalora-sm-"))
        self.model = get_peft_model(tiny_llama(), delta_config())
        self.names = ["default"]
        self.counter = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _dir(self, stem: str) -> Path:
        self.counter += 1
        return self.tmp / f"{stem}-{self.counter}"

    @property
    def active(self) -> str:
        return self.model.active_adapter

    @rule(steps=st.integers(1, 4), seed=st.integers(0, 3))
    def train_a_new_run(self, steps: int, seed: int) -> None:
        train(self.model, self._dir("run"), steps=steps, seed=seed)

    @rule(low_cpu_mem_usage=st.booleans())
    def save_and_reload_on_a_fresh_base(self, low_cpu_mem_usage: bool) -> None:
        out = self._dir("save")
        self.model.save_pretrained(out)  # the first adapter at the root, the others in subfolders
        first, *others = self.names
        active = self.active
        model = PeftModel.from_pretrained(
            tiny_llama(),
            out if first == "default" else out / first,
            adapter_name=first,
            is_trainable=True,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        for name in others:
            model.load_adapter(out / name, adapter_name=name, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage)
        model.set_adapter(active)
        self.model = model

    @rule(trained=st.booleans())
    def add_a_second_adapter(self, trained: bool) -> None:
        name = f"a{self.counter}"
        self.counter += 1
        if trained:
            other = get_peft_model(tiny_llama(), delta_config())
            train(other, self._dir("other-run"), steps=4, seed=self.counter % 4)
            out = self._dir("other")
            other.save_pretrained(out)
            self.model.load_adapter(out, adapter_name=name, is_trainable=True)
        else:
            self.model.add_adapter(name, delta_config())
        self.names.append(name)

    @rule(data=st.data())
    def set_adapter(self, data) -> None:
        self.model.set_adapter(data.draw(st.sampled_from(self.names)))

    @precondition(lambda self: len(self.names) > 1)
    @rule(data=st.data())
    def delete_an_adapter(self, data) -> None:
        name = data.draw(st.sampled_from(self.names))
        self.model.delete_adapter(name)
        self.names.remove(name)
        if self.active not in self.names:
            self.model.set_adapter(self.names[0])

    @rule()
    def merge_then_unmerge(self) -> None:
        tensors = adapter_state(self.model, self.active)
        self.model.merge_adapter()
        assert_close(logits(self.model), reference(tensors))
        self.model.unmerge_adapter()

    @rule()
    def unload_then_reload(self) -> None:
        out = self._dir("before-unload")
        self.model.save_pretrained(out, selected_adapters=[self.active])
        path = out if self.active == "default" else out / self.active
        active = self.active
        assert_close(logits(self.model.unload()), reference(None))
        self.model = PeftModel.from_pretrained(tiny_llama(), path, adapter_name=active, is_trainable=True)
        self.names = [active]

    @invariant()
    def logits_are_the_active_adapter_alone_on_the_original_base(self) -> None:
        assert_close(logits(self.model), reference(adapter_state(self.model, self.active)))

    @invariant()
    def disabled_adapters_give_the_original_base(self) -> None:
        with self.model.disable_adapter():
            assert_close(logits(self.model), reference(None))


InPlaceModelMachine.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
test_in_place_model_state_machine = InPlaceModelMachine.TestCase
