"""The promotion gate: every check of a candidate's held-out metrics, each with a reason."""
from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline.retrain.config import GateSettings


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any) -> str:
    return f"{x:.4f}" if finite(x) else str(x)


def gate(candidate: Mapping[str, Any], current: Mapping[str, Any] | None, g: GateSettings) -> tuple[bool, list[dict]]:
    """Every check (name, passed, detail) of the candidate's held-out metrics; ``current`` is the current
    model's metrics on the same rows, or None (first run, or it cannot read the new features).

        gate({"rows": 10, "auc": 0.7, "logloss": 0.4, "calibration": 1.0}, None, GateSettings(min_rows=100))
        -> (False, [{"check": "min_rows", "passed": False, "detail": "test rows 10 (min 100)"}, ...])
    """
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    rows, auc, ll, cal = (candidate.get(k) for k in ("rows", "auc", "logloss", "calibration"))
    check("min_rows", isinstance(rows, int) and rows >= g.min_rows, f"test rows {rows} (min {g.min_rows})")
    check("logloss_finite", finite(ll), f"logloss {ll}")
    check("calibration", finite(cal) and g.calibration_min <= cal <= g.calibration_max,  # type: ignore[operator]
          f"calibration {fmt(cal)} (allowed [{g.calibration_min}, {g.calibration_max}])")
    check("min_auc", finite(auc) and auc >= g.min_auc, f"AUC {fmt(auc)} (min {g.min_auc})")  # type: ignore[operator]
    if current is not None and finite(current.get("auc")):
        floor = current["auc"] - g.auc_tolerance
        check("vs_current", finite(auc) and auc >= floor,  # type: ignore[operator]
              f"AUC {fmt(auc)} vs current {fmt(current['auc'])} (tolerance {g.auc_tolerance})")
    return all(c["passed"] for c in checks), checks


# A candidate that fails only "vs_current" (a little worse than the current model on the same rows) says
# nothing against its day; the other checks judge the held-out day itself (too few rows, labels that no
# model learned: AUC near 0.5, miscalibrated, non-finite loss), so such a day stays out of later windows.
RELATIVE_CHECKS = frozenset({"vs_current"})


def day_failures(checks: list[dict]) -> list[str]:
    """The failed checks that judge the day (not merely the candidate against the current model).

        [{"check": "min_auc", "passed": False}, {"check": "vs_current", "passed": False}] -> ["min_auc"]
    """
    return [c["check"] for c in checks if not c["passed"] and c["check"] not in RELATIVE_CHECKS]


def describe(g: GateSettings, with_current: bool) -> str:
    """The checks in words (for the dry run)."""
    return (f"test rows >= {g.min_rows}, logloss finite, calibration in [{g.calibration_min}, {g.calibration_max}], "
            f"AUC >= {g.min_auc}" + (f", AUC >= current - {g.auc_tolerance}" if with_current else ""))
