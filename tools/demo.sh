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

echo "== 1/2 generate: $days day(s) x $rows rows of Criteo-format logs -> $raw"
rm -rf "$raw"
python -m pipeline.generate --out "$raw" --config "$config" --days "$days" --rows-per-day "$rows" \
  --max-cardinality 50000 --seed 7

echo "== 2/2 featurize: spark-submit jobs/featurize.py -> $feat"
spark-submit --master "local[2]" --driver-memory 4g \
  --driver-java-options "-Dlog4j2.configurationFile=file:$root/tools/log4j2.properties" jobs/featurize.py --input "$raw" --output "$feat" \
  --config "$config" --neg-sample-rate 0.5 --overwrite
