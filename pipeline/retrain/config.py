"""The retrain settings (conf/retrain.yaml): one frozen dataclass, read and checked once, up front.

Every default is stated here, on the dataclass fields, and nowhere else (conf/retrain.yaml states the
deployment's paths and sizes; a test holds its other keys to these defaults). The ``train:`` section
holds retraining's own keys (``nproc``, ``config``, ``extra_args``) and any key of the trainer's
:class:`~deepfm.trainconf.TrainConfig`; the trainer settings are checked by the trainer's own loader
and the whole argument list retraining will pass by the trainer's own parser, here, before any step
runs. So ``train: {dropout: 1.5}`` and ``train: {extra_args: [--modle, fm]}`` fail at load, naming the
key, not hours later after featurize.

Imports neither Spark nor torch (deepfm.trainconf imports neither).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from deepfm.trainconf import DEFAULT_TRAIN_CONFIG, TrainConfig, TrainConfigError, load_train_config, parse_args
from pipeline import config as C
from pipeline.layout import PathOverlapError, refuse_overlap

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONTRACT = ROOT / "conf" / "criteo_small.yaml"


class RetrainConfigError(C.ConfigError):
    """A retrain setting that cannot be used; the message names the file and the dotted key."""


def _sample_rate(v: Any, where: str) -> float:
    return C.number(v, where, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class SparkSettings:
    master: str = C.setting("local[2]", doc="spark-submit --master: local[N], yarn, k8s://..., spark://host:7077")
    submit_args: tuple[str, ...] = C.setting((), doc="more spark-submit flags, e.g. [--driver-memory, 4g]")
    featurize_args: tuple[str, ...] = C.setting((), doc="more jobs/featurize.py flags, e.g. [--min-row-groups, 4]")


@dataclass(frozen=True)
class TrainSettings:
    """Retraining's own training keys; ``settings`` are the trainer's keys given in ``train:`` (typed by the
    trainer's loader), passed to deepfm/train.py as its flags."""

    nproc: int = C.setting(1, C.at_least(1), doc="torchrun --nproc_per_node")
    config: Path = C.setting(DEFAULT_TRAIN_CONFIG, doc="deepfm/train.py --config")
    extra_args: tuple[str, ...] = C.setting((), doc="more deepfm/train.py flags, e.g. [--model, fm]")
    settings: Mapping[str, Any] = C.setting(factory=dict, doc="set by load_config from the trainer keys of train:")


@dataclass(frozen=True)
class GateSettings:
    auc_tolerance: float = C.setting(0.002, C.at_least(0.0), doc="candidate AUC >= current AUC - tolerance")
    min_auc: float = C.setting(0.55, C.in_range(0.0, 1.0), doc="and at least this (0.5 = a constant predictor)")
    calibration_min: float = C.setting(0.8, C.at_least(0.0), doc="mean prediction / observed CTR within")
    calibration_max: float = C.setting(1.25, C.at_least(0.0), doc="[calibration_min, calibration_max]")
    min_rows: int = C.setting(10_000, C.at_least(0), doc="rows of the held-out day")


@dataclass(frozen=True)
class CheckSettings:
    """Data checks of the new (held-out) day before a training run is spent on it, against the median of
    the trailing processed days (TFX's ExampleValidator in spirit): a day outside a bound is held - not
    trained on, counted as processed and left out of later windows until re-admitted (``--readmit N``).
    A ratio's bound of 0 (min) or a large number (max) turns that check off."""

    trailing_days: int = C.setting(7, C.at_least(1), doc="compare with the newest this many processed days")
    min_trailing_days: int = C.setting(2, C.at_least(1), doc="fewer trailing days with stats: no checks")
    max_rows_ratio: float = C.setting(3.0, C.at_least(1.0), doc="rows / trailing rows at most")
    min_rows_ratio: float = C.setting(0.33, C.in_range(0.0, 1.0), doc="rows / trailing rows at least")
    max_positive_rate_ratio: float = C.setting(2.0, C.at_least(1.0), doc="positive rate / trailing at most")
    min_positive_rate_ratio: float = C.setting(0.5, C.in_range(0.0, 1.0), doc="positive rate / trailing at least")
    max_reject_fraction_increase: float = C.setting(0.02, C.in_range(0.0, 1.0),
                                                    doc="malformed share of the day's lines - trailing, at most")
    max_missing_rate_increase: float = C.setting(0.2, C.in_range(0.0, 1.0),
                                                 doc="per field: share of id 0 - trailing, at most")
    max_distinct_ratio: float = C.setting(3.0, C.at_least(1.0), doc="per field: distinct ids / trailing at most")
    min_distinct_ratio: float = C.setting(0.33, C.in_range(0.0, 1.0), doc="per field: distinct ids / trailing "
                                                                          "at least")


@dataclass(frozen=True)
class Timeouts:
    """Seconds per step; a step that takes longer is stopped and the run fails."""

    featurize: int = C.setting(6 * 3600, C.at_least(1))
    train: int = C.setting(48 * 3600, C.at_least(1))
    evaluate: int = C.setting(4 * 3600, C.at_least(1))
    export: int = C.setting(3600, C.at_least(1), doc="python -m deepfm.export of a promoted candidate")


@dataclass(frozen=True)
class RetrainConfig:
    path: Path                                  # the file (set by load_config)
    trainer: TrainConfig                        # what deepfm/train.py will run with (set by load_config)
    raw_dir: Path = C.setting()
    work_dir: Path = C.setting()
    registry_dir: Path = C.setting()
    contract: Path = C.setting(DEFAULT_CONTRACT)
    window_days: int = C.setting(7, C.at_least(1), doc="featurize days newest-W .. newest (newest = the test day)")
    valid_days: int = C.setting(1, C.at_least(0), doc="days before the test day used for validation ...")
    min_train_days: int = C.setting(1, C.at_least(1), doc="... when at least this many train days remain, else 0")
    neg_sample_rate: float | None = C.setting(None, _sample_rate, doc="None: the contract's")
    refit: bool = C.setting(False, doc="refit boundaries/vocabulary and train from scratch")
    completeness: Literal["marker", "stable_seconds"] = C.setting("marker")
    stable_seconds: int = C.setting(600, C.at_least(0), doc="completeness stable_seconds: unchanged this long")
    keep_versions: int = C.setting(5, C.at_least(1))
    spark: SparkSettings = C.setting(factory=SparkSettings)
    train: TrainSettings = C.setting(factory=TrainSettings)
    gate: GateSettings = C.setting(factory=GateSettings)
    checks: CheckSettings = C.setting(factory=CheckSettings)
    timeouts: Timeouts = C.setting(factory=Timeouts)


_TOP_KEYS = frozenset(f.name for f in dataclasses.fields(RetrainConfig)) - {"path", "trainer"}
_OWN_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainSettings)) - {"settings"}
_TRAINER_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_TRAINER_SETS = ("--data", "--out", "--warm-start")        # retraining's to pass, per run
_PLACEHOLDER = ["--data", "<featurized>", "--out", "<run folder>"]


