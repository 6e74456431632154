"""Featurized Parquet -> KeyedJaggedTensor batches, through petastorm, sharded by rank, prefetched.

petastorm's ``make_batch_reader`` shards by row group (``index % shard_count == cur_shard``); the
featurize job writes one row group per file and at least ``min_row_groups`` of them per split. Train
batches come from an endless, seeded stream so that every rank runs the same number of steps (the
caller decides the count; an uneven shard never leaves a rank without a batch, which would hang the
collective calls). Evaluation reads each rank's shard once and says when it is exhausted.

List-valued fields (the manifest's ``FieldInfo.pooling``) are Parquet ``list<int32>`` columns: a
petastorm transform pads each to the field's ``max_length`` and adds its length (petastorm stacks a
list column into a matrix and refuses ragged lists), and :func:`columns_batch` gives the KJT those
lengths (single-valued fields keep length 1). A recall output (the manifest's ``recall``) adds
``user_index``, ``item_index`` and ``day`` to every batch, and ``log_q`` of each row's item from the
catalogue (:attr:`Dataset.catalogue`).
"""
from __future__ import annotations

import logging
import queue
import threading
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from deepfm.model import FieldSpec
from pipeline import layout
from pipeline.manifest import FieldInfo, Manifest, ManifestError, open_featurized

log = logging.getLogger("deepfm.inputs")


class DataError(RuntimeError):
    pass


LENGTH_SUFFIX = "__length"      # the transform's column of a list field's lengths, beside its padded ids
RECALL_COLUMNS = (layout.USER_INDEX, layout.ITEM_INDEX)


@dataclass(frozen=True)
class Catalogue:
    """The recall output's items, row i = item_index i: each item-side field's ids (a list field's padded,
    with lengths) and ``log_q``. Read whole by every rank (one row per item)."""

    columns: Mapping[str, np.ndarray]   # item-side field -> ids [N] or padded [N, L]; list fields' lengths too
    log_q: np.ndarray                   # [N] float32

    @property
    def items(self) -> int:
        return len(self.log_q)


@dataclass(frozen=True)
class Dataset:
    """The featurized output as the trainer sees it: where, and its manifest (which fields, how many rows)."""

    root: Path
    manifest: Manifest

    @property
    def fields(self) -> list[FieldSpec]:
        return [FieldSpec.of(f) for f in self.manifest.fields]

    @property
    def list_fields(self) -> list[FieldInfo]:
        return [f for f in self.manifest.fields if f.is_list]

    @property
    def is_recall(self) -> bool:
        return self.manifest.recall is not None

    @property
    def day_column(self) -> str:
        return self.manifest.day_column

    def columns(self) -> list[str]:
        """The Parquet columns a batch reads: the label, the fields, and a recall output's indexes and day."""
        extra = [*RECALL_COLUMNS, self.day_column] if self.is_recall else []
        return [self.label, *self.field_names, *extra]

    @cached_property
    def catalogue(self) -> Catalogue:
        """The recall output's catalogue (:class:`DataError` when the data has none), rows by item_index."""
        r = self.manifest.recall
        if r is None:
            raise DataError(f"{self.root}: not a recall output (its contract has no recall key): no catalogue")
        import pyarrow.parquet as pq
        item_fields = [f for f in self.manifest.fields if f.side == "item"]
        t = pq.read_table(self.root / r.catalogue, columns=[layout.ITEM_INDEX, layout.LOG_Q, *[f.name for f in item_fields]])
        order = np.argsort(t.column(layout.ITEM_INDEX).to_numpy())
        index = t.column(layout.ITEM_INDEX).to_numpy()[order]
        if not np.array_equal(index, np.arange(r.items)):
            raise DataError(f"{self.root / r.catalogue}: item_index is not 0..{r.items - 1} once each (the manifest's "
                            f"{r.items} items)")
        cols: dict[str, np.ndarray] = {}
        for f in item_fields:
            col = t.column(f.name)
            if f.is_list:
                padded, lengths = pad_lists(col.to_pylist(), f.max_length or 1)
                cols[f.name], cols[f.name + LENGTH_SUFFIX] = padded[order], lengths[order]
            else:
                cols[f.name] = col.to_numpy().astype(np.int32)[order]
        return Catalogue(cols, t.column(layout.LOG_Q).to_numpy().astype(np.float32)[order])

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
    recall: dict[str, torch.Tensor] = field(default_factory=dict)   # recall data: user_index, item_index, day [B]
                                                                    # int64 and log_q [B] float32

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(self.kjt.to(device, non_blocking=non_blocking), self.labels.to(device, non_blocking=non_blocking),
                     self.valid, {k: v.to(device, non_blocking=non_blocking) for k, v in self.recall.items()})

    def record_stream(self, stream: torch.Stream) -> None:
        self.kjt.record_stream(stream)
        self.labels.record_stream(stream)
        for v in self.recall.values():
            v.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.kjt.pin_memory(), self.labels.pin_memory(), self.valid,
                     {k: v.pin_memory() for k, v in self.recall.items()})


