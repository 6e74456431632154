"""The exported model in use: ``Predictor.load("model.pt2").predict(rows)``; a two_tower's user tower:
``UserEncoder.load("user_tower.pt2").vectors(rows)``.

Loads and runs with torch, numpy, xxhash and pyyaml only: no torchrec, no fbgemm, no pyspark (the graph
is plain aten, see deepfm.export; the id rules are pipeline.rows, the card pipeline.artifact).

    >>> p = Predictor.load("model.pt2")
    >>> p.predict([{"I1": "5", "C1": "68fd1e64"}, {"I1": 3, "C3": ""}])     # raw values; absent = missing
    array([0.0321, 0.0158])
    >>> p.predict([{"I1": "five"}])
    ValueError: row 0: I1: 'five' is not a number (the featurize job rejects such a line: non_numeric)

A load checks the archive: that it is this project's export, of a version this code reads, and that its
golden set (raw rows and the probabilities the eager model gave them at export) comes out the same
through this featurizer and this graph; :class:`pipeline.artifact.ArtifactError` otherwise. Each class
refuses the other's kind of graph (the card's ``graph``).

A contract with list-valued fields (an item's genres ``Comedy|Drama``) gives the graph its ids padded to each
list field's ``max_length`` (pipeline.artifact.InputLayout); rows hold such a field as its text (split at the
list's delimiter) or as a list of values.
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


class _Loaded:
    """What both loaded kinds share: the card, the featurizer of its contract, the program, the input layout."""

    GRAPH = A.LOGIT
    OTHER = ""                                    # the class that loads the other graph kind, for the refusal

    def __init__(self, path: Path, program: Any, card: A.ModelCard, vocabulary: Mapping[str, np.ndarray]):
        self.path = path
        self.card = card
        self.featurizer = RowFeaturizer(card.manifest.contract, card.manifest.boundaries, vocabulary)
        self.layout = card.layout
        self._program = program
        self._module = program.module()

    @classmethod
    def _read(cls, path: str | Path) -> tuple[Path, Any, A.ModelCard, dict[str, np.ndarray]]:
        path = Path(path)
        card = A.read_card(path)                  # refuses a foreign or truncated file before torch reads it
        if card.graph != cls.GRAPH:
            raise A.ArtifactError(f"{path}: its graph computes a {card.graph} (model {card.model}), not a {cls.GRAPH}: "
                                  f"load it with deepfm.serving.{cls.OTHER}")
        vocabulary = A.read_vocabulary(path)
        try:
            program = torch.export.load(str(path))
        except Exception as e:                    # torch raises several types for a damaged archive
            raise A.ArtifactError(f"{path}: torch.export.load failed: {type(e).__name__}: {e}") from None
        return path, program, card, vocabulary

    @property
    def fingerprint(self) -> str:
        return self.card.model_fingerprint

    @property
    def field_names(self) -> tuple[str, ...]:
        """The fields the graph reads, in its input's order."""
        return self.card.field_names

    def ids(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Raw rows -> the graph's ids int64 [B, W] (pipeline.artifact.InputLayout; [B, F] without list
        fields), by the featurize job's rules; ValueError naming a rejected field."""
        return A.graph_ids(self.featurizer, self.layout, rows)

    def _golden_ids(self) -> np.ndarray:
        """The golden rows' ids, refused (naming the first row that differs) when not the export's."""
        g = self.card.golden
        ids = self.ids([r.row for r in g])
        want = np.array([r.ids for r in g], dtype=np.int64)
        bad = np.flatnonzero((ids != want).any(axis=1)) if ids.shape == want.shape else np.array([0])
        if len(bad):
            i = int(bad[0])
            raise A.ArtifactError(f"{self.path}: golden row {i} gets ids {ids[i].tolist()}, the export recorded "
                                  f"{want[i].tolist()}: the id rules differ from the training data's")
        return ids


