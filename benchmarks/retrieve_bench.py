"""Brute-force retrieval time over a catalogue of 10^5 and 10^6 items (issue 16's targets), one process.

    python benchmarks/retrieve_bench.py [--items 100000,1000000] [--dim 49] [--queries 1000] [--k 100]

Per catalogue size: the exact chunked top-K (deepfm.retrieval.exact_topk: what evaluation and
``deepfm.retrieve`` use) for one query (median latency of 20) and for a batch of queries (queries/s);
faiss's exact inner-product index (flat) and HNSW (M 32, efSearch 128): build seconds, the same two
timings, and HNSW's recall@K against the exact search. Vectors are seeded normal (the timing does not
depend on the values; HNSW's recall does, so it is the model's own item vectors that the export reports).
The default dim 49 is the two-tower default: 16 (the FM part) + 1 (first order) + 32 (the towers).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_name  # noqa: E402
from deepfm.retrieval import ann_recall, build_index, exact_topk, search  # noqa: E402


def timed(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="100000,1000000")
    p.add_argument("--dim", type=int, default=49)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", default="1,2", help="torch and faiss threads, each setting in turn")
    p.add_argument("--methods", default="exact,flat,hnsw", help="of exact, flat, hnsw (HNSW's build at 10^6 items "
                                                               "takes minutes)")
    a = p.parse_args()
    methods = a.methods.split(",")
    import faiss
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores; dim {a.dim}, "
          f"k {a.k}, {a.queries} queries a batch")
    print("| items | method | threads | build s | 1 query ms (median of 20) | queries/s (batch) | recall@k vs exact |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for n in (int(x) for x in a.items.split(",")):
        items = rng.standard_normal((n, a.dim), dtype=np.float32)
        queries = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
        one = queries[:1]
        _, exact = exact_topk(queries, items, a.k)
        for threads in (int(x) for x in a.threads.split(",")):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            if "exact" in methods:
                t1 = timed(lambda: exact_topk(one, items, a.k), 20)
                tb = timed(lambda: exact_topk(queries, items, a.k), 1)
                print(f"| {n:,} | exact (chunked torch.topk) | {threads} | – | {t1 * 1e3:.2f} | {a.queries / tb:,.0f} "
                      "| 1 |", flush=True)
            for kind in [m for m in ("flat", "hnsw") if m in methods]:
                report(kind, threads, n, items, queries, one, exact, a.k)


def report(kind: str, threads: int, n: int, items: np.ndarray, queries: np.ndarray, one: np.ndarray,
           exact: np.ndarray, k: int) -> None:
    t = time.perf_counter()
    index = build_index(items, kind)
    build = time.perf_counter() - t
    t1 = timed(lambda: search(index, one, k), 20)
    tb = timed(lambda: search(index, queries, k), 1)
    _, got = search(index, queries, k)
    print(f"| {n:,} | faiss {kind} | {threads} | {build:.1f} | {t1 * 1e3:.2f} | {len(queries) / tb:,.0f} | "
          f"{ann_recall(got, exact):.4f} |", flush=True)


if __name__ == "__main__":
    main()
