"""Decide, then act: what one retrain run will do, as a pure function of what it sees.

:func:`make_plan` takes the raw days (:class:`~pipeline.retrain.days.DayScan`), what the registry says
(:class:`~pipeline.retrain.registry.RegistryState`), the settings and the contract's fingerprint, and
returns a :class:`Plan` or :class:`Nothing` (with the reason) - no printing, no file system, no clock.
:mod:`pipeline.retrain.run` gathers the inputs and carries the plan out. The plan decides what varies
from run to run (the day, the window, warm or cold); the steps are always the same, and exporting a
promoted candidate (python -m deepfm.export) is part of publishing it, not a decision: the plan has no
step for it, and its key does not change with it.

    scan = DayScan(complete=(0, 1, 2), incomplete={})
    make_plan(scan, RegistryState(), cfg, "fp")        # window_days 7, valid_days 1
    -> Plan(day=2, first=0, splits={"train": (0,), "valid": (1,), "test": (2,)}, cold_start_reason="first run: ...")

The window: the held-out day and the ``window_days`` calendar days before it that are not excluded
(:class:`~pipeline.retrain.registry.Exclusion`: a day whose candidate the gate rejected, or that the data
checks held); each excluded day moves the window's start one day earlier (never before day 0), so a
window trains on as many days as it would have, and the excluded ones are listed in ``left_out``:

    window_days 2, day 3 excluded, newest day 4 -> first 1, days (1, 2, 4), left_out (day 3, why)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline import layout
from pipeline.retrain.config import RetrainConfig
from pipeline.retrain.days import DayScan
from pipeline.retrain.registry import Architecture, CurrentModel, RegistryState

TEST_DAYS = 1                                   # the newest day of the window is held out


class PlanError(ValueError):
    """What was asked cannot be done (``--day N`` of an incomplete day or window)."""


@dataclass(frozen=True)
class Nothing:
    """Nothing to do this run, and why."""

    reason: str


@dataclass(frozen=True)
class LeftOut:
    """An excluded day within the window's span, left out of its train and valid days."""

    day: int
    reason: str


