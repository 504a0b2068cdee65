"""Every TRL trainer that takes a PEFT adapter trains a Delta-LoRA adapter to the model TRL means (issue 16).

For each trainer in the matrix, in both base-update modes, two ways:

* ``fresh``: a base model and ``peft_config=DeltaLoraConfig(...)``; TRL's reference is the original base
  (``disable_adapter``);
* ``continuing``: a Delta-LoRA adapter trained past its ``start_step`` (anchored, W moved) with a plain Trainer,
  saved, and loaded with ``PeftModel.from_pretrained(base, dir, is_trainable=True)``; TRL's reference is that
  initial trained policy (DPO, KTO, GRPO, RLOO add a ``"ref"`` adapter and copy the parameters named ``.default.``
  into it; online DPO deep-copies the model).

Two checks, both against the independent dense reference (``trl_support.dense_model``), to 1e-5 in fp32:

1. every forward TRL runs as its reference, at every step, gives the logits of the model TRL means
   (``trl_support.ReferenceProbe`` sees TRL's own reference forward, with TRL's inputs);
2. after training, the policy gives the logits of its current adapter tensors written densely on a fresh base.

``TRAINERS`` classifies every ``Trainer`` that the installed TRL defines; a trainer it does not name fails
``test_every_installed_trainer_is_classified``, so a new TRL release cannot add an untested path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import transformers
from packaging.version import Version
from peft import PeftModel, get_peft_model

from deltalora_hf import DeltaLoRACallback

from . import trl_support as ts
from .helpers import VOCAB, SequentialTrainer, lm_rows, train_args

pytest.importorskip("trl")
pytest.importorskip("datasets")

MODES = ["inplace", "factored"]
WAYS = ["fresh", "continuing"]


@dataclass(frozen=True)
class Run:
    """In the matrix. ``reference``: what TRL compares the policy with, when it builds that model from the policy
    (None: it builds none, so only the policy check applies)."""

    runner: Callable[..., Any]
    reference: str | None
    base: Callable[[], Any] = ts.causal_lm
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NotRun:
    reason: str
    takes_peft: bool = True  # False: the trainer takes neither peft_config nor a PeftModel (checked)


PEFT_REFERENCE = 'fresh: disable_adapter(); continuing: a "ref" adapter, parameters ".default." copied to ".ref."'
SEQ_CLS = dict(task_type="SEQ_CLS", modules_to_save=["score"])  # as TRL's RewardTrainer recommends
TEACHER_ONLY = "its reference is a separate teacher model or vLLM server, never built from the student's adapter"
REFERENCE_FREE = (
    "reference-free (no reference model): only the policy check would apply; its PEFT setup is get_peft_model or "
    "the PeftModel as passed, as in SFTTrainer (run)"
)
SELF_DISTILLATION = (
    "self-distillation: teacher 'base' with PEFT is disable_adapter() (checked by the fresh cells; for a loaded "
    "adapter it is the pretrained base, not the initial student its docs name, for any PEFT method); teacher "
    "'ema' needs peft_type LORA (is_pure_lora_training) and otherwise raises a clear ValueError"
)

# Every transformers.Trainer subclass defined in trl.trainer and trl.experimental, by qualified name.
TRAINERS: dict[str, Run | NotRun] = {
    "trl.trainer.sft_trainer.SFTTrainer": Run(ts.run_sft, None),
    "trl.trainer.dpo_trainer.DPOTrainer": Run(ts.run_dpo, PEFT_REFERENCE),
    "trl.trainer.kto_trainer.KTOTrainer": Run(ts.run_kto, PEFT_REFERENCE),
    "trl.trainer.grpo_trainer.GRPOTrainer": Run(ts.run_grpo, PEFT_REFERENCE + " (beta > 0; default beta 0: none)"),
    "trl.trainer.rloo_trainer.RLOOTrainer": Run(ts.run_rloo, PEFT_REFERENCE + " (beta > 0)"),
    "trl.trainer.reward_trainer.RewardTrainer": Run(ts.run_reward, None, ts.reward_model, SEQ_CLS),
    "trl.trainer.distillation_trainer.DistillationTrainer": Run(ts.run_distillation, None),  # teacher: its own model
    "trl.trainer.base_trainer._BaseTrainer": NotRun("private base class of the trainers", takes_peft=False),
    "trl.experimental.online_dpo.online_dpo_trainer.OnlineDPOTrainer": Run(
        ts.run_online_dpo, "fresh: disable_adapter(); continuing: ref_model, a deep copy of the PeftModel"
    ),
    "trl.experimental.kto.KTOTrainer": NotRun("deprecated alias of trl.trainer.KTOTrainer (run)"),
    "trl.experimental.distillation.DistillationTrainer": NotRun(
        "deprecated alias of trl.trainer.DistillationTrainer (run)"
    ),
    "trl.experimental.gmpo.gmpo_trainer.GMPOTrainer": NotRun(
        "GRPOTrainer subclass that overrides only _compute_loss: PEFT setup and reference are GRPOTrainer's (run)"
    ),
    "trl.experimental.bema_for_ref_model.dpo_trainer.DPOTrainer": NotRun(
        "DPOTrainer (run) with a callback handler that passes ref_model to callbacks; only a BEMACallback("
        "update_ref_model=True) changes it, and that replaces the reference by design (with PEFT it writes the "
        "policy's base weights) with a running average of the policy"
    ),
    "trl.experimental.a2po.a2po_trainer.A2POTrainer": NotRun(
        "takes no peft_config and documents no PeftModel", takes_peft=False
    ),
    "trl.experimental.async_grpo.async_grpo_trainer.AsyncGRPOTrainer": NotRun("generates with a vLLM server"),
    "trl.experimental.async_distillation.async_distillation_trainer.AsyncDistillationTrainer": NotRun(
        "generates with a vLLM server"
    ),
    "trl.experimental.server_distillation.server_distillation_trainer.ServerDistillationTrainer": NotRun(
        "the teacher is an external vLLM server"
    ),
    "trl.experimental.iw_opd.iw_opd_trainer.IWOPDTrainer": NotRun(TEACHER_ONLY),
    "trl.experimental.gkd.gkd_trainer.GKDTrainer": NotRun("SFTTrainer subclass; " + TEACHER_ONLY),
    "trl.experimental.gold.gold_trainer.GOLDTrainer": NotRun("SFTTrainer subclass; " + TEACHER_ONLY),
    "trl.experimental.cpo.cpo_trainer.CPOTrainer": NotRun(REFERENCE_FREE),
    "trl.experimental.orpo.orpo_trainer.ORPOTrainer": NotRun(REFERENCE_FREE),
    "trl.experimental.tpo.tpo_trainer.TPOTrainer": NotRun(REFERENCE_FREE),
    "trl.experimental.sdft.sdft_trainer.SDFTTrainer": NotRun(SELF_DISTILLATION),
    "trl.experimental.sdpo.sdpo_trainer.SDPOTrainer": NotRun(SELF_DISTILLATION + " (SDPO's default is 'ema')"),
}

# Modules of trl.experimental that need an optional package the tests do not install.
UNIMPORTABLE = {"trl.experimental.async_grpo.openenv_harness": "needs the `openenv` package"}
# Modules of trl.experimental that import names of a newer transformers than the oldest supported one (4.57.1);
# with the newest transformers they must import (and their trainers be classified).
NEEDS_NEWER_TRANSFORMERS = {"trl.experimental.async_grpo": "5.0"}

REQUIRED = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "RewardTrainer")
RUN = [name for name, entry in TRAINERS.items() if isinstance(entry, Run)]


def test_every_installed_trainer_is_classified():
    found, failed = ts.installed_trainers()
    assert not sorted(set(found) - set(TRAINERS)), "trainers of the installed TRL that TRAINERS does not classify"
    excused = {
        m for m, version in NEEDS_NEWER_TRANSFORMERS.items() if Version(transformers.__version__) < Version(version)
    }
    assert not sorted(set(failed) - set(UNIMPORTABLE) - excused), f"TRL modules that failed to import: {failed}"
    for name, entry in TRAINERS.items():
        if name in found and isinstance(entry, NotRun):
            assert ts.accepts_peft(found[name]) == entry.takes_peft, name
    assert {name.rsplit(".", 1)[1] for name in RUN if name.startswith("trl.trainer.")} >= set(REQUIRED)
    for name in RUN:
        assert name in found, f"{name} is in the matrix but not in the installed TRL"
        assert ts.accepts_peft(found[name]), name


# -- the matrix ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_adapters(tmp_path_factory):
    """A Delta-LoRA adapter per (base, mode), trained with a plain Trainer past its start_step and saved."""
    cache: dict[tuple[Any, str], tuple[str, ts.Snapshot]] = {}

    def get(base: Callable[[], Any], mode: str, config: dict[str, Any]) -> tuple[str, ts.Snapshot]:
        if (base, mode) not in cache:
            model = get_peft_model(base(), ts.delta_config(mode, start_step=1, **config))
            rows = lm_rows(16, seed=3)
            if base is ts.reward_model:
                rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"][0].float() / VOCAB} for r in rows]
            out = tmp_path_factory.mktemp(f"adapter-{base.__name__}-{mode}")
            SequentialTrainer(
                model=model,
                args=train_args(out / "run", max_steps=4),
                train_dataset=rows,
                callbacks=[DeltaLoRACallback()],
            ).train()
            snap = ts.snapshot(model)
            assert all(t["anchored"] for t in snap.layers.values()) and ts.moved(snap) > 1e-4
            model.save_pretrained(out / "adapter")
            cache[(base, mode)] = (str(out / "adapter"), snap)
        return cache[(base, mode)]

    return get


def _cell_id(name: str) -> str:
    return name.rsplit(".", 1)[1].removesuffix("Trainer")


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", RUN, ids=_cell_id)
def test_trl_trainer_trains_the_model_it_means(name, mode, way, tmp_path, trained_adapters):
    entry: Run = TRAINERS[name]  # type: ignore[assignment]
    probe_ids = ts.probe_ids()
    if way == "fresh":
        model, peft_config, initial = entry.base(), ts.delta_config(mode, **entry.config), None
    else:
        saved, initial = trained_adapters(entry.base, mode, entry.config)
        model, peft_config = PeftModel.from_pretrained(entry.base(), saved, is_trainable=True), None
        loaded = ts.max_diff(ts.output(model, probe_ids), ts.output(ts.dense_model(initial, entry.base), probe_ids))
        assert loaded <= ts.TOL, f"the loaded adapter is {loaded:.2e} off the trained one before TRL runs"

    probe = ts.ReferenceProbe(ts.dense_model(initial, entry.base))  # the base, or the initial trained policy
    trainer = entry.runner(model, peft_config, str(tmp_path), [DeltaLoRACallback(), probe])
    probe.watch(trainer)
    trainer.train()
    assert trainer.state.global_step == ts.STEPS

    policy = trainer.model
    current = ts.snapshot(policy)
    assert all(t["anchored"] for t in current.layers.values()) and ts.moved(current) > 1e-4
    policy_diff = ts.max_diff(ts.output(policy, probe_ids), ts.output(ts.dense_model(current, entry.base), probe_ids))
    states = sorted({c.state for c in probe.calls})
    print(
        f"\n{_cell_id(name)}-{mode}-{way}: reference {probe.worst():.2e} over {len(probe.calls)} forwards "
        f"{states}, policy {policy_diff:.2e}"
    )

    if entry.reference is None:
        assert probe.calls == [], "a trainer without a reference model ran the policy with its adapter off"
    else:
        assert {c.step for c in probe.calls} == set(range(ts.STEPS)), "steps without a reference forward"
    problems = [f"reference {probe.worst():.2e} off the model TRL means"] if probe.worst() > ts.TOL else []
    problems += [f"policy {policy_diff:.2e} off its own adapter tensors"] if policy_diff > ts.TOL else []
    assert not problems, "; ".join(problems)
