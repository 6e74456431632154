"""spark-submit benchmarks/plain_copy.py --input DIR --output DIR [--sep TAB]: the reference of the
featurize benchmark — read every day file of DIR as CSV (all columns strings) and write Parquet, nothing
else. What any Spark job over these files pays at least."""
from __future__ import annotations

import argparse
import sys

from pyspark.sql import SparkSession


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--sep", default="\t")
    a = p.parse_args(argv)
    spark = SparkSession.builder.appName("plain-copy").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    spark.read.csv(f"{a.input.rstrip('/')}/day_*", sep=a.sep).write.mode("overwrite").parquet(a.output)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
