"""Generated interaction logs for recall, with a known preference model (docs/recall.md; issue 16).

``python -m pipeline.generate --config conf/recall.yaml --out RAW`` chooses this mode because the
contract has a ``recall`` key. The world, built once from the seed:

* users with side features (age band, gender, city) and items with side features (category, a brand of
  that category, 0-4 genres, a price), constant per key; raw keys are zero-padded (``u00042``,
  ``i00042``) so that sorting the keys (the featurize job's dense index) keeps the generator's order;
* a latent preference per user and per item, p_u = sqrt(1 - r_u^2) A x_u + r_u e_u and
  q_i = sqrt(1 - r_i^2) B x_i + r_i e_i: x is the sum of the side features' own random vectors (the
  genres' mean, a smooth function of log price), A and B random linear maps, e a per-id residual;
* item exposure: Zipf popularity over a seeded order, w_i ~ (rank + 1)^-zipf.

Per day, impressions: a user uniformly, an hour from a daily traffic curve, an item drawn with
probability w_i; the click ~ Bernoulli(sigmoid(beta <p_u, q_i> / sqrt(D) + bias)), the bias set for the
target click rate. The expected clicks of (u, i) on a day are then proportional to
w_i * sigmoid(beta <p_u, q_i> / sqrt(D) + bias): the true score the ceiling ranks by
(pipeline.recall_truth).

Rows are made in chunks seeded by (seed, day, chunk), written in the contract's column order, streamed
to disk and renamed when complete, as pipeline.generate does. ``RAW/truth/``:

* ``recall_world.npz``: keys, side features, the preference vectors (and their feature parts), w;
* ``recall_model.json``: beta, bias, dims, counts, the days written;
* ``day_<N>.user`` / ``.item`` (int32), ``.label`` (uint8), ``.prob`` (float32): per line, in line order.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import layout
from pipeline.contract import FeatureContract

log = logging.getLogger("pipeline.generate_recall")

COLUMNS = ("user_id", "user_age", "user_gender", "user_city", "item_id", "item_category", "item_brand",
           "item_genres", "item_price", "hour")      # what this generator writes, besides the label
CHUNK_ROWS = 50_000          # part of the determinism contract: changing it changes the rows
# The default set (python -m pipeline.generate --config conf/recall.yaml): 8 train days, valid, test;
# about 12 train clicks a user.
DEFAULT_USERS = 20_000
DEFAULT_ITEMS = 5_000
DEFAULT_DAYS = 10
DEFAULT_ROWS_PER_DAY = 300_000
LATENT_DIM = 8
AGES = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_P = (0.14, 0.27, 0.23, 0.17, 0.11, 0.08)
GENDERS = ("f", "m", "")                     # "" = missing
GENDER_P = (0.48, 0.47, 0.05)
CITIES = 200
CATEGORIES = 30
BRANDS = 500
GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Family", "Fantasy",
          "History", "Horror", "Music", "Mystery", "Romance", "SciFi", "Sport", "Thriller", "War", "Western",
          "Kids")
GENRE_COUNT_P = (0.05, 0.35, 0.35, 0.15, 0.10)   # 0 .. 4 genres an item
# a day's traffic by hour (evening peak), relative
HOUR_TRAFFIC = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 8, 7, 6, 6, 7, 8, 10, 12, 12, 10, 7, 4], np.float64)


@dataclass(frozen=True)
class PreferenceModel:
    """The ground truth's knobs. ``user_residual`` / ``item_residual``: the share r of a preference
    vector's scale that is the id's own (the rest is explained by the side features)."""

    seed: int
    n_users: int = DEFAULT_USERS
    n_items: int = DEFAULT_ITEMS
    dim: int = LATENT_DIM
    beta: float = 5.0
    zipf: float = 0.9
    user_residual: float = 0.2
    item_residual: float = 0.25
    click_rate: float = 0.1


@dataclass(frozen=True)
class World:
    """Users and items with their side features and true vectors (index = the generator's index)."""

    model: PreferenceModel
    bias: float
    user_age: np.ndarray        # int64 [U] index into AGES
    user_gender: np.ndarray     # int64 [U] index into GENDERS
    user_city: np.ndarray       # int64 [U]
    item_category: np.ndarray   # int64 [I]
    item_brand: np.ndarray      # int64 [I]
    item_genres: np.ndarray     # int64 [I, 4], -1 = none
    item_price: np.ndarray      # float64 [I]: whole units + 0.99, as written
    user_vec: np.ndarray        # float64 [U, D] p_u
    item_vec: np.ndarray        # float64 [I, D] q_i
    user_feat_vec: np.ndarray   # float64 [U, D]: the feature part of p_u (residual 0)
    item_feat_vec: np.ndarray   # float64 [I, D]
    item_weight: np.ndarray     # float64 [I] exposure probability, sums to 1

    @property
    def user_keys(self) -> np.ndarray:
        return _keys("u", self.model.n_users)

    @property
    def item_keys(self) -> np.ndarray:
        return _keys("i", self.model.n_items)

    def logits(self, users: np.ndarray, items: np.ndarray, feature_only: bool = False) -> np.ndarray:
        """The click logit of each (users[j], items[j]) pair."""
        p = (self.user_feat_vec if feature_only else self.user_vec)[users]
        q = (self.item_feat_vec if feature_only else self.item_vec)[items]
        return self.model.beta * (p * q).sum(1) / math.sqrt(self.model.dim) + self.bias

    def expected_clicks(self, users: np.ndarray, items: np.ndarray | None = None,
                        feature_only: bool = False) -> np.ndarray:
        """The true score ``[len(users), len(items)]``: w_i * sigmoid(logit(u, i)), proportional to the
        expected clicks of (u, i) on a day (every user has the same traffic)."""
        items = np.arange(self.model.n_items) if items is None else items
        p = (self.user_feat_vec if feature_only else self.user_vec)[users]
        q = (self.item_feat_vec if feature_only else self.item_vec)[items]
        z = p @ q.T                                     # in place from here: [U, I] can be large
        z *= -self.model.beta / math.sqrt(self.model.dim)
        z -= self.bias
        np.exp(z, out=z)
        z += 1.0
        return np.divide(self.item_weight[items][None, :], z, out=z)

    def save(self, path: Path) -> None:
        np.savez(path, user_key=self.user_keys, item_key=self.item_keys, user_age=self.user_age,
                 user_gender=self.user_gender, user_city=self.user_city, item_category=self.item_category,
                 item_brand=self.item_brand, item_genres=self.item_genres, item_price=self.item_price,
                 user_vec=self.user_vec, item_vec=self.item_vec, user_feat_vec=self.user_feat_vec,
                 item_feat_vec=self.item_feat_vec, item_weight=self.item_weight)


def _keys(prefix: str, n: int) -> np.ndarray:
    """Zero-padded raw keys whose sorted order is the index order: ``("u", 3)`` -> [b"u00000", b"u00001", b"u00002"]."""
    width = max(5, len(str(n - 1)))
    digits = np.char.zfill(np.arange(n).astype(f"S{width}"), width)
    return np.char.add(prefix.encode(), digits)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def _standardise(x: np.ndarray) -> np.ndarray:
    """Columns scaled to unit variance over the rows (so each part of a vector has a known scale)."""
    return x / np.maximum(x.std(axis=0, keepdims=True), 1e-12)


def build_world(model: PreferenceModel) -> World:
    """The users, items and their true vectors; the same ``model`` always gives the same world."""
    rng = np.random.default_rng([model.seed, 0x5EC0])
    U, I, D = model.n_users, model.n_items, model.dim
    user_age = rng.choice(len(AGES), size=U, p=AGE_P)
    user_gender = rng.choice(len(GENDERS), size=U, p=GENDER_P)
    city_p = 1.0 / np.arange(1, CITIES + 1) ** 0.9
    user_city = rng.choice(CITIES, size=U, p=city_p / city_p.sum())
    cat_p = 1.0 / np.arange(1, CATEGORIES + 1) ** 0.7
    item_category = rng.choice(CATEGORIES, size=I, p=cat_p / cat_p.sum())
    # brand b belongs to category b % CATEGORIES; an item's brand is one of its category's
    per_cat = np.bincount(np.arange(BRANDS) % CATEGORIES, minlength=CATEGORIES)
    item_brand = item_category + CATEGORIES * np.floor(rng.random(I) * per_cat[item_category]).astype(np.int64)
    n_genres = rng.choice(len(GENRE_COUNT_P), size=I, p=GENRE_COUNT_P)
    order = np.argsort(rng.random((I, len(GENRES))), axis=1)[:, :len(GENRE_COUNT_P) - 1]
    item_genres = np.where(np.arange(len(GENRE_COUNT_P) - 1)[None, :] < n_genres[:, None], order, -1)
    cat_mu = rng.uniform(1.5, 5.0, CATEGORIES)
    item_price = np.floor(np.exp(cat_mu[item_category] + 0.5 * rng.standard_normal(I))) + 0.99
    # each side feature value's own random vector; x = their sum
    g_age, g_gender, g_city = _unit(rng, len(AGES), D), _unit(rng, len(GENDERS), D), _unit(rng, CITIES, D)
    g_cat, g_brand, g_genre = _unit(rng, CATEGORIES, D), _unit(rng, BRANDS, D), _unit(rng, len(GENRES), D)
    g_price = _unit(rng, 2, D)
    x_user = g_age[user_age] + g_gender[user_gender] + g_city[user_city]
    has = item_genres >= 0
    genre_mean = (np.where(has[..., None], g_genre[np.maximum(item_genres, 0)], 0.0).sum(1)
                  / np.maximum(has.sum(1), 1)[:, None])
    z = np.log(item_price)
    z = (z - z.mean()) / z.std()
    x_item = g_cat[item_category] + 0.7 * g_brand[item_brand] + genre_mean + np.outer(z, g_price[0]) \
        + np.outer((z * z - 1) / math.sqrt(2), g_price[1])
    A = _unit(rng, D, D) / math.sqrt(D)
    B = _unit(rng, D, D) / math.sqrt(D)
    user_feat = math.sqrt(1 - model.user_residual ** 2) * _standardise(x_user @ A.T)
    item_feat = math.sqrt(1 - model.item_residual ** 2) * _standardise(x_item @ B.T)
    user_vec = user_feat + model.user_residual * _unit(rng, U, D)
    item_vec = item_feat + model.item_residual * _unit(rng, I, D)
    rank = rng.permutation(I)
    w = 1.0 / (rank + 1.0) ** model.zipf
    world = World(model=model, bias=0.0, user_age=user_age, user_gender=user_gender, user_city=user_city,
                  item_category=item_category, item_brand=item_brand, item_genres=item_genres,
                  item_price=item_price, user_vec=user_vec, item_vec=item_vec, user_feat_vec=user_feat,
                  item_feat_vec=item_feat, item_weight=w / w.sum())
    # the bias for the target click rate, on a seeded sample of impressions
    srng = np.random.default_rng([model.seed, 0xB1A5])
    n = 50_000
    logit = world.logits(srng.integers(0, U, n), _draw_items(world, srng.random(n)))
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) < model.click_rate:
            lo = mid
        else:
            hi = mid
    return World(**{**world.__dict__, "bias": (lo + hi) / 2})


