"""Nearest neighbours by inner product over the whole catalogue: exact (chunked ``torch.topk``) and faiss.

The two-tower model's score is one dot product <user vector, item vector> (deepfm.two_tower), so the
items for a user are the catalogue's top-K by inner product. :func:`exact_topk` is the reference: it
scores every item, in chunks so memory stays bounded, and is what training evaluation uses. faiss
(``pip install faiss-cpu``; optional) gives an exact inner-product index (``flat``: the same answers,
faster on many queries) and an approximate one (``hnsw``: a graph index whose recall against the exact
search :func:`ann_recall` measures). Vectors are never normalised: the index is built for inner
product, the metric the model was trained for (an L2 index would rank by distance, another order).

    >>> items = ItemVectors.read("run/items.parquet")
    >>> scores, idx = exact_topk(user_vectors, items.vectors, k=100)
    >>> items.keys[idx[0]]                         # the raw item keys of the first user's top 100
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

INDEX_KINDS = ("exact", "flat", "hnsw")
VECTOR_COLUMN = "vector"
KEY_COLUMN = "item_key"
INDEX_COLUMN = "item_index"


@dataclass(frozen=True)
class ItemVectors:
    """The catalogue's item vectors: ``keys[i]`` (raw item key) has ``vectors[i]`` and catalogue index
    ``index[i]``."""

    keys: np.ndarray            # [N] object (str)
    index: np.ndarray           # [N] int64
    vectors: np.ndarray         # [N, D] float32, C-contiguous

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.index) == len(self.vectors)):
            raise ValueError(f"item vectors: {len(self.keys)} keys, {len(self.index)} indexes, "
                             f"{len(self.vectors)} vectors")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def write(self, path: str | Path) -> None:
        """Parquet with ``item_key`` (string), ``item_index`` (int32), ``vector`` (fixed-size list of
        float32), written under a temporary name and renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = Path(path)
        flat = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        table = pa.table({KEY_COLUMN: pa.array([str(k) for k in self.keys], pa.string()),
                          INDEX_COLUMN: pa.array(self.index.astype(np.int32)),
                          VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(flat, self.dim)})
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)

    @classmethod
    def read(cls, path: str | Path) -> "ItemVectors":
        import pyarrow.parquet as pq
        t = pq.read_table(path, columns=[KEY_COLUMN, INDEX_COLUMN, VECTOR_COLUMN])
        col = t.column(VECTOR_COLUMN).combine_chunks()
        dim = col.type.list_size
        vectors = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        return cls(keys=np.asarray(t.column(KEY_COLUMN).to_pylist(), dtype=object),
                   index=t.column(INDEX_COLUMN).to_numpy().astype(np.int64), vectors=np.ascontiguousarray(vectors))


def exact_topk(queries: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor, k: int,
               exclude: Sequence[np.ndarray] | None = None, chunk_items: int = 1 << 16,
               chunk_queries: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Every query's top ``k`` items by inner product: (scores [Q, k] float32, item positions [Q, k] int64),
    best first. ``exclude[q]``: item positions query q must not get (its already-seen items); they score
    -inf, so a query with fewer than ``k`` other items gets -inf scores at the end. Memory: one
    [chunk_queries, chunk_items] score block at a time."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    it = torch.as_tensor(items, dtype=torch.float32)
    n = it.shape[0]
    k = min(k, n)
    if exclude is not None:
        if len(exclude) != q.shape[0]:
            raise ValueError(f"exclude: {len(exclude)} lists for {q.shape[0]} queries")
        lengths = np.array([len(e) for e in exclude], dtype=np.int64)
        ex_rows = np.repeat(np.arange(len(exclude)), lengths)
        ex_cols = np.concatenate([np.asarray(e, np.int64) for e in exclude]) if lengths.sum() else np.zeros(0, np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
    out_s = np.empty((q.shape[0], k), np.float32)
    out_i = np.empty((q.shape[0], k), np.int64)
    with torch.no_grad():
        for qs in range(0, q.shape[0], chunk_queries):
            qb = q[qs:qs + chunk_queries]
            qe = qs + qb.shape[0]
            best_s = torch.full((qb.shape[0], 0), -math.inf)
            best_i = torch.zeros((qb.shape[0], 0), dtype=torch.int64)
            for s in range(0, n, chunk_items):
                block = qb @ it[s:s + chunk_items].T                         # [q, c]
                if exclude is not None:
                    rows, cols = ex_rows[indptr[qs]:indptr[qe]], ex_cols[indptr[qs]:indptr[qe]]
                    inside = (cols >= s) & (cols < s + block.shape[1])
                    block[torch.from_numpy(rows[inside] - qs), torch.from_numpy(cols[inside] - s)] = -math.inf
                bs, bi = torch.topk(block, min(k, block.shape[1]), dim=1)      # the block's best, then merge
                cand_s, cand_i = torch.cat([best_s, bs], 1), torch.cat([best_i, bi + s], 1)
                top_s, top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
                best_s, best_i = top_s, cand_i.gather(1, top)
            out_s[qs:qe] = best_s.numpy()
            out_i[qs:qe] = best_i.numpy()
    return out_s, out_i


def build_index(vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128) -> Any:
    """A faiss index over ``vectors`` for inner product: ``flat`` (exact) or ``hnsw`` (approximate)."""
    if kind not in ("flat", "hnsw"):
        raise ValueError(f"index kind {kind!r} is not one of flat, hnsw")
    try:
        import faiss
    except ImportError:
        raise RuntimeError("faiss is not installed: pip install faiss-cpu (or use the exact search)") from None
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(v.shape[1])
    else:
        index = faiss.IndexHNSWFlat(v.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        index.hnsw.efSearch = ef_search
    index.add(v)
    return index


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], positions [Q, k]) from a faiss index; -1 positions (too few results) stay -1."""
    s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return s, i.astype(np.int64)


def ann_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact top-K positions that the approximate top-K found (mean over queries)."""
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k) if len(hits) else 0.0
