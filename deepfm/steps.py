"""Training steps, two ways over the same train wrapper (``dmp(batch) -> (loss, (loss, logits, labels))``):

- ``sparse_dist``: TorchRec's ``TrainPipelineSparseDist``, which starts the id all-to-all (the sharded
  tables' ``input_dist``) of batch i+1 while batch i runs forward and backward, on CUDA streams of their
  own; it reads two batches ahead of the step.
- ``plain``: one batch at a time, forward, backward, optimizer step.

Both run the same batches in the same order, so a run's numbers do not depend on the choice; a
pipelined run hands the batches it read ahead back to the stream whenever the plain model is needed
(evaluation), so an evaluation between steps changes nothing either.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Protocol

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from deepfm.inputs import Batch
from deepfm.sharded import Trainable

# What `train_pipeline: auto` means on each device, and why.
#
# Measured 2026-12-01 on this project's machine (CPU "Intel(R) Xeon(R) Processor" per /proc/cpuinfo,
# 2 cores, avx512_bf16; torch 2.13, torchrec 1.8, gloo), both loops in the same sitting, interleaved:
#   torchrun --standalone --nproc_per_node=2 deepfm/train.py --data <conf/criteo.yaml data, 4 days x 150k
#     rows, 187k train rows> --out <run> --config <train_pipeline: plain | sparse_dist> --max-steps 60
#     --checkpoint-every-steps 0 --no-test          (batch 2,048 per rank, 400-400-400, bf16 auto: on)
# examples/s from metrics.json, plain / sparse_dist, pair by pair (the machine was shared; the load
# average went from 0.5 to 9): 12,551 / 12,519; 10,237 / 9,205; 9,497 / 9,818; 18,066 / 12,795;
# 14,645 / 12,553; 10,086 / 10,003; 10,400 / 9,277. Medians 10,400 (plain) and 10,003 (sparse_dist);
# plain was the faster in 6 of 7 pairs and by the most when the machine was quietest. Both give
# bit-identical metrics (same batches, same order: on conf/criteo_small.yaml data with reader_workers 1,
# against the loop before the train wrapper too, with and without mid-epoch evaluations and embedding_l2).
# On the CPU there are no CUDA streams to overlap on: the pipeline only moves the next batch's id
# all-to-all earlier (onto the same 2 cores), reads two batches ahead and traces the model with torch.fx
# at each start (each epoch, each mid-epoch evaluation), so plain is the CPU's default. On CUDA the pipeline is what TorchRec trains with (the copy and the all-to-all on side streams
# while the default stream computes): auto picks it there, unmeasured here (no GPU machine).
AUTO = {"cpu": "plain", "cuda": "sparse_dist"}


class Steps(Protocol):
    def step(self) -> torch.Tensor:
        """Train on the next batch; its loss (detached)."""

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Within: the model is the plain model (for evaluation); the batch order is kept."""

    def close(self) -> None:
        ...


def resolve_train_pipeline(setting: str, device: torch.device) -> tuple[str, str]:
    """The config's ``train_pipeline`` -> (``sparse_dist`` | ``plain``, why)."""
    if setting != "auto":
        return setting, f"train_pipeline: {setting} in the config"
    kind = AUTO.get(device.type, "plain")
    return kind, f"train_pipeline: auto, {kind} on {device.type} (deepfm/steps.py)"


def make_steps(kind: str, t: Trainable, batches: Iterator[Batch], device: torch.device) -> Steps:
    if kind == "sparse_dist":
        return SparseDistSteps(t, batches, device)
    if kind == "plain":
        return PlainSteps(t, batches, device)
    raise ValueError(f"train_pipeline {kind!r} is not sparse_dist or plain")


class PlainSteps:
    """One batch at a time: move it to the device, forward (loss), backward, optimizer step."""

    def __init__(self, t: Trainable, batches: Iterator[Batch], device: torch.device):
        self.t, self.batches, self.device = t, batches, device

    def step(self) -> torch.Tensor:
        b = next(self.batches).to(self.device)
        loss, (detached, _, _) = self.t.dmp(b)
        self.t.optimizer.zero_grad()
        loss.backward()
        self.t.optimizer.step()           # the sparse optimizer is fused into backward; this steps the dense one
        return detached

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


class SparseDistSteps:
    """TorchRec's ``TrainPipelineSparseDist`` over the train wrapper. The pipeline rewrites the sharded
    tables' forward to take their inputs from its own queue; :meth:`paused` (and :meth:`close`) detach
    it, restoring the model, and the batches it had read ahead go back in front of the stream; the next
    step starts a new pipeline."""

    def __init__(self, t: Trainable, batches: Iterator[Batch], device: torch.device):
        self.t, self.device = t, device
        self._batches: Iterator[Batch] = batches
        self._pipeline: TrainPipelineSparseDist | None = None

    def step(self) -> torch.Tensor:
        if self._pipeline is None:
            self._pipeline = TrainPipelineSparseDist(self.t.dmp, self.t.optimizer, self.device)
        loss, _, _ = self._pipeline.progress(self._batches)
        return loss

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._batches = itertools.chain(self._detach(), self._batches)
        yield

    def close(self) -> None:
        self._detach()

    def _detach(self) -> list[Batch]:
        """Detach the pipeline; the batches it holds, not yet trained on, in order."""
        if self._pipeline is None:
            return []
        ahead = [b for b in self._pipeline.batches if b is not None]
        self._pipeline.detach()
        self._pipeline = None
        return ahead
