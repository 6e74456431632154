"""The exported model's card: everything besides the graph that a ``model.pt2`` holds, as one typed object.

``python -m deepfm.export`` writes a ``torch.export`` archive whose ``extra_files`` hold
:data:`CARD` (a :class:`ModelCard`: the featurized data's whole manifest, so the contract, field order,
table sizes, boundaries and sampling travel with the model; the training settings; the valid and test
metrics; a golden set) and :data:`VOCABULARY` (the frequent ids of the ``min_count`` fields). deepfm.serving
loads the graph with torch; this module reads the card with the standard library alone (a ``.pt2`` is a zip
archive), so the Spark scoring job's driver needs no torch to featurize with the model's own rules.

    >>> card = read_card("model.pt2")
    >>> card.manifest.contract.name, card.neg_sample_rate, card.metrics["test"]["auc"]
    ('criteo_small', 0.25, 0.7713)

The graph (:attr:`ModelCard.graph`) takes ``ids int64 [B, W]``: the ids of the card's input fields
(:attr:`ModelCard.inputs`; all the manifest's fields, in its order, for a ranker) laid out by
:class:`InputLayout`: one column per single-valued field, ``max_length`` columns per list-valued field (its
ids, then :data:`PAD_ID`), so W = F when the contract has no list field. What it returns:

- ``logit`` (DeepFM and every ranking kind): ``logit float32 [B]``, the negative-sampling correction
  included: ``logit = model logit + ln(neg_sample_rate)``, so ``sigmoid(logit)`` is the probability
  calibrated to the unsampled traffic (the same as pipeline.metrics.debias of the model's probability);
- ``user_vector`` (two_tower's user tower, docs/recall.md): ``vector float32 [B, K]`` from the user and
  context fields alone; a user's score of an item is <vector, item vector>, the item vectors of the whole
  catalogue exported beside it (:attr:`ModelCard.retrieval`).

No pyspark and no torch import.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.manifest import Manifest, ManifestError, decode_typed, encode_typed

ARTIFACT_VERSION = 2                # 2: the graph kind, its input fields, list fields, golden vectors, retrieval
READABLE_VERSIONS = (1, 2)          # a version 1 card is a ranker over every field (the defaults of the new keys)
CARD = "card.json"                  # extra_files names inside the archive (stored under <archive>/extra/)
VOCABULARY = "vocabulary.json"
GOLDEN_TOLERANCE = 1e-5             # |probability - expected| allowed when a load checks the golden set
VECTOR_TOLERANCE = 1e-4             # max |vector - expected| allowed (vectors are not squashed into [0, 1])
LOGIT = "logit"                     # ModelCard.graph: ids -> calibrated logit [B] (deepfm.serving.Predictor)
USER_VECTOR = "user_vector"         # ids of the user tower's fields -> vector [B, K] (deepfm.serving.UserEncoder)
GRAPHS = (LOGIT, USER_VECTOR)
PAD_ID = -1                         # a list-valued field's unused columns in the graph's input


class ArtifactError(ValueError):
    """A model file that cannot be used: not an export of this project, truncated, or of another version."""


@dataclass(frozen=True)
class GoldenRow:
    """One raw row (column -> text as in the logs; None = absent), its graph input ids and what the eager
    model gave it at export (the probability of a ``logit`` graph, the vector of a ``user_vector`` one):
    a load that computes something else is refused."""

    row: Mapping[str, str | None]
    ids: tuple[int, ...]
    probability: float | None = None
    vector: tuple[float, ...] | None = None


@dataclass(frozen=True)
class IndexInfo:
    """A faiss index over the exported item vectors (deepfm.retrieval.build_index), and how well it finds
    the exact search's top ``k`` for ``queries`` user vectors of the held-out split (``recall``, the mean
    share: deepfm.retrieval.ann_recall; 1.0 for ``flat``)."""

    kind: str                           # flat | hnsw
    file: str                           # its file name, beside the model
    k: int
    queries: int
    recall: float
    build_seconds: float


@dataclass(frozen=True)
class RetrievalInfo:
    """The item side of a ``user_vector`` artifact: the catalogue's vectors (deepfm.retrieval.ItemVectors,
    Parquet keyed by the raw item key) written beside the model, their digest (:func:`items_digest`:
    a retrieval refuses vectors of another model), how far the plain item tower was from the eager one."""

    items: int
    dim: int
    items_file: str                     # its file name, beside the model
    items_digest: str
    item_max_diff: float
    index: IndexInfo | None = None


@dataclass(frozen=True)
class ModelCard:
    model_fingerprint: str              # the weights' and the features' hash: what a score came from
    model: str                          # deepfm | fm | lr | dnn | ... | two_tower (deepfm.model.KINDS)
    manifest: Manifest                  # the featurized data the model was trained on (feature facts)
    train_config: Mapping[str, Any]     # the run's settings (deepfm.trainconf.to_overrides)
    metrics: Mapping[str, Any]          # {"valid": {...}, "test": {...}} from the run's metrics.json
    checkpoint: str                     # the checkpoint exported, and its step
    global_step: int
    torch_version: str
    created: str
    golden: tuple[GoldenRow, ...]
    graph: str = LOGIT                  # what the graph computes: one of GRAPHS
    inputs: tuple[str, ...] = ()        # the fields the graph reads, in order; () = the manifest's, all of them
    retrieval: RetrievalInfo | None = None  # user_vector: the item vectors (and index) exported with it
    version: int = ARTIFACT_VERSION

    @property
    def feature_fingerprint(self) -> str:
        return self.manifest.feature_fingerprint

    @property
    def field_names(self) -> tuple[str, ...]:
        """The fields the graph reads, in its input's order."""
        return self.inputs or self.manifest.field_names

    @property
    def layout(self) -> "InputLayout":
        return InputLayout.of(self.manifest, self.field_names)

    @property
    def neg_sample_rate(self) -> float:
        return self.manifest.sampling.neg_sample_rate

    @property
    def logit_offset(self) -> float:
        """ln(neg_sample_rate): what the graph adds to the model's logit (0 without sampling)."""
        return math.log(self.neg_sample_rate)

    def dumps(self) -> str:
        d = encode_typed(self)
        d["manifest"] = self.manifest.to_json()
        return json.dumps({"artifact_version": d.pop("version"), **d}, indent=1)

    @classmethod
    def loads(cls, text: str, where: str = "model card") -> "ModelCard":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ArtifactError(f"{where}: not JSON: {e}") from None
        version = d.get("artifact_version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise ArtifactError(f"{where}: artifact_version {version!r} is not one of "
                                f"{', '.join(map(str, READABLE_VERSIONS))}, the versions this code reads; export the "
                                "model again with this version of deepfm.export")
        body = {k: v for k, v in d.items() if k != "artifact_version"}
        try:
            manifest = Manifest.from_json(body.pop("manifest"), f"{where}: manifest")
            hints = typing.get_type_hints(cls)
            rest = {f.name: decode_typed(hints[f.name], body[f.name], where) for f in dataclasses.fields(cls)
                    if f.name not in ("manifest", "version")
                    and (f.name in body or f.default is dataclasses.MISSING)}     # keys added later: defaults
        except (KeyError, TypeError, ValueError, ManifestError) as e:
            raise ArtifactError(f"{where}: not a readable model card: {type(e).__name__}: {e}") from None
        if rest.get("graph", LOGIT) not in GRAPHS:
            raise ArtifactError(f"{where}: graph {rest['graph']!r} is not one of {', '.join(GRAPHS)}")
        return cls(manifest=manifest, version=version, **rest)