def to_batch(ids: np.ndarray, labels: np.ndarray, keys: Sequence[str], valid: int | None = None) -> Batch:
    """ids [B, F] (one id per field per row) -> a KJT laid out key by key, and labels [B].

        ids [[3, 7], [4, 8]], keys (a, b) -> values [3, 4, 7, 8], lengths [1, 1, 1, 1]
    """
    b, f = ids.shape
    values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1).astype(np.int64, copy=False))
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=torch.ones(b * f, dtype=torch.int32),
                            stride=b)
    return Batch(kjt, torch.from_numpy(labels.astype(np.float32, copy=False)), b if valid is None else valid)


def pad_lists(lists: Sequence[Any], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """A list column (arrays or None) -> (ids padded with 0 [N, max_length] int32, lengths [N] int32); the first
    ``max_length`` ids kept; an empty or missing list is the one id 0 (missing), as the featurize job writes it.

        [[5, 7], [], None, [9]], 3 -> [[5, 7, 0], [0, 0, 0], [0, 0, 0], [9, 0, 0]], [2, 1, 1, 1]
    """
    n = len(lists)
    lengths = np.fromiter((0 if x is None else len(x) for x in lists), np.int64, n)
    flat = (np.concatenate([np.asarray(x, np.int32) for x in lists if x is not None and len(x)])
            if lengths.sum() else np.zeros(0, np.int32))
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < max_length
    padded = np.zeros((n, max_length), np.int32)
    padded[rows[keep], cols[keep]] = flat[keep]
    return padded, np.maximum(np.minimum(lengths, max_length), 1).astype(np.int32)


def columns_batch(cols: Mapping[str, np.ndarray], ds: "Dataset", valid: int | None = None,
                  log_q: np.ndarray | None = None) -> Batch:
    """One batch's columns (:func:`_rebatch`) -> a KJT key by key: a single-valued field's ids with length
    1 each, a list field's real ids (the padding dropped) with their lengths; a recall output's indexes
    and day, and ``log_q`` of each row's item when given (the catalogue's).

        a [3, 4], b padded [[5, 6], [7, 0]] with lengths [2, 1] -> values [3, 4, 5, 6, 7], lengths [1, 1, 2, 1]
    """
    b = len(cols[ds.label])
    values, lengths = [], []
    for f in ds.manifest.fields:
        ids = cols[f.name]
        if f.is_list:
            n = cols[f.name + LENGTH_SUFFIX]
            values.append(ids[np.arange(ids.shape[1]) < n[:, None]])
            lengths.append(n)
        else:
            values.append(ids)
            lengths.append(np.ones(b, np.int32))
    kjt = KeyedJaggedTensor(keys=ds.field_names, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
                            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)), stride=b)
    recall = {}
    if ds.is_recall:
        recall = {k: torch.from_numpy(cols[k].astype(np.int64)) for k in (*RECALL_COLUMNS, ds.day_column)}
        if log_q is not None:
            recall[layout.LOG_Q] = torch.from_numpy(log_q[cols[layout.ITEM_INDEX]].astype(np.float32))
    return Batch(kjt, torch.from_numpy(cols[ds.label].astype(np.float32)), b if valid is None else valid, recall)


def _list_transform(ds: Dataset) -> Any:
    """The petastorm transform that pads each list field to its max_length and adds its lengths (None when
    the data has no list field: the reader stays as it was)."""
    lists = ds.list_fields
    if not lists:
        return None
    from petastorm import TransformSpec

    def pad(df: Any) -> Any:
        for f in lists:
            padded, lengths = pad_lists(df[f.name].values, f.max_length or 1)
            df[f.name] = list(padded)
            df[f.name + LENGTH_SUFFIX] = lengths
        return df
    edits = [e for f in lists for e in ((f.name, np.int32, (f.max_length or 1,), False),
                                        (f.name + LENGTH_SUFFIX, np.int32, (), False))]
    return TransformSpec(pad, edit_fields=edits)


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
    return make_batch_reader(ds.url(split), schema_fields=ds.columns(), num_epochs=epochs,
                             cur_shard=rank, shard_count=world, shard_seed=None, seed=seed,
                             shuffle_row_groups=epochs is None, reader_pool_type="thread",
                             workers_count=workers, transform_spec=_list_transform(ds))


