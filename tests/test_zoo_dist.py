"""The model zoo on 2 gloo ranks (one torchrun of tests/zoo_kinds.py trains every zoo kind, and fm for fnn
to start from, on the shared featurized data): each beats a constant predictor, fnn's tables start as the
fm run's, and a zoo kind exports to a graph that gives its eager logits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from deepfm import sharded
from deepfm.export import kjt_of, load_eager, split_rows
from deepfm.model import ZOO
from deepfm.serving import Predictor
from pipeline import artifact as A
from pipeline import layout
from pipeline import manifest as M
from tests.conftest import ROOT, run_torchrun

pytestmark = pytest.mark.slow
KINDS = ("fm", *ZOO)              # fm first: fnn starts from its run folder
START_ROWS = 2000                 # test rows whose looked-up table rows fnn's start is compared on


@pytest.fixture(scope="module")
def zoo(featurized: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    r = run_torchrun("tests/zoo_kinds.py", [str(featurized), str(out), ",".join(KINDS), str(START_ROWS)], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def results(zoo: Path) -> dict:
    return json.loads((zoo / "zoo.json").read_text())


def test_every_kind_trains_on_two_ranks_and_beats_a_constant_predictor(zoo: Path, featurized: Path):
    res = results(zoo)
    assert list(res) == list(KINDS)
    valid_rows = M.read(featurized).splits["valid"].rows
    aucs = {}
    for kind, r in res.items():
        m = json.loads((Path(r["run"]) / layout.METRICS).read_text())
        assert (m["model"], m["world_size"], m["global_step"]) == (kind, 2, r["global_step"]), kind
        assert m["valid"]["rows"] == valid_rows, kind
        aucs[kind] = m["valid"]["auc"]
        # a constant predictor has AUC 0.5 and NE 1 (its logloss is the base rate's entropy)
        assert m["valid"]["auc"] > 0.62 and m["valid"]["ne"] < 1.0, (kind, m["valid"])
    print("valid AUC:", {k: round(v, 4) for k, v in aucs.items()})


def test_fnn_starts_from_the_fm_runs_tables(zoo: Path, featurized: Path):
    fnn = results(zoo)["fnn"]
    assert fnn["start"] == "embeddings"
    fm_ckpt = Path(fnn["from"])
    assert fm_ckpt == layout.latest_checkpoint(zoo / "fm")
    fm_state = sharded.read_state(fm_ckpt)
    assert fm_state.config.model == "fm"
    fm = load_eager(fm_ckpt, fm_state)          # the fm checkpoint read in one plain process
    ids = torch.from_numpy(split_rows(featurized, M.read(featurized), START_ROWS))
    keys = list(M.read(featurized).field_names)
    with torch.no_grad():
        fm_rows = torch.cat(fm.sparse(kjt_of(ids, keys)), 2)
    start_rows = torch.from_numpy(np.load(zoo / "fnn_start_rows.npy"))   # what the sharded fnn looked up at its start
    assert start_rows.shape == (START_ROWS, len(keys), fm.sparse.dim + 4)
    assert_close(start_rows, fm_rows, rtol=0, atol=0)
    # and then it trained them on: its last checkpoint's rows have moved
    last = layout.latest_checkpoint(Path(fnn["run"]))
    assert last is not None
    trained = load_eager(last, sharded.read_state(last))
    with torch.no_grad():
        assert not torch.equal(torch.cat(trained.sparse(kjt_of(ids, keys)), 2), fm_rows)


@pytest.mark.parametrize("kind", ["deepfm_cross", "fm_dnn"])
def test_a_zoo_kind_exports_and_the_graph_gives_its_eager_logits(zoo: Path, featurized: Path, tmp_path: Path,
                                                                 kind: str):
    """deepfm_cross (its crosses from the saved settings) and fm_dnn (two latent vectors per row):
    ``python -m deepfm.export`` as a user runs it, then the graph beside the eager model."""
    out = tmp_path / "model.pt2"
    r = subprocess.run([sys.executable, "-m", "deepfm.export", "--run", results(zoo)[kind]["run"], "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    card = A.read_card(out)
    assert card.model == kind
    ckpt = Path(card.checkpoint)
    eager = load_eager(ckpt, sharded.read_state(ckpt))
    ids = split_rows(featurized, M.read(featurized), 3000)
    with torch.no_grad():
        want = eager(kjt_of(torch.from_numpy(ids), list(M.read(featurized).field_names))).double().numpy()
    got = Predictor.load(out).logits_of_ids(ids).astype(np.float64) - card.logit_offset
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
