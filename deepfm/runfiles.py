"""The files a training run leaves for people to look at, beside metrics.json: what deepfm.report draws
and deepfm.compare tabulates without loading the model. deepfm/train.py's rank 0 writes them at the end
of the run, each atomically (a temporary file renamed into place), before metrics.json, so a run folder
with a metrics.json of this trainer has them. numpy and json only: no torch import.

    RUN/curves.json             {"train_loss": {"every": 10, "points": [[step, loss], ...], "what": "..."}}
    RUN/predictions/test.npz    p: float32, the test rows' probabilities after the sampling correction;
                                y: uint8 labels; rows: the split's rows; kept: len(p); seed

``points``: the mean train loss of rank 0's batches over the ``every`` steps up to ``step`` (the loss the
progress bar shows, on the sampled train rows: not comparable with the valid logloss). A test split of
more than :data:`MAX_PREDICTIONS` rows keeps a uniform sample of that many (without replacement, seeded:
the same rows every time for the same row count), which is plenty for an ROC curve and a reliability
diagram; ``kept`` < ``rows`` says so.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CURVES = "curves.json"
PREDICTIONS = "predictions"
MAX_PREDICTIONS = 1_000_000
SUBSAMPLE_SEED = 20170313              # fixed: the kept rows depend on the row count only
LOSS_POINTS = 500                      # about this many points per run, whatever its length


def loss_every(total_steps: int) -> int:
    """The interval (in steps, a multiple of 10) between loss points for a run of ``total_steps`` steps:
    10 for up to 5,000 steps, then about :data:`LOSS_POINTS` points in all.

        loss_every(60) -> 10;  loss_every(33_000) -> 70
    """
    return 10 * max(1, math.ceil(total_steps / LOSS_POINTS / 10))


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_curves(run: Path, train_loss: Sequence[Sequence[float]], every: int) -> Path:
    """RUN/curves.json with the loss points ``[[step, mean loss], ...]`` (compact: one line)."""
    body = {"train_loss": {"every": every, "points": [[int(s), float(v)] for s, v in train_loss],
                           "what": "mean train loss of rank 0's batches over the steps since the previous point "
                                   "(sampled train rows, before the sampling correction)"}}
    p = Path(run) / CURVES
    _replace(p, json.dumps(body, separators=(",", ":")).encode())
    return p


def read_curves(run: Path) -> dict[str, Any] | None:
    """RUN/curves.json, or None when the run has none (a run of an older trainer)."""
    try:
        d = json.loads((Path(run) / CURVES).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def predictions_path(run: Path, split: str = "test") -> Path:
    return Path(run) / PREDICTIONS / f"{split}.npz"


def subsample(rows: int, limit: int = MAX_PREDICTIONS) -> np.ndarray | None:
    """The sorted indices of the rows kept out of ``rows`` (None: all are kept)."""
    if rows <= limit:
        return None
    return np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(rows, size=limit, replace=False))


def write_predictions(run: Path, split: str, p: np.ndarray, y: np.ndarray, limit: int = MAX_PREDICTIONS) -> dict:
    """RUN/predictions/<split>.npz from the split's (probability after the sampling correction, label)
    of every row; above ``limit`` rows a seeded uniform sample of ``limit``. Returns what it wrote:
    ``{"path": "predictions/test.npz", "rows": 25000, "kept": 25000}``."""
    keep = subsample(len(y), limit)
    pk, yk = (p, y) if keep is None else (p[keep], y[keep])
    buf = io.BytesIO()
    np.savez_compressed(buf, p=np.asarray(pk, dtype=np.float32), y=np.asarray(yk).astype(np.uint8),
                        rows=np.int64(len(y)), kept=np.int64(len(yk)), seed=np.int64(SUBSAMPLE_SEED))
    path = predictions_path(run, split)
    _replace(path, buf.getvalue())
    return {"path": str(path.relative_to(run)), "rows": int(len(y)), "kept": int(len(yk))}


@dataclass(frozen=True)
class Predictions:
    p: np.ndarray           # float32, after the sampling correction
    y: np.ndarray           # uint8
    rows: int               # the split's rows (> len(p) when subsampled)

    @property
    def subsampled(self) -> bool:
        return len(self.y) < self.rows


def read_predictions(run: Path, split: str = "test") -> Predictions | None:
    """RUN/predictions/<split>.npz, or None when the run has none."""
    try:
        with np.load(predictions_path(run, split)) as z:
            return Predictions(z["p"], z["y"], int(z["rows"]))
    except (OSError, ValueError, KeyError):
        return None