def _draw_items(world: World, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(world.item_weight)
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), world.model.n_items - 1)


@dataclass(frozen=True)
class Texts:
    """Each user's and item's column texts ('S' arrays by index) and the hours'."""

    user: dict[str, np.ndarray]
    item: dict[str, np.ndarray]
    hour: np.ndarray


def column_texts(world: World) -> Texts:
    """The text of every user column per user and every item column per item.

        item_genres: [2, 7, -1, -1] -> b"Animation|History"; [-1, ...] -> b"" (missing)
    """
    genre = np.array([g.encode() for g in GENRES])
    gl = world.item_genres
    parts = np.where(gl >= 0, genre[np.maximum(gl, 0)], b"")
    genres = parts[:, 0]
    for j in range(1, gl.shape[1]):
        genres = np.char.add(genres, np.where(gl[:, j] >= 0, np.char.add(b"|", parts[:, j]), b""))
    user = {"user_id": world.user_keys,
            "user_age": np.array([a.encode() for a in AGES])[world.user_age],
            "user_gender": np.array([g.encode() for g in GENDERS])[world.user_gender],
            "user_city": np.char.add(b"city", np.char.zfill(world.user_city.astype("S3"), 3))}
    item = {"item_id": world.item_keys,
            "item_category": np.char.add(b"cat", np.char.zfill(world.item_category.astype("S2"), 2)),
            "item_brand": np.char.add(b"brand", np.char.zfill(world.item_brand.astype("S3"), 3)),
            "item_genres": genres,
            "item_price": np.char.mod("%.2f", world.item_price).astype("S")}
    return Texts(user=user, item=item, hour=np.arange(24).astype("S2"))


