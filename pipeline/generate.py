"""Generated click logs with a known click model, in the layout of a feature contract.

Every later piece is tested and measured on these logs, so they must look like real click logs
(Criteo's by default) and carry a signal whose best possible score is known:

* categorical fields with Zipf-like value frequencies (P(rank r) ~ 1/(r+1)) and cardinalities from a
  handful to millions, some with missing values; values are written as 8 hex digits, as in Criteo;
* heavy-tailed (log-normal) integer fields with missing values, a few with small negative values;
* labels drawn from a ground-truth click model:
    logit = bias + first-order effects (every field)
                 + planted pairwise interactions <v_a, v_b>   (an FM can learn these)
                 + planted three-way parities sign(v_a0 v_b0 v_c0) (no sum of pairwise terms can,
                   a deep part can)
  with the bias set so that about 25% of rows are positive;
* every row's true click probability in a side file (``truth/day_<N>.prob``, float32, same order as
  the day file's lines; ``truth/day_<N>.label``, uint8), so tests and benchmarks can compute the
  oracle AUC and logloss that no model can beat.

Rows are made in fixed-size chunks, each seeded by (seed, day, chunk), so the output is the same for
any number of worker processes and memory does not grow with the number of rows.

    python -m pipeline.generate --out data/raw --days 3 --rows-per-day 100000 --seed 7

A contract with a ``recall`` key (conf/recall.yaml) selects the recall mode (pipeline.generate_recall):
users and items with side features and a known preference model, ``--users`` / ``--items``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline import generate_recall as recall_mode
from pipeline import layout
from pipeline.contract import FeatureContract, load_contract

log = logging.getLogger("pipeline.generate")

CHUNK_ROWS = 50_000          # part of the determinism contract: changing it changes the rows
DEFAULT_DAYS = 3
DEFAULT_ROWS_PER_DAY = 100_000
LATENT_DIM = 4
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A vectorised 64-bit integer hash (splitmix64 finaliser); uint64 in, uint64 out."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _hash_normal(seed: int, field: int, what: int, rank: np.ndarray) -> np.ndarray:
    """A standard normal per (seed, field, what, rank), the same every time (Box-Muller on two hashes)."""
    with np.errstate(over="ignore"):
        base = np.uint64((seed * 1_000_003 + field * 7919 + what * 104_729) & 0xFFFFFFFFFFFFFFFF)
        r = rank.astype(np.uint64) * np.uint64(2)
        h1 = _splitmix64(r ^ base)
        h2 = _splitmix64((r + np.uint64(1)) ^ base)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class FieldSpec:
    """How one field's values are drawn and how they move the click probability."""

    name: str
    kind: str                  # "categorical" | "continuous"
    index: int                 # position among the feature fields (hash salt)
    cardinality: int           # categorical: distinct values; continuous: unused
    missing_rate: float
    strength: float            # scale of the first-order effect
    log_mu: float = 0.0        # continuous: log-normal location and scale
    log_sigma: float = 1.0
    negative_rate: float = 0.0


@dataclass(frozen=True)
class ClickModel:
    """The ground truth. Built deterministically from (contract, seed, max_cardinality)."""

    seed: int
    label: str
    columns: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    pairs: tuple[tuple[int, int, float], ...]          # (field a, field b, weight)
    triples: tuple[tuple[int, int, int, float], ...]   # (a, b, c, weight)
    bias: float

    def to_json(self) -> dict:
        return {"seed": self.seed, "bias": self.bias, "pairs": self.pairs, "triples": self.triples,
                "fields": [f.__dict__ for f in self.fields]}


