"""On-disk names and layouts, stated once: the markers and files every step writes or reads.

No pyspark and no torch import: the orchestrator (pipeline.retrain), the Spark job and the trainer all
use these names, so none of them has to copy a helper to avoid importing another's stack.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

SUCCESS = "_SUCCESS"            # written last into a featurized (or scored) output: it is complete
MANIFEST = "manifest.json"      # the featurized data's manifest (pipeline.manifest reads and writes it)

# --- a featurized output's folders ---------------------------------------------------------------------
# (train/, valid/, test/ are pipeline.manifest.SPLITS)
VOCAB = "vocab"                 # OUTPUT/vocab: the frequent ids of the min_count fields
REJECTS = "rejects"             # OUTPUT/rejects: the malformed lines, their day and reason
CATALOGUE = "catalogue"         # OUTPUT/catalogue (recall contracts): one row per item, featurized
SEEN = "seen"                   # OUTPUT/seen (recall): each (user, item) clicked, with its first day
USERS = "users"                 # OUTPUT/users (recall): user_index and the raw user key
USER_INDEX = "user_index"       # recall splits' dense index of the raw user key (hash ids may collide)
ITEM_INDEX = "item_index"       # ... and of the raw item key: the catalogue's row
SAMPLE_PROB = "sample_prob"     # recall splits with random negatives: the probability the row's item was drawn
ITEM_KEY = "item_key"           # catalogue: the raw item key (text)
USER_KEY = "user_key"           # users: the raw user key (text)
TRAIN_COUNT = "train_count"     # catalogue: the item's positives in the train days
LOG_Q = "log_q"                 # catalogue: ln((train_count + 1) / (train positives + items)), the logQ correction
FIRST_DAY = "first_day"         # seen: the first day the user clicked the item
PAIRS = "recall_pairs"          # STAGING/recall_pairs: per (user key, item key) aggregates, deleted before the commit
                                # (not "_pairs": Spark's reader ignores a path starting with "_" and warns)
WRITTEN = "_all"                # STAGING/_all: the one flat write, before its files move into the splits
DIRECT = "_direct"              # STAGING/_direct/<split>: a big valid or test split written without the shuffle
STAGING_INFIX = ".__staging-"   # OUTPUT.__staging-<id>: where a run writes, renamed to OUTPUT at the end
OLD_INFIX = ".__old-"           # OUTPUT.__old-<id>: the replaced output (--overwrite), deleted after the rename

# --- a scored output (jobs/score.py): SCORES/scores, SCORES/rejects (as above), scores.json, _SUCCESS ---
SCORED = "scores"               # SCORES/scores: Parquet, per row a key, the label, the logit, the probability
SCORES_MANIFEST = "scores.json"  # what was scored, with which model, and what was rejected


def staging_dir(output: str, token: str) -> str:
    """The staging folder beside ``output``: ``/d/feat``, ``ab12`` -> ``/d/feat.__staging-ab12``."""
    return f"{output}{STAGING_INFIX}{token}"


def old_dir(output: str, token: str) -> str:
    """Where ``--overwrite`` moves the replaced output: ``/d/feat``, ``ab12`` -> ``/d/feat.__old-ab12``."""
    return f"{output}{OLD_INFIX}{token}"


def local_path(path: str) -> str | None:
    """A local path (no scheme, or ``file:``) as its real absolute form, or None for another file
    system's URL: ``file:/d/raw`` -> ``/d/raw``; ``hdfs://nn/d/raw`` -> None."""
    return _local(path)


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


# --- raw day files ------------------------------------------------------------------------------------

DONE_SUFFIX = ".done"           # day_<N>.done beside day_<N>: the producer says the day is complete


