"""Which stack each part of the project pulls in, checked by importing each module in a fresh
interpreter: the orchestration and contract code runs where neither Spark nor torch is installed, the
trainer never needs Spark, the Spark job never needs torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("pyspark", "torch", "torchrec", "fbgemm_gpu", "petastorm")


def modules(package: str) -> list[str]:
    out = []
    for p in sorted((ROOT / package).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def imported(module: str) -> set[str]:
    """Top-level names of every module that importing ``module`` loads."""
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


PIPELINE_PLAIN = [m for m in modules("pipeline") if not m.startswith("pipeline.spark")]


@pytest.mark.parametrize("module", PIPELINE_PLAIN)
def test_pipeline_outside_spark_imports_neither_spark_nor_torch(module: str):
    assert not imported(module) & set(HEAVY), module


@pytest.mark.parametrize("module", modules("deepfm"))
def test_deepfm_never_imports_spark_or_jobs(module: str):
    assert not imported(module) & {"pyspark", "jobs"}, module


@pytest.mark.parametrize("module", modules("jobs"))
def test_jobs_never_import_torch(module: str):
    assert not imported(module) & {"torch", "torchrec", "fbgemm_gpu"}, module


def test_only_pipeline_spark_and_jobs_import_pyspark():
    """A static look at the source, so that a lazy import inside a function is caught too."""
    offenders = []
    for package in ("pipeline", "deepfm"):
        for p in (ROOT / package).rglob("*.py"):
            if "spark" in p.relative_to(ROOT).parts[1:2]:
                continue
            text = p.read_text()
            if "import pyspark" in text or "from pyspark" in text:
                offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []
