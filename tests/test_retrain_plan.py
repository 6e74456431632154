"""The retrain plan (pipeline.retrain.plan.make_plan) on hand-made states: raw days, what the registry
says and the settings in, a Plan or Nothing (with its reason) out. No subprocess, no Spark, no torch, no
folders: the paths below exist nowhere."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deepfm.trainconf import load_train_config
from pipeline.retrain.config import RetrainConfig, TrainSettings
from pipeline.retrain.days import DayScan
from pipeline.retrain.plan import Nothing, Plan, PlanError, cold_after_featurize, make_plan
from pipeline.retrain.registry import Architecture, CurrentModel, RegistryState

CONTRACT_FP = "contract-a"
TRAINER = load_train_config(None)               # conf/train.yaml: deepfm, hidden [400, 400, 400]


def config(**over) -> RetrainConfig:
    base = {"path": Path("/conf/retrain.yaml"), "trainer": TRAINER, "raw_dir": Path("/data/raw"),
            "work_dir": Path("/data/work"), "registry_dir": Path("/data/registry"), "window_days": 2}
    return RetrainConfig(**{**base, **over})


def current(day: int, **over) -> CurrentModel:
    base = {"name": "v000001", "path": Path("/data/registry/v000001"),
            "features": Path("/data/registry/v000001/features"),
            "checkpoint": Path("/data/registry/v000001/checkpoint"), "day": day, "contract_fingerprint": CONTRACT_FP,
            "feature_fingerprint": "features-a", "architecture": Architecture(TRAINER.model, TRAINER.hidden),
            "reusable": True}
    return CurrentModel(**{**base, **over})


def served(day: int, **over) -> RegistryState:
    """The registry after a promoted run of ``day``."""
    return RegistryState(current(day, **over), frozenset({day}))


def days(*complete: int, **incomplete: str) -> DayScan:
    return DayScan(tuple(complete), {int(d.removeprefix("d")): why for d, why in incomplete.items()})


def plan(scan: DayScan, state: RegistryState, cfg: RetrainConfig | None = None, **kw) -> Plan:
    p = make_plan(scan, state, cfg or config(), CONTRACT_FP, **kw)
    assert isinstance(p, Plan), p
    return p


def nothing(scan: DayScan, state: RegistryState, cfg: RetrainConfig | None = None, **kw) -> str:
    p = make_plan(scan, state, cfg or config(), CONTRACT_FP, **kw)
    assert isinstance(p, Nothing), p
    return p.reason


# --- which day and window -------------------------------------------------------------------------

def test_first_run_takes_the_newest_complete_day_and_its_window_cold():
    p = plan(days(0, 1, 2, 3), RegistryState())
    assert (p.day, p.first, p.last, p.days) == (3, 1, 3, (1, 2, 3))
    assert p.splits == {"train": (1,), "valid": (2,), "test": (3,)}
    assert (p.valid_days, p.test_days) == (1, 1)
    assert not p.warm_start and p.cold_start_reason == "first run: no current model"
    assert p.parent is None and p.reuse is None and p.warm_start_from is None
    assert p.window_text() == "window 1-3 (train [1], valid [2], test [3])"


def test_the_window_reaches_back_window_days_and_no_further_than_day_0():
    assert plan(days(0, 1, 2, 3, 4, 5), RegistryState(), config(window_days=7)).days == (0, 1, 2, 3, 4, 5)
    assert plan(days(0, 1, 2, 3, 4, 5), RegistryState(), config(window_days=1)).days == (4, 5)


def test_no_valid_day_when_it_would_leave_fewer_than_min_train_days():
    p = plan(days(0, 1), RegistryState())
    assert p.splits == {"train": (0,), "valid": (), "test": (1,)}
    p = plan(days(0, 1, 2), RegistryState(), config(min_train_days=2))
    assert p.splits == {"train": (0, 1), "valid": (), "test": (2,)}


def test_one_day_alone_is_not_enough():
    assert "at least one train day besides the held-out day" in nothing(days(0), RegistryState())
    assert nothing(days(), RegistryState()) == "no complete day in /data/raw"


def test_a_rerun_after_success_finds_nothing_new():
    why = nothing(days(0, 1, 2), served(2))
    assert why == "the newest complete day is 2, already processed (last: day 2)"


def test_a_rejected_day_counts_as_processed():
    # v000001 served day 1; day 2's candidate was rejected (a run record says kept_current)
    state = RegistryState(current(1), frozenset({1, 2}))
    assert "already processed (last: day 2)" in nothing(days(0, 1, 2), state)


def test_a_new_day_starts_warm_from_the_current_model():
    p = plan(days(0, 1, 2, 3), served(2))
    assert p.day == 3 and p.warm_start and p.cold_start_reason is None and p.parent == "v000001"
    assert p.reuse == "/data/registry/v000001/features"
    assert p.warm_start_from == "/data/registry/v000001/checkpoint"
    assert p.parent_feature_fingerprint == "features-a"
    assert p.start_text() == "warm start from v000001"


def test_an_incomplete_day_in_the_window_holds_the_newer_day_back():
    scan = days(0, 1, 3, d2="no marker day_2.done")
    # day 3's window 1-3 holds day 2, still incomplete: day 3 waits, and the run says so
    why = nothing(scan, served(1))
    assert why.startswith("the newest complete day is 1, already processed (last: day 1)")
    assert "day(s) [3] wait for their window; incomplete: {2: 'no marker day_2.done'}" in why
    # on a first run the newest day with a complete window goes first
    assert plan(scan, RegistryState()).day == 1
    # once day 2 is complete, day 3 goes
    assert plan(days(0, 1, 2, 3), served(1)).day == 3


def test_no_complete_window_reports_the_incomplete_days():
    why = nothing(days(2, d1="day_1 changed 5 s ago (< 600 s)"), RegistryState())
    assert why == "no complete day in /data/raw; incomplete: {1: 'day_1 changed 5 s ago (< 600 s)'}"


# --- --day and --force ----------------------------------------------------------------------------

def test_day_of_an_incomplete_day_is_refused():
    with pytest.raises(PlanError, match=r"--day 2: day 2 is not complete in /data/raw \(no marker day_2.done\)"):
        make_plan(days(0, 1, d2="no marker day_2.done"), RegistryState(), config(), CONTRACT_FP, day=2)
    with pytest.raises(PlanError, match=r"--day 7: day 7 is not complete in /data/raw \(no such day file\)"):
        make_plan(days(0, 1), RegistryState(), config(), CONTRACT_FP, day=7)


def test_day_with_an_incomplete_window_is_refused():
    with pytest.raises(PlanError, match=r"--day 3: day\(s\) \[2\] of its window are not complete yet"):
        make_plan(days(0, 1, 3, d2="no marker day_2.done"), RegistryState(), config(), CONTRACT_FP, day=3)


def test_day_names_an_older_day_and_force_redoes_a_processed_one():
    assert plan(days(0, 1, 2, 3), served(1), day=2).day == 2
    assert nothing(days(0, 1, 2), served(2), day=2) == "day 2 was already processed (pass --force to redo it)"
    p = plan(days(0, 1, 2), served(2), day=2, force=True)
    assert p.day == 2 and p.warm_start
    assert plan(days(0, 1, 2), served(2), force=True).day == 2


# --- warm or cold ---------------------------------------------------------------------------------

def test_refit_starts_cold_without_the_current_features():
    for p in (plan(days(0, 1, 2, 3), served(2), refit=True), plan(days(0, 1, 2, 3), served(2), config(refit=True))):
        assert p.cold_start_reason == "refit requested: boundaries and vocabulary refitted"
        assert p.reuse is None and p.warm_start_from is None and p.parent == "v000001"


def test_a_changed_contract_starts_cold():
    p = plan(days(0, 1, 2, 3), served(2, contract_fingerprint="contract-b"))
    assert p.cold_start_reason == "the feature contract changed (current model contract-b, now contract-a)"
    assert p.reuse is None


def test_a_current_model_without_complete_features_or_checkpoint_starts_cold():
    p = plan(days(0, 1, 2, 3), served(2, reusable=False))
    assert p.cold_start_reason == "/data/registry/v000001 has no reusable features or checkpoint"


@pytest.mark.parametrize("trainer, was", [
    (dataclasses.replace(TRAINER, hidden=(32, 32)), "deepfm [400, 400, 400]"),      # train: {hidden: [32, 32]}
    (dataclasses.replace(TRAINER, model="fm"), "deepfm [400, 400, 400]")])          # extra_args: [--model, fm]
def test_an_architecture_change_starts_cold(trainer, was):
    p = plan(days(0, 1, 2, 3), served(2), config(trainer=trainer))
    assert p.cold_start_reason == f"the model changed (v000001: {was}, now {trainer.model} {list(trainer.hidden)})"
    assert p.reuse is None and p.warm_start_from is None


def test_a_checkpoint_that_does_not_say_its_architecture_starts_cold():
    p = plan(days(0, 1, 2, 3), served(2, architecture=None))
    assert p.cold_start_reason.startswith("the model changed (v000001: unknown, now deepfm")


def test_a_warm_plan_goes_cold_when_the_new_features_mean_something_else():
    p = plan(days(0, 1, 2, 3), served(2))
    assert cold_after_featurize(p, "features-a") is None
    assert cold_after_featurize(p, "features-b") == "the new features' fingerprint features-b differs from " \
                                                     "v000001's features-a"
    assert cold_after_featurize(plan(days(0, 1, 2, 3), RegistryState()), "features-b") is None


# --- the plan as data -----------------------------------------------------------------------------

def test_the_run_key_follows_the_plan():
    a = plan(days(0, 1, 2, 3), served(2))
    assert a.run_key == plan(days(0, 1, 2, 3), served(2)).run_key and len(a.run_key) == 10
    assert a.run_key != plan(days(0, 1, 2, 3), served(2), refit=True).run_key
    cfg = config(train=TrainSettings(settings={"dropout": 0.1}))
    assert a.run_key != plan(days(0, 1, 2, 3), served(2), cfg).run_key
    assert a.run_key == plan(days(0, 1, 2, 3), served(2), config(train=TrainSettings(nproc=4))).run_key
    d = json.loads(json.dumps(a.to_json()))
    assert d["splits"] == {"train": [1], "valid": [2], "test": [3]} and d["warm_start"] is True
    assert d["train"] == {"config": str(TrainSettings().config), "extra_args": []}