def day_file_name(file_pattern: str, day: int) -> str:
    """The file name a writer gives day ``day`` under the contract's ``source.file_pattern`` (a regular
    expression whose first group captures the day): the literal text before the group, the number, and
    the literal text after it up to the first optional or special part. The name is checked against the
    pattern, so a pattern this cannot render is an error, not a wrong name.

        day_file_name(r"day_(\\d+)(\\.gz)?$", 3) -> "day_3";  day_file_name(r"^log-(\\d+)\\.tsv$", 12) -> "log-12.tsv"
    """
    pat = file_pattern.lstrip("^")
    m = re.match(r"((?:[^\\()\[\]{}.*+?|^$]|\\.)*)\((?:\?P<\w+>)?\\d\+\)((?:[^\\()\[\]{}.*+?|^$]|\\.)*)", pat)
    if m is None:
        raise ValueError(f"source.file_pattern {file_pattern!r}: cannot name a day file from it (expected literal "
                         r"text around one (\d+) group, e.g. 'day_(\d+)(\.gz)?$')")
    name = f"{_unescape(m.group(1))}{day}{_unescape(m.group(2))}"
    found = re.search(file_pattern, name)
    if found is None or int(found.group(1)) != day:
        raise ValueError(f"source.file_pattern {file_pattern!r}: the day file name {name!r} made from it does not "
                         "match it")
    return name


def _unescape(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal)


def missing_days(days: Sequence[int]) -> tuple[int, ...]:
    """The day numbers between the first and last of ``days`` that are not among them.

        missing_days([0, 1, 3, 6]) -> (2, 4, 5);  missing_days([]) -> ()
    """
    have = set(days)
    return tuple(d for d in range(min(have), max(have) + 1) if d not in have) if have else ()


def day_ranges(days: Sequence[int]) -> str:
    """Days as short text, consecutive runs joined: ``[2, 4, 5, 6, 9]`` -> ``"2, 4-6, 9"``."""
    out: list[str] = []
    ds = sorted(set(days))
    i = 0
    while i < len(ds):
        j = i
        while j + 1 < len(ds) and ds[j + 1] == ds[j] + 1:
            j += 1
        out.append(str(ds[i]) if i == j else f"{ds[i]}-{ds[j]}")
        i = j + 1
    return ", ".join(out)


def done_marker(day_file: str) -> str:
    """The completeness marker of a day file: ``day_3`` -> ``day_3.done``."""
    return day_file + DONE_SUFFIX


def split_days(days: Sequence[int], valid_days: int, test_days: int) -> dict[str, list[int]]:
    """The day split rule, for featurize and retraining alike: the last ``test_days`` days are test, the
    ``valid_days`` before them valid, the rest train. Raises ValueError when no train day is left.

        ([0, 1, 2, 3], 1, 1) -> {"train": [0, 1], "valid": [2], "test": [3]}
    """
    ds = sorted(days)
    if len(ds) <= valid_days + test_days:
        raise ValueError(f"{len(ds)} day(s) found ({ds}) but {valid_days} valid + {test_days} test day(s) leave none "
                         "to train on")
    t = len(ds) - test_days
    v = t - valid_days
    return {"train": ds[:v], "valid": ds[v:t], "test": ds[t:]}


# --- training runs ----------------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"     # RUN_DIR/checkpoints/step_<N> (rotated) and checkpoints/best
STEP_PREFIX = "step_"
BEST = "best"                   # the weights of the best valid evaluation, outside the rotation
COMPLETE = "COMPLETE"           # written last into a checkpoint folder: only such folders are used
CHECKPOINT_META = "meta.json"   # inside a checkpoint: the trainer's state (deepfm.state.TrainState)
METRICS = "metrics.json"        # RUN_DIR/metrics.json: what the run measured


def step_checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{STEP_PREFIX}{step:09d}"


def best_checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS / BEST


def is_complete_checkpoint(path: Path) -> bool:
    return (path / COMPLETE).exists()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``step_<N>`` checkpoints of a run folder, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete_checkpoint(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``step_<N>`` checkpoint of a run folder, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def best_checkpoint(run_dir: Path) -> Path | None:
    p = best_checkpoint_dir(run_dir)
    return p if is_complete_checkpoint(p) else None


def checkpoint_of(path: Path) -> Path | None:
    """A checkpoint folder itself, or a run folder's latest complete checkpoint (for --warm-start)."""
    return path if is_complete_checkpoint(path) else latest_checkpoint(path)
