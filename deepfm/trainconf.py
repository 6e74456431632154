"""Training settings: conf/train.yaml, then command-line overrides, into one frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

MODELS = ("deepfm", "fm", "lr", "dnn")
SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "train.yaml"


class TrainConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    model: str = "deepfm"
    hidden: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.5
    batch_size: int = 2048
    epochs: int = 3
    dense_lr: float = 1e-3
    sparse_optimizer: str = "adagrad"
    sparse_lr: float = 0.01
    sparse_eps: float = 1e-3                # Adagrad's step is lr * g / (sqrt(sum g^2) + eps)
    embedding_init_scale: float = 0.0       # rows start uniform in +-this; 0: TorchRec's +-sqrt(1 / rows)
    weight_decay: float = 0.0               # L2 on the dense parameters (Adam)
    embedding_l2: float = 0.0               # loss += embedding_l2 * mean over rows of sum ||looked-up row||^2
    bf16: bool | str = "auto"               # bf16 autocast of the dense part: true, false, or "auto" (where native)
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    early_stopping_patience: int = 2
    keep_best: bool = True                  # test and the final checkpoint use the best valid evaluation's weights
    seed: int = 1234
    reader_workers: int = 2
    prefetch_batches: int = 8
    max_steps: int = 0                      # 0 = no limit (tests and benchmarks cap the run)
    sharding: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> TrainConfigError:
            return TrainConfigError(f"{key}: {why}")
        if self.model not in MODELS:
            raise bad("model", f"{self.model!r} is not one of {MODELS}")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise bad("sparse_optimizer", f"{self.sparse_optimizer!r} is not one of {SPARSE_OPTIMIZERS}")
        if not all(isinstance(h, int) and h > 0 for h in self.hidden):
            raise bad("hidden", f"expected positive layer widths, got {list(self.hidden)}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"{self.dropout} is not in [0, 1)")
        for k in ("batch_size", "epochs", "keep_checkpoints", "reader_workers", "prefetch_batches"):
            if getattr(self, k) < 1:
                raise bad(k, f"{getattr(self, k)} must be at least 1")
        for k in ("dense_lr", "sparse_lr"):
            if not getattr(self, k) > 0:
                raise bad(k, "must be positive")
        for k in ("weight_decay", "embedding_l2", "embedding_init_scale", "sparse_eps"):
            if getattr(self, k) < 0:
                raise bad(k, "must not be negative")
        if self.bf16 not in (True, False, "auto"):
            raise bad("bf16", f"{self.bf16!r} is not one of true, false, auto")
        for table, kind in self.sharding.items():
            if kind not in SHARDING_TYPES:
                raise bad(f"sharding.{table}", f"{kind!r} is not one of {SHARDING_TYPES}")


def load_train_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise TrainConfigError(f"training config not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{p}: expected a mapping")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    for k in raw:
        if k not in known:
            raise TrainConfigError(f"{k}: unknown key (allowed: {', '.join(sorted(known))})")
    if "hidden" in raw:
        raw["hidden"] = tuple(raw["hidden"])
    if "sharding" in raw:
        raw["sharding"] = dict(raw["sharding"] or {})
    try:
        return TrainConfig(**raw)
    except TypeError as e:
        raise TrainConfigError(str(e)) from None

