"""The featurize job's errors (jobs/featurize.py prints them as ``featurize: error: ...`` and exits 2),
and the one Spark failure turned into one: an input file that cannot be read (a truncated ``.gz``)."""
from __future__ import annotations

import re
from typing import Any

# Spark's error class for a task that failed reading an input file; its parameter ``path`` names it
FAILED_READ_FILE = "FAILED_READ_FILE"
# what the file is, by the extension Hadoop picks its codec by
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".zst": "zstd", ".deflate": "deflate", ".lz4": "lz4",
              ".snappy": "snappy"}
# what Hadoop's decompressors throw for a cut or damaged stream (not FileNotFoundException and the like)
DECOMPRESSION_ERRORS = ("java.io.EOFException", "java.io.IOException", "java.lang.InternalError")
_READING = re.compile(r"Encountered error while reading file (\S+?)\.?\s")


class FeaturizeError(RuntimeError):
    """The job cannot go on; the message says why. Nothing is committed to the output."""


class RejectLimitError(FeaturizeError):
    """More lines are malformed than the contract allows. The staging folder is kept with the rejected
    lines and their reasons, for inspection; nothing is committed."""


def _causes(java_exc: Any) -> list[Any]:
    """A Java throwable and its causes, outermost first (cycles cut)."""
    out: list[Any] = []
    while java_exc is not None and len(out) < 50 and all(not java_exc.equals(x) for x in out):
        out.append(java_exc)
        java_exc = java_exc.getCause()
    return out


def _error_class(java_exc: Any) -> str:
    try:
        return str(java_exc.getCondition() or "")
    except Exception:           # not a SparkThrowable
        return ""


def read_failure(e: BaseException, path: str | None = None) -> FeaturizeError | None:
    """Spark's (or the driver's) failure to read an input file, as one line naming the file and the
    innermost Java message, or None when ``e`` is something else. ``path``: the file, when the caller
    knows it (a driver-side read); otherwise it comes from Spark's ``FAILED_READ_FILE`` error.

        FAILED_READ_FILE(path=.../day_1.gz) <- java.io.EOFException: Unexpected end of input stream
        -> ".../day_1.gz: truncated or corrupt gzip (java.io.EOFException: Unexpected end of input stream);
            nothing was committed"
    """
    java_exc = getattr(e, "java_exception", None)          # py4j.protocol.Py4JJavaError
    if java_exc is None:
        java_exc = getattr(e, "_origin", None)               # pyspark's CapturedException
    if java_exc is None:
        return None
    try:
        chain = _causes(java_exc)
        if path is None:
            for j in chain:
                if _error_class(j).startswith(FAILED_READ_FILE):
                    path = str(j.getMessageParameters().get("path"))
                    break
        if path is None:
            m = _READING.search(str(java_exc.toString()))
            path = m.group(1) if m else None
        if path is None:
            return None
        root = str(chain[-1].toString())
        root_class = str(chain[-1].getClass().getName())
    except Exception:           # the gateway is gone or the exception is not what it seems: report e as is
        return None
    ext = next((x for x in COMPRESSED if path.endswith(x)), None)
    corrupt = ext is not None and (root_class in DECOMPRESSION_ERRORS or root_class.startswith("java.util.zip."))
    what = f"truncated or corrupt {COMPRESSED[ext]}" if corrupt and ext else "cannot be read"
    return FeaturizeError(f"{path}: {what} ({root}); nothing was committed")
