"""torchrun deepfm/train.py: train DeepFM on featurized Parquet with TorchRec-sharded tables.

    torchrun --nproc_per_node=N deepfm/train.py --data FEATURIZED_DIR --out RUN_DIR
        [--config conf/train.yaml] [--model deepfm|fm|lr|dnn|fnn|ipnn|...|two_tower] [--epochs E] [--batch-size B]
        [--warm-start CHECKPOINT_OR_RUN_DIR] [--init-embeddings-from FM_RUN_DIR] [--crosses A:B,...] [...]

A relaunch with the same --out (or torchrun --max-restarts after a worker dies) resumes from the
latest complete checkpoint in RUN_DIR/checkpoints, at any world size, when it is for the same data and
model (else it is refused, exit 2); a finished run is not run again (deepfm/launch.py: what "the same"
means and what a relaunch does). RUN_DIR/metrics.json gets the valid and test metrics and the training
throughput; RUN_DIR/tensorboard the event files; RUN_DIR/curves.json and predictions/test.npz what
python -m deepfm.report draws (deepfm/runfiles.py). Model two_tower (recall, deepfm/two_tower.py) trains on a
recall output the same way; its valid and test metrics are recall@K, hit rate@K and NDCG@K over the
whole catalogue (deepfm/evaluator.py), and early stopping follows recall@K for the first K of recall_k. Settings, data and run folder are checked before the
process group starts: a refusal is one line, ``train: error: ...``, exit 2 on every rank (under
torchrun, the root cause at the end of its failure summary).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # torchrun puts deepfm/ first on sys.path; import the package by its absolute name instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from torch.distributed.elastic.multiprocessing.errors import record

from deepfm import inputs, launch, runfiles, sharded
from deepfm.model import TOWERS, has_hidden
from deepfm.cluster import Cluster, dense_step_timer, init_cluster, log_project_info, resolve_bf16, shutdown
from deepfm.evaluator import Evaluator
from deepfm.launch import Start
from deepfm.state import TrainState
from deepfm.steps import make_steps, resolve_train_pipeline
from deepfm.trainconf import TrainConfig, TrainConfigError, parse_args
from pipeline import layout

log = logging.getLogger("deepfm.train")


def train(a: argparse.Namespace, cfg: TrainConfig, ds: inputs.Dataset, start: Start) -> dict:
    cluster = init_cluster(force_cpu=a.cpu)
    try:
        return _train(a, cfg, ds, start, cluster)
    finally:
        shutdown()                      # last: the batch streams have joined their threads by now
        threads_left()


def threads_left(seconds: float = 5.0) -> list[str]:
    """The daemon threads still running after up to ``seconds`` of waiting for them, named in a warning.
    Python joins the other threads at exit, not these: one of them inside a torch op when the interpreter
    finalizes aborts the process (exit 134, deepfm.inputs.Prefetcher says why)."""
    deadline = time.monotonic() + seconds
    left = []
    for t in threading.enumerate():
        if t is threading.main_thread() or not t.daemon:
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            left.append(t.name)
    if left:
        log.warning("threads still running at exit: %s; one inside a torch op as the interpreter exits aborts the "
                    "process ('terminate called without an active exception')", ", ".join(left))
    return left


def _train(a: argparse.Namespace, cfg: TrainConfig, ds: inputs.Dataset, start: Start, cluster: Cluster) -> dict:
    run = Path(a.out)
    cfg = resolve(cfg, cluster, ds)
    if cluster.is_main:
        run.mkdir(parents=True, exist_ok=True)
    t = sharded.build(ds.fields, cfg, cluster)
    log.info("rank %d/%d on %s (%s); model %s; plan %s", cluster.rank, cluster.world, cluster.device, cluster.backend,
             cfg.model, t.plan_summary() if cluster.is_main else "")
    state = start_or_resume(t, ds, cfg, cluster, start)
    loop = Loop(t, ds, cfg, cluster, run, state)
    while state.epoch < cfg.epochs and not loop.stop:
        loop.one_epoch()
    return finish(loop, test=not a.no_test)


def resolve(cfg: TrainConfig, cluster: Cluster, ds: inputs.Dataset) -> TrainConfig:
    """The settings that say ``auto`` decided for this device (and, for bf16, agreed by every rank): bf16
    by a measurement of the deep part's step at this batch size, fp32 vs bf16 (a CPU flag is not enough)."""
    timer = None
    if has_hidden(cfg.model) and cfg.bf16 == "auto":
        timer = dense_step_timer(sum(f.embedding_dim for f in ds.fields), cfg.hidden, cfg.batch_size, cluster.device)
    use_bf16, why = resolve_bf16(cfg.bf16, cluster.device, timer)
    pipeline, why_pipeline = resolve_train_pipeline(cfg.train_pipeline, cluster.device)
    if cluster.is_main:
        log.info("bf16 autocast %s (%s); steps: %s (%s)", "on" if use_bf16 else "off", why, pipeline, why_pipeline)
    return replace(cfg, bf16=use_bf16, train_pipeline=pipeline)


