"""deepfm.export of a two_tower (the user tower, the catalogue's item vectors, a faiss index), deepfm.serving's
UserEncoder, deepfm.retrieve, and the export of a DeepFM on a contract with a list-valued field.

The models are trained here in one process on the hand-built featurized outputs of tests/recall_data.py (the
eager model under Adam, a few epochs), and their weights written as a checkpoint by
``torch.distributed.checkpoint`` with the trainer's state, as deepfm/train.py leaves one; the 2-rank
checkpoint of a real ``torchrun`` is exported in tests/test_recall_e2e.py.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp

from deepfm import export, inputs, retrieve
from deepfm import state as S
from deepfm.model import DeepFM, FieldSpec
from deepfm.retrieval import ItemVectors, exact_topk
from deepfm.serving import Predictor, UserEncoder
from deepfm.trainconf import load_train_config
from deepfm.two_tower import TwoTower, TwoTowerTrain
from pipeline import artifact as A
from pipeline import layout
from pipeline import manifest as M
from tests.conftest import ROOT
from tests.recall_data import list_output, recall_output

pytestmark = pytest.mark.slow          # trains and exports (tens of seconds), like tests/test_export.py

TOWER_SETTINGS = {"model": "two_tower", "tower_hidden": [16], "tower_dim": 8, "dropout": 0.0, "bf16": False,
                  "temperature": 0.2}
DEEPFM_SETTINGS = {"model": "deepfm", "hidden": [16], "dropout": 0.0, "bf16": False}


def write_checkpoint(run: Path, model: torch.nn.Module, data: Path, settings: dict, step: int) -> Path:
    """``model``'s weights as the trainer's checkpoint ``run/checkpoints/step_<step>`` (state and COMPLETE)."""
    m = M.read(data)
    ckpt = layout.step_checkpoint(run, step)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    S.write(ckpt, S.TrainState(world_size=1, feature_fingerprint=m.feature_fingerprint,
                               contract_fingerprint=m.contract_fingerprint, config=load_train_config(None, settings),
                               fields=tuple(FieldSpec.of(f) for f in m.fields), data=str(data), global_step=step))
    (ckpt / layout.COMPLETE).write_text("")
    return ckpt


def train_towers(data: Path, epochs: int = 6) -> tuple[TwoTower, int]:
    """The eager TwoTower trained by the in-batch softmax (TwoTowerTrain) under Adam on the train split."""
    ds = inputs.open_dataset(data)
    torch.manual_seed(3)
    model = TwoTower(ds.fields, tower_hidden=(16,), tower_dim=8, init_scale=0.05)
    train = TwoTowerTrain(model, "softmax", temperature=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    steps = 0
    for _ in range(epochs):
        it = inputs.eval_batches(ds, "train", 0, 1, batch_size=64, workers=1, depth=2)
        for b in it:
            loss, _ = train(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        it.close()
    return model.eval(), steps


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    """A trained two_tower on recall_output, its checkpoint and its export with a flat index."""
    root = tmp_path_factory.mktemp("towers")
    data = recall_output(root / "data", seed=7)
    model, steps = train_towers(data)
    run = root / "run"
    write_checkpoint(run, model, data, TOWER_SETTINGS, steps)
    out = root / "model" / "user_tower.pt2"
    card = export.main(["--run", str(run), "--out", str(out), "--index", "flat"])
    return {"data": data, "model": model, "run": run, "out": out, "items": out.with_name("items.parquet"),
            "index": out.with_name("items.flat.faiss"), "card": card, "ds": inputs.open_dataset(data)}


def eager_item_vectors(ds: inputs.Dataset, model: TwoTower) -> np.ndarray:
    """Every catalogue item's vector by the eager model on the trainer's own catalogue batches."""
    with torch.no_grad():
        return np.concatenate([model.item_vectors(b.kjt)[:b.valid].numpy()
                               for b in inputs.catalogue_batches(ds, 0, ds.catalogue.items, 64)])


def eager_user_vectors(ds: inputs.Dataset, model: TwoTower, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [N, 2] = user_id, hour; eager user vectors [N, K]) of a split's rows, read by the trainer's reader."""
    it = inputs.eval_batches(ds, split, 0, 1, batch_size=64, workers=1, depth=2)
    ids, vecs = [], []
    with torch.no_grad():
        for b in it:
            d = b.kjt.to_dict()
            ids.append(np.stack([d["user_id"].values().numpy(), d["hour"].values().numpy()], 1)[:b.valid])
            vecs.append(model.user_vectors(b.kjt)[:b.valid].numpy())
    it.close()
    return np.concatenate(ids), np.concatenate(vecs)


