"""Data checks: is the new day like the days before it, before a training run is spent on it?

After featurize, the new (held-out test) day's statistics are read from its Parquet (:func:`read_day_stats`)
and compared (:func:`check_day`, a pure function) with the median of the trailing processed days, whose
statistics were kept when they were processed (:class:`DayStatsFiles`, ``work_dir/stats/day_<N>.json``),
so none is computed twice. The anchor is TFX's ExampleValidator (statistics of the new span against a
baseline, anomalies named by feature); the measures here are the ones a click log goes wrong in:

* rows (a duplicated or truncated upload), positive rate (a label pipeline bug), the share of malformed
  lines (a format change);
* per field: the share of id 0 (the contract's "missing" id: a column went empty) and the number of
  distinct ids (a column became constant, or random).

A day outside a bound of ``checks:`` (conf/retrain.yaml) is held: not trained on, counted as processed,
left out of later windows until an operator re-admits it (``--readmit N``).

    check_day(DayStats(day=5, rows=30_000, positives=22_500, ...), [stats of days 3, 4 with rate 0.25], CheckSettings())
    -> DataChecks(held=True, reason="positive rate 0.7500 is 3.00x the trailing 0.2500 (max 2.0x)", ...)

Imports pyarrow (to read the Parquet), neither Spark nor torch.
"""
from __future__ import annotations

import math
import re
import statistics
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import manifest as M
from pipeline.retrain.config import CheckSettings
from pipeline.retrain.jsonio import read_json, write_json

STATS_FILE_RE = re.compile(r"^day_(\d+)\.json$")
MAX_REASONS = 3                                 # failed checks named in the one-line outcome


@dataclass(frozen=True)
class DayStats:
    """One featurized day's statistics (its test split, where no sampling applies)."""

    day: int
    rows: int
    positives: int
    rejects: int                                # malformed lines of the day (featurize's rejects/)
    missing: Mapping[str, float]                # per field: share of rows with id 0 (missing)
    distinct: Mapping[str, int]                 # per field: distinct ids
    contract_fingerprint: str = ""
    feature_fingerprint: str = ""

    @property
    def positive_rate(self) -> float:
        return self.positives / self.rows if self.rows else 0.0

    @property
    def reject_fraction(self) -> float:
        """Malformed lines / all lines of the day."""
        lines = self.rows + self.rejects
        return self.rejects / lines if lines else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "positive_rate": self.positive_rate, "reject_fraction": self.reject_fraction}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DayStats":
        return cls(day=int(d["day"]), rows=int(d["rows"]), positives=int(d["positives"]), rejects=int(d["rejects"]),
                   missing={str(k): float(v) for k, v in d["missing"].items()},
                   distinct={str(k): int(v) for k, v in d["distinct"].items()},
                   contract_fingerprint=str(d.get("contract_fingerprint", "")),
                   feature_fingerprint=str(d.get("feature_fingerprint", "")))


@dataclass(frozen=True)
class Check:
    """One measure of the new day against the trailing median; ``bound`` names the setting it broke."""

    check: str                                  # rows | positive_rate | reject_fraction | missing_rate | distinct_ids
    value: float
    trailing: float
    passed: bool
    detail: str
    field: str | None = None
    bound: str | None = None                    # the checks: key that held the day (None: passed)


@dataclass(frozen=True)
class DataChecks:
    """The verdict on a day: held or not, every check, and the trailing days it was measured against."""

    held: bool
    trailing_days: tuple[int, ...]
    checks: tuple[Check, ...] = ()
    skipped: str | None = None                  # why no check ran (too few trailing days)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def reason(self) -> str:
        """The failed checks in one line (the first few; the run record has them all)."""
        f = self.failed
        more = f"; and {len(f) - MAX_REASONS} more (see the run record)" if len(f) > MAX_REASONS else ""
        return "; ".join(c.detail for c in f[:MAX_REASONS]) + more

    def to_json(self) -> dict[str, Any]:
        return {"held": self.held, "trailing_days": list(self.trailing_days), "skipped": self.skipped,
                "failed": [c.bound for c in self.failed], "checks": [asdict(c) for c in self.checks]}


def _ratio(value: float, trailing: float) -> float:
    if trailing:
        return value / trailing
    return 1.0 if value == 0 else math.inf


def _ratio_check(name: str, what: str, value: float, trailing: float, lo: float, hi: float, lo_key: str,
                 hi_key: str, show: Callable[[float], str], fld: str | None = None) -> Check:
    r = _ratio(value, trailing)
    verb = "are" if what.endswith(("rows", "ids")) else "is"
    text = f"{what} {show(value)} {verb} {r:.2f}x the trailing {show(trailing)}"
    if r > hi:
        return Check(name, value, trailing, False, f"{text} (max {hi}x)", fld, hi_key)
    if r < lo:
        return Check(name, value, trailing, False, f"{text} (min {lo}x)", fld, lo_key)
    return Check(name, value, trailing, True, f"{text} (allowed {lo}x-{hi}x)", fld)


