"""The contract's id rules in plain Python, for serving and for checking the Spark job.

The Spark job computes the same ids with JVM expressions (pipeline.spark.sql); these functions give a
server (or a test) the id of one value without Spark. Spark's ``xxhash64(a, b)`` is XXH64 of ``a``'s
UTF-8 bytes with seed 42, then of ``b``'s bytes seeded with that result, read as a signed long.

    >>> categorical_id("C1", "68fd1e64", 1000)
    220
    >>> log_square_id(5.0, 64), log_square_id(None, 64), log_square_id(-1.0, 64)
    (4, 0, 1)
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import xxhash

from pipeline.contract import MISSING_ID, NEGATIVE_ID, RESERVED_IDS

SPARK_HASH_SEED = 42


def spark_xxhash64(*values: str) -> int:
    """Spark SQL's ``xxhash64`` of string arguments."""
    h = SPARK_HASH_SEED
    for v in values:
        h = xxhash.xxh64_intdigest(v.encode(), h)
    return h - (1 << 64) if h >= 1 << 63 else h


def categorical_id(field: str, value: str | None, hash_buckets: int) -> int:
    """0 for missing, else 2 + pmod(xxhash64(field, value), hash_buckets - 2). (Rare values map to 1
    only through the featurized data's vocabulary.)"""
    if value is None or value == "":
        return MISSING_ID
    return RESERVED_IDS + spark_xxhash64(field, value) % (hash_buckets - RESERVED_IDS)


def log_square_id(value: float | None, num_buckets: int) -> int:
    """0 missing, 1 negative, else 2 + min(num_buckets - 1, v if v <= 2 else floor(ln(v)^2))."""
    if value is None:
        return MISSING_ID
    if value < 0:
        return NEGATIVE_ID
    b = math.floor(value) if value <= 2 else math.floor(math.log(value) ** 2)
    return RESERVED_IDS + min(b, num_buckets - 1)


def quantile_id(value: float | None, boundaries: Sequence[float]) -> int:
    """0 missing, 1 negative, else 2 + the number of boundaries <= value."""
    if value is None:
        return MISSING_ID
    if value < 0:
        return NEGATIVE_ID
    return RESERVED_IDS + bisect.bisect_right(sorted(set(boundaries)), value)