@dataclass(frozen=True)
class Plan:
    day: int                                    # the held-out (test) day, the newest of the window
    first: int                                  # the window spans first .. day
    days: tuple[int, ...]                       # its complete days that are not excluded
    left_out: tuple[LeftOut, ...]               # the excluded days of first .. day - 1, and why
    splits: Mapping[str, tuple[int, ...]]       # train / valid / test days (pipeline.layout.split_days)
    contract: str
    contract_fingerprint: str
    parent: str | None                          # the current version, if any
    parent_feature_fingerprint: str | None
    cold_start_reason: str | None               # None: warm start from the parent
    reuse: str | None                           # featurize --reuse (the parent's features) on a warm start
    warm_start_from: str | None                 # train --warm-start (the parent's checkpoint) on a warm start
    neg_sample_rate: float | None
    featurize_args: tuple[str, ...]
    train: Mapping[str, Any]                    # the training settings (what the run key covers)
    trailing: tuple[int, ...] = ()              # processed days (not excluded) the data checks compare with
    hold_on_checks: bool = True                 # False: an operator re-admitted the day; checks are recorded only

    @property
    def last(self) -> int:
        return self.day

    @property
    def warm_start(self) -> bool:
        return self.cold_start_reason is None

    @property
    def gaps(self) -> tuple[int, ...]:
        """Days between the first and last featurized day that are not featurized (excluded or absent)."""
        return layout.missing_days(self.days)

    @property
    def valid_days(self) -> int:
        return len(self.splits["valid"])

    @property
    def test_days(self) -> int:
        return len(self.splits["test"])

    def to_json(self) -> dict[str, Any]:
        """The plan as plain data (the work folder's plan.json, the run key's input)."""
        d = _plain(dataclasses.asdict(self))
        return {**d, "last": self.last, "warm_start": self.warm_start, "valid_days": self.valid_days,
                "test_days": self.test_days}

    @property
    def run_key(self) -> str:
        """A hash of the plan: the same plan (a rerun after a kill) finds the same work folder."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:10]

    def window_text(self) -> str:
        s = self.splits
        out = "; left out " + ", ".join(f"{x.day} ({x.reason})" for x in self.left_out) if self.left_out else ""
        return (f"window {self.first}-{self.last} (train {list(s['train'])}, valid {list(s['valid'])}, "
                f"test {list(s['test'])}{out})")

    def start_text(self) -> str:
        return f"warm start from {self.parent}" if self.warm_start else f"cold start: {self.cold_start_reason}"


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return str(x) if isinstance(x, Path) else x


def make_plan(scan: DayScan, registry: RegistryState, cfg: RetrainConfig, contract_fingerprint: str,
              day: int | None = None, refit: bool = False, force: bool = False) -> Plan | Nothing:
    """This run's plan: the newest complete day whose window has no incomplete day and that was not
    processed (or ``day``; ``force`` redoes a processed one), its window (without the excluded days) and
    split, the days its data checks compare it with, and whether it starts warm from the current model.
    Raises :class:`PlanError` when ``day`` cannot be processed."""
    newest = _newest(scan, registry, cfg, day, force)
    if isinstance(newest, Nothing):
        return newest
    ex = registry.excluded
    first = window_start(newest, cfg.window_days, ex)
    days = tuple(d for d in scan.complete if first <= d <= newest and (d == newest or d not in ex))
    left_out = tuple(LeftOut(d, ex[d]) for d in sorted(ex) if first <= d < newest)
    valid = cfg.valid_days if len(days) - 1 - cfg.valid_days >= cfg.min_train_days else 0
    try:
        splits = layout.split_days(days, valid, TEST_DAYS)
    except ValueError:
        return Nothing(f"day {newest}: the window {first}-{newest} has {len(days)} complete day(s) {list(days)}; "
                       "at least one train day besides the held-out day is needed")
    cur = registry.current
    cold = cold_start_reason(cur, cfg, contract_fingerprint, refit or cfg.refit)
    warm = cur if cold is None else None
    t = cfg.train
    return Plan(day=newest, first=first, days=days, splits={k: tuple(v) for k, v in splits.items()},
                contract=str(cfg.contract), contract_fingerprint=contract_fingerprint,
                parent=cur.name if cur else None, parent_feature_fingerprint=cur.feature_fingerprint if cur else None,
                cold_start_reason=cold, reuse=str(warm.features) if warm else None,
                warm_start_from=str(warm.checkpoint) if warm else None, neg_sample_rate=cfg.neg_sample_rate,
                featurize_args=cfg.spark.featurize_args,
                train=_plain({"config": t.config, **t.settings, "extra_args": t.extra_args}),
                left_out=left_out, trailing=trailing_days(newest, registry, cfg, contract_fingerprint),
                hold_on_checks=newest not in registry.readmitted)


def window_start(day: int, window_days: int, excluded: Mapping[int, Any]) -> int:
    """The first day of ``day``'s window: ``window_days`` days before it that are not excluded, or day 0.

        window_start(4, 2, {}) -> 2;  window_start(4, 2, {3: "..."}) -> 1;  window_start(1, 7, {}) -> 0
    """
    first, kept = day, 0
    while kept < window_days and first > 0:
        first -= 1
        kept += first not in excluded
    return first


def trailing_days(day: int, registry: RegistryState, cfg: RetrainConfig, contract_fingerprint: str) -> tuple[int, ...]:
    """The days ``day``'s data checks compare it with: the newest ``checks.trailing_days`` processed days
    before it that are not excluded and whose statistics were kept under the same contract."""
    ok = sorted(d for d in registry.processed_days if d < day and d not in registry.excluded
                and registry.day_stats.get(d) == contract_fingerprint)
    return tuple(ok[-cfg.checks.trailing_days:])


def _window_incomplete(scan: DayScan, day: int, window_days: int, excluded: Mapping[int, Any]) -> list[int]:
    first = window_start(day, window_days, excluded)
    return sorted(i for i in scan.incomplete if first <= i <= day)


def _newest(scan: DayScan, registry: RegistryState, cfg: RetrainConfig, day: int | None,
            force: bool) -> int | Nothing:
    """The day to hold out, or why there is none. An excluded day was processed (its run excluded it)."""
    processed = registry.processed_days | frozenset(registry.excluded)
    if day is not None:
        if day not in scan.complete:
            why = scan.incomplete.get(day, "no such day file")
            raise PlanError(f"--day {day}: day {day} is not complete in {cfg.raw_dir} ({why})")
        bad = _window_incomplete(scan, day, cfg.window_days, registry.excluded)
        if bad:
            raise PlanError(f"--day {day}: day(s) {bad} of its window are not complete yet")
        if day in processed and not force:
            return Nothing(f"day {day} was already processed (pass --force to redo it)")
        return day
    eligible = [d for d in scan.complete if not _window_incomplete(scan, d, cfg.window_days, registry.excluded)]
    waiting = f"; incomplete: {dict(sorted(scan.incomplete.items()))}" if scan.incomplete else ""
    if not eligible:
        return Nothing(f"no complete day in {cfg.raw_dir}{waiting}")
    newest = max(eligible)
    last = max(processed, default=None)
    if last is not None and newest <= last and not force:
        blocked = [d for d in scan.complete if d > newest]
        return Nothing(f"the newest complete day is {newest}, already processed (last: day {last})"
                       + (f"; day(s) {blocked} wait for their window{waiting}" if blocked else ""))
    return newest


def cold_start_reason(cur: CurrentModel | None, cfg: RetrainConfig, contract_fingerprint: str,
                      refit: bool) -> str | None:
    """Why this run cannot start from the current model's features and weights, or None when it can."""
    if cur is None:
        return "first run: no current model"
    if refit:
        return "refit requested: boundaries and vocabulary refitted"
    if cur.contract_fingerprint != contract_fingerprint:
        return (f"the feature contract changed (current model {cur.contract_fingerprint}, "
                f"now {contract_fingerprint})")
    if not cur.reusable:
        return f"{cur.path} has no reusable features or checkpoint"
    now = Architecture(cfg.trainer.model, cfg.trainer.hidden)
    if cur.architecture != now:
        return f"the model changed ({cur.name}: {cur.architecture or 'unknown'}, now {now})"
    return None


def cold_after_featurize(plan: Plan, feature_fingerprint: str) -> str | None:
    """Why a planned warm start cannot go on once the window is featurized (its ids mean something else
    than the parent's), or None when it can (or the plan was cold anyway)."""
    if plan.warm_start and feature_fingerprint != plan.parent_feature_fingerprint:
        return (f"the new features' fingerprint {feature_fingerprint} differs from {plan.parent}'s "
                f"{plan.parent_feature_fingerprint}")
    return None