def build_click_model(contract: FeatureContract, seed: int, max_cardinality: int = 2_000_000,
                      positive_rate: float = 0.25) -> ClickModel:
    if contract.source.day_from != "file_name":
        raise ValueError(f"contract {contract.name}: the generator writes one file per day "
                         "(source.day_from: file_name)")
    rng = np.random.default_rng([seed, 0xC11C])
    cats = contract.categorical
    conts = contract.continuous
    # Cardinalities log-spaced from 3 to max_cardinality, in a seeded order over the fields.
    cards = np.round(np.exp(np.linspace(math.log(3), math.log(max(max_cardinality, 4)), max(len(cats), 1))))
    rng.shuffle(cards)
    specs: list[FieldSpec] = []
    for cf in conts:
        specs.append(FieldSpec(name=cf.name, kind="continuous", index=len(specs), cardinality=0,
                               missing_rate=float(rng.choice([0.0, 0.0, 0.05, 0.2, 0.45])),
                               strength=float(rng.uniform(0.08, 0.3)), log_mu=float(rng.uniform(0.0, 4.0)),
                               log_sigma=float(rng.uniform(0.8, 2.2)),
                               negative_rate=float(rng.choice([0.0, 0.0, 0.0, 0.03]))))
    for i, kf in enumerate(cats):
        specs.append(FieldSpec(name=kf.name, kind="categorical", index=len(specs), cardinality=int(cards[i]),
                               missing_rate=float(rng.choice([0.0, 0.0, 0.0, 0.03, 0.2, 0.4])),
                               strength=float(rng.uniform(0.1, 0.35))))
    n = len(specs)
    # Planted pairs: between any fields. Planted three-way parities: between fields with few values,
    # so that a deep part can see every combination often enough to learn it.
    n_pairs = max(1, n // 3)
    pairs = []
    all_pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    for k in rng.choice(len(all_pairs), size=min(n_pairs, len(all_pairs)), replace=False):
        a, b = all_pairs[int(k)]
        pairs.append((a, b, float(rng.uniform(0.3, 0.5))))
    small = [s.index for s in specs if s.kind == "categorical" and s.cardinality <= 2000] or list(range(n))
    triples = []
    if len(small) >= 3:
        for _ in range(max(1, n // 13)):
            a, b, c = sorted(int(x) for x in rng.choice(small, size=3, replace=False))
            triples.append((a, b, c, float(rng.uniform(0.4, 0.6))))
    model = ClickModel(seed=seed, label=contract.label, columns=contract.source.columns, fields=tuple(specs),
                       pairs=tuple(pairs), triples=tuple(triples), bias=0.0)
    # Set the bias so that the mean click probability is positive_rate, on a seeded sample.
    logits = _draw(model, np.random.default_rng([seed, 0xB1A5]), 50_000)[2]
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logits + mid)))) < positive_rate:
            lo = mid
        else:
            hi = mid
    return ClickModel(**{**model.__dict__, "bias": (lo + hi) / 2})