def load_config(path: str | Path) -> RetrainConfig:
    """Read the retrain YAML: relative paths resolve against the file's folder; unknown keys, bad values
    and duplicate keys are errors naming the key; the ``train:`` settings are checked by the trainer."""
    p = Path(path).resolve()
    try:
        raw = C.load_yaml(p, "retrain config")
    except C.ConfigError as e:
        raise RetrainConfigError(str(e)) from None
    try:
        top = dict(C.mapping(raw, "", _TOP_KEYS))
        train = _train_settings(top.pop("train", None), p.parent)
        cfg = C.build(RetrainConfig, top, "", p.parent, path=p, train=train, trainer=_trainer(train))
        _check_together(cfg)
    except C.ConfigError as e:
        raise RetrainConfigError(f"{p}: {e}") from None
    return cfg


def _train_settings(raw: Any, base: Path) -> TrainSettings:
    """The ``train:`` section: retraining's keys built here, the trainer's checked by its own loader."""
    section = C.mapping({} if raw is None else raw, "train", _OWN_TRAIN_KEYS | _TRAINER_KEYS)
    own = C.build(TrainSettings, {k: v for k, v in section.items() if k in _OWN_TRAIN_KEYS}, "train", base)
    given = {k: v for k, v in section.items() if k in _TRAINER_KEYS and v is not None}
    try:
        load_train_config(own.config)
    except TrainConfigError as e:
        raise C.ConfigError(f"train.config: {e}") from None
    try:
        typed = load_train_config(own.config, given)
    except TrainConfigError as e:                   # the message starts with the trainer's key
        raise C.ConfigError(f"train.{e}") from None
    return dataclasses.replace(own, settings={k: getattr(typed, k) for k in given})


def trainer_args(t: TrainSettings) -> list[str]:
    """deepfm/train.py's flags for the config file and the trainer settings (not extra_args).

        TrainSettings(config=Path("t.yaml"), settings={"hidden": (32, 32), "keep_best": False})
        -> ["--config", "t.yaml", "--hidden", "32,32", "--no-keep-best"]
    """
    return ["--config", str(t.config), *(x for k, v in t.settings.items() for x in _flag(k, v))]


def _flag(key: str, value: Any) -> list[str]:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    if isinstance(value, tuple):     # hidden (64, 64) -> 64,64; crosses (("C1", "C2"),) -> C1:C2
        return [f"--{flag}", ",".join(":".join(x) if isinstance(x, tuple) else str(x) for x in value)]
    return [f"--{flag}", str(value)]


def _trainer(t: TrainSettings) -> TrainConfig:
    """The trainer's own parser over the arguments retraining will pass (extra_args included): what the
    trainer will run with, or ConfigError naming the key whose flags it refuses."""
    for k, v in t.settings.items():
        try:
            parse_args([*_PLACEHOLDER, *_flag(k, v)])
        except TrainConfigError as e:
            raise C.ConfigError(f"train.{k}: deepfm/train.py takes no flag for it ({e}); set it in the file "
                                "train.config names") from None
    try:
        a, cfg = parse_args([*_PLACEHOLDER, *trainer_args(t), *t.extra_args])
    except TrainConfigError as e:
        raise C.ConfigError(f"train.extra_args: {e}") from None
    if [a.data, a.out] != _PLACEHOLDER[1::2] or a.warm_start is not None:
        raise C.ConfigError(f"train.extra_args: {', '.join(_TRAINER_SETS)} are set by retraining, per run")
    return cfg


def _check_together(cfg: RetrainConfig) -> None:
    if not cfg.gate.calibration_min < cfg.gate.calibration_max:
        raise C.ConfigError("gate.calibration_min must be below gate.calibration_max")
    # the run writes into work_dir and registry_dir and deletes old versions and work there: neither may
    # hold, or lie inside, the raw days or each other
    folders = [("raw_dir", str(cfg.raw_dir)), ("work_dir", str(cfg.work_dir)), ("registry_dir", str(cfg.registry_dir))]
    for i, written in enumerate(folders[1:], 1):
        try:
            refuse_overlap(written, *folders[:i])
        except PathOverlapError as e:
            raise C.ConfigError(str(e)) from None
