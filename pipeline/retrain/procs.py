"""Child-process control: every step runs as a child in its own session, dies with this process, and
is killed as a group on a timeout or a signal; its output goes to a log whose error line names the
failure."""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.retrain.config import ROOT
from pipeline.retrain.jsonio import now

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT")


class StepError(RuntimeError):
    """A step failed; ``step`` names it (the run record's ``failed_step``)."""

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


def kill_group(p: subprocess.Popen, grace: float = 30.0) -> None:
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


def kill_stale(needle: Sequence[str]) -> None:
    """SIGKILL the processes :func:`stale_processes` finds (e.g. the workers of a run that was killed)."""
    for pid in stale_processes(needle):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_env() -> dict[str, str]:
    """This environment with the interpreter's bin folder first on PATH, the repo on PYTHONPATH, and no
    torchrun variables leaking in from a caller."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYSPARK_PYTHON", sys.executable)
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


def error_line(log: Path, prefixes: Sequence[str]) -> str:
    """The job's own error line (e.g. 'featurize: error: ...'; ``prefixes`` in order of preference) or else
    the log's last lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for p in prefixes:
        hits = [ln for ln in lines if p in ln]
        if hits:
            return hits[-1]
    return " | ".join(lines[-3:])


def quote(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_child(step: str, cmd: Sequence[str], *, log: Path, env: Mapping[str, str], timeout: int, timeout_key: str,
              error_prefixes: Sequence[str]) -> float:
    """Run ``cmd`` (output appended to ``log``) and return its seconds; StepError when it fails or takes
    longer than ``timeout`` (the setting ``timeout_key``). Any exception here (a signal) kills its group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "ab") as fh:
        fh.write(f"\n=== {now()} {quote(cmd)}\n".encode())
        fh.flush()
        p = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
            raise StepError(step, f"timed out after {timeout} s ({timeout_key}); log: {log}") from None
        except BaseException:
            kill_group(p)
            raise
    if rc != 0:
        raise StepError(step, f"exit code {rc}: {error_line(log, error_prefixes)} (log: {log})")
    return round(time.time() - t0, 1)
