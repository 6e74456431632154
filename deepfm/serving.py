"""The exported model in use: ``Predictor.load("model.pt2").predict(rows)``.

Loads and runs with torch, numpy, xxhash and pyyaml only: no torchrec, no fbgemm, no pyspark (the graph
is plain aten, see deepfm.export; the id rules are pipeline.rows, the card pipeline.artifact).

    >>> p = Predictor.load("model.pt2")
    >>> p.predict([{"I1": "5", "C1": "68fd1e64"}, {"I1": 3, "C3": ""}])     # raw values; absent = missing
    array([0.0321, 0.0158])
    >>> p.predict([{"I1": "five"}])
    ValueError: row 0: I1: 'five' is not a number (the featurize job rejects such a line: non_numeric)

A load checks the archive: that it is this project's export, of a version this code reads, and that its
golden set (raw rows and the probabilities the eager model gave them at export) comes out the same
through this featurizer and this graph; :class:`pipeline.artifact.ArtifactError` otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipeline import artifact as A
from pipeline.rows import RowFeaturizer


def probability(logit: np.ndarray) -> np.ndarray:
    """The artifact's logits (sampling correction included) -> calibrated probabilities, in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logit, dtype=np.float64)))


class Predictor:
    """A loaded model: raw rows -> ids (:attr:`featurizer`) -> calibrated logits (the graph) -> probabilities."""

    def __init__(self, path: Path, program: Any, card: A.ModelCard, vocabulary: Mapping[str, np.ndarray]):
        self.path = path
        self.card = card
        self.featurizer = RowFeaturizer(card.manifest.contract, card.manifest.boundaries, vocabulary)
        self._program = program
        self._module = program.module()

    @classmethod
    def load(cls, path: str | Path, check: bool = True) -> "Predictor":
        """The model at ``path``; with ``check`` (the default) its golden set is verified."""
        path = Path(path)
        card = A.read_card(path)                  # refuses a foreign or truncated file before torch reads it
        vocabulary = A.read_vocabulary(path)
        try:
            program = torch.export.load(str(path))
        except Exception as e:                    # torch raises several types for a damaged archive
            raise A.ArtifactError(f"{path}: torch.export.load failed: {type(e).__name__}: {e}") from None
        p = cls(path, program, card, vocabulary)
        if check:
            p.check_golden()
        return p

    @property
    def fingerprint(self) -> str:
        return self.card.model_fingerprint

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.card.field_names

    def check_golden(self) -> int:
        """Every golden row through this featurizer and graph: the ids and the probability (within
        pipeline.artifact.GOLDEN_TOLERANCE) the export recorded; :class:`ArtifactError` naming the first
        row that differs. Returns the rows checked."""
        g = self.card.golden
        if not g:
            return 0
        ids = self.featurizer.ids([r.row for r in g])
        want = np.array([r.ids for r in g], dtype=np.int64)
        bad = np.flatnonzero((ids != want).any(axis=1))
        if len(bad):
            i = int(bad[0])
            raise A.ArtifactError(f"{self.path}: golden row {i} gets ids {ids[i].tolist()}, the export recorded "
                                  f"{want[i].tolist()}: the id rules differ from the training data's")
        p = self.predict_ids(ids)
        expected = np.array([r.probability for r in g])
        diff = np.abs(p - expected)
        if not (diff <= A.GOLDEN_TOLERANCE).all():
            i = int(np.argmax(diff))
            raise A.ArtifactError(f"{self.path}: golden row {i} scores {p[i]:.7f}, the export recorded "
                                  f"{expected[i]:.7f}: the graph does not compute what was exported")
        return len(g)

    def ids(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Raw rows -> ids int64 [B, F], by the featurize job's rules; ValueError naming a rejected field."""
        return self.featurizer.ids(rows)

    @torch.inference_mode()
    def logits_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, F] (the featurized data's) -> calibrated logits float32 [B]."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return self._module(x).numpy()

    def predict_ids(self, ids: np.ndarray) -> np.ndarray:
        return probability(self.logits_of_ids(ids))

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Raw rows (column -> value as in the logs: text or a number; "" or absent = missing) -> the
        probability of a click, calibrated to the traffic before negative sampling, float64 [B]."""
        return self.predict_ids(self.ids(rows))