@dataclass(frozen=True)
class Segments:
    """A line's text as runs of adjacent columns of one source (``label``, ``user``, ``item``, ``hour``),
    each run's text per index of its source, delimiters inside: a line is its runs' texts joined by the
    delimiter. conf/recall.yaml's 11 columns are 4 runs: [click] [user_id .. user_city] [item_id ..
    item_price] [hour]."""

    delimiter: bytes
    runs: tuple[tuple[str, tuple[bytes, ...]], ...]


def line_segments(texts: Texts, columns: Sequence[str], label: str, delimiter: str) -> Segments:
    sep = delimiter.encode()

    def source(c: str) -> str:
        return "label" if c == label else "hour" if c == "hour" else "user" if c in texts.user else "item"

    runs: list[tuple[str, list[str]]] = []
    for c in columns:
        if runs and runs[-1][0] == source(c):
            runs[-1][1].append(c)
        else:
            runs.append((source(c), [c]))
    table = {"label": {label: np.array([b"0", b"1"])}, "hour": {"hour": texts.hour}, "user": texts.user,
             "item": texts.item}
    out = []
    for src, cols in runs:
        joined = table[src][cols[0]]
        for c in cols[1:]:
            joined = np.char.add(np.char.add(joined, sep), table[src][c])
        out.append((src, tuple(joined.tolist())))
    return Segments(delimiter=sep, runs=tuple(out))


