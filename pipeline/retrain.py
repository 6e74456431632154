"""python -m pipeline.retrain: one scheduled retraining run (cron, Airflow, a Kubernetes CronJob).

    python -m pipeline.retrain --config conf/retrain.yaml [--day N] [--refit] [--force] [--dry-run]

One run: find the newest complete day not yet processed in the raw folder; featurize the window of the
last ``window_days`` days up to it (spark-submit jobs/featurize.py), the newest day held out as the
test day, reusing the current model's boundaries and vocabulary (``--reuse``) so that ids mean the
same; train a candidate (torchrun deepfm/train.py), warm-started from the current model; evaluate the
current model on the same held-out day (python -m deepfm.evaluate); promote the candidate into the
registry only when it passes the gate; write a run record.

Exit codes: 0 promoted, kept the current model, nothing new, or a dry run; 1 a step failed (the message
and the run record name it); 2 bad configuration or arguments; 3 another run holds the lock;
130/143 interrupted by a signal.

This process only orchestrates: it imports neither Spark nor torch, and runs every step as a child
process (in its own session, killed with this process: a run killed at any step leaves no orphans
behind and never a partial model behind ``registry/current``).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from pipeline.contract import ContractError, load_contract
from pipeline.layout import PathOverlapError, refuse_overlap

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONTRACT = ROOT / "conf" / "criteo_small.yaml"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"                      # deepfm/sharded.py's marker of a usable checkpoint
LOCK = ".lock"
CURRENT = "current"
VERSION_RE = re.compile(r"^v(\d{6})$")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3
LOCK_MESSAGE = "another retrain run holds the lock"


# --- configuration -------------------------------------------------------------------------------

class RetrainConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SparkSettings:
    master: str = "local[2]"
    submit_args: tuple[str, ...] = ()          # e.g. [--driver-memory, 4g, --conf, spark.ui.enabled=false]
    featurize_args: tuple[str, ...] = ()       # extra jobs/featurize.py flags, e.g. [--min-row-groups, "4"]


@dataclass(frozen=True)
class TrainSettings:
    nproc: int = 1
    config: Path | None = None                 # deepfm/train.py --config (default: its own conf/train.yaml)
    epochs: int = 1
    batch_size: int | None = None
    hidden: tuple[int, ...] | None = None
    dropout: float | None = None
    dense_lr: float | None = None
    sparse_lr: float | None = None
    checkpoint_every_steps: int | None = None
    max_steps: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateSettings:
    auc_tolerance: float = 0.002               # candidate AUC >= current AUC - tolerance
    min_auc: float = 0.5                       # and above this floor (0.5 = a constant predictor)
    calibration_min: float = 0.8               # mean prediction / observed CTR within [min, max]
    calibration_max: float = 1.25
    min_rows: int = 1000                       # rows of the held-out day


@dataclass(frozen=True)
class Timeouts:
    featurize: int = 6 * 3600                  # seconds per step
    train: int = 48 * 3600
    evaluate: int = 4 * 3600


@dataclass(frozen=True)
class RetrainConfig:
    path: Path
    raw_dir: Path
    work_dir: Path
    registry_dir: Path
    contract: Path = DEFAULT_CONTRACT
    window_days: int = 7                       # featurize days newest-W .. newest (newest = the test day)
    valid_days: int = 1                        # days before the test day used for validation ...
    min_train_days: int = 1                    # ... when at least this many train days remain, else 0
    neg_sample_rate: float | None = None       # None: the contract's
    refit: bool = False                        # refit boundaries/vocabulary and train from scratch
    completeness: str = "marker"               # marker: day_N.done next to day_N | stable_seconds
    stable_seconds: int = 600                  # stable_seconds: unchanged for this long
    keep_versions: int = 5
    spark: SparkSettings = field(default_factory=SparkSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)


def _typed(where: str, v: Any, kind: str, lo: float | None = None) -> Any:
    """Check one value: kind is int, float, bool, str, str_list, int_list; None passes (optional)."""
    def bad(what: str) -> RetrainConfigError:
        return RetrainConfigError(f"{where}: expected {what}, got {v!r}")
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad("a number")
        v = float(v)
    elif kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
    elif kind == "str":
        if not isinstance(v, str) or not v:
            raise bad("a non-empty string")
    elif kind == "str_list":
        if not isinstance(v, list) or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
            raise bad("a list of strings")
        return tuple(str(x) for x in v)
    elif kind == "int_list":
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in v):
            raise bad("a non-empty list of positive integers")
        return tuple(v)
    if lo is not None and v < lo:
        raise RetrainConfigError(f"{where}: {v} must be at least {lo}")
    return v


# key -> (kind, lower bound, optional)
_TOP: dict[str, tuple[str, float | None, bool]] = {
    "raw_dir": ("path", None, False), "work_dir": ("path", None, False), "registry_dir": ("path", None, False),
    "contract": ("path", None, True), "window_days": ("int", 1, False), "valid_days": ("int", 0, False),
    "min_train_days": ("int", 1, False), "neg_sample_rate": ("float", 0, True), "refit": ("bool", None, False),
    "completeness": ("str", None, False), "stable_seconds": ("int", 0, False), "keep_versions": ("int", 1, False),
}
_SECTIONS: dict[str, tuple[type, dict[str, tuple[str, float | None, bool]]]] = {
    "spark": (SparkSettings, {"master": ("str", None, False), "submit_args": ("str_list", None, False),
                              "featurize_args": ("str_list", None, False)}),
    "train": (TrainSettings, {"nproc": ("int", 1, False), "config": ("path", None, True), "epochs": ("int", 1, False),
                              "batch_size": ("int", 1, True), "hidden": ("int_list", None, True),
                              "dropout": ("float", 0, True), "dense_lr": ("float", 0, True),
                              "sparse_lr": ("float", 0, True), "checkpoint_every_steps": ("int", 0, True),
                              "max_steps": ("int", 0, True), "extra_args": ("str_list", None, False)}),
    "gate": (GateSettings, {"auc_tolerance": ("float", 0, False), "min_auc": ("float", 0, False),
                            "calibration_min": ("float", 0, False), "calibration_max": ("float", 0, False),
                            "min_rows": ("int", 0, False)}),
    "timeouts": (Timeouts, {"featurize": ("int", 1, False), "train": ("int", 1, False),
                            "evaluate": ("int", 1, False)}),
}


def _section(raw: Any, where: str, spec: Mapping[str, tuple[str, float | None, bool]], base: Path,
             path: Path) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RetrainConfigError(f"{path}: {where or 'the file'}: expected a mapping")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = f"{where}.{k}" if where else str(k)
        if k not in spec:
            raise RetrainConfigError(f"{path}: unknown key {name!r} (allowed: {', '.join(sorted(spec))})")
        kind, lo, optional = spec[k]
        if v is None:
            if not optional:
                raise RetrainConfigError(f"{path}: {name}: a value is required")
            out[k] = None
        elif kind == "path":
            out[k] = (base / str(_typed(f"{path}: {name}", v, "str"))).resolve()
        else:
            out[k] = _typed(f"{path}: {name}", v, kind, lo)
    return out


def load_config(path: str | Path) -> RetrainConfig:
    """Read the retrain YAML; relative paths resolve against the file's folder; unknown keys are errors."""
    p = Path(path).resolve()
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise RetrainConfigError(f"retrain config not found: {path}") from None
    except yaml.YAMLError as e:
        raise RetrainConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RetrainConfigError(f"{path}: expected a mapping of settings")
    top_raw = {k: v for k, v in raw.items() if k not in _SECTIONS}
    values = _section(top_raw, "", _TOP, p.parent, p)
    for k in ("raw_dir", "work_dir", "registry_dir"):
        if values.get(k) is None:
            raise RetrainConfigError(f"{p}: {k} is required")
    if values.get("contract") is None:
        values.pop("contract", None)
    for name, (cls, spec) in _SECTIONS.items():
        sec = _section(raw.get(name), name, spec, p.parent, p)
        values[name] = cls(**sec)
    cfg = RetrainConfig(path=p, **values)
    if cfg.completeness not in ("marker", "stable_seconds"):
        raise RetrainConfigError(f"{p}: completeness: {cfg.completeness!r} is not one of marker, stable_seconds")
    if not cfg.gate.calibration_min < cfg.gate.calibration_max:
        raise RetrainConfigError(f"{p}: gate.calibration_min must be below gate.calibration_max")
    if cfg.neg_sample_rate is not None and not 0 < cfg.neg_sample_rate <= 1:
        raise RetrainConfigError(f"{p}: neg_sample_rate: {cfg.neg_sample_rate} is not in (0, 1]")
    # the run writes into work_dir and registry_dir and deletes old versions and work there: neither may
    # hold, or lie inside, the raw days or each other
    folders = [("raw_dir", cfg.raw_dir), ("work_dir", cfg.work_dir), ("registry_dir", cfg.registry_dir)]
    for i, (wname, wpath) in enumerate(folders[1:], 1):
        try:
            refuse_overlap((wname, str(wpath)), *[(n, str(x)) for n, x in folders[:i]])
        except PathOverlapError as e:
            raise RetrainConfigError(f"{p}: {e}") from None
    return cfg


