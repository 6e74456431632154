"""On-disk names and layouts, stated once: the markers and files every step writes or reads.

No pyspark and no torch import: the orchestrator (pipeline.retrain), the Spark job and the trainer all
use these names, so none of them has to copy a helper to avoid importing another's stack.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

SUCCESS = "_SUCCESS"            # written last into a featurized (or scored) output: it is complete
MANIFEST = "manifest.json"      # the featurized data's manifest (pipeline.manifest reads and writes it)


class PathOverlapError(ValueError):
    """Two folders that must be apart (what a step reads, what it writes or deletes) overlap."""


def _local(path: str) -> str | None:
    """A local path's real absolute form (symlinks resolved), or None for another file system's URL."""
    u = urlparse(path)
    if u.scheme in ("", "file"):
        return os.path.realpath(u.path if u.scheme else path)
    return None


def _normal(path: str) -> str:
    local = _local(path)
    if local is not None:
        return local
    u = urlparse(path)
    return f"{u.scheme}://{u.netloc}{os.path.normpath(u.path or '/')}"


def overlap(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same folder or one lies inside the other (local paths with
    symlinks resolved; URLs such as ``hdfs://nn/x`` compared by scheme, host and normalised path).

        overlap("/d/raw", "/d/raw/") -> True;  overlap("/d", "/d/raw") -> True;  overlap("/d/raw", "/d/raw2") -> False
    """
    x, y = _normal(a), _normal(b)
    return x == y or x.startswith(y.rstrip("/") + "/") or y.startswith(x.rstrip("/") + "/")


def refuse_overlap(written: tuple[str, str], *read: tuple[str, str | None]) -> None:
    """Raise :class:`PathOverlapError` when the folder a step writes (or replaces) overlaps any folder
    it reads. Each argument is ``(what, path)``, ``what`` naming the flag or key for the message;
    a ``None`` path is skipped.

        refuse_overlap(("--output", "/d/raw"), ("--input", "/d/raw")) -> PathOverlapError
    """
    wname, wpath = written
    for rname, rpath in read:
        if rpath is not None and overlap(wpath, rpath):
            raise PathOverlapError(f"{wname} {wpath} overlaps {rname} {rpath}: a step would write or delete its own "
                                   "input; use folders that are apart")