# --- the graph's input: ids [B, W], list-valued fields padded ------------------------------------------

@dataclass(frozen=True)
class InputLayout:
    """How a graph's ``ids int64 [B, W]`` hold its fields' ids: field j takes ``widths[j]`` columns from
    ``starts[j]``, 1 for a single-valued field, ``max_length`` for a list-valued one (its ids first, then
    :data:`PAD_ID`; an empty list is the one id 0, so every list has at least one id).

        fields (a, g: a list of max_length 3): rows a=4 g=[5, 6], a=7 g=[0] -> [[4, 5, 6, -1], [7, 0, -1, -1]]
    """

    fields: tuple[str, ...]
    widths: tuple[int, ...]
    poolings: tuple[str, ...]           # sum | mean (a single-valued field: sum of its one row)

    @classmethod
    def of(cls, m: Manifest, names: tuple[str, ...] | None = None) -> "InputLayout":
        """The layout of the manifest's fields ``names`` (default all), in the order given."""
        by = {f.name: f for f in m.fields}
        names = tuple(names) if names else m.field_names
        unknown = [n for n in names if n not in by]
        if unknown:
            raise ArtifactError(f"input field {unknown[0]!r} is not a field of the manifest")
        return cls(names, tuple((by[n].max_length or 1) if by[n].is_list else 1 for n in names),
                   tuple(by[n].pooling or "sum" for n in names))

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def starts(self) -> tuple[int, ...]:
        out, s = [], 0
        for w in self.widths:
            out.append(s)
            s += w
        return tuple(out)

    @property
    def has_lists(self) -> bool:
        return self.width != len(self.fields)

    def pad(self, jagged: Mapping[str, tuple[np.ndarray, np.ndarray]], rows: int) -> np.ndarray:
        """Per field ``(values, lengths)`` (pipeline.rows.RowFeaturizer.ids_jagged) -> ids ``int64 [rows, W]``;
        a list longer than its width keeps its first ids (the featurize job's ``max_length``)."""
        out = np.full((rows, self.width), PAD_ID, dtype=np.int64)
        for name, start, width in zip(self.fields, self.starts, self.widths):
            values, lengths = jagged[name]
            lengths = np.asarray(lengths, dtype=np.int64)
            if width == 1:
                first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
                out[:, start] = np.asarray(values, dtype=np.int64)[first]
                continue
            row = np.repeat(np.arange(rows), lengths)
            pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            keep = pos < width
            out[row[keep], start + pos[keep]] = np.asarray(values, dtype=np.int64)[keep]
        return out

    def pad_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Featurized Parquet columns (a single-valued field's ids [N]; a list field's id lists, e.g.
        pyarrow's ``to_pylist()``) -> ids ``int64 [N, W]``."""
        jagged = {}
        n = 0
        for name, width in zip(self.fields, self.widths):
            col = columns[name]
            if width == 1 and not (len(col) and isinstance(col[0], (list, tuple, np.ndarray))):
                v = np.asarray(col, dtype=np.int64)
                jagged[name] = (v, np.ones(len(v), np.int64))
            else:
                lists = [list(x) if x is not None and len(x) else [0] for x in col]
                jagged[name] = (np.array([i for x in lists for i in x], dtype=np.int64),
                                np.array([len(x) for x in lists], dtype=np.int64))
            n = len(col)
        return self.pad(jagged, n)

    def jagged(self, ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The inverse of :meth:`pad`: ids [B, W] -> per field (values, lengths), the padding dropped."""
        out = {}
        for name, start, width in zip(self.fields, self.starts, self.widths):
            block = np.asarray(ids[:, start:start + width])
            keep = block != PAD_ID
            out[name] = (block[keep].astype(np.int64), keep.sum(1).astype(np.int64))
        return out


# --- the vocabulary: per field, the kept ids as base64 of little-endian int32 ----------------------------

def encode_vocabulary(vocab: Mapping[str, np.ndarray]) -> str:
    """field -> kept ids (any int array) -> the JSON text of :data:`VOCABULARY` (ids sorted)."""
    return json.dumps({k: base64.b64encode(np.sort(np.asarray(v, dtype="<i4")).tobytes()).decode()
                       for k, v in vocab.items()})


def decode_vocabulary(text: str, where: str = VOCABULARY) -> dict[str, np.ndarray]:
    try:
        return {k: np.frombuffer(base64.b64decode(v), dtype="<i4").astype(np.int64)
                for k, v in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{where}: not a vocabulary: {e}") from None


# --- reading the archive without torch -------------------------------------------------------------------

def read_extra(path: str | Path, name: str) -> str:
    """The text of extra file ``name`` in the torch.export archive at ``path``; :class:`ArtifactError`
    when the file is not such an archive (or truncated) or lacks it."""
    try:
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.endswith(f"/extra/{name}") or n == f"extra/{name}"]
            if not members:
                raise ArtifactError(f"{path}: no {name} inside: not a model exported by deepfm.export")
            return z.read(members[0]).decode()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable model archive ({e}); truncated or not a .pt2?") from None


def read_card(path: str | Path) -> ModelCard:
    return ModelCard.loads(read_extra(path, CARD), f"{path}: {CARD}")


def read_vocabulary(path: str | Path) -> dict[str, np.ndarray]:
    return decode_vocabulary(read_extra(path, VOCABULARY), f"{path}: {VOCABULARY}")


def graph_ids(featurizer: Any, layout: InputLayout, rows: Any) -> np.ndarray:
    """Raw rows -> the graph's ids ``int64 [B, W]`` by the featurize job's rules (a
    pipeline.rows.RowFeaturizer): its ``ids`` when the contract has no list field (W = the layout's fields),
    else its ``ids_jagged`` padded; ValueError naming the row and field of a value the job would reject."""
    c = featurizer.contract
    if not any(f.list is not None for f in c.categorical):
        ids = featurizer.ids(rows)
        if layout.fields == c.field_names:
            return ids
        return ids[:, [c.field_names.index(n) for n in layout.fields]]
    return layout.pad(featurizer.ids_jagged(rows), len(rows))


def items_digest(keys: Any, index: Any, vectors: Any) -> str:
    """sha256 of the item keys, catalogue indexes and vectors (float32, row order): 16 hex digits. The user
    tower's card records that of the item vectors exported with it; a retrieval refuses others.

        items_digest(["a"], [0], [[1.0, 2.0]]) -> "..." (the same for the same three, whatever their dtypes)
    """
    import hashlib
    h = hashlib.sha256()
    h.update("\n".join(str(k) for k in keys).encode())
    h.update(np.ascontiguousarray(index, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    return h.hexdigest()[:16]
