#!/usr/bin/env bash
# Installs the CPU stack into .venv at the repo root (idempotent; a stamp file marks success).
# Usage: tools/bootstrap.sh [--force]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.clickpipe-installed"
want="$(cat "$root/setup.cfg" "$root/tools/bootstrap.sh" | sha256sum | cut -c1-16)"
if [[ "${1:-}" != "--force" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
py="${PYTHON:-python3}"
echo "[bootstrap] creating $venv with $($py --version)" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# A local wheel cache (this machine kind keeps the CPU torch wheel in /opt/wheels); without it pip
# takes torch from PyPI.
[[ -d /opt/wheels ]] && pip+=(--find-links /opt/wheels)
# 1. Everything but torchrec, from setup.cfg's extras.
"${pip[@]}" -e "$root[spark,train,serve,dev]"
# 2. torchrec without its requirements: they would pull the CUDA fbgemm-gpu over fbgemm-gpu-cpu.
"${pip[@]}" --no-deps "torchrec==1.8.0"
# 3. Import check, so a broken stack fails here and not in the middle of a job.
"$venv/bin/python" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import torch, torchrec, fbgemm_gpu, pyspark, petastorm, pyarrow, starlette, uvicorn
print(f"[bootstrap] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}, "
      f"pyspark {pyspark.__version__}, petastorm {petastorm.__version__}, pyarrow {pyarrow.__version__}, "
      f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}")
PY
echo "$want" > "$stamp"
