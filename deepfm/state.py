"""The trainer's state: one object, saved whole into each checkpoint's meta.json and read back whole.

As in nanoGPT's checkpoint dict (``model_args``, ``iter_num``, ``best_val_loss``, ``config``), what a
resumed run needs sits in one place; there is no second list of keys to keep in step with the first.
The JSON keys are the field names (the layout checkpoints have always had, so older checkpoints load and
pipeline.retrain's reading of ``config`` stays valid).

    >>> s = TrainState(world_size=2, feature_fingerprint="9861", contract_fingerprint="4e99",
    ...                config=load_train_config(), fields=(FieldSpec("C1", 20000, 16),), data="/d/feat",
    ...                splits={"train": SplitData(days=(0, 1), rows=31212, positives=12487)})
    >>> TrainState.from_json(json.loads(json.dumps(s.to_json()))) == s
    True
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from deepfm.model import FieldSpec
from deepfm.trainconf import TrainConfig, load_train_config, to_overrides
from pipeline import layout
from pipeline.manifest import Manifest


class StateError(ValueError):
    """A checkpoint's meta.json that is not a trainer state."""


@dataclass(frozen=True)
class SplitData:
    """One split of the featurized data as a run saw it: its days and, after sampling, its rows and
    positives (the manifest's). With the feature fingerprint, what "the same data" means on resume."""

    days: tuple[int, ...]
    rows: int
    positives: int

    @classmethod
    def of(cls, m: Manifest) -> dict[str, "SplitData"]:
        """The manifest's splits: ``{"train": SplitData((0, 1), 31212, 12487), ...}``."""
        return {k: cls(tuple(v.days), v.rows, v.positives) for k, v in m.splits.items()}

    def describe(self) -> str:
        """``days 0-1, 31212 rows`` (``no days`` when the manifest assigned the split none)."""
        return f"{days_text(self.days)}, {self.rows} rows" if self.days else "no days"


def days_text(days: tuple[int, ...]) -> str:
    """(0, 1, 2) -> ``days 0-2``; (3,) -> ``day 3``; (1, 4) -> ``days 1,4``."""
    if len(days) == 1:
        return f"day {days[0]}"
    if list(days) == list(range(days[0], days[0] + len(days))):
        return f"days {days[0]}-{days[-1]}"
    return "days " + ",".join(str(d) for d in days)


@dataclass
class TrainState:
    """Where a run is (the counters the loop advances) and what it is (its data and settings)."""

    # what the run is: this launch's facts
    world_size: int
    feature_fingerprint: str            # the featurized data's: what an id means
    contract_fingerprint: str
    config: TrainConfig                 # bf16 resolved to true / false
    fields: tuple[FieldSpec, ...]
    data: str                           # the featurized folder, absolute
    splits: dict[str, SplitData] = field(default_factory=dict)     # the data's splits; {}: a checkpoint older than this
    # where it is: restored on resume
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_auc: float = -1.0
    best_step: int = -1                 # the step of best_auc's evaluation; -1: none yet
    bad_evals: int = 0                  # evaluations since the best one (early stopping)
    early_stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)    # one valid evaluation each: step, epoch, metrics
    examples: int = 0                   # trained, over all ranks
    seconds: float = 0.0                # of training (evaluation and checkpoint writing excluded)
    weights_from_step: int | None = None   # the final checkpoint holds the weights of this (best) step
    train_loss: list[list[float]] = field(default_factory=list)     # rank 0's: [step, mean loss since the last]

    def resumed(self, saved: "TrainState") -> "TrainState":
        """This launch's facts with ``saved``'s progress. At another world size the step within the epoch
        becomes the same fraction of the epoch (an epoch has ``rows // (batch * world)`` steps)."""
        progress = {k: getattr(saved, k) for k in _PROGRESS}
        step = saved.step_in_epoch
        if saved.world_size != self.world_size:
            step = int(step * saved.world_size / self.world_size)
        return dataclasses.replace(self, **{**progress, "history": list(saved.history),
                                            "train_loss": [list(x) for x in saved.train_loss], "step_in_epoch": step})

    def evaluation(self, step: int) -> dict[str, Any]:
        """The history entry of the valid evaluation at ``step``; else the last one; {} when none."""
        return next((h for h in self.history if h["step"] == step), self.history[-1] if self.history else {})

    # -- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = to_overrides(self.config)
        d["fields"] = [dataclasses.asdict(f) for f in self.fields]
        d["splits"] = {k: {"days": list(v.days), "rows": v.rows, "positives": v.positives} for k, v in self.splits.items()}
        d["history"] = [dict(h) for h in self.history]
        d["train_loss"] = [list(x) for x in self.train_loss]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "state") -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StateError(f"{where}: unknown key {unknown[0]!r} (a checkpoint of another version of the trainer?)")
        try:
            body = dict(d)
            body["config"] = load_train_config(None, body["config"])
            body["fields"] = tuple(FieldSpec(**f) for f in body["fields"])
            body["splits"] = {k: SplitData(tuple(v["days"]), v["rows"], v["positives"])
                              for k, v in body.get("splits", {}).items()}
            body["history"] = [dict(h) for h in body.get("history", [])]
            body["train_loss"] = [list(x) for x in body.get("train_loss", [])]
            return cls(**body)
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{where}: not a trainer state: {type(e).__name__}: {e}") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def loads(cls, text: str, where: str = "state") -> "TrainState":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StateError(f"{where}: not JSON: {e}") from None
        if not isinstance(d, dict):
            raise StateError(f"{where}: not a JSON object")
        return cls.from_json(d, where)


_PROGRESS = ("epoch", "step_in_epoch", "global_step", "best_auc", "best_step", "bad_evals", "early_stopped",
             "history", "examples", "seconds", "train_loss")


def write(ckpt: Path, state: TrainState) -> None:
    (ckpt / layout.CHECKPOINT_META).write_text(state.dumps())


def read(ckpt: Path) -> TrainState:
    """The state saved in checkpoint folder ``ckpt``; :class:`StateError` when missing or unreadable."""
    p = ckpt / layout.CHECKPOINT_META
    try:
        text = p.read_text()
    except OSError as e:
        raise StateError(f"{p}: cannot read it ({e.strerror})") from None
    return TrainState.loads(text, str(p))
