"""deepfm.launch: what a launch does, decided on hand-made states (no process group, no model)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deepfm import launch as L
from deepfm.launch import LaunchError, Start
from deepfm.model import FieldSpec
from deepfm.state import SplitData, TrainState
from deepfm.trainconf import load_train_config
from pipeline.manifest import Counts, SplitInfo

OUT = Path("/runs/r1")
CKPT = OUT / "checkpoints" / "step_000000030"
WARM = Path("/runs/r0/checkpoints/step_000000090")
SPLITS = {"train": SplitData((0, 1), 31212, 12487), "valid": SplitData((2,), 25000, 6245),
          "test": SplitData((3,), 25000, 6380)}


def facts(**kw) -> TrainState:
    cfg = load_train_config(None, {"epochs": 2, **kw.pop("cfg", {})})
    return TrainState(world_size=2, feature_fingerprint="9861641918bd503b", contract_fingerprint="4e9972ccdc660129",
                      config=cfg, fields=(FieldSpec("I1", 66, 16), FieldSpec("C1", 20000, 16)), data="/d/feat",
                      splits=dict(SPLITS), **kw)


def saved(**progress) -> TrainState:
    return facts(**progress)


def plan(now: TrainState, s: TrainState | None, metrics_step: int | None = None, warm: Path | None = None,
         warm_saved: TrainState | None = None) -> Start:
    return L.plan_start(OUT, now, CKPT if s is not None else None, s, metrics_step, warm, warm_saved)


# --- where a launch starts -------------------------------------------------------------------------

def test_an_empty_run_folder_starts_new_or_warm():
    assert plan(facts(), None) == Start(L.NEW)
    assert plan(facts(), None, warm=WARM, warm_saved=saved(global_step=90)) == Start(L.WARM, WARM)


def test_a_warm_start_from_other_features_is_refused():
    other = dataclasses.replace(saved(), feature_fingerprint="0000000000000000")
    with pytest.raises(LaunchError, match=r"^--warm-start /runs/r0/checkpoints/step_000000090: made for featurized "
                                          r"data with fingerprint 0000000000000000, but this data's is 9861641918bd503b"):
        plan(facts(), None, warm=WARM, warm_saved=other)


def test_a_crashed_run_resumes_and_its_checkpoint_wins_over_warm_start():
    s = saved(epoch=1, step_in_epoch=3, global_step=33)
    assert plan(facts(), s) == Start(L.RESUME, CKPT)
    assert plan(facts(), s, warm=WARM, warm_saved=saved()) == Start(L.RESUME, CKPT)
    # at another world size, with another batch size and learning rate: the same run
    assert plan(dataclasses.replace(facts(cfg={"batch_size": 256, "dense_lr": 0.01}), world_size=1), s).kind == L.RESUME


def test_a_finished_run_with_its_metrics_is_done():
    s = saved(epoch=2, global_step=60)
    assert plan(facts(), s, metrics_step=60) == Start(L.DONE, CKPT, "epoch 2 of 2")
    assert plan(facts(cfg={"max_steps": 12}), saved(global_step=12), metrics_step=12) == Start(
        L.DONE, CKPT, "step 12 of max_steps 12")
    early = saved(epoch=1, global_step=30, early_stopped=True)
    assert plan(facts(cfg={"epochs": 5}), early, metrics_step=30) == Start(
        L.DONE, CKPT, "early stopped at step 30, epoch 1 of 5")


def test_a_finished_run_without_its_metrics_is_finished_off():
    s = saved(epoch=2, global_step=60)
    assert plan(facts(), s, metrics_step=None) == Start(L.FINISH, CKPT, "epoch 2 of 2")
    assert plan(facts(), s, metrics_step=48) == Start(L.FINISH, CKPT, "epoch 2 of 2")   # an older metrics.json


def test_raising_epochs_or_max_steps_trains_on():
    assert plan(facts(cfg={"epochs": 3}), saved(epoch=2, global_step=60), metrics_step=60).kind == L.RESUME
    assert plan(facts(cfg={"max_steps": 20}), saved(global_step=12), metrics_step=12).kind == L.RESUME


# --- what is "the same" ----------------------------------------------------------------------------

def test_another_model_kind_is_refused_by_name():
    with pytest.raises(LaunchError) as e:
        plan(facts(cfg={"model": "fm"}), saved(epoch=2, global_step=60), metrics_step=60)
    assert str(e.value) == ("--out /runs/r1 already holds a run on model deepfm; this launch asks for model fm: use a "
                            "new --out (add --warm-start /runs/r1 to start from its weights)")


def test_hidden_layers_count_only_for_a_model_with_a_deep_part():
    with pytest.raises(LaunchError, match=r"holds a run on model deepfm with hidden 400,400,400; this launch asks "
                                          r"for hidden 64,64: "):
        plan(facts(cfg={"hidden": (64, 64)}), saved(epoch=1, global_step=30))
    fm = saved(epoch=1, global_step=30, cfg={"model": "fm"})
    assert plan(facts(cfg={"model": "fm", "hidden": (64, 64)}), fm).kind == L.RESUME


def test_other_table_sizes_are_refused():
    now = dataclasses.replace(facts(), fields=(FieldSpec("I1", 66, 16), FieldSpec("C1", 50000, 16)))
    with pytest.raises(LaunchError, match=r"already holds a run on table C1 20000 x 16; this launch asks for "
                                          r"table C1 50000 x 16"):
        plan(now, saved(epoch=1, global_step=30))


def test_other_days_in_the_same_folder_are_other_data():
    now = dataclasses.replace(facts(), splits={**SPLITS, "train": SplitData((4, 5), 30877, 12310),
                                               "test": SplitData((7,), 25000, 6301)})
    with pytest.raises(LaunchError) as e:
        plan(now, saved(epoch=2, global_step=60), metrics_step=60)
    assert str(e.value) == (
        "--out /runs/r1 already holds a run on /d/feat (features 9861641918bd503b; train days 0-1, 31212 rows; "
        "valid day 2, 25000 rows; test day 3, 25000 rows); this launch asks for /d/feat (features 9861641918bd503b; "
        "train days 4-5, 30877 rows; valid day 2, 25000 rows; test day 7, 25000 rows): use a new --out (add "
        "--warm-start /runs/r1 to start from its weights)")


def test_other_features_and_another_model_are_both_named():
    now = dataclasses.replace(facts(cfg={"model": "lr"}), feature_fingerprint="0000000000000000")
    with pytest.raises(LaunchError, match=r"holds a run on /d/feat \(features 9861641918bd503b; .*\) and model "
                                          r"deepfm; this launch asks for /d/feat \(features 0000000000000000; .*\) "
                                          r"and model lr: "):
        plan(now, saved(epoch=1, global_step=30))


def test_the_same_data_moved_elsewhere_resumes():
    assert plan(dataclasses.replace(facts(), data="/mnt/copy/feat"), saved(epoch=1, global_step=30)).kind == L.RESUME


def test_a_checkpoint_without_splits_is_compared_by_folder():
    old = dataclasses.replace(saved(epoch=1, global_step=30), splits={})
    assert plan(facts(), old).kind == L.RESUME
    with pytest.raises(LaunchError, match=r"already holds a run on /d/feat \(features 9861641918bd503b\); this "
                                          r"launch asks for /d/other \(features 9861641918bd503b; train days 0-1"):
        plan(dataclasses.replace(facts(), data="/d/other"), old)


# --- the data's splits -----------------------------------------------------------------------------

def _info(days: tuple[int, ...], rows: int) -> SplitInfo:
    return SplitInfo(days=days, before_sampling=Counts(rows, rows // 4), rows=rows, positives=rows // 4,
                     files=8 if rows else 0, neg_sample_rate=1.0)


def _check(valid_days=(2,), valid_rows=25000, test_days=(3,), test_rows=25000, train_rows=31212, test=True,
           batch=512, world=2) -> tuple[str, ...]:
    splits = {"train": _info((0, 1), train_rows), "valid": _info(valid_days, valid_rows),
              "test": _info(test_days, test_rows)}
    cfg = load_train_config(None, {"batch_size": batch})
    return L.check_data(splits, Path("/d/feat/manifest.json"), cfg, world, test)


def test_splits_with_rows_pass_without_notes():
    assert _check() == ()


def test_an_empty_test_day_is_refused_unless_no_test():
    with pytest.raises(LaunchError) as e:
        _check(test_rows=0)
    assert str(e.value) == ("/d/feat/manifest.json: the test split (day 3) has 0 rows: nothing to test on; featurize "
                            "again, or pass --no-test")
    assert _check(test_rows=0, test=False) == ()


def test_no_test_days_is_a_note():
    assert _check(test_days=(), test_rows=0) == ("/d/feat/manifest.json assigns no test days: no test metrics",)


def test_an_empty_valid_day_is_refused_and_no_valid_days_is_a_note():
    with pytest.raises(LaunchError, match=r"^/d/feat/manifest.json: the valid split \(day 2\) has 0 rows: validation "
                                          r"\(early stopping, keep_best\) needs rows"):
        _check(valid_rows=0)
    assert _check(valid_days=(), valid_rows=0) == (
        "/d/feat/manifest.json assigns no valid days: no validation, so no early stopping and no best weights "
        "(keep_best); the last weights are tested",)


def test_train_rows_fewer_than_a_batch_per_rank_are_refused():
    with pytest.raises(LaunchError) as e:
        _check(train_rows=1000)
    assert str(e.value) == ("/d/feat/manifest.json: the train split has 1000 rows, fewer than one batch per rank "
                            "(batch_size 512 x 2 ranks)")
    with pytest.raises(LaunchError, match="the train split has 0 rows"):
        _check(train_rows=0)
    assert _check(train_rows=1000, world=1, batch=1000) == ()


# --- saying it -------------------------------------------------------------------------------------

def test_a_refusal_under_torchrun_is_local_rank_0s_error_file(tmp_path: Path, monkeypatch, capsys):
    f = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(f))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    L.refuse("train", LaunchError("boom"))
    assert not f.exists() and capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "2")             # a second node's first worker: its agent prints it too
    L.refuse("train", LaunchError("boom"))
    assert json.loads(f.read_text())["message"] == "train: error: boom"
    assert capsys.readouterr().err == ""


def test_a_refusal_elsewhere_is_printed_by_rank_0(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "1")
    L.refuse("train", LaunchError("boom"))
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    L.refuse("train", LaunchError("boom"))
    assert capsys.readouterr().err == "train: error: boom\n"
