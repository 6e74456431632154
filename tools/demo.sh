#!/usr/bin/env bash
# The built-in default, end to end: generate logs -> featurize (Spark) -> train (torchrun) -> evaluate.
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

echo "== 1/4 generate: $days day(s) x $rows rows of Criteo-format logs -> $raw"
rm -rf "$raw"
python -m pipeline.generate --out "$raw" --config "$config" --days "$days" --rows-per-day "$rows" \
  --max-cardinality 50000 --seed 7

echo "== 2/4 featurize: spark-submit jobs/featurize.py -> $feat"
spark-submit --master "local[2]" --driver-memory 4g \
  --driver-java-options "-Dlog4j2.configurationFile=file:$root/tools/log4j2.properties" jobs/featurize.py --input "$raw" --output "$feat" \
  --config "$config" --neg-sample-rate 0.5 --overwrite

echo "== 3/4 train: torchrun --nproc_per_node=2 deepfm/train.py -> runs/demo"
rm -rf runs/demo
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 deepfm/train.py --data "$feat" --out runs/demo \
  --epochs "${DEMO_EPOCHS:-2}" --batch-size 2048

echo "== 4/4 evaluate: python -m deepfm.evaluate (one process, the checkpoint resharded) on the test day"
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