def start_or_resume(t: sharded.Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster,
                    start: Start) -> TrainState:
    """Start as decided (deepfm.launch): resume a checkpoint of this run (weights, optimizers and
    progress; ``finish``: with no step left), else a warm start (weights only), else fnn's start from an
    fm run's tables (``embeddings``), else from scratch."""
    state = launch.facts(ds.root, ds.manifest, cfg, cluster.world)
    if start.kind in (launch.RESUME, launch.FINISH) and start.checkpoint is not None:
        state = state.resumed(sharded.load(t, start.checkpoint, ds.fingerprint))
        log.info("resumed from %s (epoch %d, step %d)%s", start.checkpoint, state.epoch, state.global_step,
                 f": no step left ({start.why}), testing" if start.kind == launch.FINISH else "")
    elif start.kind == launch.WARM and start.checkpoint is not None:
        sharded.load(t, start.checkpoint, ds.fingerprint, with_optimizer=False)
        log.info("warm start from %s", start.checkpoint)
    elif start.kind == launch.EMBEDDINGS and start.checkpoint is not None:
        sharded.load_embeddings(t, start.checkpoint, ds.fingerprint)
        log.info("embedding tables from %s (init_embeddings_from); the dense layers start fresh", start.checkpoint)
    return state


class Loop:
    """The training loop's parts and what they share: the model, the data, the state they advance, the
    valid evaluator, the clock of training time and the progress outputs (tqdm, tensorboard)."""

    def __init__(self, t: sharded.Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster, run: Path,
                 state: TrainState):
        self.t, self.ds, self.cfg, self.cluster, self.run, self.state = t, ds, cfg, cluster, run, state
        self.steps_per_epoch = ds.rows("train") // (cfg.batch_size * cluster.world)   # >= 1: launch.check_data
        self.evaluator = Evaluator(t, ds, cfg, cluster)
        self.writer = _tensorboard(run) if cluster.is_main else None
        self.stop = launch.no_step_left(state, cfg) is not None
        self.clock = Stopwatch()
        self.clock.start(state.seconds)
        self.examples_at_start = state.examples
        total = self.steps_per_epoch * cfg.epochs
        self.loss_every = runfiles.loss_every(min(total, cfg.max_steps) if cfg.max_steps else total)
        self._loss_sum: Any = None          # rank 0: the losses since the last point of state.train_loss
        self._loss_n = 0

    def one_epoch(self) -> None:
        """Steps to the end of the epoch, or until max_steps or early stopping; then (at the end of the
        epoch, unless eval_every_steps validates) validation, and a checkpoint in any case."""
        s, cfg, c = self.state, self.cfg, self.cluster
        batches = inputs.train_batches(self.ds, c.rank, c.world, cfg.batch_size, cfg.seed + s.epoch, cfg.reader_workers,
                                       cfg.prefetch_batches, skip=s.step_in_epoch)
        steps = make_steps(cfg.train_pipeline, self.t, batches, c.device)
        bar = _progress(c, self.steps_per_epoch, s.step_in_epoch, s.epoch)
        self.t.dmp.train()
        try:
            while s.step_in_epoch < self.steps_per_epoch and not self.stop:
                loss = steps.step()
                self.count_step(loss, bar)
                if cfg.eval_every_steps and s.global_step % cfg.eval_every_steps == 0:
                    with steps.paused():
                        self.stop = s.early_stopped = self.validate()
                if cfg.checkpoint_every_steps and s.global_step % cfg.checkpoint_every_steps == 0:
                    self.checkpoint()
                if cfg.max_steps and s.global_step >= cfg.max_steps:
                    self.stop = True
        finally:
            steps.close()
            batches.close()
            if bar is not None:
                bar.close()
        if s.step_in_epoch >= self.steps_per_epoch:
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
            if not cfg.eval_every_steps and self.validate():
                self.stop = s.early_stopped = True
        self.checkpoint()

    def count_step(self, loss: Any, bar: Any) -> None:
        s = self.state
        s.step_in_epoch += 1
        s.global_step += 1
        s.examples += self.cfg.batch_size * self.cluster.world
        if bar is None:
            return
        d = loss.detach()
        self._loss_sum = d if self._loss_sum is None else self._loss_sum + d    # no sync: a tensor add
        self._loss_n += 1
        if s.global_step % self.loss_every == 0:
            s.train_loss.append([s.global_step, round(float(self._loss_sum.item()) / self._loss_n, 6)])
            self._loss_sum, self._loss_n = None, 0
        bar.update(1)
        if s.global_step % 10 == 0:
            rate = (s.examples - self.examples_at_start) / max(self.clock.seconds() - self.clock.base, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", ex_s=f"{rate:,.0f}")
            if self.writer:
                self.writer.add_scalar("train/loss", loss.item(), s.global_step)

    def validate(self) -> bool:
        """Evaluate on valid, keep the best weights; True when early stopping says stop. The metric followed
        is the evaluator's ``select``: AUC, or two_tower's recall@K (the first of ``recall_k``); the state
        keeps its best value as ``best_auc`` whichever it is."""
        s = self.state
        if self.ds.rows("valid") == 0:          # no valid days (launch.check_data refuses valid days without rows)
            return False
        with self.clock.paused():
            m = self.evaluator.evaluate("valid")
        s.history.append({"step": s.global_step, "epoch": s.epoch, **m})
        if self.writer:
            for k, v in m.items():
                if k not in ("rows", "users") and not k.startswith("random_"):
                    self.writer.add_scalar(f"valid/{k}", v, s.global_step)
        if self.cluster.is_main:
            log.info("valid at step %d: %s", s.global_step, describe(m))
        score = m[self.evaluator.select]
        if score > s.best_auc:
            s.best_auc, s.best_step, s.bad_evals = score, s.global_step, 0
            if self.cfg.keep_best:
                with self.clock.paused():
                    s.seconds = self.clock.seconds()
                    sharded.save_best(self.t, self.cluster, self.run, s)
        else:
            s.bad_evals += 1
        return s.bad_evals >= self.cfg.early_stopping_patience

    def checkpoint(self) -> None:
        with self.clock.paused():
            self.state.seconds = self.clock.seconds()
            sharded.save(self.t, self.cluster, self.run, self.state, self.cfg.keep_checkpoints)


def finish(loop: Loop, test: bool) -> dict:
    """The best valid weights back (when kept) for the test and the last checkpoint; metrics.json, and
    before it the files deepfm.report draws (deepfm.runfiles: the loss curve, the test predictions)."""
    s, cfg, cluster, ds = loop.state, loop.cfg, loop.cluster, loop.ds
    if cfg.keep_best and 0 <= s.best_step != s.global_step and restore_best(loop.t, cluster, loop.run, ds.fingerprint,
                                                                            s.best_step):
        s.weights_from_step = s.best_step
        # The run's model is now the best one: the last checkpoint gets its weights too, so that
        # deepfm.evaluate, --warm-start and the retraining registry see the model the test figures are for.
        sharded.save(loop.t, cluster, loop.run, s, cfg.keep_checkpoints)
    weights_from = s.weights_from_step if s.weights_from_step is not None else s.global_step
    result: dict[str, Any] = {
        "model": cfg.model, "world_size": cluster.world, "device": str(cluster.device),
        "precision": "bf16" if cfg.bf16 else "fp32", "train_pipeline": cfg.train_pipeline,
        "feature_fingerprint": ds.fingerprint, "data": str(ds.root.resolve()), "global_step": s.global_step,
        "train": {"examples": s.examples, "seconds": round(s.seconds, 3),
                  "examples_per_s": round(s.examples / max(s.seconds, 1e-9), 1)},
        "valid": s.evaluation(weights_from), f"valid_best_{loop.evaluator.select}": s.best_auc,
        "valid_best_step": s.best_step,
        "weights_from_step": weights_from, "history": s.history,
        "plan": loop.t.plan_summary(),
    }
    if test and ds.rows("test") > 0:
        result["test"], p, y = loop.evaluator.scored("test")
        if cluster.is_main:
            log.info("test: %s", {k: round(v, 5) for k, v in result["test"].items()})
            if p is not None and y is not None:
                result["test_predictions"] = runfiles.write_predictions(loop.run, "test", p, y)
    if cluster.is_main:
        runfiles.write_curves(loop.run, s.train_loss, loop.loss_every)
        tmp = loop.run / f".{layout.METRICS}.tmp"
        tmp.write_text(json.dumps(_jsonable(result), indent=1))
        os.replace(tmp, loop.run / layout.METRICS)
        if loop.writer:
            loop.writer.close()
    return result


def restore_best(t: sharded.Trainable, cluster: Cluster, run: Path, fingerprint: str, best_step: int) -> bool:
    """Load checkpoints/best (the weights of the best valid evaluation, at step ``best_step``); False, with
    a warning, when it does not hold them (a run killed while writing it), and the weights stay as they are."""
    ckpt = layout.best_checkpoint(run)
    if ckpt is None or sharded.read_state(ckpt).global_step != best_step:
        log.warning("%s does not hold the weights of step %d (the best valid evaluation): testing the last weights",
                    layout.best_checkpoint_dir(run), best_step)
        return False
    sharded.load(t, ckpt, fingerprint, with_optimizer=False)
    if cluster.is_main:
        log.info("restored the weights of step %d (best valid auc) from %s", best_step, ckpt)
    return True


def describe(m: dict[str, float]) -> str:
    """A valid evaluation for the log: ``auc 0.7712 logloss 0.4702 ne 0.8811 calibration 1.012`` (recall:
    ``recall@50 0.3125 hit_rate@50 0.5000 ndcg@50 0.1875 ...``)."""
    if "auc" in m:
        return (f"auc {m['auc']:.4f} logloss {m['logloss']:.4f} ne {m['ne']:.4f} "
                f"calibration {m['calibration']:.3f}")
    return " ".join(f"{k} {v:.4f}" for k, v in m.items() if "@" in k and not k.startswith("random_"))


class Stopwatch:
    """Seconds of training (reading, steps, optimizers), with evaluation and checkpoint writing paused."""

    def __init__(self) -> None:
        self.base = 0.0
        self._acc = 0.0
        self._since: float | None = None

    def start(self, already: float) -> None:
        self.base = self._acc = already
        self._since = time.perf_counter()

    def seconds(self) -> float:
        return self._acc + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._acc = self.seconds()
        self._since = None
        try:
            yield
        finally:
            self._since = time.perf_counter()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _progress(cluster: Cluster, total: int, done: int, epoch: int):
    if not cluster.is_main:
        return None
    from tqdm import tqdm
    tqdm.monitor_interval = 0           # no monitor thread (it is never stopped): no thread of ours outlives the run
    return tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="step", mininterval=2.0,
                disable=None if sys.stderr.isatty() else False, file=sys.stderr)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:                 # tensorboard not installed: metrics.json still has everything
        return None
    return SummaryWriter(str(run / "tensorboard"))


