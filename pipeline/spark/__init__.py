"""The Spark side of the pipeline: the only package (with jobs/) that imports pyspark.

    sql         Spark SQL text for the per-column expressions (ids, buckets, the packed shuffle)
    records     the input: day files, their lines, typed records and which lines are malformed
    transforms  DataFrame -> DataFrame steps: ids, rare ids, negative sampling, the day window
    recall      a recall contract's steps: key indexes, catalogue, seen pairs, random negatives
    placement   which output file each row goes to, and the part files moved into train/valid/test
    counts      rows and positives per split: observed, read back, recounted
    hadoopfs    file-system calls through Spark's Hadoop FileSystem (local, HDFS, S3, GCS)
    featurize   the featurize run as a list of named steps (jobs/featurize.py is its entry point)
    errors      FeaturizeError and RejectLimitError
"""