def _batch_columns(ds: Dataset) -> list[str]:
    """What a batch holds: :meth:`Dataset.columns` and each list field's lengths."""
    return [*ds.columns(), *[f.name + LENGTH_SUFFIX for f in ds.list_fields]]


def _rebatch(chunks: Iterator[Mapping[str, np.ndarray]], names: Sequence[str], batch_size: int,
             pad_last: bool) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Chunks of columns (row groups) -> fixed-size batches of the columns ``names`` and their valid rows;
    the last one padded with zeros (lengths with 1: the one id 0) when ``pad_last``."""
    buf: dict[str, list[np.ndarray]] = {n: [] for n in names}
    have = 0
    for cols in chunks:
        for n in names:
            buf[n].append(np.asarray(cols[n]))
        have += len(buf[names[0]][-1])
        if have >= batch_size:
            whole = {n: np.concatenate(v) for n, v in buf.items()}
            n_full = have // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield {n: v[s:s + batch_size] for n, v in whole.items()}, batch_size
            buf = {n: [v[n_full:]] for n, v in whole.items()}
            have -= n_full
    if pad_last and have:
        out = {}
        for n, v in buf.items():
            a = np.concatenate(v)
            fill = 1 if n.endswith(LENGTH_SUFFIX) else 0
            out[n] = np.concatenate([a, np.full((batch_size - have, *a.shape[1:]), fill, a.dtype)])
        yield out, have


def _chunks(reader: Any) -> Iterator[dict[str, np.ndarray]]:
    for chunk in reader:
        yield chunk._asdict()


def _log_q(ds: Dataset) -> np.ndarray | None:
    return ds.catalogue.log_q if ds.is_recall else None


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
    log_q = _log_q(ds)

    def gen() -> Iterator[Batch]:
        with _reader(ds, "train", rank, world, None, seed, workers) as r:
            for i, (cols, _) in enumerate(_rebatch(_chunks(r), _batch_columns(ds), batch_size, pad_last=False)):
                if i >= skip:
                    yield columns_batch(cols, ds, log_q=log_q)
    return Prefetcher(gen(), depth)


def eval_batches(ds: Dataset, split: str, rank: int, world: int, batch_size: int, workers: int,
                 depth: int) -> Prefetcher:
    """This rank's shard of a split, once, in fixed-size batches (the last one padded)."""
    log_q = _log_q(ds)

    def gen() -> Iterator[Batch]:
        with _reader(ds, split, rank, world, 1, 0, workers) as r:
            for cols, valid in _rebatch(_chunks(r), _batch_columns(ds), batch_size, pad_last=True):
                yield columns_batch(cols, ds, valid, log_q=log_q)
    return Prefetcher(gen(), depth)


def dummy_batch(ds: Dataset, batch_size: int) -> Batch:
    """All-missing ids (id 0 is valid in every table), for a rank that has run out of eval rows."""
    return columns_batch(_missing(ds, _batch_columns(ds), batch_size), ds, valid=0, log_q=_log_q(ds))


def _missing(ds: Dataset, names: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """``n`` rows of the columns ``names``, every field the one id 0 (a list field's lengths 1)."""
    return {c: np.full((n, *_shape(ds, c)), 1 if c.endswith(LENGTH_SUFFIX) else 0, np.int32) for c in names}


def _shape(ds: Dataset, column: str) -> tuple[int, ...]:
    """A column's shape beyond the rows: (max_length,) for a list field's padded ids, () otherwise."""
    f = next((f for f in ds.list_fields if f.name == column), None)
    return (f.max_length or 1,) if f is not None else ()


def catalogue_batches(ds: Dataset, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
    """Items ``start`` .. ``stop`` - 1 of the catalogue (:attr:`Dataset.catalogue`) as batches whose item-side
    fields hold the items' ids and every other field id 0 (missing: the item tower reads none of them), the
    last batch padded; ``item_index`` in ``recall``. A rank's slice of the catalogue for its item vectors."""
    cat = ds.catalogue
    names = _batch_columns(ds)
    cols = _missing(ds, names, stop - start)
    cols.update({c: v[start:stop] for c, v in cat.columns.items()})
    cols[layout.ITEM_INDEX] = np.arange(start, stop, dtype=np.int32)
    return (columns_batch(b, ds, valid) for b, valid in _rebatch(iter([cols]), names, batch_size, pad_last=True))