def _increase_check(name: str, what: str, value: float, trailing: float, hi: float, key: str,
                    fld: str | None = None) -> Check:
    d = value - trailing
    text = f"{what} {value:.4f} is {d:+.4f} from the trailing {trailing:.4f} (max +{hi})"
    return Check(name, value, trailing, d <= hi, text, fld, None if d <= hi else key)


def _count(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def _rate(x: float) -> str:
    return f"{x:.4f}"


def check_day(new: DayStats, trailing: Sequence[DayStats], s: CheckSettings) -> DataChecks:
    """The new day against the median of ``trailing`` (the days it is compared with, already chosen):
    held when any check is outside its bound; no checks (not held) with fewer than
    ``s.min_trailing_days`` trailing days. Per-field checks cover the fields the trailing days have.

        new: rows 30000, positives 22500 (0.75); trailing: two days of 30000 rows, 0.25 positive
        -> held, reason "positive rate 0.7500 is 3.00x the trailing 0.2500 (max 2.0x)"
    """
    days = tuple(t.day for t in trailing)
    if len(trailing) < s.min_trailing_days:
        return DataChecks(False, days, skipped=f"{len(trailing)} trailing day(s) with statistics {list(days)} "
                                                f"(min {s.min_trailing_days}): no data checks")
    med = statistics.median
    checks = [
        _ratio_check("rows", "rows", new.rows, med(t.rows for t in trailing), s.min_rows_ratio, s.max_rows_ratio,
                     "min_rows_ratio", "max_rows_ratio", _count),
        _ratio_check("positive_rate", "positive rate", new.positive_rate, med(t.positive_rate for t in trailing),
                     s.min_positive_rate_ratio, s.max_positive_rate_ratio, "min_positive_rate_ratio",
                     "max_positive_rate_ratio", _rate),
        _increase_check("reject_fraction", "reject fraction", new.reject_fraction,
                        med(t.reject_fraction for t in trailing), s.max_reject_fraction_increase,
                        "max_reject_fraction_increase"),
    ]
    for name, rate in new.missing.items():
        seen = [t.missing[name] for t in trailing if name in t.missing]
        if seen:
            checks.append(_increase_check("missing_rate", f"{name} missing rate", rate, med(seen),
                                          s.max_missing_rate_increase, "max_missing_rate_increase", name))
    for name, n in new.distinct.items():
        counts = [t.distinct[name] for t in trailing if name in t.distinct]
        if counts:
            checks.append(_ratio_check("distinct_ids", f"{name} distinct ids", n, med(counts), s.min_distinct_ratio,
                                       s.max_distinct_ratio, "min_distinct_ratio", "max_distinct_ratio", _count,
                                       name))
    return DataChecks(any(not c.passed for c in checks), days, tuple(checks))


def read_day_stats(featurized: Path, m: M.Manifest, day: int) -> DayStats:
    """The statistics of ``day``, the test split of a featurized output, read from its Parquet with pyarrow
    one column at a time (a column of a day in memory at once, never the whole split); its malformed
    lines from the output's rejects/."""
    if list(m.splits["test"].days) != [day]:
        raise M.ManifestError(f"{featurized}: test days {list(m.splits['test'].days)}, expected [{day}]")
    data = ds.dataset(featurized / "test", format="parquet")
    rows = data.count_rows()
    label = data.to_table(columns=[m.label_column]).column(0)
    positives = int(pc.sum(label).as_py() or 0)
    missing: dict[str, float] = {}
    distinct: dict[str, int] = {}
    for name in m.field_names:
        col = data.to_table(columns=[name]).column(0)
        zeros = int(pc.sum(pc.equal(col, 0)).as_py() or 0)
        missing[name] = zeros / rows if rows else 0.0
        distinct[name] = int(pc.count_distinct(col).as_py())
    rejects = 0
    if m.rejects.total:
        rj = ds.dataset(featurized / m.rejects.path, format="parquet")
        rejects = rj.count_rows(filter=pc.field(m.day_column) == day)
    return DayStats(day=day, rows=rows, positives=positives, rejects=rejects, missing=missing, distinct=distinct,
                    contract_fingerprint=m.contract_fingerprint, feature_fingerprint=m.feature_fingerprint)


@dataclass
class DayStatsFiles:
    """The kept statistics of processed days: ``<root>/day_<N>.json`` (root: ``work_dir/stats``)."""

    root: Path
    _cache: dict[int, DayStats] = dataclasses.field(default_factory=dict)

    def path(self, day: int) -> Path:
        return self.root / f"day_{day}.json"

    def save(self, st: DayStats) -> Path:
        p = self.path(st.day)
        write_json(p, st.to_json())
        self._cache[st.day] = st
        return p

    def load(self, day: int) -> DayStats | None:
        if day not in self._cache:
            d = read_json(self.path(day))
            try:
                self._cache[day] = DayStats.from_json(d)
            except (KeyError, TypeError, ValueError, AttributeError):
                return None
        return self._cache[day]

    def index(self) -> dict[int, str]:
        """Day -> the contract fingerprint its statistics were measured under, for every readable file."""
        out: dict[int, str] = {}
        for p in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            m = STATS_FILE_RE.match(p.name)
            st = self.load(int(m.group(1))) if m else None
            if st is not None:
                out[st.day] = st.contract_fingerprint
        return out