@dataclass(frozen=True)
class RecallChunk:
    user: np.ndarray        # int32 [n]
    item: np.ndarray        # int32 [n]
    label: np.ndarray       # uint8 [n]
    prob: np.ndarray        # float32 [n]: the true click probability
    text: bytes


def make_chunk(world: World, segments: Segments, day: int, chunk: int, rows: int) -> RecallChunk:
    """One chunk of a day file: the same (world, day, chunk, rows) always gives the same bytes."""
    rng = np.random.default_rng([world.model.seed, day, chunk, 0x5EC1])
    users = rng.integers(0, world.model.n_users, rows)
    hour_cdf = np.cumsum(HOUR_TRAFFIC) / HOUR_TRAFFIC.sum()
    hours = np.minimum(np.searchsorted(hour_cdf, rng.random(rows), side="right"), 23)
    items = _draw_items(world, rng.random(rows))
    prob = 1.0 / (1.0 + np.exp(-world.logits(users, items)))
    clicks = (rng.random(rows) < prob).astype(np.uint8)
    index = {"label": clicks, "user": users, "item": items, "hour": hours}
    # bytes joins in C are several times faster here than numpy byte scatters (pipeline.generate's)
    cols = [[text[i] for i in index[src].tolist()] for src, text in segments.runs]
    text = b"\n".join(map(segments.delimiter.join, zip(*cols))) + (b"\n" if rows else b"")
    return RecallChunk(user=users.astype(np.int32), item=items.astype(np.int32), label=clicks,
                       prob=prob.astype(np.float32), text=text)


def _chunk_job(args: tuple[Any, ...]) -> RecallChunk:
    return make_chunk(*args)


def check_layout(contract: FeatureContract) -> None:
    """Refuse a contract whose columns are not the ones this generator writes (conf/recall.yaml's)."""
    if contract.recall is None:
        raise ValueError(f"contract {contract.name}: not a recall contract (no recall key)")
    if contract.source.day_from != "file_name":
        raise ValueError(f"contract {contract.name}: the generator writes one file per day (source.day_from: file_name)")
    have = set(contract.source.columns) - {contract.label}
    if have != set(COLUMNS):
        raise ValueError(f"contract {contract.name}: the recall generator writes the columns {', '.join(COLUMNS)} "
                         f"and the label; the contract's source.columns differ (missing: "
                         f"{sorted(set(COLUMNS) - have)}, extra: {sorted(have - set(COLUMNS))})")
    for f in contract.fields:
        if f.name == "item_genres" and (f.kind != "categorical" or getattr(f, "list", None) is None):
            raise ValueError(f"contract {contract.name}: item_genres must be a list-valued categorical field")
    if contract.recall.user_key != "user_id" or contract.recall.item_key != "item_id":
        raise ValueError(f"contract {contract.name}: the recall generator's keys are user_id and item_id")


def chunk_plan(rows: int, chunk_rows: int = CHUNK_ROWS) -> list[int]:
    full, rest = divmod(rows, chunk_rows)
    return [chunk_rows] * full + ([rest] if rest else [])


