"""One config validator for the feature contract and the training config: duplicate keys refused,
YAML 1.1's 1e-3 read as a number, wrong types and values named by their dotted key."""
from __future__ import annotations

from pathlib import Path

import pytest

from deepfm.trainconf import TrainConfigError, load_train_config, parse_args
from pipeline import config as C
from pipeline.contract import ContractError, load_contract
from tests.conftest import CONF


def test_yaml_reads_exponents_as_numbers_and_keeps_strings():
    assert C.parse_yaml("a: 1e-3\nb: 1E+5\nc: 2.5\nd: '1e-3'\ne: 7\nf: .inf\n") == {
        "a": 0.001, "b": 100000.0, "c": 2.5, "d": "1e-3", "e": 7, "f": float("inf")}


@pytest.mark.parametrize("text, msg", [
    ("a: 1\nb: 2\na: 3\n", r"^f\.yaml: a: given twice in one mapping \(lines 1 and 3\)"),
    ("x:\n  y: 1\n  y: 2\n", r"^f\.yaml: y: given twice"),
    ("a: [1,\n", r"^f\.yaml: not valid YAML \(line 2, column 1\)"),
])
def test_yaml_refuses_duplicates_and_names_syntax_errors(text: str, msg: str):
    with pytest.raises(C.ConfigError, match=msg):
        C.parse_yaml(text, "f.yaml")


def test_a_duplicated_contract_block_is_refused(tmp_path: Path):
    text = (CONF / "criteo_small.yaml").read_text() + "sampling:\n  seed: 3\nsampling:\n  neg_sample_rate: 0.5\n"
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    # criteo_small.yaml has `base: criteo.yaml`: copy the base beside it
    (tmp_path / "criteo.yaml").write_text((CONF / "criteo.yaml").read_text())
    with pytest.raises(ContractError, match=r"dup\.yaml: sampling: given twice in one mapping"):
        load_contract(p)


@pytest.mark.parametrize("text, msg", [
    ("hidden: 400\n", r"^hidden: expected a list of integers, got 400 \(int\)"),
    ("batch_size: 2048.0\n", r"^batch_size: expected an integer, got 2048\.0 \(float\)"),
    ("dropout: 1.5\n", r"^dropout: 1\.5 is not in \[0\.0, 1\.0\)"),
    ("max_steps: -5\n", r"^max_steps: -5 must be at least 0"),
    ("hidden: [400, 0]\n", r"^hidden\[1\]: 0 must be positive"),
    ("sharding: {C1: sideways}\n", r"^sharding\.C1: 'sideways' is not one of"),
    ("epochs: 2\nepochs: 3\n", r"train\.yaml: epochs: given twice"),
    ("model: deepfm\n  batch_size: [\n", r"train\.yaml: not valid YAML"),
    ("batchsize: 512\n", r"^batchsize: unknown key"),
])
def test_training_config_errors_name_the_key(tmp_path: Path, text: str, msg: str):
    p = tmp_path / "train.yaml"
    p.write_text(text)
    with pytest.raises(TrainConfigError, match=msg):
        load_train_config(p)


def test_training_config_reads_1e_minus_3_and_layers_over_the_shipped_defaults(tmp_path: Path):
    p = tmp_path / "train.yaml"
    p.write_text("dense_lr: 1e-3\nsparse_lr: 5e-2\n")
    cfg = load_train_config(p)
    shipped = load_train_config()
    assert (cfg.dense_lr, cfg.sparse_lr) == (0.001, 0.05)
    assert cfg.hidden == shipped.hidden and cfg.model == shipped.model      # the rest from conf/train.yaml


def test_every_training_setting_is_stated_once_in_the_shipped_yaml():
    """TrainConfig states no defaults: conf/train.yaml must set every key (or loading it fails)."""
    import dataclasses
    from deepfm.trainconf import DEFAULT_TRAIN_CONFIG, TrainConfig
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(TrainConfig))
    shipped = C.load_yaml(DEFAULT_TRAIN_CONFIG)
    assert set(shipped) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_the_trainer_parser_raises_instead_of_exiting():
    with pytest.raises(TrainConfigError, match="unrecognized arguments: --modle"):
        parse_args(["--data", "d", "--out", "o", "--modle", "fm"])
    with pytest.raises(TrainConfigError, match=r"--max-steps: invalid int value"):
        parse_args(["--data", "d", "--out", "o", "--max-steps", "x"])
    with pytest.raises(TrainConfigError, match=r"^max_steps: -5 must be at least 0"):
        parse_args(["--data", "d", "--out", "o", "--max-steps", "-5"])


def test_a_duplicated_retrain_gate_block_is_refused(tmp_path: Path):
    from pipeline import retrain as R
    from tests.test_retrain import write_conf
    p = write_conf(tmp_path)
    p.write_text(p.read_text() + "gate:\n  min_auc: 0.6\n")        # a second gate: block
    with pytest.raises(R.RetrainConfigError, match=r"retrain\.yaml: gate: given twice in one mapping"):
        R.load_config(p)