# --- raw days ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DayScan:
    complete: tuple[int, ...]
    incomplete: dict[int, str]                 # day -> why not complete


def _latest_mtime_and_size(p: Path) -> tuple[float, int]:
    if p.is_dir():
        newest, size = p.stat().st_mtime, 0
        for sub in p.rglob("*"):
            st = sub.stat()
            newest = max(newest, st.st_mtime)
            size += st.st_size if sub.is_file() else 0
        return newest, size
    st = p.stat()
    return st.st_mtime, st.st_size


def scan_days(raw_dir: Path, file_pattern: str, rule: str, stable_seconds: int, now: float | None = None) -> DayScan:
    """Which days of the raw folder are complete: a ``day_N.done`` marker next to the file, or a
    ``_SUCCESS`` inside a folder of parts (rule ``marker``); or the file (every file of a folder) not
    modified for ``stable_seconds`` (rule ``stable_seconds``)."""
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw_dir {raw_dir}: no such folder")
    now = time.time() if now is None else now
    rx = re.compile(file_pattern)
    status: dict[int, list[str | None]] = {}
    for e in sorted(raw_dir.iterdir()):
        if e.name.startswith((".", "_")):
            continue
        m = rx.search(e.name)
        if not m:
            continue
        day = int(m.group(1))
        why: str | None = None
        if rule == "marker":
            markers = [raw_dir / f"{e.name}.done", raw_dir / f"day_{day}.done", e / SUCCESS]   # or a folder's _SUCCESS
            if not any(mk.exists() for mk in markers):
                why = f"no marker {markers[1].name}"
        else:
            mtime, size = _latest_mtime_and_size(e)
            if size == 0:
                why = f"{e.name} is empty"
            elif now - mtime < stable_seconds:
                why = f"{e.name} changed {now - mtime:.0f} s ago (< {stable_seconds} s)"
        status.setdefault(day, []).append(why)
    complete = tuple(sorted(d for d, ws in status.items() if all(w is None for w in ws)))
    incomplete = {d: next(w for w in ws if w is not None) for d, ws in status.items() if any(w is not None for w in ws)}
    return DayScan(complete, incomplete)


