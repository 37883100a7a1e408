"""The cleaned corpus on disk: Parquet shards per split, plus report.json.

Layout of CORPUS/:
    train/part-00000.parquet, val/part-00000.parquet, test/part-00000.parquet ...
    report.json
Each row is a Post's fields (all strings or null) plus `clean_text`, the normalized text
that the tokenizer and the model see.
"""

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tweetlm.data.post import POST_FIELDS
from tweetlm.errors import UserError

SPLITS = ("train", "val", "test")
SCHEMA = pa.schema([(name, pa.string()) for name in (*POST_FIELDS, "clean_text")])


class ShardWriter:
    """Appends rows to CORPUS/SPLIT/part-NNNNN.parquet, starting a new file every `rows_per_shard` rows."""

    def __init__(self, out_dir: Path, split: str, *, prefix: str = "part", rows_per_shard: int = 500_000):
        self.dir = Path(out_dir) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.rows_per_shard = prefix, rows_per_shard
        self.shard, self.rows_in_shard, self.writer = 0, 0, None
        self.buffer: list[dict] = []

    def write(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= 10_000:
            self._flush()

    def _flush(self) -> None:
        while self.buffer:
            if self.writer is None:
                path = self.dir / f"{self.prefix}-{self.shard:05d}.parquet"
                self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
            take = min(len(self.buffer), self.rows_per_shard - self.rows_in_shard)
            batch, self.buffer = self.buffer[:take], self.buffer[take:]
            self.writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
            self.rows_in_shard += take
            if self.rows_in_shard == self.rows_per_shard:
                self.writer.close()
                self.writer, self.shard, self.rows_in_shard = None, self.shard + 1, 0

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def shard_paths(corpus_dir: Path, split: str) -> list[Path]:
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "report.json").is_file():
        raise UserError(f"{corpus_dir} is not a corpus (no report.json): make one with `tweetlm data prepare INPUT --out {corpus_dir}`")
    return sorted((corpus_dir / split).glob("*.parquet"))


def iter_texts(corpus_dir: Path, split: str, *, batch_size: int = 10_000) -> Iterator[list[str]]:
    """Batches of `clean_text` of one split, in shard order."""
    for path in shard_paths(corpus_dir, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["clean_text"]):
            yield batch.column(0).to_pylist()
