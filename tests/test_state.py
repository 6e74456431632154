"""deepfm.state.TrainState: saved whole, read back whole."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deepfm import state as S
from deepfm.model import FieldSpec
from deepfm.state import SplitData, StateError, TrainState
from deepfm.trainconf import load_train_config, to_overrides
from pipeline import layout


def _state(**progress) -> TrainState:
    cfg = load_train_config(None, {"model": "fm", "hidden": (64, 32), "bf16": True, "sharding": {"C1": "column_wise"},
                                   "train_pipeline": "plain", "sparse_eps": 1e-3})
    return TrainState(world_size=2, feature_fingerprint="9861641918bd503b", contract_fingerprint="4e9972ccdc660129",
                      config=cfg, fields=(FieldSpec("I1", 66, 16), FieldSpec("C1", 20000, 16)),
                      data="/data/feat", splits={"train": SplitData((0, 1), 31212, 12487),
                                                 "test": SplitData((3,), 25000, 6380)}, **progress)


def test_a_state_round_trips_exactly_through_meta_json(tmp_path: Path):
    s = _state(epoch=1, step_in_epoch=7, global_step=37, best_auc=0.7312345678901234, best_step=30, bad_evals=1,
               early_stopped=False, examples=37 * 1024, seconds=12.345678901, weights_from_step=30,
               history=[{"step": 30, "epoch": 1, "auc": 0.7312345678901234, "logloss": 0.51, "ne": 0.93,
                         "calibration": 1.01, "rows": 25000}])
    S.write(tmp_path, s)
    back = S.read(tmp_path)
    assert back == s
    assert back.config == s.config and back.config.hidden == (64, 32)
    assert back.fields == s.fields and isinstance(back.fields, tuple)
    assert back.splits == s.splits and back.splits["train"].days == (0, 1)
    assert (tmp_path / layout.CHECKPOINT_META).exists()


def test_the_json_keys_are_the_field_names_and_config_is_plain_data():
    d = _state().to_json()
    assert list(d) == [f.name for f in dataclasses.fields(TrainState)]
    assert d["config"] == to_overrides(_state().config) and d["config"]["hidden"] == [64, 32]
    assert d["fields"][0] == {"name": "I1", "num_embeddings": 66, "embedding_dim": 16, "pooling": "sum", "side": "context"}
    assert d["splits"]["train"] == {"days": [0, 1], "rows": 31212, "positives": 12487}
    json.dumps(d)                                        # plain data all the way down


def test_a_checkpoint_of_the_older_trainer_loads():
    """meta.json as deepfm/train.py wrote it before TrainState (no best_step, early_stopped, weights_from_step)."""
    d = _state(global_step=12).to_json()
    for k in ("best_step", "early_stopped", "weights_from_step", "splits"):
        d.pop(k)
    d["config"].pop("train_pipeline")                    # a setting added later: conf/train.yaml's default
    s = TrainState.from_json(d)
    assert (s.global_step, s.best_step, s.early_stopped, s.weights_from_step) == (12, -1, False, None)
    assert s.splits == {}                                # deepfm.launch then compares the data by folder
    assert s.config.train_pipeline == load_train_config().train_pipeline


def test_an_unknown_key_or_a_missing_fact_is_refused(tmp_path: Path):
    d = _state().to_json()
    with pytest.raises(StateError, match="unknown key 'iter_num'"):
        TrainState.from_json({**d, "iter_num": 3})
    d.pop("feature_fingerprint")
    with pytest.raises(StateError, match="not a trainer state"):
        TrainState.from_json(d)
    with pytest.raises(StateError, match="cannot read it"):
        S.read(tmp_path / "nothing")


def test_resuming_keeps_the_progress_and_takes_this_launchs_facts():
    saved = _state(epoch=1, step_in_epoch=10, global_step=40, best_auc=0.7, best_step=30, examples=40960,
                   seconds=9.5, weights_from_step=30, history=[{"step": 30, "auc": 0.7}])
    now = dataclasses.replace(_state(), world_size=1, data="/elsewhere")
    s = now.resumed(saved)
    assert (s.epoch, s.global_step, s.best_auc, s.best_step, s.examples, s.seconds) == (1, 40, 0.7, 30, 40960, 9.5)
    assert s.step_in_epoch == 20                         # the same fraction of an epoch twice as long
    assert (s.world_size, s.data, s.weights_from_step) == (1, "/elsewhere", None)
    assert s.history == saved.history and s.history is not saved.history


def test_the_loss_curve_is_progress_a_resumed_run_keeps(tmp_path: Path):
    """deepfm/train.py's rank 0 appends [step, mean loss] to train_loss; a checkpoint keeps it and a resumed
    run goes on from it (a checkpoint of an older trainer has none)."""
    saved = _state(global_step=20, train_loss=[[10, 0.69], [20, 0.65]])
    S.write(tmp_path, saved)
    back = S.read(tmp_path)
    assert back.train_loss == [[10, 0.69], [20, 0.65]]
    s = _state().resumed(back)
    assert s.train_loss == back.train_loss and s.train_loss is not back.train_loss
    d = saved.to_json()
    d.pop("train_loss")
    assert TrainState.from_json(d).train_loss == []
