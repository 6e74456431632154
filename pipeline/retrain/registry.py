"""The model registry and the run lock.

    registry/
      v000001/  v000002/   checkpoint/, model.pt2 (the exported model, what serving loads), features/
                           (what featurize --reuse needs), manifest.json, metrics.json,
                           train_metrics.json, lineage.json (with the model's fingerprint)
      current -> v000002   a symlink, replaced atomically
      excluded.json        the days left out of later windows (rejected by the gate, held by the data
                           checks), why, and the history of exclusions and re-admissions
      .lock                flock of the running retrain

A version folder is written as ``.vNNNNNN.tmp-<pid>`` and renamed when complete - its model.pt2
included, so ``current`` never names a version that cannot serve; ``current`` is switched only after
that. A version holds copies, not links, of the run's checkpoint and exported model (the work folder
they came from is pruned on its own schedule); pruning a version deletes its folder, model.pt2 with it.
:meth:`Registry.state` is what the retrain plan reads of it.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline import layout
from pipeline import manifest as M
from pipeline.retrain.jsonio import fsync_dir, now, read_json, write_json

CURRENT = "current"
LOCK = ".lock"
LINEAGE = "lineage.json"
METRICS = "metrics.json"                # a version's test metrics, the current model's on the same rows, the gate
TRAIN_METRICS = "train_metrics.json"    # the trainer's own metrics.json of the run
CHECKPOINT = "checkpoint"               # a version's model: a copy of the run's latest complete checkpoint
MODEL = "model.pt2"                     # the same weights exported (python -m deepfm.export): what serves
FEATURES = "features"                   # a version's manifest (+ vocabulary) and _SUCCESS, for --reuse
EXCLUDED = "excluded.json"              # the excluded days and the history of exclusions and re-admissions
VERSION_RE = re.compile(r"^v(\d{6})$")
PARTIAL_RE = re.compile(r"^\.v\d{6}\.tmp")
LOCK_MESSAGE = "another retrain run holds the lock"


class RegistryError(RuntimeError):
    pass


class LockBusy(RuntimeError):
    pass


@dataclass(frozen=True)
class Version:
    name: str
    path: Path
    lineage: Mapping[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def features(self) -> Path:
        return self.path / FEATURES

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def model_fingerprint(self) -> str | None:
        """The exported model's fingerprint (its card's, recorded in the lineage at publishing); None for a
        version published before versions held an exported model."""
        fp = self.lineage.get("model_fingerprint")
        return fp if isinstance(fp, str) else None

    @property
    def label(self) -> str:
        """The name and the exported model's fingerprint, as the run's output shows a version."""
        fp = self.model_fingerprint
        return f"{self.name} (model {fp})" if fp else f"{self.name} (no exported model)"


@dataclass(frozen=True)
class Architecture:
    """What decides whether one model's weights can seed another: the model kind and layer widths."""

    model: str | None
    hidden: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.model} {list(self.hidden)}"


@dataclass(frozen=True)
class CurrentModel:
    """What the registry says about the served version, as the plan needs it."""

    name: str
    path: Path
    features: Path
    checkpoint: Path
    day: int | None                           # its held-out day
    contract_fingerprint: str | None
    feature_fingerprint: str | None
    architecture: Architecture | None         # None: its checkpoint does not say
    reusable: bool                            # its features (--reuse) and checkpoint (--warm-start) are complete


@dataclass(frozen=True)
class Exclusion:
    """A day left out of later windows (train and valid) until an operator re-admits it."""

    day: int
    by: str                                   # "gate" (its candidate was rejected) | "data_checks" (held)
    checks: tuple[str, ...]                   # the failed gate checks, or the checks: bounds it broke
    reason: str                               # one line: which check, with the numbers
    run_id: str
    since: str

    @property
    def text(self) -> str:
        what = "rejected by the gate" if self.by == "gate" else "held by data checks"
        return f"{what} ({', '.join(self.checks)}): {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"day": self.day, "by": self.by, "checks": list(self.checks), "reason": self.reason,
                "run_id": self.run_id, "since": self.since}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Exclusion":
        return cls(day=int(d["day"]), by=str(d["by"]), checks=tuple(str(c) for c in d.get("checks") or ()),
                   reason=str(d.get("reason", "")), run_id=str(d.get("run_id", "")), since=str(d.get("since", "")))