class Predictor(_Loaded):
    """A loaded model: raw rows -> ids (:attr:`featurizer`) -> calibrated logits (the graph) -> probabilities."""

    GRAPH = A.LOGIT
    OTHER = "UserEncoder"

    @classmethod
    def load(cls, path: str | Path, check: bool = True) -> "Predictor":
        """The model at ``path``; with ``check`` (the default) its golden set is verified."""
        p = cls(*cls._read(path))
        if check:
            p.check_golden()
        return p

    def check_golden(self) -> int:
        """Every golden row through this featurizer and graph: the ids and the probability (within
        pipeline.artifact.GOLDEN_TOLERANCE) the export recorded; :class:`ArtifactError` naming the first
        row that differs. Returns the rows checked."""
        g = self.card.golden
        if not g:
            return 0
        ids = self._golden_ids()
        p = self.predict_ids(ids)
        expected = np.array([r.probability for r in g], dtype=np.float64)
        diff = np.abs(p - expected)
        if not (diff <= A.GOLDEN_TOLERANCE).all():
            i = int(np.argmax(diff))
            raise A.ArtifactError(f"{self.path}: golden row {i} scores {p[i]:.7f}, the export recorded "
                                  f"{expected[i]:.7f}: the graph does not compute what was exported")
        return len(g)

    @torch.inference_mode()
    def logits_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, W] (the featurized data's: :meth:`ids`) -> calibrated logits float32 [B]."""
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


class UserEncoder(_Loaded):
    """A loaded two_tower user tower (deepfm.export): raw rows of user and context fields -> ids -> user
    vectors float32 [B, K]. A user's score of an item is the inner product with the item's vector (the
    catalogue's, exported beside it: :attr:`retrieval`); item fields in a row are ignored.

        >>> e = UserEncoder.load("user_tower.pt2")
        >>> e.vectors([{"user_id": "u000042", "user_age": "25-34", "hour": "20"}]).shape
        (1, 49)
    """

    GRAPH = A.USER_VECTOR
    OTHER = "Predictor"

    @classmethod
    def load(cls, path: str | Path, check: bool = True) -> "UserEncoder":
        """The user tower at ``path``; with ``check`` (the default) its golden set is verified: each golden
        row's ids, and its vector within pipeline.artifact.VECTOR_TOLERANCE."""
        e = cls(*cls._read(path))
        if check:
            e.check_golden()
        return e

    @property
    def retrieval(self) -> A.RetrievalInfo:
        """The item side exported with it (the item vectors' file name and digest, the index)."""
        if self.card.retrieval is None:
            raise A.ArtifactError(f"{self.path}: its card names no item vectors")
        return self.card.retrieval

    @property
    def dim(self) -> int:
        return self.retrieval.dim

    def check_golden(self) -> int:
        """Every golden row through this featurizer and graph: the ids and the vector the export recorded;
        :class:`ArtifactError` naming the first row that differs. Returns the rows checked."""
        g = self.card.golden
        if not g:
            return 0
        ids = self._golden_ids()
        got = self.vectors_of_ids(ids).astype(np.float64)
        want = np.array([r.vector for r in g], dtype=np.float64)
        diff = np.abs(got - want).max(axis=1) if got.shape == want.shape else np.array([np.inf])
        if not (diff <= A.VECTOR_TOLERANCE).all():
            i = int(np.argmax(diff))
            raise A.ArtifactError(f"{self.path}: golden row {i}'s vector is {diff[i]:.3g} from the one the export "
                                  "recorded: the graph does not compute what was exported")
        return len(g)

    @torch.inference_mode()
    def vectors_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, W] (:meth:`ids`) -> user vectors float32 [B, K]."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return self._module(x).numpy()

    def vectors(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Raw rows (column -> value as in the logs; "" or absent = missing) -> user vectors float32 [B, K]."""
        return self.vectors_of_ids(self.ids(rows))
