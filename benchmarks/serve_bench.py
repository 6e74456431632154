"""Online latency: ``Predictor.predict`` in-process and the HTTP service (python -m deepfm.serve) on 127.0.0.1.

    python benchmarks/serve_bench.py --model small=MODEL.pt2 [--model paper=PAPER.pt2 ...]
        [--raw DAY_FILE] [--calls 2000] [--sizes 1,256] [--concurrency 1,4,16] [--http-sizes 1,32]
        [--http-seconds 8] [--threads 2] [--torch-threads 1] [--json OUT.json]

For each model:
  in-process: ``Predictor.predict(rows)`` for 1 row and 256 rows (--sizes), --calls timed calls after
              warm-up (torch intra-op threads: --torch-threads), each call's p50 and p99, and (a quarter
              as many calls) its two halves: the featurizer (raw rows -> ids, Python) and the graph (ids
              -> probabilities, torch);
  HTTP:       the service started as users start it (``python -m deepfm.serve --port 0 --threads T
              --torch-threads K``), then for each number of clients (--concurrency) and rows a request
              (--http-sizes): every client on its own keep-alive connection sends POST /predict back to
              back for --http-seconds (after 1 s of warm-up); requests/s, rows/s, p50 and p99 of a
              request's round trip. The clients are one asyncio process with a minimal HTTP/1.1 client
              (a few tens of microseconds a request), so that the load generator takes little of the CPU
              it shares with the server. Every answer is checked: status 200 and the model's fingerprint.

Rows: lines of --raw (a raw log day file of the model's layout), else the model card's golden rows,
repeated to the sizes needed. Prints a table, the CPU and the load average (other jobs on the machine
are not stopped: say so with the figures).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from deepfm.serving import Predictor  # noqa: E402
from pipeline.rows import split_line  # noqa: E402


def percentiles(seconds: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    s = np.sort(np.asarray(seconds))
    return 1e3 * float(s[len(s) // 2]), 1e3 * float(s[min(len(s) - 1, int(len(s) * 0.99))])


def rows_for(p: Predictor, raw: Path | None, n: int) -> list[dict[str, Any]]:
    if raw is not None:
        contract = p.card.manifest.contract
        base: list[dict[str, Any]] = []
        with open(raw) as f:
            for _, line in zip(range(n), f):
                row = dict(split_line(line.rstrip("\n"), contract))
                row.pop(p.card.manifest.source_label, None)
                base.append(row)
    else:
        base = [dict(g.row) for g in p.card.golden]
    if not base:
        sys.exit("no rows: pass --raw")
    return [base[i % len(base)] for i in range(n)]


def timed(f: Any, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        f()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def in_process(p: Predictor, rows: list[dict[str, Any]], sizes: Sequence[int], calls: int) -> list[dict[str, Any]]:
    res = []
    for n in sizes:
        batch = rows[:n]
        ids = p.ids(batch)
        k = calls
        total = percentiles(timed(lambda: p.predict(batch), k, warmup=max(20, k // 10)))
        part = max(50, k // 4)                          # the two halves: fewer calls
        feat = percentiles(timed(lambda: p.ids(batch), part, warmup=10))
        graph = percentiles(timed(lambda: p.predict_ids(ids), part, warmup=10))
        res.append({"rows": n, "calls": k, "p50_ms": total[0], "p99_ms": total[1], "featurize_p50_ms": feat[0],
                    "featurize_p99_ms": feat[1], "graph_p50_ms": graph[0], "graph_p99_ms": graph[1]})
        print(f"  in-process {n:4d} row(s), {k} calls: p50 {total[0]:.3f} ms, p99 {total[1]:.3f} ms "
              f"(featurize p50 {feat[0]:.3f}, graph p50 {graph[0]:.3f})", flush=True)
    return res


# --- the HTTP side -----------------------------------------------------------------------------------

def start_service(model: Path, threads: int, torch_threads: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "deepfm.serve", "--model", str(model), "--port", "0", "--threads", str(threads),
           "--torch-threads", str(torch_threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            print("  " + line.strip().split(" INFO ", 1)[-1], flush=True)
            return proc, int(m.group(1))
    proc.wait()
    sys.exit(f"{' '.join(cmd)} exited {proc.returncode} before serving")


async def one_client(port: int, request: bytes, fingerprint: bytes, stop_at: float, record_from: float,
                     seconds: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
            done = time.perf_counter()
            if status != b"200" or fingerprint not in head:
                raise RuntimeError(f"answer {status!r}: {body[:300]!r}")
            if t >= record_from:
                seconds.append(done - t)
    finally:
        writer.close()


async def load(port: int, request: bytes, fingerprint: bytes, clients: int, duration: float) -> tuple[list[float], float]:
    seconds: list[float] = []
    t0 = time.perf_counter()
    record_from, stop_at = t0 + 1.0, t0 + 1.0 + duration
    await asyncio.gather(*(one_client(port, request, fingerprint, stop_at, record_from, seconds)
                           for _ in range(clients)))
    return seconds, time.perf_counter() - record_from


def http_request(rows: Sequence[Mapping[str, Any]]) -> bytes:
    body = json.dumps({"rows": rows}).encode()
    return (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def over_http(model: Path, fingerprint: str, rows: list[dict[str, Any]], concurrency: Sequence[int],
              sizes: Sequence[int], duration: float, threads: int, torch_threads: int) -> list[dict[str, Any]]:
    proc, port = start_service(model, threads, torch_threads)
    res = []
    try:
        fp = fingerprint.encode()
        for n in sizes:
            req = http_request(rows[:n])
            for c in concurrency:
                seconds, wall = asyncio.run(load(port, req, fp, c, duration))
                p50, p99 = percentiles(seconds)
                rps = len(seconds) / wall
                res.append({"rows": n, "clients": c, "requests": len(seconds), "requests_per_s": rps,
                            "rows_per_s": rps * n, "p50_ms": p50, "p99_ms": p99})
                print(f"  HTTP {n:3d} row(s) x {c:2d} client(s): {rps:8,.0f} requests/s, {rps * n:9,.0f} rows/s, "
                      f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return res


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model.pt2 to measure")
    ap.add_argument("--raw", type=Path, help="a raw log day file whose lines are the rows (default: golden rows)")
    ap.add_argument("--calls", type=int, default=2000, help="timed predict calls per size (default 2000)")
    ap.add_argument("--sizes", default="1,256", help="rows per in-process call (default 1,256)")
    ap.add_argument("--concurrency", default="1,4,16", help="HTTP clients (default 1,4,16)")
    ap.add_argument("--http-sizes", default="1,32", help="rows per HTTP request (default 1,32)")
    ap.add_argument("--http-seconds", type=float, default=8.0, help="seconds measured per HTTP setting (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="the service's --threads (default 2)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads, both sides (default 1)")
    ap.add_argument("--no-http", action="store_true", help="in-process figures only")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    sizes = [int(x) for x in a.sizes.split(",")]
    http_sizes = [int(x) for x in a.http_sizes.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "threads": a.threads, "torch_threads": a.torch_threads,
                           "load_average_start": os.getloadavg(), "models": {}}
    print(f"{out['cpu']}, {out['cores']} cores, torch {out['torch']}, load average {os.getloadavg()[0]:.1f}")
    for spec in a.model:
        name, _, path = spec.partition("=")
        model = Path(path or name)
        t = time.perf_counter()
        p = Predictor.load(model)
        size = model.stat().st_size / 1e6
        print(f"{name}: {model} ({size:,.0f} MB, {p.card.model}, hidden {p.card.train_config.get('hidden')}, "
              f"{sum(p.card.manifest.table_sizes().values()):,} table rows), loaded and checked in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        rows = rows_for(p, a.raw, max(sizes + http_sizes))
        m: dict[str, Any] = {"path": str(model), "mb": size, "in_process": in_process(p, rows, sizes, a.calls)}
        fingerprint = p.fingerprint
        del p                                           # the server loads its own (a paper-size one is 2 GB)
        gc.collect()
        if not a.no_http:
            m["http"] = over_http(model, fingerprint, rows, conc, http_sizes, a.http_seconds, a.threads,
                                  a.torch_threads)
        out["models"][name] = m
    out["load_average_end"] = os.getloadavg()
    print_table(out)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


def print_table(out: Mapping[str, Any]) -> None:
    print(f"\n{out['cpu']}, {out['cores']} cores, torch {out['torch']}, {out['date']}; service --threads "
          f"{out['threads']} --torch-threads {out['torch_threads']}; load average "
          f"{out['load_average_start'][0]:.1f} -> {out['load_average_end'][0]:.1f} (shared machine)")
    print("\n| model | in-process rows | p50 ms | p99 ms | featurize p50 ms | graph p50 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in out["models"].items():
        for r in m["in_process"]:
            print(f"| {name} | {r['rows']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['featurize_p50_ms']:.3f} | "
                  f"{r['graph_p50_ms']:.3f} |")
    if any("http" in m for m in out["models"].values()):
        print("\n| model | rows/request | clients | requests/s | rows/s | p50 ms | p99 ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, m in out["models"].items():
            for r in m.get("http", []):
                print(f"| {name} | {r['rows']} | {r['clients']} | {r['requests_per_s']:,.0f} | {r['rows_per_s']:,.0f} | "
                      f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")


if __name__ == "__main__":
    main()
