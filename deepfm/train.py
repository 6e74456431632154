"""torchrun deepfm/train.py: train DeepFM on featurized Parquet with TorchRec-sharded tables.

    torchrun --nproc_per_node=N deepfm/train.py --data FEATURIZED_DIR --out RUN_DIR
        [--config conf/train.yaml] [--model deepfm|fm|lr|dnn] [--epochs E] [--batch-size B]
        [--warm-start CHECKPOINT_OR_RUN_DIR] [...]

A relaunch with the same --out (or torchrun --max-restarts after a worker dies) resumes from the
latest complete checkpoint in RUN_DIR/checkpoints, at any world size. RUN_DIR/metrics.json gets the
valid and test metrics and the training throughput; RUN_DIR/tensorboard the event files.
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
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from deepfm import inputs, sharded
from deepfm.cluster import Cluster, init_cluster, resolve_bf16, shutdown
from deepfm.model import predict_proba
from deepfm.trainconf import TrainConfig, TrainConfigError, parse_args
from pipeline import metrics as M

log = logging.getLogger("deepfm.train")


class Evaluator:
    """Exact metrics over all ranks' rows: predictions are gathered, not per-rank AUCs averaged."""

    def __init__(self, t: sharded.Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster):
        self.t, self.ds, self.cfg, self.cluster = t, ds, cfg, cluster

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(debiased probability, label) of every row of the split, on every rank."""
        c = self.cluster
        self.t.dmp.eval()
        it = inputs.eval_batches(self.ds, split, c.rank, c.world, self.cfg.batch_size, self.cfg.reader_workers,
                                 self.cfg.prefetch_batches)
        dummy = inputs.dummy_batch(self.ds, self.cfg.batch_size)
        preds, labels = [], []
        flag = torch.zeros(1, dtype=torch.int32)
        while True:
            b = next(it, None)
            flag.fill_(0 if b is None else 1)
            dist.all_reduce(flag)                      # every rank steps until all have run out
            if flag.item() == 0:
                break
            batch = (b or dummy).to(c.device)
            # fp32 whatever the training precision: the metrics match deepfm.evaluate's exactly
            q = predict_proba(self.t.dmp(batch.kjt)).cpu().numpy()[:batch.valid]
            preds.append(q)
            labels.append(batch.labels.cpu().numpy()[:batch.valid])
        it.close()
        self.t.dmp.train()
        local = (np.concatenate(preds) if preds else np.zeros(0, np.float32),
                 np.concatenate(labels) if labels else np.zeros(0, np.float32))
        gathered: list[Any] = [None] * c.world
        dist.all_gather_object(gathered, local)
        q = np.concatenate([g[0] for g in gathered]).astype(np.float64)
        y = np.concatenate([g[1] for g in gathered])
        return M.debias(q, self.ds.neg_sample_rate), y   # the model saw a fraction r of the negatives

    def evaluate(self, split: str) -> dict[str, float]:
        p, y = self.predict(split)
        if len(y) != self.ds.rows(split):
            raise RuntimeError(f"{split}: evaluated {len(y)} rows, the manifest says {self.ds.rows(split)}")
        return M.summary(p, y)


def train(a: argparse.Namespace, cfg: TrainConfig) -> dict:
    cluster = init_cluster(force_cpu=a.cpu)
    try:
        return _train(a, cfg, cluster)
    finally:
        shutdown()


def _train(a: argparse.Namespace, cfg: TrainConfig, cluster: Cluster) -> dict:
    run = Path(a.out)
    ds = inputs.open_dataset(a.data)
    use_bf16, why = resolve_bf16(cfg.bf16, cluster.device)
    cfg = replace(cfg, bf16=use_bf16)
    if cluster.is_main:
        log.info("bf16 autocast %s (%s)", "on" if use_bf16 else "off", why)
        run.mkdir(parents=True, exist_ok=True)
    t = sharded.build(ds.fields, cfg, cluster)
    log.info("rank %d/%d on %s (%s); model %s; plan %s", cluster.rank, cluster.world, cluster.device, cluster.backend,
             cfg.model, t.plan_summary() if cluster.is_main else "")

    # Where to start: a checkpoint of this run (resume), else a warm start, else from scratch.
    epoch, step_in_epoch, global_step, best_auc, best_step, bad_evals = 0, 0, 0, -1.0, -1, 0
    early_stopped = False
    history: list[dict] = []
    examples_done, seconds_done = 0, 0.0
    resume = sharded.latest_checkpoint(run)
    if resume is not None:
        saved = sharded.load(t, resume, ds.fingerprint)
        epoch, step_in_epoch, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        best_auc, bad_evals, history = saved["best_auc"], saved["bad_evals"], saved["history"]
        best_step, early_stopped = saved.get("best_step", -1), saved.get("early_stopped", False)
        examples_done, seconds_done = saved["examples"], saved["seconds"]
        if saved["world_size"] != cluster.world:    # same fraction of the epoch, at the new world size
            step_in_epoch = int(step_in_epoch * saved["world_size"] / cluster.world)
        log.info("resumed from %s (epoch %d, step %d)", resume, epoch, global_step)
    elif a.warm_start:
        src = Path(a.warm_start)
        ckpt = src if (src / sharded.COMPLETE).exists() else sharded.latest_checkpoint(src)
        if ckpt is None:
            raise sharded.CheckpointError(f"--warm-start {src}: no complete checkpoint there")
        sharded.load(t, ckpt, ds.fingerprint, with_optimizer=False)
        log.info("warm start from %s", ckpt)

    steps_per_epoch = ds.rows("train") // (cfg.batch_size * cluster.world)
    if steps_per_epoch == 0:
        raise inputs.DataError(f"{ds.rows('train')} train rows are fewer than one batch per rank "
                               f"({cfg.batch_size} x {cluster.world})")
    evaluator = Evaluator(t, ds, cfg, cluster)
    has_valid = ds.rows("valid") > 0
    writer = _tensorboard(run) if cluster.is_main else None
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def meta(e: int, s: int) -> dict:
        return {"epoch": e, "step_in_epoch": s, "global_step": global_step, "best_auc": best_auc,
                "best_step": best_step, "bad_evals": bad_evals, "early_stopped": early_stopped, "history": history,
                "examples": examples_done, "seconds": seconds_done, "world_size": cluster.world, "feature_fingerprint": ds.fingerprint,
                "contract_fingerprint": ds.manifest["contract_fingerprint"], "config": _jsonable(asdict(cfg)),
                "fields": [asdict(f) for f in ds.fields], "data": str(Path(a.data).resolve())}

    clock = Stopwatch()

    def validate() -> bool:
        """Evaluate on valid; True when early stopping says stop."""
        nonlocal best_auc, best_step, bad_evals
        if not has_valid:
            return False
        with clock.paused():
            m = evaluator.evaluate("valid")
        history.append({"step": global_step, "epoch": epoch, **m})
        if writer:
            for k in ("auc", "logloss", "ne", "calibration"):
                writer.add_scalar(f"valid/{k}", m[k], global_step)
        if cluster.is_main:
            log.info("valid at step %d: auc %.4f logloss %.4f ne %.4f calibration %.3f", global_step, m["auc"],
                     m["logloss"], m["ne"], m["calibration"])
        if m["auc"] > best_auc:
            best_auc, best_step, bad_evals = m["auc"], global_step, 0
            if cfg.keep_best:
                with clock.paused():
                    sharded.save_best(t, cluster, run, meta(epoch, step_in_epoch))
        else:
            bad_evals += 1
        return bad_evals >= cfg.early_stopping_patience

    stop = early_stopped
    clock.start(seconds_done)
    ex_start = examples_done
    while epoch < cfg.epochs and not stop:
        stream = inputs.train_batches(ds, cluster.rank, cluster.world, cfg.batch_size, cfg.seed + epoch,
                                      cfg.reader_workers, cfg.prefetch_batches, skip=step_in_epoch)
        bar = _progress(cluster, steps_per_epoch, step_in_epoch, epoch)
        t.dmp.train()
        while step_in_epoch < steps_per_epoch:
            b = next(stream).to(cluster.device)
            with torch.autocast(cluster.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if cfg.embedding_l2:
                    logit, l2 = t.dmp(b.kjt, with_l2=True)
                else:
                    logit, l2 = t.dmp(b.kjt), None
            loss = loss_fn(logit.float(), b.labels)
            if l2 is not None:
                loss = loss + cfg.embedding_l2 * l2.float().mean()
            t.optimizer.zero_grad()
            loss.backward()
            t.optimizer.step()
            step_in_epoch += 1
            global_step += 1
            examples_done += cfg.batch_size * cluster.world
            if bar is not None:
                bar.update(1)
                if global_step % 10 == 0:
                    el = clock.seconds() - clock.base
                    bar.set_postfix(loss=f"{loss.item():.4f}", ex_s=f"{(examples_done - ex_start) / max(el, 1e-9):,.0f}")
                    if writer:
                        writer.add_scalar("train/loss", loss.item(), global_step)
            if cfg.eval_every_steps and global_step % cfg.eval_every_steps == 0:
                stop = early_stopped = validate()
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
                with clock.paused():
                    seconds_done = clock.seconds()
                    sharded.save(t, cluster, run, global_step, meta(epoch, step_in_epoch), cfg.keep_checkpoints)
            if stop or (cfg.max_steps and global_step >= cfg.max_steps):
                stop = True
                break
        stream.close()
        if bar is not None:
            bar.close()
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            if not cfg.eval_every_steps and validate():
                stop = early_stopped = True
        with clock.paused():
            seconds_done = clock.seconds()
            sharded.save(t, cluster, run, global_step, meta(epoch, step_in_epoch), cfg.keep_checkpoints)

    weights_from = global_step
    if cfg.keep_best and 0 <= best_step != global_step and restore_best(t, cluster, run, ds.fingerprint, best_step):
        weights_from = best_step
        # The run's model is now the best one: the last checkpoint gets its weights too, so that
        # deepfm.evaluate, --warm-start and the retraining registry see the model the test figures are for.
        sharded.save(t, cluster, run, global_step, {**meta(epoch, step_in_epoch), "weights_from_step": best_step},
                     cfg.keep_checkpoints)
    best = next((h for h in history if h["step"] == weights_from), history[-1] if history else {})
    result: dict[str, Any] = {
        "model": cfg.model, "world_size": cluster.world, "device": str(cluster.device), "precision": "bf16" if use_bf16 else "fp32",
        "feature_fingerprint": ds.fingerprint, "global_step": global_step,
        "train": {"examples": examples_done, "seconds": round(seconds_done, 3),
                  "examples_per_s": round(examples_done / max(seconds_done, 1e-9), 1)},
        "valid": best, "valid_best_auc": best_auc, "valid_best_step": best_step, "weights_from_step": weights_from,
        "history": history,
        "plan": t.plan_summary(),
    }
    if not a.no_test and ds.rows("test") > 0:
        result["test"] = evaluator.evaluate("test")
        if cluster.is_main:
            log.info("test: %s", {k: round(v, 5) for k, v in result["test"].items()})
    if cluster.is_main:
        tmp = run / ".metrics.json.tmp"
        tmp.write_text(json.dumps(_jsonable(result), indent=1))
        os.replace(tmp, run / "metrics.json")
        if writer:
            writer.close()
    return result


def restore_best(t: sharded.Trainable, cluster: Cluster, run: Path, fingerprint: str, best_step: int) -> bool:
    """Load checkpoints/best (the weights of the best valid evaluation, at step ``best_step``); False, with
    a warning, when it does not hold them (a run killed while writing it), and the weights stay as they are."""
    ckpt = sharded.best_checkpoint(run)
    if ckpt is None or sharded.read_meta(ckpt)["global_step"] != best_step:
        log.warning("%s does not hold the weights of step %d (the best valid evaluation): testing the last weights",
                    run / "checkpoints" / sharded.BEST, best_step)
        return False
    sharded.load(t, ckpt, fingerprint, with_optimizer=False)
    if cluster.is_main:
        log.info("restored the weights of step %d (best valid auc) from %s", best_step, ckpt)
    return True


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
    def paused(self):
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
    return tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="step", mininterval=2.0,
                disable=None if sys.stderr.isatty() else False, file=sys.stderr)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:                 # tensorboard not installed: metrics.json still has everything
        return None
    return SummaryWriter(str(run / "tensorboard"))


def main(argv: Sequence[str] | None = None) -> dict:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")   # fbgemm CPU ops
    a, cfg = parse_args(argv)
    return train(a, cfg)


if __name__ == "__main__":
    try:
        main()
    except (TrainConfigError, inputs.DataError, sharded.CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
