"""Spark SQL text for the featurize job's per-column expressions: every function here returns a string.

The strings are projected together (``selectExpr``) or made a Column with ``F.expr``: every call of the
Column API is a round trip to the JVM, and the wide projections of a run made about 14,000 of them
(about 2 s of a 1M-row run); one SQL text per column is one call. Everything is a JVM expression (no
Python UDFs), so executors need none of this project's code. The id layout is the contract's (see
pipeline.contract; pipeline.ids computes the same ids in plain Python):

    categorical: 0 missing, 1 rare, 2 + pmod(xxhash64(field name, value), hash_buckets - 2)
    continuous:  0 missing, 1 negative, 2 + bucket

No pyspark import: this module only writes text.
"""
from __future__ import annotations

from typing import Sequence

from pipeline.contract import MISSING_ID, NEGATIVE_ID, RESERVED_IDS, CategoricalField, ContinuousField, FeatureContract


def q(name: str) -> str:
    """A column name as a Spark SQL identifier: C1 -> `C1`."""
    return "`" + name.replace("`", "``") + "`"


def string_literal(text: str) -> str:
    """A Python string as a Spark SQL string literal: it's -> 'it\\'s'."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def double_literal(x: float) -> str:
    """A float as an exact Spark SQL double literal (Python's repr round-trips; D makes it a double):
    0.1 -> 0.1D."""
    return f"{float(x)!r}D"


def non_finite_sql(contract: FeatureContract) -> str:
    """True when a continuous field holds NaN or an infinity (false when there are none).

        fields I1, I2 -> (coalesce(isnan(`I1`) OR abs(`I1`) = CAST('Infinity' AS DOUBLE), false) OR ...)
    """
    parts = [f"coalesce(isnan({q(f.name)}) OR abs({q(f.name)}) = CAST('Infinity' AS DOUBLE), false)"
             for f in contract.continuous]
    return "(" + (" OR ".join(parts) or "false") + ")"


def hash_categorical(name: str, f: CategoricalField) -> str:
    """Column ``name`` holding field ``f``'s values -> its id: null -> 0, else
    2 + pmod(xxhash64(f.name, value), buckets - 2).

        C1="68fd1e64", hash_buckets=1000 -> 2 + pmod(xxhash64("C1", "68fd1e64"), 998) = 220

    The field name is part of the hash, so equal strings in two fields get unrelated ids.
    """
    c = q(name)
    return (f"CAST(CASE WHEN {c} IS NULL THEN {MISSING_ID} ELSE pmod(xxhash64({string_literal(f.name)}, {c}), "
            f"CAST({f.hash_buckets - RESERVED_IDS} AS BIGINT)) + {RESERVED_IDS} END AS INT)")


# Java's String.trim(): characters <= U+0020 at either end (Spark's trim() strips only spaces)
JAVA_TRIM_REGEX = "^[\\x00-\\x20]+|[\\x00-\\x20]+$"


def regex_quote(ch: str) -> str:
    """One character as a Java regular expression matching it literally: | -> \\|, a -> a."""
    return "\\" + ch if ch in ".^$*+?()[]{}|\\" else ch


def list_elements(name: str, f: CategoricalField) -> str:
    """A list-valued field's text -> its kept elements (array<string>): split at ``f.list.delimiter``,
    each element Java-trimmed, empty elements dropped, the first ``max_length`` kept; null -> null.

        " Comedy |Drama||", max_length 32 -> ["Comedy", "Drama"]
    """
    assert f.list is not None
    c = q(name)
    split = f"split({c}, {string_literal(regex_quote(f.list.delimiter))}, -1)"
    trimmed = f"transform({split}, x -> regexp_replace(x, {string_literal(JAVA_TRIM_REGEX)}, ''))"
    return f"slice(filter({trimmed}, x -> x != ''), 1, {f.list.max_length})"


def hash_list(name: str, f: CategoricalField) -> str:
    """Column ``name`` holding list-valued field ``f``'s text -> its ids (array<int>): each kept element
    (:func:`list_elements`) hashed exactly as one value of the field (:func:`hash_categorical`); an
    empty or missing list -> [0] (missing).

        "Comedy|Drama" -> [hash("Comedy"), hash("Drama")];  "" or " | " or null -> [0]
    """
    elements = list_elements(name, f)
    one = (f"CAST(pmod(xxhash64({string_literal(f.name)}, x), CAST({f.hash_buckets - RESERVED_IDS} AS BIGINT)) "
           f"+ {RESERVED_IDS} AS INT)")
    return (f"CASE WHEN {q(name)} IS NULL OR size({elements}) = 0 THEN array({MISSING_ID}) "
            f"ELSE transform({elements}, x -> {one}) END")


def field_ids(name: str, f: CategoricalField) -> str:
    """A categorical field's id expression: :func:`hash_list` for a list-valued field (array<int>),
    :func:`hash_categorical` for one value (int)."""
    return hash_list(name, f) if f.list is not None else hash_categorical(name, f)


def log_square_bucket(name: str, f: ContinuousField) -> str:
    """The Criteo winners' rule: v <= 2 -> floor(v), else floor(ln(v)^2); capped at num_buckets - 1.

        null -> 0, -3 -> 1, 0 -> 2, 2 -> 4, 5 -> 2 + floor(ln(5)^2) = 4, 1e9 -> 2 + 63 (cap, 64 buckets)
    """
    c = q(name)
    b = f"least(CASE WHEN {c} <= 2 THEN floor({c}) ELSE floor(pow(ln({c}), 2)) END, {f.num_buckets - 1})"
    return _reserve(c, f"{b} + {RESERVED_IDS}")


def quantile_bucket(name: str, f: ContinuousField, boundaries: Sequence[float]) -> str:
    """Bucket by fitted boundaries b_1 < ... < b_k: the bucket is #{i: b_i <= v} (a binary search in
    nested CASE WHENs, so the plan stays in the JVM). Boundaries are compared exactly.

        boundaries [1, 10], v = 0 -> 2, v = 1 -> 3, v = 50 -> 4; null -> 0; -1 -> 1
    """
    bs = sorted(set(float(b) for b in boundaries))
    if len(bs) > f.num_buckets - 1:
        raise ValueError(f"{f.name}: {len(bs)} boundaries for {f.num_buckets} buckets")
    c = q(name)

    def search(lo: int, hi: int) -> str:     # count of boundaries <= v, knowing it is in [lo, hi]
        if lo == hi:
            return str(lo)
        mid = (lo + hi + 1) // 2               # is b_mid (1-based) <= v ?
        return f"CASE WHEN {c} >= {double_literal(bs[mid - 1])} THEN {search(mid, hi)} ELSE {search(lo, mid - 1)} END"

    return _reserve(c, f"{search(0, len(bs))} + {RESERVED_IDS}")


def _reserve(c: str, bucket: str) -> str:
    # A non-finite value makes the line malformed (check_records), but Spark evaluates this expression on
    # rows a later filter drops, and under ANSI mode floor(ln(inf)^2) cast to int raises: such a value
    # gets the missing id here, so the expression cannot fail whatever the row.
    return (f"CAST(CASE WHEN {c} IS NULL OR isnan({c}) OR abs({c}) = CAST('Infinity' AS DOUBLE) THEN {MISSING_ID} "
            f"WHEN {c} < 0 THEN {NEGATIVE_ID} ELSE {bucket} END AS INT)")


def quantile_probabilities(f: ContinuousField) -> list[float]:
    """The probabilities whose quantiles become the boundaries: k / num_buckets, k = 1..num_buckets-1.

        num_buckets=4 -> [0.25, 0.5, 0.75]
    """
    return [k / f.num_buckets for k in range(1, f.num_buckets)]


def pack_ints(names: Sequence[str]) -> list[str]:
    """Non-null int columns -> longs holding two each (``_p0`` = names[0] << 32 | names[1], ...; an odd
    last one alone), for a shuffle: Spark's rows spend 8 bytes on every field, so 41 int columns shuffle
    and sort as 21 longs, half the bytes. :func:`unpack_ints` undoes it.

        a=1, b=-2 -> _p0 = 0x00000001_FFFFFFFE
    """
    out = []
    for j in range(0, len(names), 2):
        hi = f"CAST({q(names[j])} AS BIGINT)"
        if j + 1 < len(names):
            hi = f"shiftleft({hi}, 32) | (CAST({q(names[j + 1])} AS BIGINT) & 4294967295)"
        out.append(f"{hi} AS `_p{j // 2}`")
    return out


def unpack_ints(names: Sequence[str]) -> list[str]:
    """The columns of :func:`pack_ints` -> the int columns ``names`` again (signs kept).

        _p0 = 0x00000001_FFFFFFFE -> a=1, b=-2
    """
    out = []
    for j, name in enumerate(names):
        p = f"`_p{j // 2}`"
        if j % 2 == 0 and j + 1 < len(names):
            v = f"shiftright({p}, 32)"
        elif j % 2 == 0:
            v = p
        else:    # the low 32 bits, sign-extended in long arithmetic before the (then exact) cast
            v = f"(({p} & 4294967295) ^ 2147483648) - 2147483648"
        out.append(f"CAST({v} AS INT) AS {q(name)}")
    return out


def pack_ids_binary(names: Sequence[str], widths: Sequence[int] | None = None) -> str:
    """Non-negative int columns -> one binary value of 4 big-endian bytes per column, in order: what the
    scoring job hands its Python workers (one bytes object a row, read there with one
    ``numpy.frombuffer(..., ">i4")`` per batch, rather than 40 ints a row to unpickle).
    :func:`unpack_ids_binary` undoes it. ``widths`` (pipeline.artifact.InputLayout's): a column of
    width w > 1 is a list-valued field's array<int>, written as w ids, its own and then -1
    (pipeline.artifact.PAD_ID) up to w.

        a=1, b=300 -> X'00000001' || X'0000012C';  a=1, g=[5] (width 2) -> X'00000001' || X'00000005' || X'FFFFFFFF'
    """
    ws = widths or [1] * len(names)

    def one(x: str) -> str:
        return f"CASE WHEN {x} < 0 THEN 'FFFFFFFF' ELSE lpad(hex({x}), 8, '0') END" if widths else f"lpad(hex({x}), 8, '0')"

    parts = [one(q(n)) if w == 1 else ", ".join(one(f"coalesce(try_element_at({q(n)}, {k}), -1)") for k in range(1, w + 1))
             for n, w in zip(names, ws)]
    return "unhex(concat(" + ", ".join(parts) + "))"


def unpack_ids_binary(column: str, names: Sequence[str], widths: Sequence[int] | None = None) -> list[str]:
    """The binary column of :func:`pack_ids_binary` -> the int columns ``names`` again (a list-valued
    field's, width > 1, as its array<int> without the padding).

        X'00000001' || X'0000012C' -> a=1, b=300;  X'00000001' || X'00000005' || X'FFFFFFFF' -> a=1, g=[5]
    """
    c = q(column)

    def one(j: int) -> str:      # 4 bytes at position j as a signed int (conv gives 0 .. 2^32 - 1)
        v = f"CAST(conv(hex(substring({c}, {4 * j + 1}, 4)), 16, 10) AS BIGINT)"
        return f"CAST(CASE WHEN {v} >= 2147483648 THEN {v} - 4294967296 ELSE {v} END AS INT)"

    if widths is None:
        return [f"CAST(conv(hex(substring({c}, {4 * j + 1}, 4)), 16, 10) AS INT) AS {q(n)}" for j, n in enumerate(names)]
    out, at = [], 0
    for n, w in zip(names, widths):
        out.append(f"{one(at)} AS {q(n)}" if w == 1 else
                   f"filter(array({', '.join(one(at + k) for k in range(w))}), x -> x >= 0) AS {q(n)}")
        at += w
    return out


# One well-formed UTF-8 sequence (RFC 3629: no overlong forms, no surrogates, at most U+10FFFF) as
# upper-case hex, what Spark's hex() writes: one ASCII byte, or a lead byte and its continuation bytes.
_CONT = "[89AB][0-9A-F]"
UTF8_SEQUENCE_HEX = "|".join([
    "[0-7][0-9A-F]",
    f"(?:C[2-9A-F]|D[0-9A-F]){_CONT}",
    f"E0[AB][0-9A-F]{_CONT}", f"E[1-9A-CEF]{_CONT}{_CONT}", f"ED[89][0-9A-F]{_CONT}",
    f"F0[9AB][0-9A-F]{_CONT}{_CONT}", f"F[1-3]{_CONT}{_CONT}{_CONT}", f"F48[0-9A-F]{_CONT}{_CONT}"])


def utf8_escaped(name: str) -> str:
    """A string column whose bytes may not be UTF-8 -> valid UTF-8 text: the column itself when it is
    valid, else each byte that is not part of a well-formed sequence written as ``\\xNN`` (what Python's
    ``bytes.decode("utf-8", "backslashreplace")`` gives). Readable by any Parquet or Arrow reader; exact
    for every valid line (a literal ``\\xff`` in the text is not told apart: keep the bytes for that).

        b"ok" -> "ok";  b"a\\xffb\\xe2\\x82" -> "a\\\\xffb\\\\xe2\\\\x82"

    How, in JVM expressions only: the bytes as hex; one pass of a regular expression anchored at the end
    of the previous match (``\\G``) takes a run of well-formed sequences (possessively: no backtracking
    and no deep recursion on long lines) and the next byte, which is then not well-formed, and writes
    that byte as ``5C78`` (``\\x``) and its two hex digits marked with ``Z``; the marked digits become the
    hex of their lower-case ASCII; unhex gives the bytes.
    """
    c = q(name)
    rx = rf"\G((?:{UTF8_SEQUENCE_HEX})*+)(?!{UTF8_SEQUENCE_HEX})([0-9A-F])([0-9A-F])"
    h = f"regexp_replace(hex(CAST({c} AS BINARY)), {string_literal(rx)}, '$15C78Z$2Z$3')"
    h = f"regexp_replace({h}, 'Z([0-9])', '3$1')"                 # '0'..'9' are 0x30..0x39
    for i, digit in enumerate("ABCDEF"):                            # 'a'..'f' are 0x61..0x66
        h = f"replace({h}, 'Z{digit}', '6{i + 1}')"
    return f"CASE WHEN is_valid_utf8({c}) THEN {c} ELSE CAST(unhex({h}) AS STRING) END"
