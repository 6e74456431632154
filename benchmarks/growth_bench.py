"""Training cost as the tables grow: the same rows featurized with 10^4, 10^5 and 10^6 hash buckets per
categorical field, then `torchrun deepfm/train.py` (defaults) and DeepCTR-Torch's DeepFM on each, in one
sitting.

    python benchmarks/growth_bench.py [--raw RAW] [--buckets 10000,100000,1000000] [--rows-per-day 1000000]
        [--days 3] [--work /tmp/clickpipe-growth]

RAW (generated when missing: --days days x --rows-per-day rows of ``pipeline.generate --seed 7``) is
featurized once per bucket count by `spark-submit jobs/featurize.py` with conf/criteo.yaml and
``categorical.defaults.hash_buckets`` set (a contract file of two lines on top of it; not timed). The
project's fused sparse update touches only the rows a batch looks up, so its examples/s should stay flat;
DeepCTR-Torch's dense Adam steps over every row of every table each batch. Prints one line per size and
a table. Needs the bench extra (`pip install -e .[bench]`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.featurize_bench import spark_submit  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.train_bench import project, reference  # noqa: E402
from pipeline.contract import load_contract  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.manifest import open_featurized  # noqa: E402

BASE = ROOT / "conf" / "criteo.yaml"


def featurize(raw: Path, buckets: int, work: Path) -> Path:
    out = work / f"feat_{buckets}"
    if (out / "_SUCCESS").exists():
        return out
    contract = work / f"criteo_{buckets}.yaml"
    contract.write_text(f"base: {BASE}\ncategorical:\n  defaults: {{hash_buckets: {buckets}}}\n")
    spark_submit(ROOT / "jobs" / "featurize.py", ["--input", str(raw), "--output", str(out), "--config", str(contract),
                                                 "--overwrite"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path)
    p.add_argument("--buckets", default="10000,100000,1000000")
    p.add_argument("--rows-per-day", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--reference-threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-growth"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    raw = a.raw or a.work / "raw"
    if not (raw / "_done").exists() and a.raw is None:
        generate(load_contract(BASE), raw, list(range(a.days)), a.rows_per_day, seed=7, workers=2)
        (raw / "_done").write_text("")
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores; {raw}", flush=True)
    rows = []
    for b in (int(x) for x in a.buckets.split(",")):
        feat = featurize(raw, b, a.work)
        m = open_featurized(feat)
        largest = max(f.num_embeddings for f in m.fields)
        ours = project(str(feat), 2, 1, [], a.work)
        ref = reference(str(feat), a.reference_threads, 1, a.work)
        rows.append((b, largest, m.rows("train"), ours, ref))
        print(f"  {b:,} buckets (largest table {largest:,} rows): project {ours['examples_per_s']:,.0f} examples/s "
              f"(AUC {ours['auc']:.4f}), DeepCTR-Torch {ref['examples_per_s']:,.0f} (AUC {ref['auc']:.4f}), "
              f"ratio {ours['examples_per_s'] / ref['examples_per_s']:.2f}x", flush=True)
    first_o, first_r = rows[0][3]["examples_per_s"], rows[0][4]["examples_per_s"]
    print("\n| hash buckets a field | largest table | train rows | project examples/s (vs smallest) | "
          "DeepCTR-Torch examples/s (vs smallest) | ratio | test AUC project / DeepCTR-Torch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for b, largest, n, o, r in rows:
        print(f"| {b:,} | {largest:,} | {n:,} | {o['examples_per_s']:,.0f} ({o['examples_per_s'] / first_o:.2f}) | "
              f"{r['examples_per_s']:,.0f} ({r['examples_per_s'] / first_r:.2f}) | "
              f"{o['examples_per_s'] / r['examples_per_s']:.2f}x | {o['auc']:.4f} / {r['auc']:.4f} |")


if __name__ == "__main__":
    main()
