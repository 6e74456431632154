"""What a launch of deepfm/train.py does, decided from files before any process group or model exists.

Decide, then act: :func:`check_data` and :func:`plan_start` are pure functions of what the launch sees
(the featurized data's manifest; the run folder's latest checkpoint state and metrics.json; this
launch's settings), :func:`prepare` reads those files and calls them, and deepfm/train.py acts on the
:class:`Launch` it gets. Every rank reads the same files and decides the same, so a refusal is every
rank's, before ``init_cluster`` and before anything is written.

**The same data** (resume, or refuse): the same feature fingerprint (what an id means) and, split by
split, the same days, rows and positives (which rows: the manifest's :class:`deepfm.state.SplitData`).
The folder's path is not part of it: a featurized output moved or copied resumes; one featurized again
over other days, or from other logs, does not. (Checkpoints older than this record no splits; for them
the same data is the same fingerprint and the same folder.) **The same model**: the same kind, the same
hidden layers when the kind has a deep part (and the same ``crosses`` for deepfm_cross), the same fields
with the same table sizes and embedding dims. Any other setting (learning rates, batch size, epochs, max_steps, ...) may change on a relaunch
and applies from the resumed step.

**A finished run** (no step left: its epochs done, early stopped, or max_steps reached) whose
metrics.json is for its last step is not run again: ``RUN is finished (epoch E of E); nothing to do``,
exit 0, nothing rewritten. Raising ``--epochs`` (or ``--max-steps``) trains on from the last
checkpoint, as Lightning's ``fit(ckpt_path=...)`` does with a larger ``max_epochs``; an early-stopped
run stays finished. A finished run without its metrics.json (killed between its last checkpoint and
the end of the test) is finished off: loaded, tested, metrics.json written.

**FNN's pre-training** (``init_embeddings_from``, model fnn): a new run (no checkpoint of its own, no
--warm-start) starts its tables from an fm run's checkpoint, its dense layers fresh; refused unless
that checkpoint is an fm model's, for this data, with the same tables. A run that resumes, or is
warm-started, does not go back to the fm run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from deepfm.model import FieldSpec, has_hidden
from deepfm.state import SplitData, StateError, TrainState, days_text, read
from deepfm.trainconf import TrainConfig
from pipeline import layout
from pipeline.manifest import Manifest, SplitInfo

NEW, WARM, EMBEDDINGS, RESUME, FINISH, DONE = "new", "warm", "embeddings", "resume", "finish", "done"


class LaunchError(RuntimeError):
    """A launch refused before it starts (the data or the run folder does not fit it): exit 2."""


@dataclass(frozen=True)
class Start:
    """How the run starts: ``new`` (from scratch), ``warm`` (the weights of ``checkpoint``), ``embeddings``
    (the tables of ``checkpoint``, an fm run's, the rest from scratch: fnn), ``resume`` (weights,
    optimizers and progress of ``checkpoint``), ``finish`` (resume with no step left: test and write
    metrics.json) or ``done`` (finished: nothing to do). ``why``: why no step is left."""

    kind: str
    checkpoint: Path | None = None
    why: str = ""


@dataclass(frozen=True)
class Launch:
    start: Start
    notes: tuple[str, ...] = ()         # for the log: what this data leaves out (no valid days, no test days)


def facts(root: Path, m: Manifest, cfg: TrainConfig, world: int) -> TrainState:
    """What a run on this data with these settings is, before any progress."""
    return TrainState(world_size=world, feature_fingerprint=m.feature_fingerprint,
                      contract_fingerprint=m.contract_fingerprint, config=cfg,
                      fields=tuple(FieldSpec.of(f) for f in m.fields),
                      data=str(root.resolve()), splits=SplitData.of(m))


# --- the data --------------------------------------------------------------------------------------

def check_data(splits: Mapping[str, SplitInfo], where: Path, cfg: TrainConfig, world: int,
               test: bool) -> tuple[str, ...]:
    """Refuse a split the run needs that has no rows; the notes for the log on splits it goes without.

    Train needs at least one batch per rank. Valid may have no rows only when the manifest assigned it
    no days (then there is no validation, so no early stopping and no best weights); test likewise, or
    with ``test`` False (--no-test). ``where``: the manifest's path, for the messages.

        train 31212 rows, batch 512, 2 ranks, valid day 2 with 25000 rows, test day 3 with 0 rows
        -> LaunchError("...: the test split (day 3) has 0 rows: nothing to test on; ... or pass --no-test")
    """
    train = splits.get("train")
    rows = train.rows if train else 0
    if rows < cfg.batch_size * world:
        raise LaunchError(f"{where}: the train split has {rows} rows, fewer than one batch per rank "
                          f"(batch_size {cfg.batch_size} x {world} ranks)")
    notes = []
    valid = splits.get("valid")
    if valid is None or not valid.days:
        notes.append(f"{where} assigns no valid days: no validation, so no early stopping and no best weights "
                     "(keep_best); the last weights are tested")
    elif valid.rows == 0:
        raise LaunchError(f"{where}: the valid split ({days_text(tuple(valid.days))}) has 0 rows: "
                          "validation (early stopping, keep_best) needs rows; featurize again (--valid-days 0 "
                          "for data without validation)")
    t = splits.get("test")
    if test and (t is None or not t.days):
        notes.append(f"{where} assigns no test days: no test metrics")
    elif test and t is not None and t.rows == 0:
        raise LaunchError(f"{where}: the test split ({days_text(tuple(t.days))}) has 0 rows: "
                          "nothing to test on; featurize again, or pass --no-test")
    return tuple(notes)


def check_crosses(cfg: TrainConfig, fields: tuple[str, ...] | list[str], where: Path) -> None:
    """Refuse a ``crosses`` pair that names a field the data does not have (by name, with the fields it has).

        crosses [[C1, C99]], fields I1..I13, C1..C26 -> LaunchError("crosses[0]: no field C99 in ...")
    """
    for i, pair in enumerate(cfg.crosses):
        for name in pair:
            if name not in fields:
                raise LaunchError(f"crosses[{i}]: no field {name} in {where} (its fields: {', '.join(fields)})")


# --- the run folder --------------------------------------------------------------------------------

def same_data(saved: TrainState, now: TrainState) -> bool:
    if saved.feature_fingerprint != now.feature_fingerprint:
        return False
    if not saved.splits:                # a checkpoint that recorded no splits: the folder is all we know
        return saved.data == now.data
    return saved.splits == now.splits


def describe_data(s: TrainState) -> str:
    """``/d/feat (features 9861641918bd503b; train days 0-1, 31212 rows; valid day 2, 25000 rows; ...)``."""
    splits = "; ".join(f"{k} {v.describe()}" for k, v in s.splits.items())
    return f"{s.data} (features {s.feature_fingerprint}" + (f"; {splits})" if splits else ")")


def model_differences(saved: TrainState, now: TrainState) -> tuple[list[str], list[str]]:
    """(what the saved run's model is, what this launch asks for), for each setting that changes the
    parameters or their meaning; empty when the models are the same."""
    a, b = saved.config, now.config
    if a.model != b.model:
        return [f"model {a.model}"], [f"model {b.model}"]
    was: list[str] = []
    asks: list[str] = []
    if has_hidden(a.model) and a.hidden != b.hidden:
        was.append(f"model {a.model} with hidden {','.join(map(str, a.hidden))}")
        asks.append(f"hidden {','.join(map(str, b.hidden))}")
    if a.model == "two_tower" and (a.tower_hidden, a.tower_dim) != (b.tower_hidden, b.tower_dim):
        was.append(f"model {a.model} with towers {','.join(map(str, a.tower_hidden))} -> {a.tower_dim}")
        asks.append(f"towers {','.join(map(str, b.tower_hidden))} -> {b.tower_dim}")
    if a.model == "deepfm_cross" and a.crosses != b.crosses:
        was.append(f"model {a.model} with crosses {_pairs(a.crosses)}")
        asks.append(f"crosses {_pairs(b.crosses)}")
    if [f.name for f in saved.fields] != [f.name for f in now.fields]:
        was.append(f"{len(saved.fields)} fields {','.join(f.name for f in saved.fields)}")
        asks.append(f"{len(now.fields)} fields {','.join(f.name for f in now.fields)}")
    else:
        for x, y in zip(saved.fields, now.fields):
            if x != y:
                was.append(f"table {x.name} {x.num_embeddings} x {x.embedding_dim}")
                asks.append(f"table {y.name} {y.num_embeddings} x {y.embedding_dim}")
                break
    return was, asks


def _pairs(crosses: tuple[tuple[str, ...], ...]) -> str:
    return ",".join(":".join(p) for p in crosses)


def no_step_left(s: TrainState, cfg: TrainConfig) -> str | None:
    """Why a run at state ``s`` has nothing left to train under ``cfg``, or None."""
    if s.early_stopped:
        return f"early stopped at step {s.global_step}, epoch {s.epoch} of {cfg.epochs}"
    if s.epoch >= cfg.epochs:
        return f"epoch {s.epoch} of {cfg.epochs}"
    if cfg.max_steps and s.global_step >= cfg.max_steps:
        return f"step {s.global_step} of max_steps {cfg.max_steps}"
    return None


def plan_start(out: Path, now: TrainState, latest: Path | None, saved: TrainState | None,
               metrics_step: int | None, warm: Path | None, warm_saved: TrainState | None,
               init: Path | None = None, init_saved: TrainState | None = None) -> Start:
    """How a launch with facts ``now`` starts in run folder ``out``, whose latest complete checkpoint is
    ``latest`` (state ``saved``) and whose metrics.json is for step ``metrics_step`` (None: none);
    ``warm``: the --warm-start checkpoint (state ``warm_saved``); ``init``: the ``init_embeddings_from``
    checkpoint (state ``init_saved``). A checkpoint of the run itself wins over --warm-start (a restarted
    warm-started run resumes), and --warm-start over ``init``. :class:`LaunchError` on another run's folder.
    """
    if latest is not None and saved is not None:
        was: list[str] = []
        asks: list[str] = []
        if not same_data(saved, now):
            was.append(describe_data(saved))
            asks.append(describe_data(now))
        mw, ma = model_differences(saved, now)
        was, asks = was + mw, asks + ma
        if was:
            raise LaunchError(f"--out {out} already holds a run on {' and '.join(was)}; this launch asks for "
                              f"{' and '.join(asks)}: use a new --out (add --warm-start {out} to start from its weights)")
        why = no_step_left(saved, now.config)
        if why is None:
            return Start(RESUME, latest)
        if metrics_step == saved.global_step:
            return Start(DONE, latest, why)
        return Start(FINISH, latest, why)
    if warm is not None:
        if warm_saved is not None and warm_saved.feature_fingerprint != now.feature_fingerprint:
            raise LaunchError(f"--warm-start {warm}: made for featurized data with fingerprint "
                              f"{warm_saved.feature_fingerprint}, but this data's is {now.feature_fingerprint}: the ids "
                              "mean different things. Train from scratch, or featurize with --reuse of the data "
                              "that model was trained on.")
        return Start(WARM, warm)
    if init is not None and init_saved is not None:
        check_embeddings_source(init, init_saved, now)
        return Start(EMBEDDINGS, init)
    return Start(NEW)


def check_embeddings_source(init: Path, src: TrainState, now: TrainState) -> None:
    """Refuse an ``init_embeddings_from`` checkpoint that is not an fm model's, or not for this data's
    ids, or whose tables are not this run's (names, rows, dims)."""
    where = f"init_embeddings_from {init}"
    if src.config.model != "fm":
        raise LaunchError(f"{where}: a model {src.config.model} checkpoint; fnn starts from an fm run's embeddings "
                          "(train one with --model fm)")
    if src.feature_fingerprint != now.feature_fingerprint:
        raise LaunchError(f"{where}: made for featurized data with fingerprint {src.feature_fingerprint}, but this "
                          f"data's is {now.feature_fingerprint}: the ids mean different things. Train the fm run on "
                          "this data.")
    if src.fields != now.fields:
        have = next((f"table {x.name} {x.num_embeddings} x {x.embedding_dim}" for x, y in zip(src.fields, now.fields)
                     if x != y), f"{len(src.fields)} fields")
        want = next((f"table {y.name} {y.num_embeddings} x {y.embedding_dim}" for x, y in zip(src.fields, now.fields)
                     if x != y), f"{len(now.fields)} fields")
        raise LaunchError(f"{where}: its tables are not this run's ({have}; this run has {want})")


def _state(ckpt: Path) -> TrainState:
    try:
        return read(ckpt)
    except StateError as e:
        raise LaunchError(str(e)) from None


def _metrics_step(run: Path) -> int | None:
    try:
        step = json.loads((run / layout.METRICS).read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def prepare(out: Path, root: Path, m: Manifest, cfg: TrainConfig, world: int, warm_start: str | None,
            test: bool) -> Launch:
    """Read the run folder (and the --warm-start checkpoint) and decide: the checks above, in order."""
    notes = check_data(m.splits, root / layout.MANIFEST, cfg, world, test)
    check_crosses(cfg, list(m.field_names), root / layout.MANIFEST)
    latest = layout.latest_checkpoint(out)
    warm = init = None
    if latest is None and warm_start:
        warm = layout.checkpoint_of(Path(warm_start))
        if warm is None:
            raise LaunchError(f"--warm-start {warm_start}: no complete checkpoint there")
    if latest is None and warm is None and cfg.init_embeddings_from is not None:
        init = layout.checkpoint_of(Path(cfg.init_embeddings_from))
        if init is None:
            raise LaunchError(f"init_embeddings_from {cfg.init_embeddings_from}: no complete checkpoint there")
    start = plan_start(out, facts(root, m, cfg, world), latest, _state(latest) if latest else None,
                       _metrics_step(out), warm, _state(warm) if warm else None, init, _state(init) if init else None)
    return Launch(start, notes)


# --- saying why a launch stops ---------------------------------------------------------------------

def refuse(prog: str, e: BaseException) -> None:
    """Say ``prog: error: <e>`` once, where the user looks last. Under torchrun (the agent sets
    TORCHELASTIC_ERROR_FILE for each worker) local rank 0 writes it as the message of its error file:
    the agent prints that as the root cause at the end of its failure summary (the line before the
    summary's closing border), after every worker's output, so the line is not printed as well; the
    other ranks write none (the agent takes the earliest error file; on a tie, the lowest rank's).
    Elsewhere rank 0 prints it to stderr. The caller exits with code 2 on every rank."""
    line = f"{prog}: error: {e}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            # exit after local rank 0: the agent's root cause is the earliest failure (error files carry
            # whole seconds; a rank without one is stamped when the agent sees it exit), so a rank that
            # exits first would be reported instead, with no message (seen in CI)
            time.sleep(3)
            return
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": str(int(time.time()))}, f)
            return
        except OSError:
            pass
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