def test_the_user_tower_reads_the_user_fields_alone_and_equals_the_eager_model(towers: dict):
    enc = UserEncoder.load(towers["out"])
    card = enc.card
    assert card.graph == A.USER_VECTOR and card.model == "two_tower"
    assert card.field_names == ("user_id", "hour") and card.manifest == M.read(towers["data"])
    assert A.ModelCard.loads(card.dumps()) == card
    ids, want = eager_user_vectors(towers["ds"], towers["model"], "test")
    assert len(ids) == M.read(towers["data"]).splits["test"].rows
    np.testing.assert_allclose(enc.vectors_of_ids(ids), want, rtol=0, atol=1e-5)
    assert enc.check_golden() == len(card.golden) >= 4
    assert all(r.probability is None and len(r.vector) == towers["model"].out_dim for r in card.golden)


def test_the_user_vector_does_not_depend_on_the_item_fields(towers: dict):
    enc = UserEncoder.load(towers["out"])
    rows = [{"user_id": "u9", "hour": "20"}, {"user_id": "u9", "hour": "20", "item_id": "i3", "item_genres": "x|y"},
            {"user_id": "u9", "hour": "20", "item_id": "i4", "item_genres": ""}]
    v = enc.vectors(rows)
    assert v.shape == (3, towers["model"].out_dim)
    np.testing.assert_array_equal(v[0], v[1])
    np.testing.assert_array_equal(v[0], v[2])
    assert not np.array_equal(v[0], enc.vectors([{"user_id": "u9", "hour": "21"}])[0])     # the context counts


def test_the_item_vectors_are_the_eager_models_for_the_whole_catalogue(towers: dict):
    iv = ItemVectors.read(towers["items"])
    items = towers["ds"].catalogue.items
    assert iv.keys.tolist() == [f"item{i}" for i in range(items)]          # recall_data's raw keys, by item_index
    assert iv.index.tolist() == list(range(items))
    np.testing.assert_allclose(iv.vectors, eager_item_vectors(towers["ds"], towers["model"]), rtol=0, atol=1e-5)
    r = towers["card"].retrieval
    assert (r.items, r.dim, r.items_file) == (items, towers["model"].out_dim, "items.parquet")
    assert r.items_digest == A.items_digest(iv.keys, iv.index, iv.vectors) and r.item_max_diff <= 1e-5
    assert r.index.kind == "flat" and r.index.recall == 1.0 and r.index.k == 100
    assert r.index.queries == M.read(towers["data"]).splits["test"].rows


def test_retrieve_gives_the_exact_top_k_of_the_eager_vectors_and_leaves_out_the_excluded(towers: dict):
    enc = UserEncoder.load(towers["out"])
    rows = [{"user_id": "user3", "hour": "7"}, {"user_id": "user12", "hour": "23"}]
    model = towers["model"]
    lay = enc.layout
    ids = enc.ids(rows)
    with torch.no_grad():
        uv = model.user_vectors(export.kjt_of_jagged(lay.jagged(ids), list(towers["ds"].field_names), 2)).numpy()
    iv = eager_item_vectors(towers["ds"], model)
    keys = np.array([f"item{i}" for i in range(len(iv))])
    want_s, want = exact_topk(uv, iv, 10)
    lines = "\n".join(json.dumps(r) for r in rows)
    rows_file = towers["out"].with_name("rows.jsonl")
    rows_file.write_text(lines + "\n")
    buf = io.StringIO()
    got = retrieve.main(["--model", str(towers["out"]), "--items", str(towers["items"]), "--rows", str(rows_file),
                         "--k", "10"], out=buf)
    assert [g["items"] for g in got] == [keys[w].tolist() for w in want]
    np.testing.assert_allclose([g["scores"] for g in got], want_s, atol=1e-4)
    assert [json.loads(x) for x in buf.getvalue().splitlines()] == got
    # excluded: two of the first row's top 3 for every row, one more of the second's in its own JSON
    drop = [keys[want[0][0]], keys[want[0][2]]]
    own = {**rows[1], "exclude": [str(keys[want[1][1]])]}
    got = retrieve.main(["--model", str(towers["out"]), "--items", str(towers["items"]), "--k", "10",
                         "--user-row", json.dumps(own), "--exclude", ",".join(drop)], out=io.StringIO())
    skip = [int(np.flatnonzero(keys == k)[0]) for k in [*drop, keys[want[1][1]]]]
    _, want_ex = exact_topk(uv[1:], iv, 10, exclude=[np.array(skip)])
    assert got[0]["items"] == keys[want_ex[0]].tolist()
    assert not set(got[0]["items"]) & {*drop, keys[want[1][1]]}