def _draw(model: ClickModel, rng: np.random.Generator, rows: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Draw ``rows`` rows: per field the raw value (rank or integer) and a missing mask; and the logit
    before the bias."""
    values: list[np.ndarray] = []
    missing: list[np.ndarray] = []
    logit = np.zeros(rows)
    keys: list[np.ndarray] = []        # what the latent vectors hang on: rank, or log bucket
    for f in model.fields:
        miss = rng.random(rows) < f.missing_rate
        if f.kind == "categorical":
            u = rng.random(rows)
            v = np.minimum(np.floor(np.exp(u * math.log(f.cardinality + 1))) - 1, f.cardinality - 1).astype(np.int64)
            key = v
        else:
            v = np.floor(np.exp(rng.normal(f.log_mu, f.log_sigma, rows))).astype(np.int64)
            neg = rng.random(rows) < f.negative_rate
            v = np.where(neg, -rng.integers(1, 4, rows), v)
            key = np.where(v < 1, v + 4, np.floor(np.log1p(np.maximum(v, 0)) * 3).astype(np.int64) + 8)
        key = np.where(miss, -1, key) + 1           # 0 = missing, a value of its own
        w = f.strength * _hash_normal(model.seed, f.index, 0, key)
        logit += w
        values.append(v)
        missing.append(miss)
        keys.append(key)
    for a, b, wt in model.pairs:
        va = np.stack([_hash_normal(model.seed, a, 1 + d, keys[a]) for d in range(LATENT_DIM)], 1)
        vb = np.stack([_hash_normal(model.seed, b, 1 + d, keys[b]) for d in range(LATENT_DIM)], 1)
        logit += wt * (va * vb).sum(1) / math.sqrt(LATENT_DIM)
    for a, b, c, wt in model.triples:
        s = (np.sign(_hash_normal(model.seed, a, 9, keys[a])) * np.sign(_hash_normal(model.seed, b, 9, keys[b]))
             * np.sign(_hash_normal(model.seed, c, 9, keys[c])))
        logit += wt * s
    return values, missing, logit


@dataclass(frozen=True)
class Chunk:
    label: np.ndarray       # uint8
    prob: np.ndarray        # float32 true click probability
    text: bytes             # the chunk's lines, each ending in a newline


def make_chunk(model: ClickModel, delimiter: str, day: int, chunk: int, rows: int) -> Chunk:
    """One chunk of a day file; the same (model, day, chunk, rows) always gives the same bytes."""
    rng = np.random.default_rng([model.seed, day, chunk])
    values, missing, logit = _draw(model, rng, rows)
    prob = 1.0 / (1.0 + np.exp(-(logit + model.bias)))
    label = (rng.random(rows) < prob).astype(np.uint8)
    by_name: dict[str, np.ndarray] = {model.label: label.astype("S1")}
    for f, v, miss in zip(model.fields, values, missing):
        if f.kind == "categorical":
            # The value's id -> 8 hex digits, salted per field as Criteo's hashed values look.
            h = (_splitmix64(v.astype(np.uint64) ^ np.uint64(f.index * 0x5851F42D + model.seed)) & np.uint64(0xFFFFFFFF))
            s = _hex8(h.astype(np.uint32))
        else:
            s = v.astype("S20")
        by_name[f.name] = np.where(miss, b"", s)
    text = _join_lines([by_name[c] for c in model.columns], delimiter.encode())
    return Chunk(label=label, prob=prob.astype(np.float32), text=text)


def _join_lines(cols: list[np.ndarray], sep: bytes) -> bytes:
    """Join 'S' arrays column-wise into delimited lines, each ending in a newline.

    [[b"1", b"ab"], [b"", b"c"]] with b"\\t" -> b"1\\t\\nab\\tc\\n" (no Python loop over rows).
    """
    n = len(cols[0])
    mats = [np.ascontiguousarray(c).view(np.uint8).reshape(n, c.dtype.itemsize) for c in cols]
    lens = [(m != 0).sum(1) for m in mats]
    line_len = np.sum(lens, axis=0) + len(cols)            # a separator after each cell but the last, + newline
    start = np.concatenate([[0], np.cumsum(line_len)[:-1]])
    out = np.full(int(line_len.sum()), sep[0], dtype=np.uint8)
    out[start + line_len - 1] = ord("\n")
    pos = start.copy()
    for m, ln in zip(mats, lens):
        keep = np.arange(m.shape[1])[None, :] < ln[:, None]
        out[(pos[:, None] + np.arange(m.shape[1])[None, :])[keep]] = m[keep]
        pos += ln + 1
    return out.tobytes()


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(x: np.ndarray) -> np.ndarray:
    """uint32 -> 8 lowercase hex digits as an 'S8' array, without a Python loop."""
    nib = np.stack([(x >> np.uint32(28 - 4 * i)) & np.uint32(15) for i in range(8)], 1)
    return np.ascontiguousarray(_HEX[nib]).view("S8").ravel()


def _chunk_job(args: tuple[ClickModel, str, int, int, int]) -> Chunk:
    return make_chunk(*args)


def chunk_plan(rows: int) -> list[int]:
    """Chunk sizes for a day of ``rows`` rows."""
    full, rest = divmod(rows, CHUNK_ROWS)
    return [CHUNK_ROWS] * full + ([rest] if rest else [])


def generate(contract: FeatureContract, out: Path, days: Sequence[int], rows_per_day: int, seed: int,
             workers: int = 1, max_cardinality: int = 2_000_000) -> dict:
    """Write each day N's file (named by the contract's ``source.file_pattern``: ``day_<N>`` for Criteo),
    ``out/truth/day_<N>.{prob,label}`` and
    ``out/truth/model.json``; returns a summary. Files are written aside and renamed when complete."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    model = build_click_model(contract, seed, max_cardinality)
    (out / "truth" / "model.json").write_text(json.dumps(model.to_json(), indent=1))
    t0 = time.time()
    summary: dict = {"days": {}, "seed": seed, "rows_per_day": rows_per_day}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for day in days:
            plan = [(model, contract.source.delimiter, day, k, n) for k, n in enumerate(chunk_plan(rows_per_day))]
            chunks: Iterator[Chunk] = pool.map(_chunk_job, plan) if pool else map(_chunk_job, plan)
            final = out / layout.day_file_name(contract.source.file_pattern, day)
            tmp = out / f".{final.name}.inprogress"
            positives = 0
            with open(tmp, "wb") as fh, open(out / "truth" / f".day_{day}.prob", "wb") as fp, \
                    open(out / "truth" / f".day_{day}.label", "wb") as fl:
                for c in chunks:
                    fh.write(c.text)
                    fp.write(c.prob.tobytes())
                    fl.write(c.label.tobytes())
                    positives += int(c.label.sum())
            for ext in ("prob", "label"):
                os.replace(out / "truth" / f".day_{day}.{ext}", out / "truth" / f"day_{day}.{ext}")
            os.replace(tmp, final)
            summary["days"][day] = {"rows": rows_per_day, "positives": positives}
            log.info("%s: %d rows, %.1f%% positive", final.name, rows_per_day, 100 * positives / max(rows_per_day, 1))
    finally:
        if pool:
            pool.shutdown()
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def read_truth(raw_dir: Path, day: int) -> tuple[np.ndarray, np.ndarray]:
    """(true click probability, label) of every row of day_<N>, in line order."""
    prob = np.fromfile(raw_dir / "truth" / f"day_{day}.prob", dtype=np.float32)
    label = np.fromfile(raw_dir / "truth" / f"day_{day}.label", dtype=np.uint8)
    return prob, label


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for day_<N> files")
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "conf" / "criteo.yaml"),
                   help="feature contract whose layout to write (default conf/criteo.yaml)")
    p.add_argument("--days", type=int, default=None,
                   help=f"how many days (default {DEFAULT_DAYS}; a recall contract: {recall_mode.DEFAULT_DAYS})")
    p.add_argument("--first-day", type=int, default=0, help="number of the first day (default 0)")
    p.add_argument("--rows-per-day", type=int, default=None,
                   help=f"default {DEFAULT_ROWS_PER_DAY:,}; a recall contract: {recall_mode.DEFAULT_ROWS_PER_DAY:,}")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-cardinality", type=int, default=2_000_000,
                   help="distinct values of the largest categorical field")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--users", type=int, default=None, help="a recall contract (pipeline.generate_recall): "
                   f"how many users (default {recall_mode.DEFAULT_USERS:,})")
    p.add_argument("--items", type=int, default=None,
                   help=f"a recall contract: how many items (default {recall_mode.DEFAULT_ITEMS:,})")
    return p.parse_args(argv)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args(argv)
    contract = load_contract(a.config)
    if contract.recall is not None:                 # a recall contract: users, items and their clicks
        days = list(range(a.first_day, a.first_day + _given(a.days, recall_mode.DEFAULT_DAYS)))
        rows_per_day = _given(a.rows_per_day, recall_mode.DEFAULT_ROWS_PER_DAY)
        summary = recall_mode.generate(contract, a.out, days, rows_per_day, a.seed, a.workers,
                                       users=_given(a.users, recall_mode.DEFAULT_USERS),
                                       items=_given(a.items, recall_mode.DEFAULT_ITEMS))
    else:
        if a.users is not None or a.items is not None:
            raise ValueError(f"--users / --items: only for a recall contract ({a.config} has no recall key)")
        days = list(range(a.first_day, a.first_day + _given(a.days, DEFAULT_DAYS)))
        rows_per_day = _given(a.rows_per_day, DEFAULT_ROWS_PER_DAY)
        summary = generate(contract, a.out, days, rows_per_day, a.seed, a.workers, a.max_cardinality)
    rows = rows_per_day * len(days)
    print(f"generated {len(days)} day(s) x {rows_per_day} rows into {a.out} in {summary['seconds']} s "
          f"({rows / max(summary['seconds'], 1e-9):,.0f} rows/s)")
    return summary


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a clear one-line error and a non-zero exit for scripts and schedulers
        print(f"generate: error: {e}", file=sys.stderr)
        sys.exit(1)
