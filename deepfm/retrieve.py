"""python -m deepfm.retrieve --model USER_TOWER.pt2 --items ITEMS.parquet [--index ITEMS.flat.faiss]
    (--user-row ROW | --rows FILE|-) [--k 100] [--exclude KEY,KEY]

Raw user rows -> the top K raw item keys of the whole catalogue by the two-tower score, as JSON lines:

    $ python -m deepfm.retrieve --model run/user_tower.pt2 --items run/items.parquet --k 3 \\
          --user-row '{"user_id": "u000042", "user_age": "25-34", "hour": "20"}'
    {"row": 0, "items": ["i001234", "i000017", "i002051"], "scores": [7.91, 7.52, 7.50]}

A row is a JSON object of raw fields (column -> text as in the logs, or a number; a list field's text or a
list; absent = missing; item fields are ignored) or a raw log line in the contract's layout (every column,
the label's too). ``--rows`` reads one row a line from a file (``-``: stdin). Items a user already has are
left out: ``--exclude`` for every row, and a JSON row's own ``"exclude": [keys]`` (when the contract has no
column of that name). The user tower is deepfm.serving.UserEncoder (its golden set checked on load); the
item vectors must be the ones exported with it (their digest is in its card); the search is the exact one
(deepfm.retrieval.exact_topk) or, with ``--index``, the faiss index exported beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

import numpy as np

from deepfm.retrieval import ItemVectors, exact_topk, search
from deepfm.serving import UserEncoder
from pipeline import artifact as A
from pipeline.contract import FeatureContract
from pipeline.rows import split_line

EXCLUDE_KEY = "exclude"         # a JSON row's own seen item keys


class RetrieveError(RuntimeError):
    """A retrieval that cannot run; the message names the cause."""


@dataclass(frozen=True)
class Hits:
    """One row's top K: raw item keys, best first, and their scores <user vector, item vector>."""

    keys: tuple[str, ...]
    scores: tuple[float, ...]


class Retriever:
    """A user tower, the catalogue's item vectors and optionally a faiss index over them:
    ``top_k(rows, k, exclude)`` -> one :class:`Hits` per row."""

    def __init__(self, encoder: UserEncoder, items: ItemVectors, index: Any | None = None):
        self.encoder, self.items, self.index = encoder, items, index
        self.position = {str(k): i for i, k in enumerate(items.keys)}

    @classmethod
    def load(cls, model: str | Path, items: str | Path, index: str | Path | None = None,
             check: bool = True) -> "Retriever":
        """Refused (:class:`RetrieveError`) when the item vectors are not the ones exported with the user
        tower (their digest) or the index is not over them (its size and dimension)."""
        enc = UserEncoder.load(model, check=check)
        info = enc.retrieval
        try:
            iv = ItemVectors.read(items)
        except (OSError, KeyError, ValueError) as e:
            raise RetrieveError(f"--items {items}: not readable item vectors: {e}") from None
        digest = A.items_digest(iv.keys, iv.index, iv.vectors)
        if digest != info.items_digest:
            raise RetrieveError(f"--items {items}: {len(iv.keys)} item vectors of digest {digest}, but {model} was "
                                f"exported with {info.items} of digest {info.items_digest} ({info.items_file}): "
                                "the scores would mix two models")
        idx = None
        if index is not None:
            try:
                import faiss
            except ImportError:
                raise RetrieveError("--index: faiss is not installed (pip install faiss-cpu), or search exactly "
                                    "without --index") from None
            try:
                idx = faiss.read_index(str(index))
            except RuntimeError as e:
                raise RetrieveError(f"--index {index}: not a faiss index: {str(e).splitlines()[0]}") from None
            if idx.ntotal != len(iv.keys) or idx.d != iv.dim:
                raise RetrieveError(f"--index {index}: {idx.ntotal} vectors of dimension {idx.d}, the item vectors "
                                    f"are {len(iv.keys)} of dimension {iv.dim}: an index over other items")
        return cls(enc, iv, idx)

    def top_k(self, rows: Sequence[Mapping[str, Any]], k: int,
              exclude: Sequence[Iterable[str]] | None = None) -> list[Hits]:
        """Each row's top ``k`` items (fewer when the catalogue minus its excluded items has fewer);
        ``exclude[i]``: raw item keys row i must not get (keys not in the catalogue are ignored)."""
        vectors = self.encoder.vectors(rows)
        skip = [np.array(sorted({self.position[str(x)] for x in e if str(x) in self.position}), dtype=np.int64)
                for e in exclude] if exclude is not None else None
        if self.index is None:
            scores, pos = exact_topk(vectors, self.items.vectors, k, exclude=skip)
        else:
            extra = max((len(s) for s in skip), default=0) if skip is not None else 0
            scores, pos = search(self.index, vectors, min(k + extra, len(self.items.keys)))
        out = []
        for i in range(len(rows)):
            drop = set(skip[i].tolist()) if skip is not None else set()
            keep = [(p, s) for p, s in zip(pos[i].tolist(), scores[i].tolist())
                    if p >= 0 and p not in drop and np.isfinite(s)][:k]
            out.append(Hits(tuple(str(self.items.keys[p]) for p, _ in keep), tuple(float(s) for _, s in keep)))
        return out