def test_faiss_flat_gives_the_exact_searchs_top_k(towers: dict):
    rows = [{"user_id": f"user{u}", "hour": str(u % 24)} for u in range(40)]
    exact = retrieve.Retriever.load(towers["out"], towers["items"])
    flat = retrieve.Retriever.load(towers["out"], towers["items"], towers["index"])
    a, b = exact.top_k(rows, 20), flat.top_k(rows, 20)
    assert [h.keys for h in a] == [h.keys for h in b]
    np.testing.assert_allclose([h.scores for h in a], [h.scores for h in b], rtol=1e-5, atol=1e-5)
    ex = [["item0", "item4", "not-an-item"]] * len(rows)
    assert [h.keys for h in exact.top_k(rows, 20, ex)] == [h.keys for h in flat.top_k(rows, 20, ex)]


def test_an_hnsw_index_reports_its_recall_against_the_exact_search(towers: dict, tmp_path: Path):
    card = export.main(["--run", str(towers["run"]), "--out", str(tmp_path / "u.pt2"), "--index", "hnsw"])
    info = card.retrieval.index
    assert info.kind == "hnsw" and info.file == "items.hnsw.faiss" and (tmp_path / info.file).exists()
    assert 0.5 <= info.recall <= 1.0
    assert card.retrieval.items_digest == towers["card"].retrieval.items_digest     # the same model, the same items


