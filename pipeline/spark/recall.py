"""Transform, for a recall (two-tower) contract: the dense indexes of the raw keys, the item catalogue,
the seen pairs and the random negatives (docs/recall.md). Pure ``DataFrame -> DataFrame`` steps; the
featurize job (pipeline.spark.featurize) runs them and writes their results.

One aggregation over the good rows, per (raw user key, raw item key) (:func:`pair_aggregates`), holds
what every recall output needs: the first day the pair was clicked (seen/), its train positives (the
item frequencies) and the smallest and largest id of each item-side field (the constant-per-item check
and the catalogue's ids). Hash ids may collide; ``user_index`` and ``item_index`` do not: they are the
rank of the raw key among the sorted distinct keys of all days.
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipeline import layout
from pipeline.contract import Field, FeatureContract, Recall
from pipeline.manifest import DAY_COLUMN, LABEL_COLUMN
from pipeline.spark.errors import FeaturizeError
from pipeline.spark.sql import q

USER_KEY = "_user_key"      # the raw user key's text, carried beside the ids until the indexes are joined
ITEM_KEY = "_item_key"


def recall_of(c: FeatureContract) -> Recall:
    assert c.recall is not None, "a recall contract"
    return c.recall


def key_columns(c: FeatureContract) -> list[str]:
    """Spark SQL that copies the raw keys (before they become ids) for :func:`pipeline.spark.transforms.to_ids`'s
    ``keep``: ``u AS _user_key``, ``i AS _item_key``."""
    r = recall_of(c)
    return [f"{q(r.user_key)} AS {q(USER_KEY)}", f"{q(r.item_key)} AS {q(ITEM_KEY)}"]


def item_fields(c: FeatureContract) -> tuple[Field, ...]:
    """The item tower's fields, in contract order (the catalogue's id columns)."""
    return c.side("item")


def pair_aggregates(ids: DataFrame, c: FeatureContract) -> DataFrame:
    """Good rows (``_user_key``, ``_item_key``, ``label``, ``day``, ``_split`` and the ids) -> one row per
    distinct (user key, item key): ``first_day`` (the first day it was clicked; null if never),
    ``train_pos`` (its positives in train days), and ``<f>__lo`` / ``<f>__hi`` (the smallest and largest id)
    of each item-side field f.

        (u1, i1, label 1, day 2), (u1, i1, label 1, day 0), (u1, i2, label 0, day 1)
        -> (u1, i1, first_day 0, train_pos 1 with train days [0, 1]), (u1, i2, first_day null, 0)
    """
    clicked = F.col(LABEL_COLUMN) == 1
    bounds = [agg(F.col(f.name)).alias(f"{f.name}__{end}") for f in item_fields(c)
              for agg, end in ((F.min, "lo"), (F.max, "hi"))]
    return ids.groupBy(USER_KEY, ITEM_KEY).agg(
        F.min(F.when(clicked, F.col(DAY_COLUMN))).alias(layout.FIRST_DAY),
        F.count_if(clicked & (F.col("_split") == "train")).cast("long").alias("train_pos"), *bounds)


def item_aggregates(pairs: DataFrame, c: FeatureContract) -> DataFrame:
    """:func:`pair_aggregates` -> one row per item key: ``_item_key``, ``train_count`` and the item
    fields' ``__lo`` / ``__hi`` over all its rows."""
    bounds = [agg(F.col(f"{f.name}__{end}")).alias(f"{f.name}__{end}") for f in item_fields(c)
              for agg, end in ((F.min, "lo"), (F.max, "hi"))]
    return pairs.groupBy(ITEM_KEY).agg(F.sum("train_pos").cast("long").alias(layout.TRAIN_COUNT), *bounds)


def check_constant_items(items: DataFrame, c: FeatureContract) -> tuple[int, int]:
    """:class:`FeaturizeError` when an item-side field has more than one id for one item key: the first
    such field in contract order, with the smallest such key and its two ids. A catalogue row must
    be the item's one featurization. Returns (items, train positives), counted by the same pass.

        item i3 with genres ids [5] and [5, 9] -> "item-side field 'genres' is not constant per item key
        (recall.item_key 'item'): item 'i3' has ids [5] and [5, 9] ..."
    """
    fields = item_fields(c)
    differs = [F.col(f"{f.name}__lo") != F.col(f"{f.name}__hi") for f in fields]
    flags = [F.max(d.cast("int")).alias(f.name) for f, d in zip(fields, differs)]
    found = items.agg(F.count(F.lit(1)).alias("_items"), F.sum(layout.TRAIN_COUNT).alias("_pos"), *flags).collect()[0]
    for f, d in zip(fields, differs):
        if found[f.name]:
            row = items.filter(d).orderBy(ITEM_KEY).select(ITEM_KEY, f"{f.name}__lo", f"{f.name}__hi").first()
            assert row is not None
            raise FeaturizeError(
                f"item-side field {f.name!r} is not constant per item key (recall.item_key {recall_of(c).item_key!r}): "
                f"item {row[0]!r} has ids {row[1]} and {row[2]} in different rows; an item's side fields must "
                "be the same on every line (or the field's side user/context); nothing was written")
    return int(found["_items"]), int(found["_pos"] or 0)