# --- the registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Version:
    name: str
    path: Path
    lineage: dict

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def features(self) -> Path:
        return self.path / "features"


class Registry:
    """registry/v000001/{checkpoint,features,manifest.json,metrics.json,train_metrics.json,lineage.json},
    registry/current -> vNNNNNN (a symlink, replaced atomically), registry/.lock."""

    def __init__(self, root: Path):
        self.root = root

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if VERSION_RE.match(p.name) and p.is_dir())

    def version(self, name: str) -> Version:
        path = self.root / name
        lineage_path = path / "lineage.json"
        if not lineage_path.exists():
            raise RegistryError(f"{path}: not a complete registry version (no lineage.json)")
        return Version(name, path, json.loads(lineage_path.read_text()))

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
        _fsync_dir(self.root)

    def find_by_run_key(self, key: str) -> Version | None:
        for name in reversed(self.versions()):
            try:
                v = self.version(name)
            except (RegistryError, ValueError):
                continue
            if v.lineage.get("run_key") == key:
                return v
        return None

    def remove_partial(self) -> list[str]:
        """Folders left by a run killed while publishing (``.vNNNNNN.tmp-*``) and a stray current.tmp."""
        gone: list[str] = []
        if not self.root.is_dir():
            return gone
        for p in self.root.iterdir():
            if re.match(r"^\.v\d{6}\.tmp", p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        tmp = self.root / f"{CURRENT}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        return gone

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; never the current one."""
        cur = self.current_name()
        names = self.versions()
        keep_set = set(names[-keep:]) | ({cur} if cur else set())
        removed = []
        for n in names:
            if n not in keep_set:
                shutil.rmtree(self.root / n, ignore_errors=True)
                removed.append(n)
        return removed


class RegistryError(RuntimeError):
    pass


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockBusy(RuntimeError):
    pass


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
        os.pwrite(fd, f"pid {os.getpid()} since {_now()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


# --- child processes -----------------------------------------------------------------------------

class StepError(RuntimeError):
    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signal.Signals(signum).name}")
        self.signum = signum


try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:                                     # pragma: no cover
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For the child, before exec: get SIGTERM when this (the parent) process dies, even by SIGKILL.
    torchrun and spark-submit stop their own workers on SIGTERM."""
    def set_deathsig() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:                # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return set_deathsig


def _kill_group(p: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the child's process group (its own session), then SIGKILL after ``grace`` seconds."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env() -> dict[str, str]:
    """This environment with the interpreter's bin folder first on PATH, the repo on PYTHONPATH, and no
    torchrun variables leaking in from a caller."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    for k in list(env):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT") or k.startswith("TORCHELASTIC_"):
            del env[k]
    return env


def find_tool(name: str, env: Mapping[str, str]) -> str:
    found = shutil.which(name, path=env.get("PATH"))
    if not found:
        raise FileNotFoundError(f"{name} not found on PATH ({env.get('PATH')})")
    return found


def stale_processes(needle: Sequence[str]) -> list[int]:
    """Pids (not this process) whose command line holds ``needle`` as consecutive arguments."""
    out = []
    n = list(needle)
    for d in Path("/proc").glob("[0-9]*"):
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        sargs = [a.decode(errors="replace") for a in args]
        if int(d.name) != os.getpid() and any(sargs[i:i + len(n)] == n for i in range(len(sargs))):
            out.append(int(d.name))
    return out


def _error_lines(log: Path, prefixes: Sequence[str]) -> str:
    """The job's own error line (e.g. 'featurize: error: ...') or else the log's last lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for p in prefixes:                                # in order of preference
        hits = [ln for ln in lines if p in ln]
        if hits:
            return hits[-1]
    return " | ".join(lines[-3:])


# --- one run -------------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _write_json(p: Path, obj: Any) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, p)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).exists())
    return done[-1] if done else None


def gate(candidate: Mapping[str, Any], current: Mapping[str, Any] | None, g: GateSettings) -> tuple[bool, list[dict]]:
    """Every check (name, passed, detail) of the candidate's held-out metrics; ``current`` is the current
    model's metrics on the same rows, or None (first run, or it cannot read the new features)."""
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    rows, auc, ll, cal = (candidate.get(k) for k in ("rows", "auc", "logloss", "calibration"))
    check("min_rows", isinstance(rows, int) and rows >= g.min_rows, f"test rows {rows} (min {g.min_rows})")
    check("logloss_finite", _finite(ll), f"logloss {ll}")
    check("calibration", _finite(cal) and g.calibration_min <= cal <= g.calibration_max,  # type: ignore[operator]
          f"calibration {_fmt(cal)} (allowed [{g.calibration_min}, {g.calibration_max}])")
    check("min_auc", _finite(auc) and auc >= g.min_auc, f"AUC {_fmt(auc)} (min {g.min_auc})")  # type: ignore[operator]
    if current is not None and _finite(current.get("auc")):
        floor = current["auc"] - g.auc_tolerance
        check("vs_current", _finite(auc) and auc >= floor,  # type: ignore[operator]
              f"AUC {_fmt(auc)} vs current {_fmt(current['auc'])} (tolerance {g.auc_tolerance})")
    return all(c["passed"] for c in checks), checks


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if _finite(x) else str(x)


class Retrain:
    def __init__(self, cfg: RetrainConfig, day: int | None = None, refit: bool = False, force: bool = False,
                 dry_run: bool = False):
        self.cfg = cfg
        self.day = day
        self.refit = refit or cfg.refit
        self.force = force
        self.dry_run = dry_run
        self.registry = Registry(cfg.registry_dir)
        self.runs_dir = cfg.work_dir / "runs"
        self.step = "start"
        self.record: dict[str, Any] = {}
        self.record_path: Path | None = None
        self.log_dir: Path | None = None
        self.env = child_env()

    # -- entry --------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.dry_run:
            return self._dry_run()
        self.cfg.registry_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.cfg.registry_dir / LOCK)
        try:
            lock.acquire()
        except LockBusy as e:
            print(f"retrain: error: {e}", file=sys.stderr)
            return EXIT_LOCKED
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

        def on_signal(signum: int, frame: Any) -> None:
            raise Interrupted(signum)
        for s in old:
            signal.signal(s, on_signal)
        try:
            return self._locked()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            lock.release()

    def _locked(self) -> int:
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
        self.record = {"run_id": run_id, "status": "running", "started": _now(), "config": str(self.cfg.path),
                       "host": os.uname().nodename, "pid": os.getpid(), "steps": {}}
        try:
            self.step = "find_days"
            self.registry.remove_partial()
            self._mark_interrupted_records()
            plan = self._select()
            if plan is None:
                return EXIT_OK
            return self._execute(plan, run_id)
        except StepError as e:
            return self._fail(e.step, str(e))
        except (Interrupted, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
            self._fail(self.step, f"interrupted by signal {signal.Signals(signum).name}")
            return 128 + signum
        except (ContractError, RegistryError, OSError, ValueError) as e:     # bad contract, train.yaml, files
            return self._fail(self.step, f"{e}" if isinstance(e, (ContractError, RegistryError)) else
                              f"{type(e).__name__}: {e}")
        except Exception as e:                          # a bug: still a record and a clear message
            return self._fail(self.step, f"{type(e).__name__}: {e}", traceback.format_exc())

    def _fail(self, step: str, message: str, tb: str | None = None) -> int:
        self.record.update(status="failed", decision="failed", failed_step=step, error=message,
                           finished=_now())
        if tb:
            self.record["traceback"] = tb
        self._save_record()
        where = f" (run record {self.record_path})" if self.record_path else ""
        print(f"retrain: error: step {step!r} failed: {message}{where}", file=sys.stderr)
        return EXIT_FAILED

    def _save_record(self) -> None:
        if self.record_path is None:
            day = self.record.get("day")
            self.record_path = self.runs_dir / f"{self.record['run_id']}{'' if day is None else f'-day{day}'}.json"
        _write_json(self.record_path, self.record)

    def _records(self) -> list[tuple[Path, dict]]:
        out = []
        for p in sorted(self.runs_dir.glob("*.json")) if self.runs_dir.is_dir() else []:
            r = _read_json(p)
            if isinstance(r, dict):
                out.append((p, r))
        return out

    def _mark_interrupted_records(self) -> None:
        """Records still 'running' belong to runs that died (this run holds the lock): say so."""
        for p, r in self._records():
            if r.get("status") == "running":
                r.update(status="interrupted", decision="failed", failed_step=r.get("current_step"),
                         error=f"the run ended during step {r.get('current_step')!r} without finishing "
                               f"(killed?); noticed by run {self.record['run_id']}")
                _write_json(p, r)

    # -- which day ----------------------------------------------------------------------------------
    def _select(self) -> dict | None:
        """The plan of this run, or None (after printing why) when there is nothing to do."""
        cfg = self.cfg
        contract = load_contract(cfg.contract)
        if contract.source.day_from != "file_name":
            raise StepError("find_days", f"{cfg.contract}: retraining needs one file per day (source.day_from: "
                                         "file_name)")
        scan = scan_days(cfg.raw_dir, contract.source.file_pattern, cfg.completeness, cfg.stable_seconds)
        current = self.registry.current()
        processed = self._processed_days(current)
        last = max(processed, default=None)

        def window_clean(d: int) -> bool:
            return not any(max(0, d - cfg.window_days) <= i <= d for i in scan.incomplete)

        if self.day is not None:
            newest = self.day
            if newest not in scan.complete:
                why = scan.incomplete.get(newest, "no such day file")
                raise StepError("find_days", f"--day {newest}: day {newest} is not complete in {cfg.raw_dir} ({why})")
            if not window_clean(newest):
                bad = sorted(i for i in scan.incomplete if max(0, newest - cfg.window_days) <= i <= newest)
                raise StepError("find_days", f"--day {newest}: day(s) {bad} of its window are not complete yet")
            if newest in processed and not self.force:
                self._nothing(f"day {newest} was already processed (pass --force to redo it)", current)
                return None
        else:
            eligible = [d for d in scan.complete if window_clean(d)]
            if not eligible:
                waiting = f"; incomplete: {dict(sorted(scan.incomplete.items()))}" if scan.incomplete else ""
                self._nothing(f"no complete day in {cfg.raw_dir}{waiting}", current)
                return None
            newest = max(eligible)
            if last is not None and newest <= last and not self.force:
                self._nothing(f"the newest complete day is {newest}, already processed (last: day {last})", current)
                return None
        first = max(0, newest - cfg.window_days)
        days = [d for d in scan.complete if first <= d <= newest]
        valid = cfg.valid_days if len(days) - 1 - cfg.valid_days >= cfg.min_train_days else 0
        if len(days) - 1 - valid < 1:
            self._nothing(f"day {newest}: the window {first}-{newest} has {len(days)} complete day(s) {days}; "
                          "at least one train day besides the held-out day is needed", current)
            return None
        n_train = len(days) - 1 - valid
        split = {"train": days[:n_train], "valid": days[n_train:n_train + valid], "test": [newest]}

        # warm or cold
        cold: str | None = None
        if current is None:
            cold = "first run: no current model"
        elif self.refit:
            cold = "refit requested: boundaries and vocabulary refitted"
        elif current.lineage.get("contract_fingerprint") != contract.fingerprint:
            cold = (f"the feature contract changed (current model {current.lineage.get('contract_fingerprint')}, "
                    f"now {contract.fingerprint})")
        elif not (current.features / SUCCESS).exists() or not (current.checkpoint / COMPLETE).exists():
            cold = f"{current.path} has no reusable features or checkpoint"
        else:
            cold = self._architecture_change(current)
        t = cfg.train
        plan: dict[str, Any] = {
            "day": newest, "first": first, "last": newest, "days": days, "splits": split,
            "valid_days": valid, "test_days": 1,
            "contract": str(cfg.contract), "contract_fingerprint": contract.fingerprint,
            "parent": current.name if current else None,
            "parent_feature_fingerprint": current.lineage.get("feature_fingerprint") if current else None,
            "warm_start": cold is None, "cold_start_reason": cold,
            "reuse": str(current.features) if current and cold is None else None,
            "warm_start_from": str(current.checkpoint) if current and cold is None else None,
            "neg_sample_rate": cfg.neg_sample_rate, "featurize_args": list(cfg.spark.featurize_args),
            "train": {k: (list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v))
                      for k, v in asdict(t).items() if k != "nproc"},
        }
        plan["run_key"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:10]
        return plan

    def _architecture(self) -> dict[str, Any]:
        """The model kind and layer widths this run's trainer will build (conf/train.yaml + the flags)."""
        from deepfm.trainconf import DEFAULT_TRAIN_CONFIG, load_train_config   # yaml only, no torch
        t = self.cfg.train
        model = None
        extra = list(t.extra_args)
        for i, a in enumerate(extra):
            if a == "--model" and i + 1 < len(extra):
                model = extra[i + 1]
            elif a.startswith("--model="):
                model = a.split("=", 1)[1]
        c = load_train_config(t.config or DEFAULT_TRAIN_CONFIG, {"hidden": t.hidden, "model": model})
        return {"model": c.model, "hidden": list(c.hidden)}

    def _architecture_change(self, current: Version) -> str | None:
        """Why the current model's weights cannot seed this run's model, or None when they can."""
        meta = _read_json(current.checkpoint / "meta.json")
        cfg = meta.get("config", {}) if isinstance(meta, dict) else {}
        was = {"model": cfg.get("model"), "hidden": list(cfg.get("hidden") or [])}
        now = self._architecture()
        if was != now:
            return f"the model changed ({current.name}: {was}, now {now})"
        return None

    def _processed_days(self, current: Version | None) -> set[int]:
        days = {int(r["day"]) for _, r in self._records()
                if r.get("status") in ("promoted", "kept_current") and isinstance(r.get("day"), int)}
        if current is not None and isinstance(current.lineage.get("day"), int):
            days.add(current.lineage["day"])
        return days

    def _nothing(self, why: str, current: Version | None) -> None:
        cur = f" (current model: {current.name})" if current else " (no current model yet)"
        print(f"retrain: nothing new: {why}{cur}")

    # -- the steps ----------------------------------------------------------------------------------
    def _day_dir(self, plan: dict) -> Path:
        return self.cfg.work_dir / "days" / f"day_{plan['day']}-{plan['run_key']}"

    def _featurize_cmd(self, plan: dict, out: Path) -> list[str]:
        c = self.cfg
        cmd = [find_tool("spark-submit", self.env), "--master", c.spark.master, *c.spark.submit_args,
               str(ROOT / "jobs" / "featurize.py"), "--input", str(c.raw_dir), "--output", str(out),
               "--config", str(c.contract), "--days", f"{plan['first']}-{plan['last']}",
               "--valid-days", str(plan["valid_days"]), "--test-days", str(plan["test_days"])]
        if plan["reuse"]:
            cmd += ["--reuse", plan["reuse"]]
        if c.neg_sample_rate is not None:
            cmd += ["--neg-sample-rate", repr(c.neg_sample_rate)]
        return cmd + [*c.spark.featurize_args, "--overwrite"]

    def _train_cmd(self, plan: dict, data: Path, run_dir: Path, warm_from: str | None) -> list[str]:
        t = self.cfg.train
        cmd = [find_tool("torchrun", self.env), "--standalone", f"--nproc_per_node={t.nproc}",
               str(ROOT / "deepfm" / "train.py"), "--data", str(data), "--out", str(run_dir), "--epochs", str(t.epochs)]
        for flag, v in (("--config", t.config), ("--batch-size", t.batch_size), ("--dropout", t.dropout),
                        ("--dense-lr", t.dense_lr), ("--sparse-lr", t.sparse_lr),
                        ("--checkpoint-every-steps", t.checkpoint_every_steps), ("--max-steps", t.max_steps)):
            if v is not None:
                cmd += [flag, str(v)]
        if t.hidden is not None:
            cmd += ["--hidden", ",".join(str(h) for h in t.hidden)]
        if warm_from:
            cmd += ["--warm-start", warm_from]
        return cmd + list(t.extra_args)

    def _evaluate_cmd(self, version: Path, ckpt: Path, data: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "deepfm.evaluate", "--run", str(version), "--checkpoint", str(ckpt),
                "--data", str(data), "--split", "test", "--json", str(out)]

    def _run_child(self, step: str, cmd: list[str], timeout: int, prefixes: Sequence[str]) -> float:
        assert self.log_dir is not None
        log = self.log_dir / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._step_info(step, command=" ".join(shlex.quote(c) for c in cmd), log=str(log))
        print(f"retrain: {step}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.time()
        with open(log, "ab") as fh:
            fh.write(f"\n=== {_now()} {' '.join(shlex.quote(c) for c in cmd)}\n".encode())
            fh.flush()
            p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=_die_with_parent(os.getpid()))
            try:
                rc = p.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                raise StepError(step, f"timed out after {timeout} s (timeouts.{step.split('_')[0]}); log: {log}")
            except BaseException:
                _kill_group(p)
                raise
        seconds = round(time.time() - t0, 1)
        if rc != 0:
            raise StepError(step, f"exit code {rc}: {_error_lines(log, prefixes)} (log: {log})")
        return seconds

    def _step_info(self, step: str, **kw: Any) -> None:
        self.record["steps"].setdefault(step, {}).update(kw)
        self._save_record()

    def _begin(self, step: str) -> None:
        self.step = step
        self.record["current_step"] = step
        self._step_info(step, status="running", started=_now())

    def _execute(self, plan: dict, run_id: str) -> int:
        cfg = self.cfg
        day_dir = self._day_dir(plan)
        self.log_dir = self.runs_dir / run_id
        resumed_dir = day_dir.exists()
        day_dir.mkdir(parents=True, exist_ok=True)
        saved_plan = _read_json(day_dir / "plan.json")
        if saved_plan is not None and saved_plan != plan:          # cannot happen with the key in the name
            shutil.rmtree(day_dir)
            day_dir.mkdir(parents=True)
            resumed_dir = False
        _write_json(day_dir / "plan.json", plan)
        self.record.update(day=plan["day"], window={k: plan[k] for k in ("first", "last", "days", "splits")},
                           parent=plan["parent"], warm_start=plan["warm_start"],
                           start="warm" if plan["warm_start"] else "cold",
                           cold_start_reason=plan["cold_start_reason"], run_key=plan["run_key"],
                           work_dir=str(day_dir), resumed_work_dir=resumed_dir)
        self._save_record()
        print(f"retrain: day {plan['day']}: window {plan['first']}-{plan['last']} (train {plan['splits']['train']}, "
              f"valid {plan['splits']['valid']}, test {plan['splits']['test']}); "
              + (f"warm start from {plan['parent']}" if plan["warm_start"] else f"cold start: {plan['cold_start_reason']}")
              + (f"; resuming {day_dir}" if resumed_dir else ""), flush=True)

        # 1. featurize
        self._begin("featurize")
        feat = day_dir / "featurized"
        if (feat / SUCCESS).exists() and _read_json(feat / MANIFEST) is not None:
            self._step_info("featurize", status="reused", output=str(feat))
        else:
            for stale in day_dir.glob("featurized.__*"):                # a killed job's staging folder
                shutil.rmtree(stale, ignore_errors=True)
            secs = self._run_child("featurize", self._featurize_cmd(plan, feat), cfg.timeouts.featurize,
                                   ["featurize: error:", "Error:", "Exception"])
            self._step_info("featurize", status="done", seconds=secs, output=str(feat))
        manifest = _read_json(feat / MANIFEST)
        if not isinstance(manifest, dict):
            raise StepError("featurize", f"{feat}: no readable {MANIFEST}")
        fp = manifest["feature_fingerprint"]
        test = manifest["splits"]["test"]
        if test["days"] != [plan["day"]]:
            raise StepError("featurize", f"{feat}: test days {test['days']}, expected [{plan['day']}]")
        warm_from = plan["warm_start_from"]
        if warm_from and fp != plan["parent_feature_fingerprint"]:
            warm_from = None
            self.record.update(warm_start=False, start="cold", cold_start_reason=(
                f"the new features' fingerprint {fp} differs from {plan['parent']}'s "
                f"{plan['parent_feature_fingerprint']}"))
        self.record.update(feature_fingerprint=fp, splits={s: {k: v for k, v in manifest["splits"][s].items()
                                                              if k in ("days", "rows", "positives")}
                                                          for s in ("train", "valid", "test")})
        self._step_info("featurize", finished=_now())

        # 2. train (a relaunch with the same run folder resumes from its latest complete checkpoint)
        self._begin("train")
        run_dir = day_dir / "train"
        done_marker = day_dir / "train.done"
        if done_marker.exists() and (run_dir / "metrics.json").exists():
            self._step_info("train", status="reused", run_dir=str(run_dir))
        else:
            resume_from = latest_checkpoint(run_dir)
            for pid in stale_processes(["--out", str(run_dir)]):       # workers of a run that was killed
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._step_info("train", resumed=resume_from is not None,
                            resumed_from=str(resume_from) if resume_from else None,
                            warm_start_from=warm_from)
            secs = self._run_child("train", self._train_cmd(plan, feat, run_dir, warm_from), cfg.timeouts.train,
                                   ["train: error:", "Error:"])
            done_marker.write_text(_now() + "\n")
            self._step_info("train", status="done", seconds=secs, run_dir=str(run_dir))
        train_metrics = _read_json(run_dir / "metrics.json")
        ckpt = latest_checkpoint(run_dir)
        if not isinstance(train_metrics, dict) or ckpt is None:
            raise StepError("train", f"{run_dir}: no metrics.json or no complete checkpoint after training")
        candidate = train_metrics.get("test") or {}
        self.record["candidate_metrics"] = candidate
        self._step_info("train", checkpoint=str(ckpt), global_step=train_metrics.get("global_step"),
                        finished=_now())

        # 3. the current model on the same held-out day
        self._begin("evaluate_current")
        current_metrics: dict | None = None
        parent = self.registry.version(plan["parent"]) if plan["parent"] else None
        if parent is None:
            self._step_info("evaluate_current", status="skipped", reason="no current model")
        elif parent.lineage.get("feature_fingerprint") != fp:
            self._step_info("evaluate_current", status="skipped",
                            reason=f"{parent.name} was trained on features {parent.lineage.get('feature_fingerprint')}"
                                   f", the new ones are {fp}: it cannot score them; absolute checks only")
        else:
            out = day_dir / "eval_current.json"
            current_metrics = _read_json(out)
            if isinstance(current_metrics, dict) and "auc" in current_metrics:
                self._step_info("evaluate_current", status="reused")
            else:
                tmp = day_dir / ".eval_current.json.tmp"
                secs = self._run_child("evaluate_current", self._evaluate_cmd(parent.path, parent.checkpoint, feat, tmp),
                                       cfg.timeouts.evaluate, ["evaluate: error:", "Error:"])
                os.replace(tmp, out)
                current_metrics = _read_json(out)
                self._step_info("evaluate_current", status="done", seconds=secs)
        self.record["current_metrics"] = current_metrics
        self._step_info("evaluate_current", finished=_now())

        # 4. gate
        self._begin("gate")
        passed, checks = gate(candidate, current_metrics, cfg.gate)
        reasons = [c["detail"] for c in checks if not c["passed"]]
        self.record.update(gate={"passed": passed, "checks": checks})
        self._step_info("gate", status="passed" if passed else "rejected")

        # 5. publish
        version: Version | None = None
        if passed:
            self._begin("publish")
            version = self._publish(plan, day_dir, feat, manifest, run_dir, ckpt, train_metrics, candidate,
                                    current_metrics, checks, warm_from)
            self._step_info("publish", status="done", version=version.name)

        self.step = "prune"
        removed = self.registry.prune(cfg.keep_versions)
        pruned_days = self._prune_work(day_dir)
        self.record.update(pruned_versions=removed, pruned_work_dirs=pruned_days)
        cur = self.registry.current_name()
        if version is not None:
            self.record.update(status="promoted", decision="promoted", version=version.name, reason=None)
            cmp_txt = f" vs current {_fmt(current_metrics.get('auc'))}" if current_metrics else ""
            msg = (f"retrain: day {plan['day']}: promoted {version.name} "
                   f"({'warm start from ' + str(plan['parent']) if warm_from else 'cold start'}; test AUC "
                   f"{_fmt(candidate.get('auc'))}{cmp_txt}, logloss {_fmt(candidate.get('logloss'))}, "
                   f"calibration {_fmt(candidate.get('calibration'))})")
        else:
            self.record.update(status="kept_current", decision="kept_current", version=cur,
                               reason="; ".join(reasons))
            msg = (f"retrain: day {plan['day']}: kept current {cur or '(none)'}: the candidate was rejected: "
                   + "; ".join(reasons))
        self.record.pop("current_step", None)
        self.record["finished"] = _now()
        self._save_record()
        print(msg)
        print(f"retrain: run record {self.record_path}")
        return EXIT_OK

    def _publish(self, plan: dict, day_dir: Path, feat: Path, manifest: dict, run_dir: Path, ckpt: Path,
                 train_metrics: dict, candidate: dict, current: dict | None, checks: list[dict],
                 warm_from: str | None) -> Version:
        """Copy the model into a new version folder (complete before it gets its name), then switch
        ``current`` to it. A rerun after a kill between the two finds the version by its run key."""
        reg = self.registry
        existing = reg.find_by_run_key(plan["run_key"])
        if existing is None:
            name = reg.next_name()
            tmp = reg.root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copytree(ckpt, tmp / "checkpoint")
            (tmp / "features").mkdir()                   # what featurize --reuse needs: manifest, vocab
            shutil.copy2(feat / MANIFEST, tmp / "features" / MANIFEST)
            if (feat / "vocab").is_dir():
                shutil.copytree(feat / "vocab", tmp / "features" / "vocab")
            (tmp / "features" / SUCCESS).write_text("")
            shutil.copy2(feat / MANIFEST, tmp / MANIFEST)
            _write_json(tmp / "train_metrics.json", train_metrics)
            _write_json(tmp / "metrics.json", {"test": candidate, "current_on_same_rows": current,
                                               "gate": checks, "test_day": plan["day"]})
            lineage = {
                "version": name, "parent": plan["parent"], "created": _now(), "run_id": self.record["run_id"],
                "run_key": plan["run_key"], "day": plan["day"], "window": [plan["first"], plan["last"]],
                "days_trained": plan["splits"]["train"], "valid_days": plan["splits"]["valid"],
                "test_days": plan["splits"]["test"], "featurized": str(feat), "run_dir": str(run_dir),
                "checkpoint_source": str(ckpt), "global_step": train_metrics.get("global_step"),
                "warm_start": warm_from is not None, "warm_started_from": plan["parent"] if warm_from else None,
                "cold_start_reason": None if warm_from else self.record.get("cold_start_reason"),
                "feature_fingerprint": manifest["feature_fingerprint"],
                "contract_fingerprint": manifest["contract_fingerprint"], "contract": plan["contract"],
                "train": plan["train"],
            }
            _write_json(tmp / "lineage.json", lineage)
            _fsync_dir(tmp)
            os.rename(tmp, reg.root / name)
            _fsync_dir(reg.root)
            existing = reg.version(name)
        reg.set_current(existing.name)
        return existing

    def _prune_work(self, keep_dir: Path) -> list[str]:
        """Delete per-day work folders that no kept version refers to (its featurized data), except this
        run's."""
        root = self.cfg.work_dir / "days"
        referenced = {keep_dir.resolve()}
        for n in self.registry.versions():
            try:
                feat = self.registry.version(n).lineage.get("featurized")
            except RegistryError:
                continue
            if feat:
                referenced.add(Path(feat).resolve().parent)
        removed = []
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.is_dir() and d.resolve() not in referenced:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    # -- dry run ------------------------------------------------------------------------------------
    def _dry_run(self) -> int:
        try:
            return self._describe()
        except (StepError, RegistryError, OSError, ValueError) as e:
            print(f"retrain (dry run): error: {e}", file=sys.stderr)
            return EXIT_FAILED

    def _describe(self) -> int:
        plan = self._select()
        if plan is None:
            return EXIT_OK
        day_dir = self._day_dir(plan)
        feat, run_dir = day_dir / "featurized", day_dir / "train"
        q: Callable[[list[str]], str] = lambda cmd: " ".join(shlex.quote(c) for c in cmd)
        print(f"retrain (dry run): would process day {plan['day']}: window {plan['first']}-{plan['last']} "
              f"(train {plan['splits']['train']}, valid {plan['splits']['valid']}, test {plan['splits']['test']}); "
              + (f"warm start from {plan['parent']}" if plan["warm_start"] else f"cold start: {plan['cold_start_reason']}"))
        print(f"  work folder: {day_dir}" + (" (exists: its finished steps would be reused)" if day_dir.exists() else ""))
        print(f"  1. featurize{' (already complete, reused)' if (feat / SUCCESS).exists() else ''}: "
              f"{q(self._featurize_cmd(plan, feat))}")
        print(f"  2. train{' (resumes from ' + str(latest_checkpoint(run_dir)) + ')' if latest_checkpoint(run_dir) else ''}: "
              f"{q(self._train_cmd(plan, feat, run_dir, plan['warm_start_from']))}")
        if plan["parent"]:
            v = self.registry.version(plan["parent"])
            print(f"  3. evaluate current {plan['parent']} on the same test day: "
                  f"{q(self._evaluate_cmd(v.path, v.checkpoint, feat, day_dir / 'eval_current.json'))}")
        else:
            print("  3. no current model to compare with")
        g = self.cfg.gate
        print(f"  4. gate: test rows >= {g.min_rows}, logloss finite, calibration in [{g.calibration_min}, "
              f"{g.calibration_max}], AUC >= {g.min_auc}" + (f", AUC >= current - {g.auc_tolerance}" if plan["parent"] else ""))
        print(f"  5. if it passes: {self.cfg.registry_dir / self.registry.next_name()}, then "
              f"{self.cfg.registry_dir / CURRENT} -> it; keep the last {self.cfg.keep_versions} version(s)")
        return EXIT_OK


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.retrain", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "conf" / "retrain.yaml"), help="retrain settings (conf/retrain.yaml)")
    p.add_argument("--day", type=int, help="process this day as the newest (held-out) day instead of the newest "
                                           "complete one")
    p.add_argument("--refit", action="store_true", help="refit boundaries and vocabulary and train from scratch")
    p.add_argument("--force", action="store_true", help="process the day even when it was already processed")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config)
    except RetrainConfigError as e:
        print(f"retrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return Retrain(cfg, day=a.day, refit=a.refit, force=a.force, dry_run=a.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
