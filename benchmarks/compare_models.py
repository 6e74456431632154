"""The paper's comparison on generated logs: python -m deepfm.compare on data made here when missing.

    python benchmarks/compare_models.py --raw RAW_DIR --data FEATURIZED_DIR [--epochs 5] [--nproc 2]
        [--rows-per-day 1000000] [--days 6] [--models lr,fm,dnn,deepfm] [--seeds 1234,...] [--work DIR]

RAW_DIR is pipeline.generate's output (its truth/ gives the oracle), FEATURIZED_DIR its featurized form;
either is made first when missing (--days days of --rows-per-day rows, seed 7, fields of up to
--max-cardinality values, featurized by `spark-submit jobs/featurize.py` with conf/criteo_small.yaml and
negative sampling 0.5). Then `python -m deepfm.compare` trains each model (a real `torchrun
deepfm/train.py` run; early stopping on valid AUC, the best valid weights tested) into --work and writes
its comparison.json, table2.md (test AUC, logloss, the share of the LR -> oracle AUC gap closed, training
time relative to LR, the paper's Criteo figures), efficiency.png and report.html there; a run already
finished in --work is not trained again (delete --work to start over).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from pipeline.manifest import is_complete  # noqa: E402


def run_step(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}   # spark-submit finds python3
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rows-per-day", type=int, default=1_000_000, help="when generating RAW_DIR")
    p.add_argument("--days", type=int, default=6, help="when generating RAW_DIR: train days + valid + test")
    p.add_argument("--max-cardinality", type=int, default=50_000, help="when generating RAW_DIR")
    p.add_argument("--config", default=str(ROOT / "conf" / "criteo_small.yaml"), help="feature contract")
    p.add_argument("--neg-sample-rate", type=float, default=0.5, help="when featurizing")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--models", default="lr,fm,dnn,deepfm", help="all, or a list (python -m deepfm.compare --models)")
    p.add_argument("--seeds", help="e.g. 1,2 (default: conf/train.yaml's seed)")
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-compare"), help="the comparison's folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting (deepfm.compare)")
    a = p.parse_args()
    if not (a.raw / "truth" / "model.json").exists():
        run_step([str(BIN / "python"), "-m", "pipeline.generate", "--out", str(a.raw), "--config", a.config,
                  "--days", str(a.days), "--rows-per-day", str(a.rows_per_day),
                  "--max-cardinality", str(a.max_cardinality), "--seed", "7"])
    if not is_complete(a.data):
        log4j = ROOT / "tools" / "log4j2.properties"
        run_step([str(BIN / "spark-submit"), "--master", "local[2]", "--driver-memory", "4g",
                  "--driver-java-options", f"-Dlog4j2.configurationFile=file:{log4j}", str(ROOT / "jobs" / "featurize.py"),
                  "--input", str(a.raw), "--output", str(a.data), "--config", a.config,
                  "--neg-sample-rate", str(a.neg_sample_rate), "--overwrite"])
    cmd = [sys.executable, "-m", "deepfm.compare", "--data", str(a.data), "--models", a.models, "--out", str(a.work),
           "--epochs", str(a.epochs), "--nproc", str(a.nproc), "--set", f"batch_size={a.batch_size}",
           "--set", "checkpoint_every_steps=0", *[x for s in a.set for x in ("--set", s)]]
    if a.seeds:
        cmd += ["--seeds", a.seeds]
    sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
