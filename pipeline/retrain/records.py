"""Run records: ``work_dir/runs/<run id>-day<N>.json``, one per run, rewritten after every step, so a
killed run leaves one saying which step it was in (the next run marks it ``interrupted``)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.retrain.jsonio import now, read_json, write_json

# the day counts as processed: its candidate was promoted or rejected (with a current model to keep), or
# the data checks held it; not "no_model" (the first candidate rejected: a later run tries again),
# "failed", "interrupted", or "readmitted" (an operator's re-admission, recorded under the day)
DONE_STATUSES = ("promoted", "kept_current", "held")


class RunRecords:
    def __init__(self, root: Path):
        self.root = root

    def all(self) -> list[tuple[Path, dict]]:
        out = []
        for p in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            r = read_json(p)
            if isinstance(r, dict):
                out.append((p, r))
        return out

    def processed_days(self) -> set[int]:
        """The held-out days of runs that promoted or rejected a candidate, or held the day."""
        return {r["day"] for _, r in self.all() if r.get("status") in DONE_STATUSES and isinstance(r.get("day"), int)}

    def mark_interrupted(self, run_id: str) -> None:
        """Records still 'running' belong to runs that died (run ``run_id`` holds the lock): say so."""
        for p, r in self.all():
            if r.get("status") == "running":
                r.update(status="interrupted", decision="failed", failed_step=r.get("current_step"),
                         error=f"the run ended during step {r.get('current_step')!r} without finishing "
                               f"(killed?); noticed by run {run_id}")
                write_json(p, r)


class RunRecord:
    """This run's record; saved on every change. Named after the run id and, once known, its day."""

    def __init__(self, root: Path, config: Path):
        self.root = root
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
        self.data: dict[str, Any] = {"run_id": self.run_id, "status": "running", "started": now(),
                                     "config": str(config), "host": os.uname().nodename, "pid": os.getpid(),
                                     "steps": {}}
        self.path: Path | None = None

    @property
    def log_dir(self) -> Path:
        return self.root / self.run_id

    def save(self) -> None:
        if self.path is None:
            day = self.data.get("day")
            self.path = self.root / f"{self.run_id}{'' if day is None else f'-day{day}'}.json"
        write_json(self.path, self.data)

    def update(self, **kw: Any) -> None:
        self.data.update(kw)
        self.save()

    def step(self, step: str, **kw: Any) -> None:
        self.data["steps"].setdefault(step, {}).update(kw)
        self.save()

    def begin(self, step: str) -> None:
        self.data["current_step"] = step
        self.step(step, status="running", started=now())

    def finish(self, **kw: Any) -> None:
        self.data.pop("current_step", None)
        self.update(**kw, finished=now())
