"""Training settings: conf/train.yaml (the one statement of every default), a user's file over it, then
command-line overrides, into one frozen dataclass, checked by pipeline.config's rules.

No torch import: the retraining orchestrator validates its ``train:`` settings through this loader
before any step runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline import config as C

MODELS = ("deepfm", "fm", "lr", "dnn")
SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "train.yaml"


class TrainConfigError(C.ConfigError):
    pass


def _bf16(v: Any, where: str) -> Any:
    if v not in (True, False, "auto"):
        raise C.ConfigError(f"{where}: {v!r} is not one of true, false, auto")
    return v


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting. The defaults and what each means are in conf/train.yaml (and nowhere else);
    a user's ``--config`` file changes keys of it."""

    model: str = C.setting(check=C.one_of(*MODELS))
    hidden: tuple[int, ...] = C.setting(check=C.each(C.positive))
    dropout: float = C.setting(check=C.in_range(0.0, 1.0, hi_open=True))
    batch_size: int = C.setting(check=C.at_least(1))
    epochs: int = C.setting(check=C.at_least(1))
    dense_lr: float = C.setting(check=C.positive)
    sparse_optimizer: str = C.setting(check=C.one_of(*SPARSE_OPTIMIZERS))
    sparse_lr: float = C.setting(check=C.positive)
    sparse_eps: float = C.setting(check=C.at_least(0.0))
    embedding_init_scale: float = C.setting(check=C.at_least(0.0))
    weight_decay: float = C.setting(check=C.at_least(0.0))
    embedding_l2: float = C.setting(check=C.at_least(0.0))
    bf16: bool | str = C.setting(check=_bf16)
    eval_every_steps: int = C.setting(check=C.at_least(0))
    checkpoint_every_steps: int = C.setting(check=C.at_least(0))
    keep_checkpoints: int = C.setting(check=C.at_least(1))
    early_stopping_patience: int = C.setting(check=C.at_least(1))
    keep_best: bool = C.setting()
    seed: int = C.setting(check=C.at_least(0))
    reader_workers: int = C.setting(check=C.at_least(1))
    prefetch_batches: int = C.setting(check=C.at_least(1))
    max_steps: int = C.setting(check=C.at_least(0))
    sharding: Mapping[str, str] = C.setting(check=C.each(C.one_of(*SHARDING_TYPES)))


def load_train_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """conf/train.yaml, the keys of ``path`` over it (when given and not that file), then ``overrides``
    (None values ignored). :class:`TrainConfigError` names the key (and the file) of a bad setting.

        load_train_config(None, {"model": "fm"}).model -> "fm"
    """
    try:
        raw = C.mapping(C.load_yaml(DEFAULT_TRAIN_CONFIG, "training config"), str(DEFAULT_TRAIN_CONFIG))
        if path is not None and Path(path).resolve() != DEFAULT_TRAIN_CONFIG:
            user = C.load_yaml(path, "training config")
            if user is not None:
                raw = {**raw, **_known(C.mapping(user, ""), path)}
        raw = {**raw, **_known({k: v for k, v in (overrides or {}).items() if v is not None}, "the overrides")}
        return C.build(TrainConfig, raw)
    except TrainConfigError:
        raise
    except C.ConfigError as e:
        raise TrainConfigError(str(e)) from None


def _known(raw: Mapping[str, Any], where: Any) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in raw:
        if k not in allowed:
            raise TrainConfigError(f"{k}: unknown key in {where} (allowed: {', '.join(sorted(allowed))})")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in raw.items()}


def to_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as plain data (lists for tuples), as :func:`load_train_config` takes them back."""
    return {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
            for k, v in dataclasses.asdict(cfg).items()}