@dataclass(frozen=True)
class RegistryState:
    """The registry (and the run records, and the kept day statistics) as the plan sees them."""

    current: CurrentModel | None = None
    processed_days: frozenset[int] = frozenset()     # promoted, rejected or held before, and the current's day
                                                     # (the plan counts the excluded days as processed too)
    excluded: Mapping[int, str] = field(default_factory=dict)   # day -> why it is left out of windows
    readmitted: frozenset[int] = frozenset()         # re-admitted by an operator (its data checks are waived)
    day_stats: Mapping[int, str] = field(default_factory=dict)  # days with kept statistics -> contract fingerprint


class Registry:
    def __init__(self, root: Path):
        self.root = root

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if VERSION_RE.match(p.name) and p.is_dir())

    def version(self, name: str) -> Version:
        path = self.root / name
        lineage = read_json(path / LINEAGE)
        if not isinstance(lineage, dict):
            raise RegistryError(f"{path}: not a complete registry version (no readable {LINEAGE})")
        return Version(name, path, lineage)

    def current_name(self) -> str | None:
        link = self.root / CURRENT
        if link.is_symlink():
            return Path(os.readlink(link)).name
        if link.is_file():                         # a plain file naming the version also works
            return link.read_text().strip() or None
        return None

    def current(self) -> Version | None:
        name = self.current_name()
        if name is None:
            return None
        if not VERSION_RE.match(name) or not (self.root / name).is_dir():
            raise RegistryError(f"{self.root / CURRENT} points at {name!r}, which is not a version folder")
        return self.version(name)

    def state(self, recorded_days: Iterable[int], day_stats: Mapping[int, str] | None = None) -> RegistryState:
        """The current version as the plan needs it, every processed day (``recorded_days`` from the run
        records and the current version's held-out day), the excluded and re-admitted days, and
        ``day_stats`` (the days whose statistics are kept)."""
        excluded = self.excluded()
        processed = frozenset(recorded_days)
        base = RegistryState(None, processed, excluded={d: e.text for d, e in excluded.items()},
                             readmitted=frozenset(self.readmitted()), day_stats=dict(day_stats or {}))
        v = self.current()
        if v is None:
            return base
        day = v.lineage.get("day")
        day = day if isinstance(day, int) else None
        cur = CurrentModel(
            name=v.name, path=v.path, features=v.features, checkpoint=v.checkpoint, day=day,
            contract_fingerprint=v.lineage.get("contract_fingerprint"),
            feature_fingerprint=v.lineage.get("feature_fingerprint"), architecture=_architecture(v.checkpoint),
            reusable=M.is_complete(v.features) and layout.is_complete_checkpoint(v.checkpoint))
        return dataclasses.replace(base, current=cur, processed_days=processed | ({day} if day is not None else set()))

    # -- excluded days ------------------------------------------------------------------------------
    def _exclusions(self) -> dict[str, Any]:
        d = read_json(self.root / EXCLUDED)
        if d is None and (self.root / EXCLUDED).exists():
            raise RegistryError(f"{self.root / EXCLUDED}: not readable JSON; fix or remove it (it lists the days "
                                "left out of training windows)")
        d = d if isinstance(d, dict) else {}
        return {"excluded": list(d.get("excluded") or []), "history": list(d.get("history") or [])}

    def excluded(self) -> dict[int, Exclusion]:
        """The days left out of later windows, by day."""
        try:
            return {e.day: e for e in (Exclusion.from_json(x) for x in self._exclusions()["excluded"])}
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{self.root / EXCLUDED}: not a list of excluded days ({e})") from None

    def readmitted(self) -> set[int]:
        """Days whose last event is a re-admission by an operator."""
        last: dict[int, str] = {}
        for h in self._exclusions()["history"]:
            if isinstance(h, dict) and isinstance(h.get("day"), int):
                last[h["day"]] = str(h.get("event"))
        return {d for d, ev in last.items() if ev == "readmitted"}

    def _write_exclusions(self, excluded: Mapping[int, Exclusion], event: Mapping[str, Any]) -> None:
        d = self._exclusions()
        write_json(self.root / EXCLUDED, {"excluded": [e.to_json() for _, e in sorted(excluded.items())],
                                          "history": [*d["history"], {**event, "at": now()}]})
        fsync_dir(self.root)

    def exclude(self, e: Exclusion) -> None:
        """Leave ``e.day`` out of later windows (replacing an earlier exclusion of the day)."""
        ex = self.excluded()
        ex[e.day] = e
        self._write_exclusions(ex, {"event": "excluded", **e.to_json()})

    def readmit(self, day: int, run_id: str, by: str = "operator") -> Exclusion:
        """Let ``day`` into later windows again; the exclusion it had. RegistryError when it has none."""
        ex = self.excluded()
        if day not in ex:
            raise RegistryError(f"day {day} is not excluded (excluded: {sorted(ex) or 'none'})")
        gone = ex.pop(day)
        self._write_exclusions(ex, {"event": "readmitted", "day": day, "by": by, "run_id": run_id,
                                    "was": gone.to_json()})
        return gone

    def next_name(self) -> str:
        nums = [int(m.group(1)) for p in (self.root.iterdir() if self.root.is_dir() else [])
                for m in [re.match(r"^\.?v(\d{6})", p.name)] if m]
        return f"v{max(nums, default=0) + 1:06d}"

    def set_current(self, name: str) -> None:
        """Point ``current`` at a complete version: a new symlink renamed over the old one (atomic)."""
        tmp = self.root / f"{CURRENT}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, self.root / CURRENT)
        fsync_dir(self.root)

    def find_by_run_key(self, key: str) -> Version | None:
        for name in reversed(self.versions()):
            try:
                v = self.version(name)
            except RegistryError:
                continue
            if v.lineage.get("run_key") == key:
                return v
        return None

    def publish(self, run_key: str, checkpoint: Path, model: Path, featurized: Path, manifest: M.Manifest,
                documents: Mapping[str, Any], lineage: Mapping[str, Any]) -> Version:
        """Copy a model (its checkpoint and its export ``model``, already made) into a new version folder
        (complete before it gets its name), then switch ``current`` to it. ``documents`` are JSON files of
        the version (name -> content); the lineage gets the version's name and ``run_key``, by which a
        rerun after a kill between the two finds it."""
        if not model.is_file():
            raise RegistryError(f"{model}: no exported model to publish")
        existing = self.find_by_run_key(run_key)
        if existing is not None and not existing.model.is_file():
            # published under this key by a version of this code that did not export: add it (atomically)
            # before current may point at it
            tmp_model = existing.path / f".{MODEL}.tmp-{os.getpid()}"
            shutil.copy2(model, tmp_model)
            os.replace(tmp_model, existing.model)
            write_json(existing.path / LINEAGE,
                       {**existing.lineage, "model_fingerprint": lineage.get("model_fingerprint")})
            fsync_dir(existing.path)
            existing = self.version(existing.name)
        if existing is None:
            name = self.next_name()
            tmp = self.root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copytree(checkpoint, tmp / CHECKPOINT)
            shutil.copy2(model, tmp / MODEL)
            (tmp / FEATURES).mkdir()
            shutil.copy2(featurized / layout.MANIFEST, tmp / FEATURES / layout.MANIFEST)
            if manifest.vocab is not None:
                shutil.copytree(featurized / manifest.vocab.path, tmp / FEATURES / manifest.vocab.path)
            (tmp / FEATURES / layout.SUCCESS).write_text("")
            shutil.copy2(featurized / layout.MANIFEST, tmp / layout.MANIFEST)
            for file_name, content in documents.items():
                write_json(tmp / file_name, content)
            write_json(tmp / LINEAGE, {"version": name, "run_key": run_key, **lineage})
            fsync_dir(tmp)
            os.rename(tmp, self.root / name)
            fsync_dir(self.root)
            existing = self.version(name)
        self.set_current(existing.name)
        return existing

    def remove_partial(self) -> list[str]:
        """Folders left by a run killed while publishing (``.vNNNNNN.tmp-*``) and a stray current.tmp."""
        gone: list[str] = []
        if not self.root.is_dir():
            return gone
        for p in self.root.iterdir():
            if PARTIAL_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        tmp = self.root / f"{CURRENT}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        return gone

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions (each whole folder: its checkpoint, model.pt2 and
        documents); never the current one."""
        cur = self.current_name()
        names = self.versions()
        keep_set = set(names[-keep:]) | ({cur} if cur else set())
        removed = []
        for n in names:
            if n not in keep_set:
                shutil.rmtree(self.root / n, ignore_errors=True)
                removed.append(n)
        return removed


def _architecture(checkpoint: Path) -> Architecture | None:
    """The model kind and widths a checkpoint was trained with (its meta.json's training config)."""
    meta = read_json(checkpoint / layout.CHECKPOINT_META)
    c = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(c, dict):
        return None
    return Architecture(c.get("model"), tuple(c.get("hidden") or ()))


class RunLock:
    """fcntl.flock on registry/.lock, non-blocking; released when this process ends, however it ends.
    Child processes do not inherit it (subprocess closes other descriptors)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockBusy(f"{LOCK_MESSAGE} ({self.path}{': ' + holder if holder else ''}); "
                               "not starting a second one") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {now()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
