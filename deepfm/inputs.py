"""Featurized Parquet -> KeyedJaggedTensor batches, through petastorm, sharded by rank, prefetched.

petastorm's ``make_batch_reader`` shards by row group (``index % shard_count == cur_shard``); the
featurize job writes one row group per file and at least ``min_row_groups`` of them per split. Train
batches come from an endless, seeded stream so that every rank runs the same number of steps (the
caller decides the count; an uneven shard never leaves a rank without a batch, which would hang the
collective calls). Evaluation reads each rank's shard once and says when it is exhausted.
"""
from __future__ import annotations

import logging
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from deepfm.model import FieldSpec
from pipeline.manifest import Manifest, ManifestError, open_featurized

log = logging.getLogger("deepfm.inputs")


class DataError(RuntimeError):
    pass


@dataclass(frozen=True)
class Dataset:
    """The featurized output as the trainer sees it: where, and its manifest (which fields, how many rows)."""

    root: Path
    manifest: Manifest

    @property
    def fields(self) -> list[FieldSpec]:
        return [FieldSpec(f.name, f.num_embeddings, f.embedding_dim) for f in self.manifest.fields]

    @property
    def field_names(self) -> list[str]:
        return list(self.manifest.field_names)

    @property
    def label(self) -> str:
        return self.manifest.label_column

    @property
    def fingerprint(self) -> str:
        return self.manifest.feature_fingerprint

    @property
    def contract_fingerprint(self) -> str:
        return self.manifest.contract_fingerprint

    @property
    def neg_sample_rate(self) -> float:
        return self.manifest.sampling.neg_sample_rate

    def has_split(self, split: str) -> bool:
        return split in self.manifest.splits

    def rows(self, split: str) -> int:
        """The split's rows; 0 for a split the manifest does not have."""
        return self.manifest.splits[split].rows if split in self.manifest.splits else 0

    def url(self, split: str) -> str:
        return (self.root / split).resolve().as_uri()


def open_dataset(path: str | Path) -> Dataset:
    """The featurized output at ``path``; :class:`DataError` when incomplete, unreadable or of another
    manifest version."""
    try:
        return Dataset(root=Path(path), manifest=open_featurized(path))
    except ManifestError as e:
        raise DataError(str(e)) from None


@dataclass
class Batch(Pipelineable):
    """One step's input. A torchrec ``Pipelineable`` (as ``torchrec.datasets.utils.Batch``), so that
    ``TrainPipelineSparseDist`` can move it to the device and mark it on its CUDA streams."""

    kjt: KeyedJaggedTensor
    labels: torch.Tensor        # [B] float
    valid: int                  # rows that are real (the rest is padding, in evaluation)

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(self.kjt.to(device, non_blocking=non_blocking), self.labels.to(device, non_blocking=non_blocking),
                     self.valid)

    def record_stream(self, stream: torch.Stream) -> None:
        self.kjt.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.kjt.pin_memory(), self.labels.pin_memory(), self.valid)


def to_batch(ids: np.ndarray, labels: np.ndarray, keys: Sequence[str], valid: int | None = None) -> Batch:
    """ids [B, F] (one id per field per row) -> a KJT laid out key by key, and labels [B].

        ids [[3, 7], [4, 8]], keys (a, b) -> values [3, 4, 7, 8], lengths [1, 1, 1, 1]
    """
    b, f = ids.shape
    values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1).astype(np.int64, copy=False))
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=torch.ones(b * f, dtype=torch.int32),
                            stride=b)
    return Batch(kjt, torch.from_numpy(labels.astype(np.float32, copy=False)), b if valid is None else valid)


class _PetastormNoise(logging.Filter):
    """Drops the two INFO lines petastorm's ``petastorm.etl.dataset_metadata`` logger writes every time a
    reader is made on plain Parquet (not written by petastorm's ``materialize_dataset``): that it found no
    Unischema in the metadata (it infers one from the Parquet schema, as it should here) and that it reads
    the row groups from the footers (the featurize job writes no ``_metadata`` summary file). They say
    nothing about this data, once per split, rank and epoch."""

    NOISE = ("Failed loading Unischema from metadata in ", "Recovering rowgroup information for the entire dataset")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.NOISE))


_PETASTORM_METADATA_LOG = logging.getLogger("petastorm.etl.dataset_metadata")
_NOISE = _PetastormNoise()


def _reader(ds: Dataset, split: str, rank: int, world: int, epochs: int | None, seed: int, workers: int):
    from petastorm import make_batch_reader
    # petastorm 0.12 on pyarrow 12 warns about the legacy ParquetDataset API on every row group, from its
    # worker threads: silence exactly those (warnings raised in petastorm's own modules), nothing else.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"petastorm\.unischema")
    if _NOISE not in _PETASTORM_METADATA_LOG.filters:
        _PETASTORM_METADATA_LOG.addFilter(_NOISE)
    return make_batch_reader(ds.url(split), schema_fields=[ds.label, *ds.field_names], num_epochs=epochs,
                             cur_shard=rank, shard_count=world, shard_seed=None, seed=seed,
                             shuffle_row_groups=epochs is None, reader_pool_type="thread",
                             workers_count=workers)


