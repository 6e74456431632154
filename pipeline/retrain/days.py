"""Which raw days are complete: what the retrain plan is made from, read from the raw folder.

A day file's name comes from the contract's ``source.file_pattern`` and its completeness marker from
:mod:`pipeline.layout`, so a contract with another naming (``log-12.tsv``) works unchanged.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from pipeline import layout


@dataclass(frozen=True)
class DayScan:
    """Complete days (ascending) and, for each incomplete one, why it is not complete yet."""

    complete: tuple[int, ...] = ()
    incomplete: Mapping[int, str] = field(default_factory=dict)


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


def _why_incomplete(entry: Path, day: int, file_pattern: str, rule: str, stable_seconds: int,
                    now: float) -> str | None:
    """None when the day file (or folder of parts) is complete, else why not."""
    if rule == "marker":
        marker = layout.done_marker(layout.day_file_name(file_pattern, day))
        markers = [entry.parent / marker, entry.parent / layout.done_marker(entry.name), entry / layout.SUCCESS]
        return None if any(m.exists() for m in markers) else f"no marker {marker}"
    mtime, size = _latest_mtime_and_size(entry)
    if size == 0:
        return f"{entry.name} is empty"
    if now - mtime < stable_seconds:
        return f"{entry.name} changed {now - mtime:.0f} s ago (< {stable_seconds} s)"
    return None


def scan_days(raw_dir: Path, file_pattern: str, rule: str, stable_seconds: int, now: float | None = None) -> DayScan:
    """Which days of the raw folder are complete: rule ``marker``: a ``<day file>.done`` marker next to
    the file (``day_3.done``; also ``day_3.gz.done``), or a ``_SUCCESS`` inside a folder of parts; rule
    ``stable_seconds``: the file (every file of a folder) not modified for ``stable_seconds``.

        day_0, day_0.done, day_1 (rule marker) -> DayScan(complete=(0,), incomplete={1: "no marker day_1.done"})
    """
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw_dir {raw_dir}: no such folder")
    now = time.time() if now is None else now
    rx = re.compile(file_pattern)
    status: dict[int, list[str | None]] = {}
    for e in sorted(raw_dir.iterdir()):
        m = None if e.name.startswith((".", "_")) else rx.search(e.name)
        if m:
            day = int(m.group(1))
            status.setdefault(day, []).append(_why_incomplete(e, day, file_pattern, rule, stable_seconds, now))
    complete = tuple(sorted(d for d, ws in status.items() if all(w is None for w in ws)))
    incomplete = {d: next(w for w in ws if w is not None) for d, ws in sorted(status.items())
                  if any(w is not None for w in ws)}
    return DayScan(complete, incomplete)


def link_days(raw_dir: Path, file_pattern: str, days: Iterable[int], dest: Path) -> list[str]:
    """Make ``dest`` a folder of symbolic links to the raw entries (files, or folders of parts) of ``days``,
    each under its own name in ``raw_dir`` (so ``day_3.gz`` stays ``day_3.gz`` and is read as gzip), and
    return the names. The featurize job reads this folder instead of ``raw_dir``, so a window can leave
    days out (excluded days) without a flag of the job and without touching the raw folder.

        raw: day_1, day_1.done, day_2.gz, day_3; days [1, 3] -> dest/day_1 -> raw/day_1, dest/day_3 -> raw/day_3
    """
    want = set(days)
    rx = re.compile(file_pattern)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)                     # removes the links, never what they point at
    dest.mkdir(parents=True)
    names: list[str] = []
    for e in sorted(raw_dir.iterdir()):
        m = None if e.name.startswith((".", "_")) else rx.search(e.name)
        if m and int(m.group(1)) in want:
            os.symlink(e.resolve(), dest / e.name)
            names.append(e.name)
    return names
