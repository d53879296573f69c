"""Sharded Parquet output for the corpus stream (``lmref.data.stream``): rows of text, source
and language in files of a fixed number of rows, written a row group at a time so memory stays
bounded.

Usage::

    writer = ShardWriter(Path("out/train"), rows_per_shard=100_000, batch_rows=2_000)
    writer.write(Document("text", "source.jsonl:1"))
    files = writer.close()                  # ["out/train/part-00000.parquet"]
"""

from __future__ import annotations

from pathlib import Path

from lmref.data.sources import Document


class ShardWriter:
    """Rows ``{text, source, language}`` to ``folder/part-00000.parquet``, ... of ``rows_per_shard`` rows;
    a row group every ``batch_rows`` rows or ``batch_mb`` MB of text, whichever comes first."""

    def __init__(self, folder: Path, rows_per_shard: int, batch_rows: int, batch_mb: float = 2.0):
        self.folder, self.rows_per_shard, self.batch_rows = folder, rows_per_shard, batch_rows
        self.batch_chars = int(batch_mb * 1e6)  # characters, a cheap stand-in for bytes
        self.buffer: list[Document] = []
        self.buffered_chars = 0
        self.writer, self.rows_in_shard, self.rows, self.files = None, 0, 0, []

    def write(self, doc: Document) -> None:
        self.buffer.append(doc)
        self.buffered_chars += len(doc.text)
        if len(self.buffer) >= self.batch_rows or self.buffered_chars >= self.batch_chars:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        while self.buffer:
            if self.writer is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"part-{len(self.files):05d}.parquet"
                schema = pa.schema(
                    [("text", pa.string()), ("source", pa.string()), ("language", pa.string())]
                )
                # Documents are unique: a dictionary would only cost memory and time
                writer = pq.ParquetWriter(path, schema, use_dictionary=False)
                self.writer, self.rows_in_shard = writer, 0
                self.files.append(str(path))
            take = self.buffer[: self.rows_per_shard - self.rows_in_shard]
            self.buffer = self.buffer[len(take) :]
            self.writer.write_table(
                pa.table(
                    {
                        "text": [d.text for d in take],
                        "source": [d.source for d in take],
                        "language": [d.language for d in take],
                    },
                    schema=self.writer.schema,
                )
            )
            self.buffered_chars = sum(len(d.text) for d in self.buffer)
            self.rows_in_shard += len(take)
            self.rows += len(take)
            if self.rows_in_shard >= self.rows_per_shard:
                self.writer.close()
                self.writer = None
        _release_freed_memory()

    def close(self) -> list[str]:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        return self.files


def _release_freed_memory() -> None:
    """Hand the heap glibc keeps after a row group back to the OS (``malloc_trim``): freed 1 MB
    Arrow buffers between small live strings otherwise raise the RSS a row group at a time."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


def warm_up_parquet() -> None:
    """Pay Arrow's one-off cost (about 60 MB at a process's first Parquet write) before the RSS
    at start is read, so growth measures the stream alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["warm-up"]}), pa.BufferOutputStream())
