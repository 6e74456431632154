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

The graph: ``ids int64 [B, F]`` (F = ``card.manifest.field_names``, the featurize job's ids) -> ``logit
float32 [B]``, the negative-sampling correction included: ``logit = model logit + ln(neg_sample_rate)``, so
``sigmoid(logit)`` is the probability calibrated to the unsampled traffic (the same as
pipeline.metrics.debias of the model's probability). No pyspark and no torch import.
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

ARTIFACT_VERSION = 1
CARD = "card.json"                  # extra_files names inside the archive (stored under <archive>/extra/)
VOCABULARY = "vocabulary.json"
GOLDEN_TOLERANCE = 1e-5             # |probability - expected| allowed when a load checks the golden set


class ArtifactError(ValueError):
    """A model file that cannot be used: not an export of this project, truncated, or of another version."""


@dataclass(frozen=True)
class GoldenRow:
    """One raw row (column -> text as in the logs; None = absent), its ids and the probability the eager
    model gave it at export: a load that computes another probability is refused."""

    row: Mapping[str, str | None]
    ids: tuple[int, ...]
    probability: float


@dataclass(frozen=True)
class ModelCard:
    model_fingerprint: str              # the weights' and the features' hash: what a score came from
    model: str                          # deepfm | fm | lr | dnn
    manifest: Manifest                  # the featurized data the model was trained on (feature facts)
    train_config: Mapping[str, Any]     # the run's settings (deepfm.trainconf.to_overrides)
    metrics: Mapping[str, Any]          # {"valid": {...}, "test": {...}} from the run's metrics.json
    checkpoint: str                     # the checkpoint exported, and its step
    global_step: int
    torch_version: str
    created: str
    golden: tuple[GoldenRow, ...]
    version: int = ARTIFACT_VERSION

    @property
    def feature_fingerprint(self) -> str:
        return self.manifest.feature_fingerprint

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.manifest.field_names

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
        if version != ARTIFACT_VERSION:
            raise ArtifactError(f"{where}: artifact_version {version!r} is not {ARTIFACT_VERSION}, the version this "
                                "code reads; export the model again with this version of deepfm.export")
        body = {k: v for k, v in d.items() if k != "artifact_version"}
        try:
            manifest = Manifest.from_json(body.pop("manifest"), f"{where}: manifest")
            hints = typing.get_type_hints(cls)
            rest = {f.name: decode_typed(hints[f.name], body[f.name], where) for f in dataclasses.fields(cls)
                    if f.name not in ("manifest", "version")}
        except (KeyError, TypeError, ValueError, ManifestError) as e:
            raise ArtifactError(f"{where}: not a readable model card: {type(e).__name__}: {e}") from None
        return cls(manifest=manifest, version=version, **rest)


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
