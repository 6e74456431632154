"""Training as users run it: `torchrun deepfm/train.py` (defaults, one epoch, reading included) against
DeepCTR-Torch's DeepFM on the same rows, in one sitting.

    python benchmarks/train_bench.py --data FEATURIZED [--epochs 1] [--nproc 2] [--repeat 1]
        [--reference-threads 2] [--extra "--batch-size 4096"] [--plain]

FEATURIZED is a featurized output (e.g. one 1M-row day with conf/criteo.yaml: the paper's model size).
Each run is a whole cold process: the trainer under torchrun with the project's defaults (conf/train.yaml;
examples/s as its metrics.json reports it: the training loop with petastorm reading and KJT building,
evaluation excluded) and benchmarks/deepctr_reference.py (one process, --reference-threads threads, the
same model settings; examples/s of its fit). Both are scored on the test split after the sampling
correction. Prints both examples/s, both test AUCs and the ratio; with --plain also the plain PyTorch
DeepFM (nn.EmbeddingBag + DDP + dense Adam, benchmarks/plain_deepfm.py). Needs the bench extra
(`pip install -e .[bench]`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from pipeline.manifest import open_featurized  # noqa: E402


def run(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{shlex.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r.stdout


def project(data: str, nproc: int, epochs: int, extra: list[str], work: Path) -> dict:
    out = work / "project_run"
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "deepfm" / "train.py"),
                   "--data", data, "--out", str(out), "--epochs", str(epochs), *extra])
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)      # GBs at the paper's size
    return {"examples_per_s": m["train"]["examples_per_s"], "auc": m.get("test", {}).get("auc"), "wall_s": wall,
            "precision": m.get("precision"), "loop": m.get("train_pipeline")}


def reference(data: str, threads: int, epochs: int, work: Path) -> dict:
    js = work / "reference.json"
    wall, _ = run([sys.executable, str(ROOT / "benchmarks" / "deepctr_reference.py"), "--data", data,
                   "--threads", str(threads), "--epochs", str(epochs), "--json", str(js)])
    r = json.loads(js.read_text())
    return {"examples_per_s": r["examples_per_s"], "auc": r["test"]["auc"], "wall_s": wall}


def plain(data: str, nproc: int, steps: int) -> float:
    _, out = run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
                  str(ROOT / "benchmarks" / "plain_deepfm.py"), "--data", data, "--steps", str(steps)])
    return float(json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["examples_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--reference-threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more deepfm/train.py flags, e.g. '--batch-size 4096'")
    p.add_argument("--plain", action="store_true", help="also the plain PyTorch baseline (slow)")
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-train-bench"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    m = open_featurized(a.data)
    sizes = [f.num_embeddings for f in m.fields]
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores; {a.data}: {m.rows('train'):,} train "
          f"rows, {len(sizes)} tables (largest {max(sizes):,} rows), {a.epochs} epoch(s)", flush=True)
    ours, refs = [], []
    for i in range(a.repeat):
        ours.append(project(a.data, a.nproc, a.epochs, shlex.split(a.extra), a.work))
        print(f"  run {i + 1}: torchrun deepfm/train.py ({a.nproc} ranks, {ours[-1]['precision']}, "
              f"{ours[-1]['loop']} loop): {ours[-1]['examples_per_s']:,.0f} examples/s, test AUC "
              f"{ours[-1]['auc']:.4f}, {ours[-1]['wall_s']:.0f} s wall", flush=True)
        refs.append(reference(a.data, a.reference_threads, a.epochs, a.work))
        print(f"  run {i + 1}: DeepCTR-Torch DeepFM ({a.reference_threads} threads): {refs[-1]['examples_per_s']:,.0f} "
              f"examples/s, test AUC {refs[-1]['auc']:.4f}, {refs[-1]['wall_s']:.0f} s wall", flush=True)
    o = statistics.median(r["examples_per_s"] for r in ours)
    ref = statistics.median(r["examples_per_s"] for r in refs)
    print(f"median examples/s: project {o:,.0f}, DeepCTR-Torch {ref:,.0f}: ratio {o / ref:.2f}x; test AUC project "
          f"{statistics.median(r['auc'] for r in ours):.4f}, DeepCTR-Torch {statistics.median(r['auc'] for r in refs):.4f}")
    if a.plain:
        b = plain(a.data, a.nproc, 20)
        print(f"plain PyTorch DeepFM ({a.nproc} ranks, 20 steps): {b:,.0f} examples/s; project / plain {o / b:.1f}x")


if __name__ == "__main__":
    main()