def parse_row(text: str, contract: FeatureContract) -> tuple[dict[str, Any], list[str]]:
    """One row of input -> (raw fields, its own excluded item keys): a JSON object, or a raw log line in
    the contract's layout (pipeline.rows.split_line); ValueError saying what is wrong.

        '{"user_id": "u1", "exclude": ["i7"]}' -> ({"user_id": "u1"}, ["i7"])
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            row = json.loads(stripped)
        except ValueError as e:
            raise ValueError(f"not a JSON object: {e}") from None
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        own: Any = []
        if EXCLUDE_KEY not in contract.source.columns:
            own = row.pop(EXCLUDE_KEY, [])
        if not isinstance(own, list):
            raise ValueError(f"{EXCLUDE_KEY}: expected a list of item keys, got {own!r}")
        return row, [str(x) for x in own]
    return dict(split_line(text.rstrip("\r\n"), contract)), []


def read_rows(lines: Iterable[str], contract: FeatureContract) -> tuple[list[dict[str, Any]], list[list[str]]]:
    rows, excl = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row, own = parse_row(line, contract)
        except ValueError as e:
            raise RetrieveError(f"row {i}: {e}") from None
        rows.append(row)
        excl.append(own)
    return rows, excl


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> list[dict[str, Any]]:
    """Retrieve for every row (see the module docstring); the JSON lines written, as dicts."""
    p = argparse.ArgumentParser(prog="python -m deepfm.retrieve", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, type=Path, help="the user tower (python -m deepfm.export of a two_tower run)")
    p.add_argument("--items", required=True, type=Path, help="the item vectors exported with it (items.parquet)")
    p.add_argument("--index", type=Path, help="a faiss index over them (exported with --index); default: exact search")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--user-row", help="one row: a JSON object of raw fields, or a raw log line")
    src.add_argument("--rows", help="a file of rows, one a line (- for stdin)")
    p.add_argument("--k", type=int, default=100, help="items per row (default 100)")
    p.add_argument("--exclude", default="", help="item keys to leave out for every row, comma-separated")
    a = p.parse_args(argv)
    if a.k < 1:
        raise RetrieveError(f"--k {a.k}: at least 1")
    r = Retriever.load(a.model, a.items, a.index)
    contract = r.encoder.card.manifest.contract
    if a.user_row is not None:
        rows, own = read_rows([a.user_row], contract)
    elif a.rows == "-":
        rows, own = read_rows(sys.stdin, contract)
    else:
        with open(a.rows, encoding="utf-8") as fh:
            rows, own = read_rows(fh, contract)
    common = [x for x in a.exclude.split(",") if x]
    try:
        hits = r.top_k(rows, a.k, [common + o for o in own])
    except ValueError as e:             # a value the featurize job would reject, named by row and field
        raise RetrieveError(str(e)) from None
    out = out or sys.stdout
    results = []
    for i, h in enumerate(hits):
        d = {"row": i, "items": list(h.keys), "scores": [round(s, 6) for s in h.scores]}
        out.write(json.dumps(d) + "\n")
        results.append(d)
    out.flush()
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """The command: :func:`main`, a refusal said in one line and exit code 2."""
    try:
        main(argv)
    except (RetrieveError, A.ArtifactError) as e:
        print(f"retrieve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