def main(argv: Sequence[str] | None = None) -> dict:
    """Check the settings, the data and the run folder (deepfm.launch), then train; a finished run's
    metrics.json as it is. Raises one of :data:`REFUSED` before any process group starts when the launch
    cannot go on."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, force=True,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")   # fbgemm CPU ops
    log_project_info()
    a, cfg = parse_args(argv)
    ds = inputs.open_dataset(a.data)
    check_model_data(cfg, ds)
    run = Path(a.out)
    plan = launch.prepare(run, ds.root, ds.manifest, cfg, int(os.environ.get("WORLD_SIZE", "1")), a.warm_start,
                          test=not a.no_test)
    if rank == "0":
        for note in plan.notes:
            log.info("%s", note)
    if plan.start.kind == launch.DONE:
        if rank == "0":
            log.info("%s is finished (%s); nothing to do: its %s stays as it is (raise --epochs or --max-steps to "
                     "train on; python -m deepfm.evaluate measures its checkpoint)", run, plan.start.why, layout.METRICS)
        return json.loads((run / layout.METRICS).read_text())
    return train(a, cfg, ds, plan.start)


def check_model_data(cfg: TrainConfig, ds: inputs.Dataset) -> None:
    """Refuse a model the data cannot train: two_tower needs a recall output (a contract with ``recall``:
    the catalogue, seen items and indexes), and its pointwise loss the featurize job's random negatives."""
    if cfg.model not in TOWERS:
        return
    r = ds.manifest.recall
    if r is None:
        raise inputs.DataError(f"{ds.root}: model two_tower needs a recall output (a feature contract with a recall "
                               "key: docs/recall.md); this data's contract has none")
    if cfg.loss == "pointwise" and r.random_negatives == 0:
        raise inputs.DataError(f"{ds.root}: loss pointwise trains on the featurize job's random negatives, and this "
                               "data has none (recall.random_negatives: 0); featurize with random_negatives > 0, or "
                               "use loss softmax")


REFUSED = (TrainConfigError, inputs.DataError, sharded.CheckpointError, launch.LaunchError)


@record
def cli() -> None:
    """The command: :func:`main`, a refusal said once (deepfm.launch.refuse) and exit code 2 on every
    rank. ``@record`` puts any other exception's traceback into torchrun's failure summary."""
    try:
        main()
    except REFUSED as e:
        launch.refuse("train", e)
        sys.exit(2)


if __name__ == "__main__":
    cli()
