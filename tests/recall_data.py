"""Tiny featurized outputs written by hand (pyarrow and pipeline.manifest), in the layout docs/recall.md
describes, for the trainer's tests: list-valued fields and a recall output (splits with user_index /
item_index, catalogue/, seen/, users/), without the Spark job.

The recall data has a known preference: users and items fall in ``groups`` groups (u % groups, i %
groups); a user clicks items of its own group only, uniformly; an item's first genre is its group, so
the item tower can tell groups apart from genres as well as from ids. Days 0 .. days - 3 are train, the
next valid, the last test.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline import manifest as M
from pipeline.contract import FeatureContract, parse_contract

DIM = 8


def contract(fields: Mapping[str, Mapping[str, Any]], recall: Mapping[str, Any] | None = None) -> FeatureContract:
    """A contract over categorical ``fields`` (name -> its settings), label ``click``."""
    raw: dict[str, Any] = {
        "version": 1, "name": "tiny",
        "source": {"format": "delimited", "delimiter": "\t", "header": False, "columns": ["click", *fields],
                   "day_from": "file_name", "file_pattern": r"day_(\d+)$"},
        "label": "click",
        "categorical": {"defaults": {"embedding_dim": DIM, "min_count": 0}, "fields": {k: dict(v) for k, v in fields.items()}},
        "sampling": {"neg_sample_rate": 1.0, "seed": 1}, "splits": {"valid_days": 1, "test_days": 1},
        "output": {"rows_per_row_group": 64, "min_row_groups": 2},
    }
    if recall is not None:
        raw["recall"] = dict(recall)
    return parse_contract(raw)


def _column(values: Any, is_list: bool) -> pa.Array:
    if is_list:
        return pa.array([list(map(int, v)) for v in values], pa.list_(pa.int32()))
    if np.asarray(values).dtype.kind == "f":
        return pa.array(np.asarray(values, np.float64))
    return pa.array(np.asarray(values, np.int32), pa.int32())


def write_split(folder: Path, cols: Mapping[str, Any], lists: Sequence[str], files: int) -> None:
    """``cols`` (name -> values) as ``files`` Parquet files of one row group each."""
    folder.mkdir(parents=True)
    n = len(next(iter(cols.values())))
    for k, idx in enumerate(np.array_split(np.arange(n), files)):
        t = pa.table({c: _column([v[i] for i in idx] if c in lists else np.asarray(v)[idx], c in lists)
                      for c, v in cols.items()})
        pq.write_table(t, folder / f"part-{k:05d}.parquet", row_group_size=max(len(idx), 1))


def write_output(root: Path, c: FeatureContract, splits: Mapping[str, tuple[tuple[int, ...], Mapping[str, Any]]],
                 recall: M.RecallInfo | None = None, files: int = 4) -> Path:
    """A complete featurized output: each split (days, columns incl. ``label`` and ``day``) written, its
    manifest and ``_SUCCESS``. The feature fingerprint is the contract's (no boundaries, no vocabulary)."""
    lists = [f.name for f in c.fields if getattr(f, "list", None) is not None]
    infos = {}
    for name, (days, cols) in splits.items():
        write_split(root / name, cols, lists, files)
        rows, pos = len(cols[M.LABEL_COLUMN]), int(np.sum(cols[M.LABEL_COLUMN]))
        infos[name] = M.SplitInfo(days=days, before_sampling=M.Counts(rows, pos), rows=rows, positives=pos,
                                  files=files, neg_sample_rate=1.0)
    m = M.Manifest(contract=c, contract_fingerprint=c.fingerprint,
                   feature_fingerprint=hashlib.sha256(c.fingerprint.encode()).hexdigest()[:16], source_label="click",
                   fields=M.fields_of(c), boundaries={}, vocab=None, sampling=M.SamplingInfo(1.0, 1), splits=infos,
                   rejects=M.Rejects(0, {}), input=M.InputInfo("raw", (), tuple(d for v in splits.values() for d in v[0]), 0),
                   seconds=0.0, seconds_by_step={}, spark_version="none", created="2026-12-01T00:00:00Z", recall=recall)
    M.write(root, m)
    (root / layout.SUCCESS).write_text("")
    return root


# --- a list field for every model ----------------------------------------------------------------

def list_output(root: Path, seed: int, pooling: str, rows: int = 1024, max_length: int = 3) -> Path:
    """Fields ``a`` (single-valued, 20 ids) and ``g`` (a list of 1..max_length ids of 12, ``pooling``); the
    label says whether the row holds g id 2. Days 0-1 train, 2 valid, 3 test."""
    c = contract({"a": {"hash_buckets": 20}, "g": {"hash_buckets": 12, "list": {"delimiter": "|", "pooling": pooling,
                                                                                    "max_length": max_length}}})
    rng = np.random.default_rng(seed)
    days = {"train": (0, 1), "valid": (2,), "test": (3,)}
    splits = {}
    for name, ds in days.items():
        n = rows if name == "train" else rows // 4
        g = [rng.choice(np.arange(2, 12), size=rng.integers(1, max_length + 1), replace=False) for _ in range(n)]
        splits[name] = (ds, {M.LABEL_COLUMN: np.array([int(2 in x) for x in g]), "a": rng.integers(2, 20, n), "g": g,
                             M.DAY_COLUMN: rng.choice(ds, n)})
    return write_output(root, c, splits)