def dense_index(keys: DataFrame, key: str, index: str) -> DataFrame:
    """Rows with distinct ``key`` -> the same rows with ``index``: the key's rank among them in sorted
    order, from 0 (an int), in one partition sorted by it. One task sorts the keys (a window over no
    partition): fine for the millions of users or items of a catalogue.

        ["b", "a", "c"] -> (a, 0), (b, 1), (c, 2)
    """
    return keys.select("*", (F.row_number().over(Window.orderBy(key)) - 1).cast("int").alias(index))


def catalogue(items: DataFrame, c: FeatureContract, train_positives: int, n_items: int) -> DataFrame:
    """:func:`item_aggregates` with ``item_index`` (:func:`dense_index`) -> the catalogue:
    ``item_index``, ``item_key`` (raw text), the item-side fields' ids (as in the splits; rare ids are
    mapped afterwards like theirs), ``train_count`` and ``log_q`` = ln((train_count + 1) /
    (train_positives + items)) (the items' add-one smoothed train frequency, a distribution over the
    catalogue: the logQ sampling-bias correction).

        2 items, train counts [3, 0]: log_q [ln(4/5), ln(1/5)]
    """
    denominator = float(train_positives + n_items)
    return items.select(
        F.col(layout.ITEM_INDEX), F.col(ITEM_KEY).alias(layout.ITEM_KEY),
        *[F.col(f"{f.name}__lo").alias(f.name) for f in item_fields(c)], F.col(layout.TRAIN_COUNT),
        F.log((F.col(layout.TRAIN_COUNT) + 1) / F.lit(denominator)).alias(layout.LOG_Q))


def seen_pairs(pairs: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """:func:`pair_aggregates` -> ``user_index``, ``item_index``, ``first_day`` of every pair clicked on
    some day: the items a user had clicked before day d are the rows with first_day < d."""
    clicked = pairs.filter(F.col(layout.FIRST_DAY).isNotNull())
    return (clicked.join(user_index, USER_KEY).join(item_index, ITEM_KEY)
            .select(layout.USER_INDEX, layout.ITEM_INDEX, layout.FIRST_DAY))


def with_indexes(rows: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """Rows with ``_user_key`` / ``_item_key`` -> the same rows with ``user_index`` and ``item_index``
    instead (every key of the rows is in the indexes: they were made from all good rows)."""
    return rows.join(user_index, USER_KEY).join(item_index, ITEM_KEY).drop(USER_KEY, ITEM_KEY)


def with_random_negatives(rows: DataFrame, catalogue_ids: DataFrame, c: FeatureContract, n_items: int,
                          seed: int) -> DataFrame:
    """Positives with ``item_index`` -> the same rows, each train positive followed by
    ``recall.random_negatives`` = k label-0 rows: the positive's user and context fields, day, split and
    ``user_index``, with a catalogue item drawn uniformly (``item_index`` = pmod(xxhash64(_h, n, seed),
    items), n = 1..k: the same draws in every run) and that item's item-side ids; ``sample_prob`` is
    1 / items for a drawn row, 1.0 for a positive (not drawn); a drawn row's ``_h`` is a hash of its own
    (the shuffle's placement). A draw may be the positive's own item (probability 1 / items): it is
    kept, so that every draw has the stated probability. (The draws hash the row's ids: two train
    positives with the same ids and day draw the same items.)

    One pass: each row is exploded into itself (n = 0) and its draws, and the item-side fields of all
    of them are taken from ``catalogue_ids`` (item_index and the item fields, rare ids mapped), which
    for the positive are its own (the fields are constant per item: :func:`check_constant_items`).

        1 train positive, k=2, 10 items -> itself (sample_prob 1.0) and 2 rows of label 0, item_index
        e.g. 7 and 3, sample_prob 0.1; a valid positive -> itself
    """
    k = recall_of(c).random_negatives
    items = [f.name for f in item_fields(c)]
    drawn = F.col("_n") > 0
    rows = rows.drop(*items).select(
        "*", F.explode(F.sequence(F.lit(0), F.when(F.col("_split") == "train", F.lit(k)).otherwise(F.lit(0))))
        .alias("_n"))
    rows = rows.withColumn(layout.ITEM_INDEX, F.when(drawn, F.pmod(F.xxhash64("_h", "_n", F.lit(seed)), F.lit(n_items)))
                           .otherwise(F.col(layout.ITEM_INDEX)).cast("int"))
    rows = rows.join(catalogue_ids.select(layout.ITEM_INDEX, *items), layout.ITEM_INDEX)
    return (rows.withColumn(LABEL_COLUMN, F.when(drawn, F.lit(0)).otherwise(F.col(LABEL_COLUMN)))
            .withColumn("_h", F.when(drawn, F.xxhash64("_h", "_n")).otherwise(F.col("_h")))
            .withColumn(layout.SAMPLE_PROB, F.when(drawn, F.lit(1.0 / n_items)).otherwise(F.lit(1.0)))
            .drop("_n"))


def columns_of(c: FeatureContract) -> list[str]:
    """The recall columns of every split after label, fields and day (pipeline.manifest.RecallInfo.columns)."""
    return [layout.USER_INDEX, layout.ITEM_INDEX, *([layout.SAMPLE_PROB] if recall_of(c).random_negatives else [])]