def generate(contract: FeatureContract, out: Path, days: Sequence[int], rows_per_day: int, seed: int,
             workers: int = 1, users: int = DEFAULT_USERS, items: int = DEFAULT_ITEMS,
             chunk_rows: int = CHUNK_ROWS, model: PreferenceModel | None = None) -> dict:
    """Write each day N's file, ``out/truth/day_<N>.{user,item,label,prob}``, ``recall_world.npz`` and
    ``recall_model.json``; returns a summary. Files are written aside and renamed when complete.
    ``model``: other knobs of the truth (its seed, users and items are replaced by the arguments')."""
    check_layout(contract)
    if users < 1 or items < 1:
        raise ValueError("--users and --items must be at least 1")
    model = dataclasses.replace(model or PreferenceModel(seed=seed), seed=seed, n_users=users, n_items=items)
    out.mkdir(parents=True, exist_ok=True)
    truth = out / "truth"
    truth.mkdir(exist_ok=True)
    t0 = time.time()
    world = build_world(model)
    segments = line_segments(column_texts(world), contract.source.columns, contract.label,
                             contract.source.delimiter)
    world.save(truth / ".recall_world.npz")
    os.replace(truth / ".recall_world.npz", truth / "recall_world.npz")
    summary: dict = {"days": {}, "seed": seed, "rows_per_day": rows_per_day, "users": users, "items": items,
                     "bias": world.bias, "model": world.model.__dict__}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    columns = contract.source.columns
    exts = ("user", "item", "label", "prob")            # RecallChunk's arrays, one side file each
    try:
        for day in days:
            plan = [(world, segments, day, k, n)
                    for k, n in enumerate(chunk_plan(rows_per_day, chunk_rows))]
            chunks: Iterator[RecallChunk] = pool.map(_chunk_job, plan) if pool else map(_chunk_job, plan)
            final = out / layout.day_file_name(contract.source.file_pattern, day)
            tmp = out / f".{final.name}.inprogress"
            sides = {ext: open(truth / f".day_{day}.{ext}", "wb") for ext in exts}
            positives = 0
            try:
                with open(tmp, "wb") as fh:
                    for c in chunks:
                        fh.write(c.text)
                        for ext in exts:
                            sides[ext].write(getattr(c, ext).tobytes())
                        positives += int(c.label.sum())
            finally:
                for fs in sides.values():
                    fs.close()
            for ext in exts:
                os.replace(truth / f".day_{day}.{ext}", truth / f"day_{day}.{ext}")
            os.replace(tmp, final)
            summary["days"][day] = {"rows": rows_per_day, "positives": positives}
            log.info("%s: %d rows, %.1f%% clicked", final.name, rows_per_day, 100 * positives / max(rows_per_day, 1))
    finally:
        if pool:
            pool.shutdown()
    summary["seconds"] = round(time.time() - t0, 2)
    meta = {**summary, "days": sorted(int(d) for d in days), "positives": summary["days"],
            "dim": world.model.dim, "columns": list(columns), "label": contract.label}
    (truth / ".recall_model.json").write_text(json.dumps(meta, indent=1, default=str))
    os.replace(truth / ".recall_model.json", truth / "recall_model.json")
    return summary


def read_world(raw_dir: Path) -> World:
    """The world a recall generation wrote (``RAW/truth/recall_world.npz`` and ``recall_model.json``)."""
    meta = json.loads((raw_dir / "truth" / "recall_model.json").read_text())
    z = np.load(raw_dir / "truth" / "recall_world.npz")
    model = PreferenceModel(**meta["model"])
    names = [k for k in World.__dataclass_fields__ if k not in ("model", "bias")]
    return World(model=model, bias=float(meta["bias"]), **{k: z[k] for k in names})


def read_day(raw_dir: Path, day: int) -> dict[str, np.ndarray]:
    """Per line of day_<N>, in line order: ``user`` and ``item`` (generator indices; the raw keys are
    ``World.user_keys[user]``), ``label`` and ``prob``."""
    t = raw_dir / "truth"
    return {"user": np.fromfile(t / f"day_{day}.user", dtype=np.int32),
            "item": np.fromfile(t / f"day_{day}.item", dtype=np.int32),
            "label": np.fromfile(t / f"day_{day}.label", dtype=np.uint8),
            "prob": np.fromfile(t / f"day_{day}.prob", dtype=np.float32)}
