"""Which stack each part of the project pulls in, checked by importing each group's modules in a fresh
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


def first_importers(mods: list[str], heavy: set[str]) -> dict[str, list[str]]:
    """Imports ``mods`` one after another in one fresh interpreter; for each module whose import loaded a
    top-level package of ``heavy`` not loaded before, those packages. Empty: none of them pulls any in,
    whichever is imported alone (what one loads is a part of what all of them load). One interpreter for
    the group: torch alone takes seconds to import, and twenty-odd deepfm modules each in an interpreter
    of its own were 90 s of the suite."""
    code = ("import importlib, json, sys\n"
            "mods, heavy = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))\n"
            "seen, out = set(), {}\n"
            "for m in mods:\n"
            "    importlib.import_module(m)\n"
            "    now = {k.split('.')[0] for k in sys.modules} & heavy\n"
            "    if now - seen:\n"
            "        out[m] = sorted(now - seen)\n"
            "    seen |= now\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(mods), json.dumps(sorted(heavy))], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PIPELINE_PLAIN = [m for m in modules("pipeline") if not m.startswith("pipeline.spark")]


def test_the_groups_cover_every_module():
    assert len(PIPELINE_PLAIN) > 20 and "pipeline.retrain.cli" in PIPELINE_PLAIN and "pipeline.manifest" in PIPELINE_PLAIN
    assert {"deepfm.train", "deepfm.serve", "deepfm.retrieval"} <= set(modules("deepfm"))
    assert "jobs.featurize" in modules("jobs")


def test_pipeline_outside_spark_imports_neither_spark_nor_torch():
    assert first_importers(PIPELINE_PLAIN, set(HEAVY)) == {}


def test_deepfm_never_imports_spark_or_jobs():
    assert first_importers(modules("deepfm"), {"pyspark", "jobs"}) == {}


def test_jobs_never_import_torch():
    assert first_importers(modules("jobs"), {"torch", "torchrec", "fbgemm_gpu"}) == {}


def test_a_module_that_pulls_in_a_package_is_named():
    """The check can fail, and names the first module whose import loaded the package (yaml here: light to
    import; pipeline.contract loads it too, after pipeline.config did)."""
    assert first_importers(["pipeline.layout", "pipeline.config", "pipeline.contract"], {"yaml"}) == {
        "pipeline.config": ["yaml"]}


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
