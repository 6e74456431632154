#!/usr/bin/env bash
# The built-in default, end to end: generate logs -> featurize (Spark) -> train (torchrun) -> evaluate
# -> export, and the exported model scoring raw lines of the test day.
# Sizes can be changed with DEMO_DAYS and DEMO_ROWS; everything goes under data/demo and runs/demo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
days="${DEMO_DAYS:-4}"
rows="${DEMO_ROWS:-100000}"
config="${DEMO_CONFIG:-conf/criteo_small.yaml}"
raw=data/demo/raw
feat=data/demo/featurized

echo "== 1/5 generate: $days day(s) x $rows rows of Criteo-format logs -> $raw"
rm -rf "$raw"
python -m pipeline.generate --out "$raw" --config "$config" --days "$days" --rows-per-day "$rows" \
  --max-cardinality 50000 --seed 7

echo "== 2/5 featurize: spark-submit jobs/featurize.py -> $feat"
spark-submit --master "local[2]" --driver-memory 4g \
  --driver-java-options "-Dlog4j2.configurationFile=file:$root/tools/log4j2.properties" jobs/featurize.py --input "$raw" --output "$feat" \
  --config "$config" --neg-sample-rate 0.5 --overwrite

echo "== 3/5 train: torchrun --nproc_per_node=2 deepfm/train.py -> runs/demo"
rm -rf runs/demo
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 deepfm/train.py --data "$feat" --out runs/demo \
  --epochs "${DEMO_EPOCHS:-2}" --batch-size 2048

echo "== 4/5 evaluate: python -m deepfm.evaluate (one process, the checkpoint resharded) on the test day"
python -m deepfm.evaluate --run runs/demo --data "$feat" --split test --json runs/demo/test_metrics.json \
  2>/dev/null | tail -n 9
python - "$raw" "$feat" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from pipeline.generate import read_truth
from pipeline.metrics import summary
raw, feat = Path(sys.argv[1]), Path(sys.argv[2])
test_day = json.loads((feat / "manifest.json").read_text())["splits"]["test"]["days"][0]
p, y = read_truth(raw, test_day)
o = summary(p, y)
m = json.loads(Path("runs/demo/test_metrics.json").read_text())
print(f"test day {test_day}: DeepFM AUC {m['auc']:.4f} logloss {m['logloss']:.4f} | oracle (true click model) "
      f"AUC {o['auc']:.4f} logloss {o['logloss']:.4f}")
PY

echo "== 5/5 export: python -m deepfm.export -> runs/demo/model.pt2, then raw lines of the test day scored by it"
python -m deepfm.export --run runs/demo --out runs/demo/model.pt2 2>&1 | grep "exported" || true
python - "$raw" "$feat" <<'PY'
import json, sys
from pathlib import Path

from deepfm.serving import Predictor
from pipeline.generate import read_truth
from pipeline.rows import split_line
raw, feat = Path(sys.argv[1]), Path(sys.argv[2])
p = Predictor.load("runs/demo/model.pt2")          # torch alone: no torchrec, fbgemm or Spark needed
test_day = json.loads((feat / "manifest.json").read_text())["splits"]["test"]["days"][0]
with open(raw / f"day_{test_day}") as f:
    lines = [next(f).rstrip("\n") for _ in range(5)]
rows = [split_line(line, p.card.manifest.contract) for line in lines]
truth, clicks = read_truth(raw, test_day)
print(f"model {p.fingerprint} ({p.card.model}, step {p.card.global_step}) on the first raw lines of day {test_day}:")
for i, (prob, row) in enumerate(zip(p.predict(rows), rows)):
    print(f"  line {i}: P(click) {prob:.4f}   true {truth[i]:.4f}   clicked {row['label']}   "
          f"I1={row['I1']!r} C1={row['C1']!r} ...")
PY
