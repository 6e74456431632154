"""Scoring raw logs against featurizing them, as users run the jobs: whole cold spark-submit processes.

    python benchmarks/score_bench.py [--rows-per-day 333334] [--days 3] [--repeat 2] [--config conf/criteo_small.yaml]
        [--work /tmp/clickpipe-score-bench] [--keep]

On one generated input (pipeline.generate: --days days of --rows-per-day rows, not timed) it makes a small
model once (not timed: spark-submit jobs/featurize.py with the settings of the tests' served model, negative
sampling 0.25, min_count 2 on every categorical field and a quantile field; torchrun --nproc_per_node=2
deepfm/train.py --max-steps 20; python -m deepfm.export), then alternates, --repeat times,

  featurize: spark-submit jobs/featurize.py (the model's settings: parse, reject, hash, bucket, fit the
             quantiles and the vocabulary, sample, split, write, verify, manifest)
  score:     spark-submit jobs/score.py --model model.pt2 (parse, reject, ids with the model's boundaries and
             vocabulary, score in the executors, write, scores.json)

each a new JVM (--master local[2], --driver-memory 4g), timed from launch to exit, and prints every pair's
times and ratio (score / featurize; issue 14's target: at most 2), the medians, and both jobs' own step
seconds. The work folder is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
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
from pipeline import manifest as M  # noqa: E402
from pipeline.contract import load_contract  # noqa: E402
from pipeline.generate import generate  # noqa: E402

# the tests' served model's featurize settings (tests/conftest.py SERVED_SETTINGS)
SETTINGS = ["--neg-sample-rate", "0.25", "--set", "categorical.defaults.min_count=2",
            "--set", "continuous.fields.I2.bucketing=quantile"]
TRAIN = ["--max-steps", "20", "--batch-size", "512", "--hidden", "64,64", "--checkpoint-every-steps", "10", "--no-test"]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def spark_submit(script: Path, args: list[str]) -> float:
    cmd = [str(BIN / "spark-submit"), "--master", "local[2]", "--driver-memory", "4g",
           "--conf", "spark.ui.showConsoleProgress=false",
           "--driver-java-options", f"-Dlog4j2.configurationFile=file:{ROOT}/tools/log4j2.properties",
           str(script), *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env())
    seconds = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return seconds


def run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    if r.returncode:
        sys.exit(f"{what} failed:\n{r.stderr[-3000:]}")


def make_model(work: Path, raw: Path, config: str) -> Path:
    """Featurize the input, train 20 steps on 2 gloo ranks, export: a small model of this input's contract."""
    model = work / "model.pt2"
    if model.exists():
        return model
    feat, run_dir = work / "model_feat", work / "model_run"
    spark_submit(ROOT / "jobs" / "featurize.py", ["--input", str(raw), "--output", str(feat), "--config", config,
                                                  "--overwrite", *SETTINGS])
    shutil.rmtree(run_dir, ignore_errors=True)
    run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(ROOT / "deepfm" / "train.py"),
         "--data", str(feat), "--out", str(run_dir), *TRAIN], "torchrun deepfm/train.py")
    run([sys.executable, "-m", "deepfm.export", "--run", str(run_dir), "--out", str(model)], "deepfm.export")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(feat, ignore_errors=True)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows-per-day", type=int, default=333_334)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--config", default=str(ROOT / "conf" / "criteo_small.yaml"))
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-score-bench"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (input, model, outputs)")
    a = p.parse_args()
    total = a.rows_per_day * a.days
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; {a.days} days x {a.rows_per_day:,} rows = {total:,} rows, {a.repeat} pairs",
          flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    raw = a.work / "raw"
    try:
        if not (raw / "_done").exists():
            shutil.rmtree(raw, ignore_errors=True)
            generate(load_contract(a.config), raw, list(range(a.days)), a.rows_per_day, seed=7, workers=2,
                     max_cardinality=30_000)
            shutil.rmtree(raw / "truth", ignore_errors=True)         # not log lines
            (raw / "_done").write_text("")
        model = make_model(a.work, raw, a.config)
        feats, scores, ratios = [], [], []
        steps: dict[str, dict] = {}
        for i in range(a.repeat):
            feat_out, score_out = a.work / "feat_out", a.work / "score_out"
            f = spark_submit(ROOT / "jobs" / "featurize.py", ["--input", str(raw), "--output", str(feat_out),
                                                              "--config", a.config, "--overwrite", *SETTINGS])
            s = spark_submit(ROOT / "jobs" / "score.py", ["--model", str(model), "--input", str(raw),
                                                          "--output", str(score_out), "--overwrite"])
            m = M.open_featurized(feat_out)
            sj = json.loads((score_out / "scores.json").read_text())
            if sj["rows"] != total:
                sys.exit(f"scored {sj['rows']} rows of {total}")
            steps = {"featurize": dict(m.seconds_by_step), "score": sj["seconds_by_step"]}
            feats.append(f)
            scores.append(s)
            ratios.append(s / f)
            print(f"  pair {i + 1}: featurize {f:.1f} s, score {s:.1f} s ({total / s:,.0f} rows/s), "
                  f"score / featurize {s / f:.2f} (load average {os.getloadavg()[0]:.1f})", flush=True)
        print(f"{total:,} rows: featurize median {statistics.median(feats):.1f} s, score median "
              f"{statistics.median(scores):.1f} s; ratio per pair {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median ratio {statistics.median(ratios):.2f} (target <= 2)", flush=True)
        for job, st in steps.items():
            print(f"   {job} steps (last run): " + ", ".join(f"{k} {v:.1f} s" for k, v in st.items()), flush=True)
        print(json.dumps({"featurize_s": feats, "score_s": scores, "ratios": ratios}))
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
