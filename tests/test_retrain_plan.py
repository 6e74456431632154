"""The retrain plan (pipeline.retrain.plan.make_plan) on hand-made states: raw days, what the registry
says and the settings in, a Plan or Nothing (with its reason) out; and the data checks
(pipeline.retrain.checks.check_day) on hand-made day statistics. No subprocess, no Spark, no torch, no
folders: the paths below exist nowhere."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deepfm.trainconf import load_train_config
from pipeline.retrain.checks import DataChecks, DayStats, check_day
from pipeline.retrain.config import CheckSettings, RetrainConfig, TrainSettings
from pipeline.retrain.days import DayScan
from pipeline.retrain.plan import LeftOut, Nothing, Plan, PlanError, cold_after_featurize, make_plan, window_start
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


# --- excluded days (rejected by the gate, held by the data checks) --------------------------------

REJECTED = "rejected by the gate (min_auc): AUC 0.4987 (min 0.55)"
HELD = "held by data checks (max_rows_ratio): rows 150000 are 10.00x the trailing 15000 (max 3.0x)"


def test_window_start_moves_back_one_day_per_excluded_day():
    assert window_start(4, 2, {}) == 2
    assert window_start(4, 2, {3: REJECTED}) == 1
    assert window_start(4, 2, {2: REJECTED, 3: HELD}) == 0
    assert window_start(4, 2, {1: REJECTED, 2: REJECTED, 3: HELD}) == 0       # never before day 0
    assert window_start(1, 7, {}) == 0


def test_an_excluded_day_is_left_out_of_train_and_the_window_reaches_back():
    # day 3's candidate was rejected; v000001 served day 2; day 4 arrives (window_days 2, valid_days 1)
    state = RegistryState(current(2), frozenset({1, 2, 3}), excluded={3: REJECTED})
    p = plan(days(0, 1, 2, 3, 4), state)
    assert (p.day, p.first, p.days) == (4, 1, (1, 2, 4))
    assert p.splits == {"train": (1,), "valid": (2,), "test": (4,)}
    assert p.left_out == (LeftOut(3, REJECTED),) and p.gaps == (3,)
    assert p.window_text() == f"window 1-4 (train [1], valid [2], test [4]; left out 3 ({REJECTED}))"
    assert p.to_json()["left_out"] == [{"day": 3, "reason": REJECTED}]


def test_an_excluded_day_is_not_the_next_windows_valid_day():
    # the case of the seven-day scenario: day 4 rejected, day 5 would have validated on it
    state = RegistryState(current(3), frozenset({1, 2, 3, 4}), excluded={4: REJECTED})
    p = plan(days(0, 1, 2, 3, 4, 5), state)
    assert p.splits == {"train": (2,), "valid": (3,), "test": (5,)} and p.first == 2
    assert [x.day for x in p.left_out] == [4]
    # and the run after trains on neither
    state = RegistryState(current(5), frozenset({1, 2, 3, 4, 5}), excluded={4: REJECTED})
    p = plan(days(*range(7)), state, config(window_days=3))
    assert p.splits == {"train": (2, 3), "valid": (5,), "test": (6,)} and 4 not in p.days


def test_left_out_names_only_the_excluded_days_of_the_span():
    state = RegistryState(current(4), frozenset({0, 1, 2, 3, 4}), excluded={0: HELD, 3: REJECTED})
    p = plan(days(*range(6)), state)
    assert (p.first, p.days, [x.day for x in p.left_out]) == (2, (2, 4, 5), [3])


def test_an_excluded_day_counts_as_processed():
    # a held day has a run record "held"; the exclusion alone is enough
    state = RegistryState(current(3), frozenset({3}), excluded={4: HELD})
    assert nothing(days(0, 1, 2, 3, 4), state) == "the newest complete day is 4, already processed (last: day 4)"


def test_a_readmitted_day_is_back_in_the_windows_and_its_checks_are_waived():
    # after --readmit 3: no longer excluded, still processed
    state = RegistryState(current(4), frozenset({1, 2, 3, 4}), readmitted=frozenset({3}))
    p = plan(days(0, 1, 2, 3, 4, 5), state)
    assert p.days == (3, 4, 5) and p.left_out == () and p.hold_on_checks
    p = plan(days(0, 1, 2, 3, 4, 5), state, day=3, force=True)
    assert p.day == 3 and not p.hold_on_checks
    assert p.run_key != plan(days(0, 1, 2, 3, 4, 5), RegistryState(current(4), frozenset({1, 2, 3, 4})), day=3,
                             force=True).run_key


def test_the_trailing_days_are_processed_kept_and_not_excluded():
    fp = {d: CONTRACT_FP for d in (1, 2, 3, 4)}
    state = RegistryState(current(5), frozenset({1, 2, 3, 4, 5}), excluded={3: REJECTED},
                          day_stats={**fp, 5: "contract-b", 0: CONTRACT_FP})
    p = plan(days(*range(7)), state)
    assert p.day == 6 and p.trailing == (1, 2, 4)          # 0: no run processed it; 3 excluded; 5 another contract
    assert plan(days(*range(7)), state, config(checks=CheckSettings(trailing_days=2))).trailing == (2, 4)


# --- the data checks (a pure function of the day statistics) --------------------------------------

def stats(day: int, rows: int = 1000, positives: int = 250, rejects: int = 0, missing: float = 0.1,
          distinct: int = 100) -> DayStats:
    return DayStats(day=day, rows=rows, positives=positives, rejects=rejects, missing={"C1": missing, "I1": 0.0},
                    distinct={"C1": distinct, "I1": 20})


TRAILING = [stats(2), stats(3)]


def failed(c: DataChecks) -> list[tuple[str | None, str | None, str]]:
    return [(x.bound, x.field, x.detail) for x in c.failed]


def test_a_day_like_the_trailing_ones_passes():
    c = check_day(stats(4, rows=1100, positives=300), TRAILING, CheckSettings())
    assert not c.held and c.failed == () and c.trailing_days == (2, 3) and c.skipped is None
    assert [x.check for x in c.checks] == ["rows", "positive_rate", "reject_fraction", "missing_rate",
                                           "missing_rate", "distinct_ids", "distinct_ids"]
    assert c.checks[0].detail == "rows 1100 are 1.10x the trailing 1000 (allowed 0.33x-3.0x)"


def test_a_tripled_positive_rate_is_held():
    c = check_day(stats(4, positives=750), TRAILING, CheckSettings())
    assert c.held
    assert failed(c) == [("max_positive_rate_ratio", None, "positive rate 0.7500 is 3.00x the trailing 0.2500 "
                                                          "(max 2.0x)")]
    assert c.reason == "positive rate 0.7500 is 3.00x the trailing 0.2500 (max 2.0x)"
    assert c.to_json()["failed"] == ["max_positive_rate_ratio"]
    assert not check_day(stats(4, positives=750), TRAILING, CheckSettings(max_positive_rate_ratio=3.5)).held


def test_ten_times_the_rows_or_a_third_of_them_is_held():
    c = check_day(stats(4, rows=10_000, positives=2500), TRAILING, CheckSettings())
    assert failed(c) == [("max_rows_ratio", None, "rows 10000 are 10.00x the trailing 1000 (max 3.0x)")]
    c = check_day(stats(4, rows=300, positives=75), TRAILING, CheckSettings())
    assert failed(c) == [("min_rows_ratio", None, "rows 300 are 0.30x the trailing 1000 (min 0.33x)")]


def test_the_trailing_value_is_the_median():
    trailing = [stats(1, rows=900), stats(2, rows=5000, positives=1250), stats(3)]
    c = check_day(stats(4, rows=2900, positives=725), trailing, CheckSettings())
    assert not c.held and c.checks[0].detail == "rows 2900 are 2.90x the trailing 1000 (allowed 0.33x-3.0x)"
    c = check_day(stats(4, rows=3100, positives=775), [stats(2), stats(3, rows=1200, positives=300)], CheckSettings())
    assert not c.held and c.checks[0].detail == "rows 3100 are 2.82x the trailing 1100 (allowed 0.33x-3.0x)"


def test_per_field_missing_ids_and_distinct_ids_are_checked():
    c = check_day(stats(4, missing=0.35, distinct=350), TRAILING, CheckSettings())
    assert failed(c) == [("max_missing_rate_increase", "C1", "C1 missing rate 0.3500 is +0.2500 from the trailing "
                                                             "0.1000 (max +0.2)"),
                         ("max_distinct_ratio", "C1", "C1 distinct ids 350 are 3.50x the trailing 100 (max 3.0x)")]
    c = check_day(stats(4, distinct=20), TRAILING, CheckSettings())
    assert failed(c) == [("min_distinct_ratio", "C1", "C1 distinct ids 20 are 0.20x the trailing 100 (min 0.33x)")]
    assert not check_day(stats(4, missing=0.25), TRAILING, CheckSettings()).held        # +0.15


def test_more_malformed_lines_than_the_trailing_days_is_held():
    # 60 malformed of 1000 lines: 0.06, against 0.0
    c = check_day(stats(4, rows=940, positives=235, rejects=60), TRAILING, CheckSettings())
    assert failed(c) == [("max_reject_fraction_increase", None, "reject fraction 0.0600 is +0.0600 from the "
                                                                "trailing 0.0000 (max +0.02)")]


def test_too_few_trailing_days_means_no_checks():
    c = check_day(stats(4, positives=900), [stats(3)], CheckSettings())
    assert not c.held and c.checks == ()
    assert c.skipped == "1 trailing day(s) with statistics [3] (min 2): no data checks"
    assert check_day(stats(4, positives=900), [stats(3)], CheckSettings(min_trailing_days=1)).held


def test_the_reason_names_the_first_three_failures():
    c = check_day(stats(4, rows=10_000, positives=9000, rejects=2000, missing=0.9, distinct=1000), TRAILING,
                  CheckSettings())
    assert len(c.failed) == 5
    assert c.reason.count("; ") == 3 and c.reason.endswith("; and 2 more (see the run record)")


def test_day_stats_round_trip_through_json():
    s = stats(4, rejects=3)
    assert DayStats.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert s.to_json()["positive_rate"] == 0.25 and s.reject_fraction == 3 / 1003