def _rebatch(reader, ds: Dataset, batch_size: int, pad_last: bool) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Row-group chunks -> fixed-size (ids [B, F], labels [B], valid rows) arrays."""
    names = ds.field_names
    buf_ids: list[np.ndarray] = []
    buf_lab: list[np.ndarray] = []
    have = 0
    for chunk in reader:
        cols = chunk._asdict()
        ids = np.stack([np.asarray(cols[n]) for n in names], axis=1)
        buf_ids.append(ids)
        buf_lab.append(np.asarray(cols[ds.label]))
        have += len(ids)
        if have >= batch_size:
            all_ids, all_lab = np.concatenate(buf_ids), np.concatenate(buf_lab)
            n_full = len(all_ids) // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield all_ids[s:s + batch_size], all_lab[s:s + batch_size], batch_size
            buf_ids, buf_lab = [all_ids[n_full:]], [all_lab[n_full:]]
            have = len(buf_ids[0])
    if pad_last and have:
        ids, lab = np.concatenate(buf_ids), np.concatenate(buf_lab)
        pad = batch_size - len(ids)
        yield (np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)]),
               np.concatenate([lab, np.zeros(pad, lab.dtype)]), len(ids))


class Prefetcher:
    """Runs an iterator of batches in a background thread, ``depth`` batches ahead of the step.

    :meth:`close` stops the thread and joins it; the thread closes the iterator on its way out (in the
    thread that runs it), so a petastorm reader stops and joins its worker threads too: once close
    returns, nothing of the stream runs. A thread left running at interpreter exit can be inside a torch
    op (``to_batch``) that released the GIL: CPython ends such a thread with ``pthread_exit`` when it
    takes the GIL back, and the unwinding through pybind11's noexcept ``~gil_scoped_release`` calls
    std::terminate ("terminate called without an active exception", exit 134; pytorch/pytorch#38228).
    Training that stops mid-epoch (max_steps) with no test to evaluate exited right after closing its
    train stream, its threads still reading (issue 13, item 16).
    """

    _END = object()
    JOIN_SECONDS = 60.0         # the thread's current batch (a row group read and decoded) and the reader's join

    def __init__(self, it: Iterator[Batch], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._err: BaseException | None = None
        self._stop = threading.Event()
        self._done = False
        self._t = threading.Thread(target=self._run, args=(it,), daemon=True, name="deepfm-prefetch")
        self._t.start()

    def _run(self, it: Iterator[Batch]) -> None:
        try:
            for b in it:
                if not self._put(b):
                    return
        except BaseException as e:   # surfaced in the consumer
            self._err = e
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()         # a generator: its `with reader` block exits here, joining the reader's threads
                except BaseException as e:
                    self._err = self._err or e
        self._put(self._END)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless stopped first (then False): never blocked on a full queue after close."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is self._END:
            self._done = True
            if self._err is not None:
                raise self._err
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread and wait for it (and so for the reader it closes), up to JOIN_SECONDS."""
        self._stop.set()
        self._t.join(self.JOIN_SECONDS)
        if self._t.is_alive():
            log.warning("the batch reader thread has not stopped %.0f s after close; a thread still running at exit "
                        "can abort the process", self.JOIN_SECONDS)


def train_batches(ds: Dataset, rank: int, world: int, batch_size: int, seed: int, workers: int,
                  depth: int, skip: int = 0) -> Prefetcher:
    """An endless stream of train batches for this rank (row groups reshuffled every pass, seeded);
    the first ``skip`` batches are read and dropped (resuming mid-epoch)."""
    keys = ds.field_names

    def gen() -> Iterator[Batch]:
        with _reader(ds, "train", rank, world, None, seed, workers) as r:
            for i, (ids, lab, _) in enumerate(_rebatch(r, ds, batch_size, pad_last=False)):
                if i >= skip:
                    yield to_batch(ids, lab, keys)
    return Prefetcher(gen(), depth)


def eval_batches(ds: Dataset, split: str, rank: int, world: int, batch_size: int, workers: int,
                 depth: int) -> Prefetcher:
    """This rank's shard of a split, once, in fixed-size batches (the last one padded)."""
    keys = ds.field_names

    def gen() -> Iterator[Batch]:
        with _reader(ds, split, rank, world, 1, 0, workers) as r:
            for ids, lab, valid in _rebatch(r, ds, batch_size, pad_last=True):
                yield to_batch(ids, lab, keys, valid)
    return Prefetcher(gen(), depth)


def dummy_batch(ds: Dataset, batch_size: int) -> Batch:
    """All-missing ids (id 0 is valid in every table), for a rank that has run out of eval rows."""
    return to_batch(np.zeros((batch_size, len(ds.field_names)), np.int32), np.zeros(batch_size, np.float32),
                    ds.field_names, valid=0)
