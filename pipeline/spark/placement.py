"""Load: which output file each row goes to, the one shuffle and write, and the written part files moved
into train/valid/test.

Every split gets the files its expected rows need (:func:`row_group_plan`); the files of all splits are
numbered in one sequence, split ``s`` owning ``[offsets[s], offsets[s] + files[s])``. A row is sent to a
file of its split chosen by its hash, through a key that Spark's hash partitioning sends to exactly
that shuffle partition (:func:`partition_keys`): shuffle partition p is file p, so one flat write makes
every file and its part number says which split it belongs to (:func:`place_files`).

A valid or test split big enough that all its files can be whole row groups (:func:`direct_splits`)
skips the shuffle: it is never sampled and has no order to draw, so the tasks that read its day files
write them (:func:`write_direct`), in the log's line order, and its files are moved as they are
(:func:`place_direct`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from pyspark.sql import DataFrame

from pipeline.manifest import SPLITS
from pipeline.spark.errors import FeaturizeError
from pipeline.spark.hadoopfs import HadoopFS
from pipeline.spark.sql import pack_ints, q, unpack_ints

PART_FILE = re.compile(r"^part-(\d+)-.*\.parquet$")


def row_group_plan(rows: int, rows_per_row_group: int, min_row_groups: int) -> tuple[int, int]:
    """(files, rows per file) for a split: at least ``min_row_groups`` files when there are enough rows,
    none larger than ``rows_per_row_group``; each file is written as one row group.

        (1_000_000, 65536, 8) -> (16, 62500);  (100, 65536, 8) -> (8, 13);  (3, 65536, 8) -> (3, 1)
    """
    if rows <= 0:
        return 0, 0
    per = min(rows_per_row_group, max(1, math.ceil(rows / min_row_groups)))
    files = math.ceil(rows / per)
    return files, math.ceil(rows / files)


@dataclass(frozen=True)
class FilePlan:
    """How many files each split gets and where its files start in the one numbering of all files.

        files {"train": 8, "valid": 8, "test": 8} -> offsets {"train": 0, "valid": 8, "test": 16}, 24 parts
    """

    files: Mapping[str, int]
    offsets: Mapping[str, int]

    @property
    def n_parts(self) -> int:
        """Shuffle partitions of the write (at least one, even with no rows)."""
        return max(1, sum(self.files.values()))

    def parts(self) -> dict[str, range]:
        """split -> the part numbers (shuffle partitions) that are its files."""
        return {s: range(self.offsets[s], self.offsets[s] + self.files[s]) for s in self.files}

    def target_sql(self, key: str) -> str:
        """Spark SQL: the part number of a row, a file of its ``_split`` chosen by the long ``key``.

            train owns parts [0, 8): key 13 -> 0 + pmod(13, 8) = 5
        """
        def per_split(d: Mapping[str, int]) -> str:
            return "CASE `_split` " + " ".join(f"WHEN '{s}' THEN {v}" for s, v in d.items()) + " END"
        return f"{per_split(self.offsets)} + pmod({key}, greatest({per_split(self.files)}, 1))"


def plan_files(expected_rows: Mapping[str, int], rows_per_row_group: int, min_row_groups: int) -> FilePlan:
    """The files of each split (in SPLITS order) for the rows it is expected to have after sampling.

        {"train": 100, "valid": 0, "test": 3}, 65536, 8 -> files {8, 0, 3}, offsets {0, 8, 8}
    """
    files = {s: row_group_plan(expected_rows[s], rows_per_row_group, min_row_groups)[0] for s in SPLITS}
    offsets, at = {}, 0
    for s in SPLITS:
        offsets[s], at = at, at + files[s]
    return FilePlan(files=files, offsets=offsets)


def direct_splits(expected_rows: Mapping[str, int], rows_per_row_group: int, min_row_groups: int,
                  eligible: bool) -> tuple[str, ...]:
    """The evaluation splits written by the tasks that read them, without the shuffle: valid and test
    when ``eligible`` (their days are files of their own and they are never sampled) and each expects
    at least ``min_row_groups + 2`` full row groups, so that files of at most ``rows_per_row_group`` rows
    still number ``min_row_groups`` when the row estimate is up to 20% high. Train always goes through
    the shuffle (its files are a seeded random mix of its days), and so does a smaller split (the
    shuffle gives it ``min_row_groups`` even files).

        {"train": 900_000, "valid": 1_000_000, "test": 400_000}, 65536, 8, True -> ("valid",)
    """
    if not eligible:
        return ()
    full = rows_per_row_group * (min_row_groups + 2)
    return tuple(s for s in ("valid", "test") if expected_rows[s] >= full)


def spark_int_hash(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int column (Murmur3_x86_32.hashInt), as a signed 32-bit int, in Python.

        spark_int_hash(0) -> 933211791;  spark_int_hash(1) -> -559580957  (Spark's hash(0), hash(1))
    """
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = (value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF
    k1 = rotl(k1, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = rotl((seed & 0xFFFFFFFF) ^ k1, 13)
    h1 = (h1 * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & 0xFFFFFFFF
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """For each partition p < n an int key that Spark's hash partitioning into n partitions
    (``repartition(n, col)``: pmod(hash(key), n)) sends to p, so that a row can be sent to a chosen file.

        partition_keys(3) -> [0, 1, 11]   (pmod(hash(11), 3) == 2)
    """
    found: dict[int, int] = {}
    k = 0
    while len(found) < n:
        found.setdefault(spark_int_hash(k) % n, k)      # Python's % of a positive n is Spark's pmod
        k += 1
    return [found[p] for p in range(n)]


def write_files(ids: DataFrame, plan: FilePlan, columns: Sequence[str], seed: int, rows_per_file: int,
                path: str) -> None:
    """Write ``columns`` of ``ids`` (which has ``_split`` and the row hash ``_h``) as Parquet under
    ``path``: the rows of split s in the files planned for s, each file sorted by one random long (train
    rows in a seeded random order), at most ``rows_per_file`` rows (one row group) per file.

    Shuffle partition p is file p. The int columns travel two to a long (half the shuffled bytes) and
    are unpacked for the write; other columns (a list-valued field's array<int>, a double) travel as
    they are."""
    key = f"xxhash64(`_h`, {seed + 1})"
    keys = partition_keys(plan.n_parts)
    types = dict(ids.dtypes)
    ints = [c for c in columns if types[c] == "int"]
    others = [q(c) for c in columns if types[c] != "int"]
    placed = ids.selectExpr(*pack_ints(ints), *others, f"{key} AS `_k`",
                            f"element_at(array({', '.join(map(str, keys))}), CAST({plan.target_sql(key)} + 1 AS INT)) "
                            "AS `_pk`")
    (placed.repartition(plan.n_parts, "_pk").sortWithinPartitions("_k").selectExpr(*unpack_ints(ints), *others)
     .select(*columns)
     .write.option("maxRecordsPerFile", rows_per_file)
     .option("compression", "snappy").parquet(path))


def write_direct(ids: DataFrame, columns: Sequence[str], rows_per_file: int, path: str) -> None:
    """Write ``columns`` of ``ids`` as Parquet under ``path`` from the tasks that compute them (no
    shuffle): each task's rows in their order, at most ``rows_per_file`` rows (one row group) a file."""
    (ids.select(*columns).write.option("maxRecordsPerFile", rows_per_file)
     .option("compression", "snappy").parquet(path))


def place_direct(fs: HadoopFS, written: str, dest: str) -> int:
    """Move the Parquet files of a :func:`write_direct` from ``written`` into ``dest`` (created) and delete
    ``written``; returns how many were moved."""
    files = [e for e in fs.list(written) if not e.name.startswith(("_", ".")) and e.name.endswith(".parquet")]
    if files:
        fs.mkdirs(dest)
    for e in files:
        fs.rename(e.path, f"{dest}/{e.name}")
    fs.delete(written)
    return len(files)


def place_files(fs: HadoopFS, written: str, staging: str, parts: Mapping[str, range]) -> dict[str, int]:
    """Move each Parquet file of ``written`` (Spark's part-<partition>-... names) into ``staging/<split>``
    by the split that owns its partition; returns the file count per split. A file that fits no split
    (a name Spark did not give) stops the job rather than being lost.

        part-00009-....parquet, parts {"train": range(0, 8), "valid": range(8, 16)} -> staging/valid/
    """
    moved = {s: 0 for s in parts}
    for e in fs.list(written):
        if e.name.startswith(("_", ".")):
            continue
        m = PART_FILE.match(e.name)
        owner = [s for s, r in parts.items() if m and int(m.group(1)) in r]
        if not owner:
            raise FeaturizeError(f"{e.path}: not a part file of a planned partition; nothing was committed")
        if not moved[owner[0]]:
            fs.mkdirs(f"{staging}/{owner[0]}")
        fs.rename(e.path, f"{staging}/{owner[0]}/{e.name}")
        moved[owner[0]] += 1
    fs.delete(written)
    return moved
