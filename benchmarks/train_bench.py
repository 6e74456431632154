"""Training throughput, reading included: TorchRec DeepFM on 1 and 2 ranks vs plain PyTorch.

    python benchmarks/train_bench.py --data FEATURIZED_DIR [--steps 150] [--batch-size 2048]
        [--precision auto|bf16|fp32]

Both the TorchRec trainer and the plain baseline run under the same precision: bf16 autocast or fp32;
auto (the default, as the trainer's `bf16: auto`) is bf16 where the CPU has avx512_bf16 or amx_bf16.

FEATURIZED_DIR should be made with conf/criteo.yaml (26 categorical fields of 1M buckets: the paper's
model size), e.g. by benchmarks/featurize_bench.py (its feat_x1 output). Each run is a real torchrun;
examples/s is measured over the whole loop (petastorm reading, KJT building, forward, backward,
optimizers) by deepfm/train.py itself (metrics.json train.examples_per_s).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deepfm.cluster import native_bf16  # noqa: E402
from pipeline.manifest import open_featurized  # noqa: E402


def torchrec_run(data: str, nproc: int, steps: int, batch: int, bf16: bool, work: Path) -> float:
    run = work / f"torchrec_{nproc}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "deepfm" / "train.py"),
           "--data", data, "--out", str(run), "--epochs", "1", "--max-steps", str(steps), "--batch-size", str(batch),
           "--checkpoint-every-steps", "0", "--no-test", "--bf16" if bf16 else "--no-bf16"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return json.loads((run / "metrics.json").read_text())["train"]["examples_per_s"]


def plain_run(data: str, nproc: int, steps: int, batch: int, bf16: bool) -> float:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "benchmarks" / "plain_deepfm.py"),
           "--data", data, "--steps", str(steps), "--batch-size", str(batch)] + (["--bf16"] if bf16 else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])["examples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--plain-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-bench"))
    a = p.parse_args()
    m = open_featurized(a.data)
    sizes = [f.num_embeddings for f in m.fields]
    native, why = native_bf16(torch.device("cpu"))
    bf16 = native if a.precision == "auto" else a.precision == "bf16"
    print(f"precision: {'bf16' if bf16 else 'fp32'} ({a.precision}; {why})")
    print(f"data: {a.data}, {len(sizes)} tables, largest {max(sizes):,} rows, dim {m.fields[0].embedding_dim}, "
          f"batch {a.batch_size}/rank, bf16 {bf16}")
    r1 = torchrec_run(a.data, 1, a.steps, a.batch_size, bf16, a.work)
    print(f"torchrec deepfm, 1 rank : {r1:,.0f} examples/s", flush=True)
    r2 = torchrec_run(a.data, 2, a.steps, a.batch_size, bf16, a.work)
    print(f"torchrec deepfm, 2 ranks: {r2:,.0f} examples/s", flush=True)
    b2 = plain_run(a.data, 2, a.plain_steps, a.batch_size, bf16)
    print(f"plain pytorch (EmbeddingBag + DDP + dense Adam), 2 ranks: {b2:,.0f} examples/s", flush=True)
    print(f"ratio torchrec/plain at 2 ranks: {r2 / b2:.2f}x; 2 ranks / 1 rank: {r2 / r1:.2f}x")


if __name__ == "__main__":
    main()
