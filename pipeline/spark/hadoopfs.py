"""File-system calls through the Spark driver's Hadoop FileSystem, so that the featurize job works the
same on local folders, HDFS (hdfs://), S3 (s3a://) and GCS (gs://) with the connectors installed."""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import SparkSession


@dataclass(frozen=True)
class Entry:
    """One entry of a folder listing: its full (qualified) path and its name."""

    path: str
    name: str


class HadoopFS:
    """The Hadoop FileSystem of ``any_path`` (its scheme and authority), through the driver's JVM."""

    def __init__(self, spark: SparkSession, any_path: str):
        jvm = spark.sparkContext._jvm
        assert jvm is not None, "the Spark session has no JVM gateway"
        self._jvm = jvm
        self._Path = jvm.org.apache.hadoop.fs.Path
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()
        self._fs = self._Path(any_path).getFileSystem(self._conf)

    def qualify(self, path: str) -> str:
        return str(self._fs.makeQualified(self._Path(path)).toString())

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._Path(path)))

    def list(self, path: str) -> list[Entry]:
        out = []
        for st in self._fs.listStatus(self._Path(path)):
            p = st.getPath()
            out.append(Entry(path=str(p.toString()), name=str(p.getName())))
        return out

    def is_dir(self, path: str) -> bool:
        return bool(self._fs.getFileStatus(self._Path(path)).isDirectory())

    def data_files(self, path: str) -> tuple[str, ...]:
        """``path`` itself when it is a file; for a folder (of parts) the files in it that Spark reads
        (names starting with ``_`` or ``.`` left out), sorted."""
        p = self._Path(path)
        if not self._fs.getFileStatus(p).isDirectory():
            return (str(self._fs.makeQualified(p).toString()),)
        return tuple(sorted(st.getPath().toString() for st in self._fs.listStatus(p)
                            if st.isFile() and not str(st.getPath().getName()).startswith(("_", "."))))

    def first_line(self, path: str, max_bytes: int = 1 << 20) -> str | None:
        """The first line of a file, decompressed by the codec its extension names (``.gz``, ...), as
        Spark's text reader splits lines (at ``\\n``, ``\\r`` or ``\\r\\n``), of at most ``max_bytes``;
        None for an empty file. Reads only the start of the file."""
        p = self._Path(path)
        codec = self._jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(self._conf).getCodec(p)
        stream = self._fs.open(p)
        try:
            if codec is not None:
                stream = codec.createInputStream(stream)
            text = self._jvm.org.apache.hadoop.io.Text()
            reader = self._jvm.org.apache.hadoop.util.LineReader(stream)
            if reader.readLine(text, max_bytes, max_bytes) == 0:
                return None
            return str(text.toString())
        finally:
            stream.close()

    def head(self, path: str, max_bytes: int) -> tuple[bytes, int] | None:
        """(the first ``max_bytes`` bytes of a file, its size in bytes), or None when the file is compressed
        (its extension names a codec: its size says nothing of its lines). One read of the start only."""
        p = self._Path(path)
        if self._jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(self._conf).getCodec(p) is not None:
            return None
        size = int(self._fs.getFileStatus(p).getLen())
        stream = self._fs.open(p)
        try:
            return bytes(stream.readNBytes(min(max_bytes, size))), size
        finally:
            stream.close()

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._Path(src), self._Path(dst)):
            raise OSError(f"could not rename {src} -> {dst}")

    def mkdirs(self, path: str) -> None:
        if not self._fs.mkdirs(self._Path(path)):
            raise OSError(f"could not create {path}")

    def delete(self, path: str) -> None:
        self._fs.delete(self._Path(path), True)

    def write_text(self, path: str, text: str) -> None:
        out = self._fs.create(self._Path(path), True)
        try:
            out.write(bytearray(text.encode()))
        finally:
            out.close()

    def parquet_rows(self, folder: str) -> int:
        """Rows in the Parquet files of ``folder``, from their footers (no data is read)."""
        n = 0
        for e in self.list(folder):
            if e.name.endswith(".parquet"):
                f = self._jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(self._Path(e.path), self._conf)
                reader = self._jvm.org.apache.parquet.hadoop.ParquetFileReader.open(f)
                try:
                    n += int(reader.getRecordCount())
                finally:
                    reader.close()
        return n

    def read_text(self, path: str) -> str:
        stream = self._fs.open(self._Path(path))
        try:
            buf = stream.readAllBytes()   # one py4j call; fine for the small files read here
            return bytes(buf).decode()
        finally:
            stream.close()
