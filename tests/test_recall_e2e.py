"""Recall end to end (issue 16): generated logs with a known preference (pipeline.generate, conf/recall.yaml) ->
``spark-submit jobs/featurize.py`` -> ``torchrun`` 2 gloo ranks ``deepfm/train.py --model two_tower`` ->
``python -m deepfm.export`` (user tower, item vectors, faiss flat index) -> recall@50 on the held-out day,
computed from the raw lines of that day through the exported user tower, beside the generator's own
baselines (pipeline.recall_truth): above popularity by a clear margin and at least 0.6x the ceiling.

The control: the same featurized output with every train positive's item replaced by a uniformly drawn
catalogue item (its item fields and item_index, and the catalogue's train counts and log_q recomputed),
trained alike: with no user-item association left to learn, and no popularity either, it stays near the
random ranking's recall.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import CONF, DRIVER_JAVA_OPTIONS, ROOT, run_torchrun

pytestmark = pytest.mark.slow

DAYS, ROWS_PER_DAY, USERS, ITEMS, SEED = 5, 50_000, 2_000, 1_000, 3
HELDOUT = DAYS - 1                  # the test day; DAYS - 2 is valid, the days before train
K = 50
TRAIN = ["--model", "two_tower", "--batch-size", "512", "--tower-hidden", "64", "--tower-dim", "16", "--dropout", "0",
         "--sparse-lr", "0.05", "--dense-lr", "0.003", "--temperature", "0.1", "--checkpoint-every-steps", "0",
         "--no-bf16"]


def featurize(raw: Path, out: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    r = subprocess.run(
        ["spark-submit", "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.sql.shuffle.partitions=2",
         "--driver-java-options", DRIVER_JAVA_OPTIONS,
         str(ROOT / "jobs" / "featurize.py"), "--input", str(raw), "--output", str(out),
         "--config", str(CONF / "recall.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]


def train(data: Path, run: Path, config: Path, epochs: int) -> dict[str, Any]:
    r = run_torchrun("deepfm/train.py", ["--data", str(data), "--out", str(run), "--config", str(config),
                                         "--epochs", str(epochs), *TRAIN])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((run / "metrics.json").read_text())


def shuffled_copy(src: Path, dst: Path, seed: int) -> Path:
    """The featurized output ``src`` with each train positive's item drawn uniformly from the catalogue
    (item fields and item_index; the catalogue's train_count and log_q recomputed), in the same files."""
    from pipeline import layout
    from pipeline import manifest as M
    shutil.copytree(src, dst)
    m = M.read(src)
    assert m.recall is not None
    cat_path = next((dst / m.recall.catalogue).glob("*.parquet"))
    cat = pq.read_table(cat_path)
    order = np.argsort(cat.column(layout.ITEM_INDEX).to_numpy())
    item_cols = [f.name for f in m.fields if f.side == "item"] + [layout.ITEM_INDEX]
    rng = np.random.default_rng(seed)
    counts = np.zeros(cat.num_rows, np.int64)
    for f in sorted((dst / "train").glob("*.parquet")):
        t = pq.read_table(f)
        drawn = order[rng.integers(0, cat.num_rows, t.num_rows)]          # catalogue rows of uniform items
        for c in item_cols:
            t = t.set_column(t.schema.get_field_index(c), t.schema.field(c), cat.column(c).take(pa.array(drawn)))
        counts += np.bincount(cat.column(layout.ITEM_INDEX).to_numpy()[drawn], minlength=cat.num_rows)
        pq.write_table(t, f, row_group_size=t.num_rows)
    per_row = counts[cat.column(layout.ITEM_INDEX).to_numpy()]
    log_q = np.log((per_row + 1) / (counts.sum() + cat.num_rows))
    cat = cat.set_column(cat.schema.get_field_index(layout.TRAIN_COUNT), layout.TRAIN_COUNT, pa.array(per_row))
    cat = cat.set_column(cat.schema.get_field_index(layout.LOG_Q), layout.LOG_Q, pa.array(log_q))
    pq.write_table(cat, cat_path)
    return dst


def heldout_recall(model: Path, items: Path, raw: Path, data: Path) -> dict[str, float]:
    """recall/hit rate/NDCG@K on the held-out day from its raw click lines through the exported user tower
    (a user's vector: the mean over its clicks of the day, as the trainer's evaluation), the exact top K of
    the exported item vectors with the items clicked before the day left out (the featurize job's seen/)."""
    from deepfm.retrieval import ItemVectors, exact_topk
    from deepfm.serving import UserEncoder
    from pipeline import layout
    from pipeline import manifest as M
    from pipeline import recall_metrics as R
    from pipeline.rows import split_line
    m = M.read(data)
    enc = UserEncoder.load(model)
    iv = ItemVectors.read(items)
    order = np.argsort(iv.index)
    vectors = iv.vectors[order]
    users = pq.read_table(data / layout.USERS)
    user_index = dict(zip(users.column(layout.USER_KEY).to_pylist(), users.column(layout.USER_INDEX).to_pylist()))
    c = m.contract
    rows = [split_line(line.rstrip("\n"), c) for line in (raw / f"day_{HELDOUT}").open()]
    clicks = [r for r in rows if r[c.label] == "1"]
    vec = enc.vectors(clicks)
    who = np.array([user_index[r[c.recall.user_key]] for r in clicks])
    seen = pq.read_table(data / layout.SEEN)
    sets = R.eval_sets(*(seen.column(x).to_numpy().astype(np.int64) for x in (layout.USER_INDEX, layout.ITEM_INDEX,
                                                                          "first_day")),
                       eval_day=HELDOUT, n_items=len(vectors))
    queries = np.stack([vec[who == u].mean(0) for u in sets.users])
    _, top = exact_topk(queries, vectors, K, exclude=[sets.seen(j) for j in range(len(sets))])
    return R.evaluate(top, sets, (K,))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> dict[str, Any]:
    from deepfm import export
    from pipeline import generate
    from pipeline.recall_truth import baselines
    root = tmp_path_factory.mktemp("recall_e2e")
    raw = root / "raw"
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        seconds[step] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
    generate.main(["--config", str(CONF / "recall.yaml"), "--out", str(raw), "--days", str(DAYS), "--rows-per-day",
                   str(ROWS_PER_DAY), "--users", str(USERS), "--items", str(ITEMS), "--seed", str(SEED),
                   "--workers", "2"])
    lap("generate")
    featurize(raw, root / "feat")
    lap("featurize")
    config = root / "train.yaml"
    config.write_text(f"recall_k: [{K}]\n")
    metrics = train(root / "feat", root / "run", config, epochs=3)
    lap("train")
    out = root / "model" / "user_tower.pt2"
    card = export.main(["--run", str(root / "run"), "--out", str(out), "--index", "flat"])
    lap("export")
    control = train(shuffled_copy(root / "feat", root / "shuffled", SEED + 1), root / "run_shuffled", config, epochs=2)
    lap("control")
    truth = baselines(raw, heldout_day=HELDOUT, train_days=range(DAYS - 2), ks=(K,))
    lap("baselines")
    return {"raw": raw, "data": root / "feat", "model": out, "items": out.with_name("items.parquet"),
            "index": out.with_name("items.flat.faiss"), "card": card, "metrics": metrics, "control": control,
            "truth": truth, "seconds": seconds}


def test_the_exported_towers_recall_beats_popularity_and_reaches_most_of_the_ceiling(pipeline_run: dict):
    got = heldout_recall(pipeline_run["model"], pipeline_run["items"], pipeline_run["raw"], pipeline_run["data"])
    truth, test = pipeline_run["truth"], pipeline_run["metrics"]["test"]
    r, pop, ceiling = got[f"recall@{K}"], truth["popularity"][f"recall@{K}"], truth["ceiling"][f"recall@{K}"]
    print(f"\nrecall@{K}: exported {r:.4f} (trainer's test {test[f'recall@{K}']:.4f}), popularity {pop:.4f}, "
          f"ceiling {ceiling:.4f} ({r / ceiling:.2f}x), random {truth['random'][f'recall@{K}']:.4f}, shuffled control "
          f"{pipeline_run['control']['test'][f'recall@{K}']:.4f}; users {got['users']:.0f}; seconds {pipeline_run['seconds']}")
    assert got["users"] == truth["users"] == test["users"]             # the same held-out users everywhere
    assert r == pytest.approx(test[f"recall@{K}"], abs=2e-3)           # raw lines -> export = the trainer's evaluation
    assert r >= pop + 0.1 and r >= 1.3 * pop
    assert r >= 0.6 * ceiling
    assert got[f"ndcg@{K}"] > truth["popularity"][f"ndcg@{K}"]


def test_the_label_shuffled_control_stays_near_the_random_ranking(pipeline_run: dict):
    control, truth = pipeline_run["control"]["test"], pipeline_run["truth"]
    random, pop = truth["random"][f"recall@{K}"], truth["popularity"][f"recall@{K}"]
    assert control[f"random_recall@{K}"] == pytest.approx(random, rel=1e-6)
    assert control[f"recall@{K}"] < random + 0.25 * (pop - random)


def test_the_exact_search_and_the_faiss_exact_index_agree(pipeline_run: dict):
    from deepfm.retrieve import Retriever
    info = pipeline_run["card"].retrieval.index
    assert info.kind == "flat" and info.recall == pytest.approx(1.0, abs=1e-3)
    rows = [{"user_id": f"u{u:05d}", "user_age": "25-34", "hour": str(u % 24)} for u in range(0, USERS, 20)]
    exact = Retriever.load(pipeline_run["model"], pipeline_run["items"]).top_k(rows, K)
    flat = Retriever.load(pipeline_run["model"], pipeline_run["items"], pipeline_run["index"]).top_k(rows, K)
    same = np.mean([a.keys == b.keys for a, b in zip(exact, flat)])
    assert same >= 0.95                                                # order may differ only at float ties
    assert np.mean([len(set(a.keys) & set(b.keys)) / K for a, b in zip(exact, flat)]) >= 0.999