# --- a recall output ------------------------------------------------------------------------------

def recall_output(root: Path, seed: int, users: int = 64, items: int = 200, groups: int = 4, clicks: int = 6,
                  days: int = 5, random_negatives: int = 0) -> Path:
    """The recall layout of docs/recall.md over the preference of the module's docstring. Ids: user_id =
    2 + user index, item_id = 2 + item index (no collisions), hour 2 .. 25, item_genres [2 + group] and, for
    even items, 2 + groups + i % 3 as well (mean pooled)."""
    c = contract({"user_id": {"hash_buckets": users + 2, "side": "user"},
                  "hour": {"hash_buckets": 26, "side": "context"},
                  "item_id": {"hash_buckets": items + 2, "side": "item"},
                  "item_genres": {"hash_buckets": 2 + groups + 3, "side": "item",
                                  "list": {"delimiter": "|", "pooling": "mean", "max_length": 2}}},
                 {"user_key": "user_id", "item_key": "item_id", "random_negatives": random_negatives})
    rng = np.random.default_rng(seed)
    genres = [[2 + i % groups] + ([2 + groups + i % 3] if i % 2 == 0 else []) for i in range(items)]
    by_group = [np.arange(g, items, groups) for g in range(groups)]
    clicked = [(u, int(i), d) for d in range(days) for u in range(users)
               for i in rng.choice(by_group[u % groups], clicks, replace=False)]
    user, item, day = (np.array(x) for x in zip(*clicked))
    train_days = tuple(range(days - 2))
    split_days = {"train": train_days, "valid": (days - 2,), "test": (days - 1,)}
    train = np.isin(day, train_days)
    counts = np.bincount(item[train], minlength=items)
    log_q = np.log((counts + 1) / (train.sum() + items))

    def columns(rows: np.ndarray, label: np.ndarray, it: np.ndarray) -> dict[str, Any]:
        return {M.LABEL_COLUMN: label, "user_id": 2 + user[rows], "hour": rng.integers(2, 26, len(rows)),
                "item_id": 2 + it, "item_genres": [genres[i] for i in it], M.DAY_COLUMN: day[rows],
                layout.USER_INDEX: user[rows], layout.ITEM_INDEX: it}
    splits = {}
    for name, ds in split_days.items():
        rows = np.nonzero(np.isin(day, ds))[0]
        label, it = np.ones(len(rows), np.int32), item[rows]
        if name == "train" and random_negatives:
            rows = np.concatenate([rows, np.repeat(rows, random_negatives)])
            label = np.concatenate([label, np.zeros(len(rows) - len(label), np.int32)])
            it = np.concatenate([it, rng.integers(0, items, len(rows) - len(it))])
        perm = rng.permutation(len(rows))
        splits[name] = (ds, columns(rows[perm], label[perm], it[perm]))
        if random_negatives:        # docs/recall.md: in every split, 1 / items for a drawn row, 1.0 for a positive
            splits[name][1][layout.SAMPLE_PROB] = np.where(label[perm] == 1, 1.0, 1.0 / items)
    cat = pa.table({layout.ITEM_INDEX: pa.array(np.arange(items, dtype=np.int32)),
                    layout.ITEM_KEY: pa.array([f"item{i}" for i in range(items)]),
                    "item_id": pa.array(np.arange(2, items + 2, dtype=np.int32)),
                    "item_genres": pa.array(genres, pa.list_(pa.int32())),
                    layout.TRAIN_COUNT: pa.array(counts.astype(np.int64)), layout.LOG_Q: pa.array(log_q)})
    seen = _seen(user, item, day)
    for folder, table in ((layout.CATALOGUE, cat), (layout.SEEN, seen),
                          (layout.USERS, pa.table({layout.USER_INDEX: pa.array(np.arange(users, dtype=np.int32)),
                                                   layout.USER_KEY: pa.array([f"user{u}" for u in range(users)])}))):
        (root / folder).mkdir(parents=True)
        pq.write_table(table, root / folder / "part-00000.parquet")
    info = M.RecallInfo(user_key="user_id", item_key="item_id", items=items, users=users,
                        train_positives=int(train.sum()), seen_rows=len(seen), item_fields=("item_id", "item_genres"),
                        random_negatives=random_negatives, sample_prob=layout.SAMPLE_PROB if random_negatives else None)
    return write_output(root, c, splits, info)


def _seen(user: np.ndarray, item: np.ndarray, day: np.ndarray) -> pa.Table:
    """Distinct (user_index, item_index) with the first day they were clicked."""
    first: dict[tuple[int, int], int] = {}
    for u, i, d in zip(user.tolist(), item.tolist(), day.tolist()):
        first[(u, i)] = min(d, first.get((u, i), d))
    keys = sorted(first)
    return pa.table({layout.USER_INDEX: pa.array([k[0] for k in keys], pa.int32()),
                     layout.ITEM_INDEX: pa.array([k[1] for k in keys], pa.int32()),
                     layout.FIRST_DAY: pa.array([first[k] for k in keys], pa.int32())})
