"""The paper's comparison on generated logs: LR, FM, DNN and DeepFM from the same code, against the
oracle (the generator's true click probabilities).

    python benchmarks/compare_models.py --raw RAW_DIR --data FEATURIZED_DIR [--epochs 5] [--nproc 2]
        [--rows-per-day 1000000] [--days 6]

RAW_DIR is pipeline.generate's output (for truth/), FEATURIZED_DIR its featurized form; either is made
first when missing (--days days of --rows-per-day rows, seed 7, fields of up to --max-cardinality values,
featurized by `spark-submit jobs/featurize.py` with conf/criteo_small.yaml and negative sampling 0.5).
Each model is a real `torchrun deepfm/train.py --model M` run (early stopping on valid AUC, the best valid
weights tested); the table shows test AUC, logloss, the share of the LR -> oracle AUC gap recovered, and
training time relative to LR (the paper's efficiency measure).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from pipeline.generate import read_truth  # noqa: E402
from pipeline.manifest import is_complete, open_featurized  # noqa: E402
from pipeline.metrics import summary  # noqa: E402


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
    p.add_argument("--models", default="lr,fm,dnn,deepfm")
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-compare"))
    p.add_argument("--extra", default="", help="extra train.py flags, e.g. '--bf16'")
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
    man = open_featurized(a.data)
    test_day = man.splits["test"].days[0]
    oracle = summary(*read_truth(a.raw, test_day))
    rows = {}
    for model in a.models.split(","):
        run = a.work / model
        shutil.rmtree(run, ignore_errors=True)
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={a.nproc}", str(ROOT / "deepfm" / "train.py"),
               "--data", str(a.data), "--out", str(run), "--model", model, "--epochs", str(a.epochs),
               "--batch-size", str(a.batch_size), "--checkpoint-every-steps", "0", *a.extra.split()]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{model}: " + r.stderr[-3000:])
        m = json.loads((run / "metrics.json").read_text())
        rows[model] = m
        valid = ", ".join(f"{h['auc']:.4f}" for h in m["history"])
        print(f"{model}: test AUC {m['test']['auc']:.4f} logloss {m['test']['logloss']:.4f} "
              f"({m['train']['seconds']:.0f} s; valid AUC per evaluation {valid}; tested the weights of step "
              f"{m.get('weights_from_step', m['global_step'])} of {m['global_step']})", flush=True)
    lr_auc = rows["lr"]["test"]["auc"] if "lr" in rows else None
    lr_s = rows["lr"]["train"]["seconds"] if "lr" in rows else None
    print(f"\ntrain rows {man.splits['train'].rows:,} (neg. sampling {man.sampling.neg_sample_rate}), "
          f"test rows {man.splits['test'].rows:,}, {a.epochs} epochs, {a.nproc} ranks\n")
    print("| model | test AUC | test logloss | LR->oracle gap recovered | train time / LR |")
    print("| --- | --- | --- | --- | --- |")
    for model, m in rows.items():
        gap = ((m["test"]["auc"] - lr_auc) / (oracle["auc"] - lr_auc)) if lr_auc is not None else float("nan")
        rel = m["train"]["seconds"] / lr_s if lr_s else float("nan")
        print(f"| {model} | {m['test']['auc']:.4f} | {m['test']['logloss']:.4f} | {100 * gap:.0f}% | {rel:.2f} |")
    print(f"| oracle (true click model) | {oracle['auc']:.4f} | {oracle['logloss']:.4f} | 100% | - |")


if __name__ == "__main__":
    main()