def test_retrieve_refuses_item_vectors_of_another_model_and_each_loader_the_other_graph(towers: dict, tmp_path: Path,
                                                                                        capsys):
    iv = ItemVectors.read(towers["items"])
    other = tmp_path / "items.parquet"
    ItemVectors(iv.keys, iv.index, iv.vectors * 2).write(other)
    with pytest.raises(SystemExit) as e:
        retrieve.cli(["--model", str(towers["out"]), "--items", str(other), "--user-row", '{"user_id": "u1"}'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("retrieve: error: --items") and "digest" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(A.ArtifactError, match="user_vector .*load it with deepfm.serving.UserEncoder"):
        Predictor.load(towers["out"])


BLOCK = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu", "pyspark", "petastorm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from deepfm.serving import UserEncoder
e = UserEncoder.load(sys.argv[1])
v = e.vectors([json.loads(sys.argv[3])]).tolist()
no_pyarrow = "pyarrow" not in sys.modules
from deepfm import retrieve
retrieve.main(["--model", sys.argv[1], "--items", sys.argv[2], "--user-row", sys.argv[3], "--k", "5"])
print(json.dumps({"v": v, "no_pyarrow": no_pyarrow, "mods": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_the_user_tower_and_retrieve_run_where_torchrec_fbgemm_and_pyspark_cannot_be_imported(towers: dict):
    row = {"user_id": "user3", "hour": "7"}
    r = subprocess.run([sys.executable, "-c", BLOCK, str(towers["out"]), str(towers["items"]), json.dumps(row)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hits, out = (json.loads(x) for x in r.stdout.strip().splitlines()[-2:])
    assert out["no_pyarrow"] and not set(out["mods"]) & {"torchrec", "fbgemm_gpu", "pyspark", "petastorm"}
    np.testing.assert_allclose(out["v"], UserEncoder.load(towers["out"]).vectors([row]), rtol=0, atol=1e-6)
    assert hits["items"] == [h for h in retrieve.Retriever.load(towers["out"], towers["items"]).top_k([row], 5)[0].keys]


def test_a_raw_log_line_is_a_row_too(towers: dict):
    c = M.read(towers["data"]).contract
    line = "\t".join({"click": "1", "user_id": "user5", "hour": "11"}.get(col, "ignored") for col in c.source.columns)
    by_line = retrieve.main(["--model", str(towers["out"]), "--items", str(towers["items"]), "--k", "5",
                             "--user-row", line], out=io.StringIO())
    by_json = retrieve.main(["--model", str(towers["out"]), "--items", str(towers["items"]), "--k", "5",
                             "--user-row", '{"user_id": "user5", "hour": 11}'], out=io.StringIO())
    assert by_line == by_json and len(by_line[0]["items"]) == 5


# --- DeepFM on a list-valued field ------------------------------------------------------------------

def test_a_deepfm_on_a_list_field_exports_reloads_and_matches_the_eager_model(tmp_path: Path):
    data = list_output(tmp_path / "d", seed=2, pooling="mean", rows=256, max_length=3)
    ds = inputs.open_dataset(data)
    torch.manual_seed(1)
    model = DeepFM(ds.fields, "deepfm", hidden=(16,), dropout=0.0, init_scale=0.3).eval()
    write_checkpoint(tmp_path / "run", model, data, DEEPFM_SETTINGS, 1)
    out = tmp_path / "m.pt2"
    card = export.main(["--run", str(tmp_path / "run"), "--out", str(out)])
    p = Predictor.load(out)
    assert card.graph == A.LOGIT and p.layout.widths == (1, 3) and p.layout.poolings == ("sum", "mean")
    # the trainer's reader's batches (its own padding and KJT) through the eager model, the test split's
    # Parquet rows through the graph
    it = inputs.eval_batches(ds, "test", 0, 1, batch_size=64, workers=1, depth=2)
    got_ids, want = [], []
    with torch.no_grad():
        for b in it:
            d = b.kjt.to_dict()
            g = [x.tolist() for x in d["g"].to_dense()][:b.valid]
            got_ids += [[a, *x, *[-1] * (3 - len(x))] for a, x in zip(d["a"].values().tolist()[:b.valid], g)]
            want.append(model(b.kjt)[:b.valid].numpy())
    it.close()
    np.testing.assert_allclose(p.logits_of_ids(np.array(got_ids)), np.concatenate(want), rtol=0, atol=1e-5)
    rows = export.split_rows(data, M.read(data), 1000)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, got_ids))      # the same rows, padded alike
    # raw rows: a list as text (trimmed, empties dropped, the first 3 kept) or as a list of values
    raw: list[dict[str, Any]] = [{"a": "x", "g": " p || q|r|s"}, {"a": "x", "g": ["p", "q", "r"]}, {"a": "x", "g": ""}, {}]
    ids = p.ids(raw)
    assert ids[0].tolist() == ids[1].tolist() and (ids[0, 1:] >= 2).all()
    assert ids[2].tolist()[1:] == [0, -1, -1] and ids[3].tolist() == [0, 0, -1, -1]
    jagged = p.featurizer.ids_jagged(raw)
    with torch.no_grad():
        eager = model(export.kjt_of_jagged(jagged, ["a", "g"], len(raw))).numpy()
    np.testing.assert_allclose(p.logits_of_ids(ids), eager, rtol=0, atol=1e-5)
    np.testing.assert_allclose(p.predict(raw), 1 / (1 + np.exp(-eager.astype(np.float64))), atol=1e-6)
    assert any(len([x for x in r.ids[1:] if x >= 0]) == 3 for r in card.golden)       # a list cut at max_length
    # python -m deepfm.score on the featurized test split (list columns padded as the graph reads them)
    from deepfm import score
    score.main(["--model", str(out), "--input", str(data / "test"), "--output", str(tmp_path / "scores"),
                "--workers", "1"])
    scored = pq.read_table(tmp_path / "scores" / "part-00000-of-00001.parquet").sort_by(
        [("file", "ascending"), ("row", "ascending")])
    files = sorted((data / "test").glob("*.parquet"))
    lay = A.InputLayout.of(M.read(data))
    want_ids = np.concatenate([lay.pad_columns({c: pq.read_table(f).column(c).to_pylist() for c in ("a", "g")})
                               for f in files])
    assert scored.num_rows == len(want_ids)
    np.testing.assert_allclose(scored.column("logit").to_numpy(), p.logits_of_ids(want_ids), rtol=0, atol=1e-6)
