"""Training settings: conf/train.yaml (the one statement of every default), a user's file over it, then
command-line overrides, into one frozen dataclass, checked by pipeline.config's rules.

No torch import: the retraining orchestrator validates its ``train:`` settings through this loader
before any step runs.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import config as C

MODELS = ("deepfm", "fm", "lr", "dnn", "fnn", "ipnn", "opnn", "pnn_star", "wide_deep", "fm_dnn", "nfm",
          "deepfm_cross", "two_tower")      # deepfm.model.KINDS (the tests check they agree); formulas in deepfm/zoo.py
SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
TRAIN_PIPELINES = ("auto", "sparse_dist", "plain")
TOWER_LOSSES = ("softmax", "pointwise")
DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "train.yaml"


class TrainConfigError(C.ConfigError):
    pass


def _crosses(v: Any, where: str) -> Any:
    """Pairs of two different field names, no pair twice (in either order); the names are checked
    against the data's fields by deepfm.launch."""
    seen: dict[frozenset[str], int] = {}
    for i, pair in enumerate(v):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise C.ConfigError(f"{where}[{i}]: {list(pair)} is not a pair of two different fields, e.g. [C1, C2]")
        key = frozenset(pair)
        if key in seen:
            raise C.ConfigError(f"{where}[{i}]: {list(pair)} is {where}[{seen[key]}] again")
        seen[key] = i
    return v


def _recall_k(v: Any, where: str) -> Any:
    """At least one K, no K twice (the first is early stopping's)."""
    if not v:
        raise C.ConfigError(f"{where}: name at least one K, e.g. [50, 10, 100]")
    if len(set(v)) != len(v):
        raise C.ConfigError(f"{where}: {list(v)} names a K twice")
    return v


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
    train_pipeline: str = C.setting(check=C.one_of(*TRAIN_PIPELINES))
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
    crosses: tuple[tuple[str, ...], ...] = C.setting(check=_crosses)
    init_embeddings_from: str | None = C.setting()
    tower_hidden: tuple[int, ...] = C.setting(check=C.each(C.positive))
    tower_dim: int = C.setting(check=C.at_least(0))
    tower_dropout: float = C.setting(check=C.in_range(0.0, 1.0, hi_open=True))
    temperature: float = C.setting(check=C.positive)
    loss: str = C.setting(check=C.one_of(*TOWER_LOSSES))
    recall_k: tuple[int, ...] = C.setting(check=lambda v, w: _recall_k(C.each(C.positive)(v, w), w))


def check_kind(cfg: TrainConfig) -> TrainConfig:
    """The settings a model kind needs or refuses: deepfm_cross needs ``crosses``; fnn needs
    ``init_embeddings_from`` (its FM pre-training), which no other kind takes."""
    if cfg.model == "deepfm_cross" and not cfg.crosses:
        raise TrainConfigError("crosses: model deepfm_cross needs at least one pair of fields to cross, "
                               "e.g. crosses: [[C1, C2]]")
    if cfg.model == "fnn" and cfg.init_embeddings_from is None:
        raise TrainConfigError("init_embeddings_from: model fnn starts from the embeddings of a trained fm run "
                               "(the paper's FM pre-training): name that run folder or checkpoint "
                               "(--init-embeddings-from)")
    if cfg.model != "fnn" and cfg.init_embeddings_from is not None:
        raise TrainConfigError(f"init_embeddings_from: only model fnn starts from another run's embeddings, not "
                               f"model {cfg.model} (--warm-start starts from a run's weights)")
    return cfg


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
        return check_kind(C.build(TrainConfig, raw))
    except TrainConfigError:
        raise
    except C.ConfigError as e:
        raise TrainConfigError(str(e)) from None


def _known(raw: Mapping[str, Any], where: Any) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in raw:
        if k not in allowed:
            raise TrainConfigError(f"{k}: unknown key in {where} (allowed: {', '.join(sorted(allowed))})")
    return {k: _plain(v) for k, v in raw.items()}


def _plain(v: Any) -> Any:
    """Tuples (at any depth) as lists, mappings as dicts: the data YAML and JSON give."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as plain data (lists for tuples), as :func:`load_train_config` takes them back."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


class _Parser(argparse.ArgumentParser):
    """Raises TrainConfigError instead of exiting, so that a caller (retraining) can check arguments."""

    def error(self, message: str) -> Any:
        raise TrainConfigError(f"{self.prog}: {message}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    p = _Parser(prog="torchrun deepfm/train.py", description="train DeepFM (or another kind: --model) on featurized Parquet with TorchRec-sharded tables")
    p.add_argument("--data", required=True, help="featurized output (jobs/featurize.py)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.json, tensorboard/")
    p.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG), help="training settings (conf/train.yaml)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per rank")
    p.add_argument("--dense-lr", type=float)
    p.add_argument("--sparse-lr", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--hidden", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 400,400,400")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the dense part; default (config bf16: auto): on where bf16 is native "
                        "(AVX-512 BF16/AMX, a GPU with bf16) and the dense step measured at the start is faster")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (0 = no limit)")
    p.add_argument("--eval-every-steps", type=int)
    p.add_argument("--checkpoint-every-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--warm-start", help="start from this checkpoint's (or run folder's latest) model weights")
    p.add_argument("--init-embeddings-from", metavar="RUN_OR_CHECKPOINT",
                   help="model fnn: start its tables from this fm run's (its latest checkpoint) or checkpoint's")
    p.add_argument("--crosses", type=_pairs, metavar="A:B,C:D",
                   help="model deepfm_cross: the field pairs to cross, e.g. C1:C2,I1:C3")
    p.add_argument("--loss", choices=TOWER_LOSSES, help="model two_tower: softmax (in-batch) or pointwise")
    p.add_argument("--temperature", type=float, help="model two_tower, loss softmax")
    p.add_argument("--tower-hidden", type=lambda s: tuple(int(x) for x in s.split(",") if x),
                   help="model two_tower: each tower's hidden layers, e.g. 128,64")
    p.add_argument("--tower-dim", type=int, help="model two_tower: each tower MLP's output width")
    p.add_argument("--tower-dropout", type=float, help="model two_tower: the towers' dropout (not --dropout)")
    p.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    p.add_argument("--cpu", action="store_true", help="use the CPU and gloo even when CUDA is present")
    a = p.parse_args(argv)
    over = {k: getattr(a, k) for k in ("model", "epochs", "batch_size", "dense_lr", "sparse_lr", "dropout", "hidden",
                                       "bf16", "max_steps", "eval_every_steps", "checkpoint_every_steps", "seed",
                                       "init_embeddings_from", "crosses", "loss", "temperature", "tower_hidden",
                                       "tower_dim", "tower_dropout")}
    return a, load_train_config(a.config, over)


def _pairs(s: str) -> list[list[str]]:
    """``C1:C2,I1:C3`` -> [["C1", "C2"], ["I1", "C3"]] (the setting checks that each is a pair)."""
    return [p.split(":") for p in s.split(",")]


