"""Token shards: a corpus's clean_text as memory-mappable arrays of token ids, per split.

    tweetlm data tokenize work/corpus --tokenizer work/tokenizer --out work/tokens --workers 2

Layout of TOKENS/ (docs/CONTRACTS.md):
    train-00000.bin ...  raw little-endian uint16 (uint32 if the vocabulary has more than 65536 ids);
                         each document is [boundary_id] + encode(clean_text), so a shard starts with boundary_id
    index.json           tokenizer hash, dtype, and tokens / UTF-8 bytes / documents per shard
The work unit is one Parquet row group; units go to worker processes (or Ray tasks with --ray, on every node
of a cluster: tweetlm/data/ray_cluster.py) and come back in order, so the bytes written do not depend on the
number of workers, nor on Ray.
"""

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import cache, partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from tweetlm.artifacts.files import write_text
from tweetlm.data.corpus import SPLITS, shard_paths
from tweetlm.data.ray_cluster import cluster_cpus, ray_session  # imports Ray only when a session starts
from tweetlm.errors import UserError, check
from tweetlm.tokenizer.bpe import Tokenizer


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    corpus: Path
    tokenizer: Path
    out: Path
    workers: int = 1
    # A new shard starts at the first document past this many tokens: 200 MB files in uint16.
    shard_tokens: int = 100_000_000
    # A Ray cluster to encode on: "local" (started for the run), "auto" (this machine's), "ray://HOST:PORT".
    ray: str | None = None

    def __post_init__(self):
        check(self.workers >= 1, "workers", self.workers, "must be at least 1")
        check(self.shard_tokens >= 1, "shard_tokens", self.shard_tokens, "must be at least 1")


@dataclass(frozen=True)
class _Unit:
    """One Parquet row group of one split: the work a process does at a time."""

    split: str
    path: Path
    row_group: int
    rows: int


@dataclass(frozen=True)
class _Encoded:
    tokens: np.ndarray  # [sum(doc_tokens)] boundary_id then the document's ids, document after document
    doc_tokens: np.ndarray  # [docs] int64, boundary included
    doc_bytes: np.ndarray  # [docs] int64, UTF-8 bytes of clean_text


def tokenize(config: TokenizeConfig) -> dict:
    """Write TOKENS/{split}-NNNNN.bin for every split, then index.json; returns the index."""
    tokenizer = Tokenizer.load(config.tokenizer)
    dtype = _dtype(tokenizer.vocab_size)
    units = _units(config.corpus)
    # Connected before anything is written: an unreachable --ray address leaves the folder as it was.
    with ray_session(config.ray) if config.ray is not None else nullcontext() as ray:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        # Remove the previous index first: until the new one is renamed in, the folder reads as unfinished.
        (out / "index.json").unlink(missing_ok=True)
        for split in SPLITS:
            for stale in out.glob(f"{split}-*.bin"):
                stale.unlink()

        writers = {split: _ShardWriter(out, split, dtype, config.shard_tokens) for split in SPLITS}
        t0, n_tokens = time.perf_counter(), 0
        with tqdm(total=sum(u.rows for u in units), unit="doc", unit_scale=True, desc="tokenize") as bar:
            for unit, encoded in zip(units, _encode_all(units, config, tokenizer, ray)):
                writers[unit.split].add(encoded)
                n_tokens += len(encoded.tokens)
                bar.update(unit.rows)
                bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0) / 1e6:.2f}M tok/s", refresh=False)
        seconds = time.perf_counter() - t0

    index = {"tokenizer_hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
             "boundary_id": tokenizer.boundary_id, "splits": {split: writers[split].close() for split in SPLITS}}
    tokenizer.save(out)  # beside the shards, so `tweetlm train` needs no --tokenizer
    write_text(out / "index.json", json.dumps(index, indent=1) + "\n")

    for split, shards in index["splits"].items():
        tokens, nbytes = sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)
        ratio = f", {nbytes / tokens:.2f} bytes per token" if tokens else ""
        print(f"{split}: {sum(s['docs'] for s in shards):,} docs, {tokens:,} tokens in {len(shards)} shards{ratio}")
    where = f"Ray {config.ray}" if config.ray is not None else f"{config.workers} workers"
    print(f"{n_tokens:,} tokens in {seconds:.1f}s ({n_tokens / seconds / 1e6:.2f}M tokens/s, {where}) -> {out}")
    return index


def read_index(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / "index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{tokens_dir} has no index.json (not made, or its tokenize was interrupted): "
                        f"run `tweetlm data tokenize CORPUS --tokenizer TOKENIZER --out {tokens_dir}`") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): rerun `tweetlm data tokenize` into {tokens_dir}") from None


def open_split(tokens_dir: Path, split: str) -> list[np.memmap]:
    """The split's shards as read-only memmaps, in order ([] for an empty split)."""
    index = read_index(tokens_dir)
    if split not in index["splits"]:
        raise UserError(f"{tokens_dir} has no split {split!r}; it has {sorted(index['splits'])}")
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    shards = []
    for shard in index["splits"][split]:
        path = Path(tokens_dir) / shard["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["tokens"] * dtype.itemsize:
            raise UserError(f"{path} has {size} bytes but index.json says {shard['tokens']} tokens of {dtype.name}: "
                            "the folder is damaged, rerun `tweetlm data tokenize`")
        shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return shards


def check_tokenizer(index: dict, tokenizer: Tokenizer) -> None:
    """Refuse token shards made with another tokenizer: their ids would mean other text."""
    if index["tokenizer_hash"] != tokenizer.hash:
        raise UserError(f"the token shards were made with tokenizer sha256 {index['tokenizer_hash'][:12]}, not with this "
                        f"tokenizer ({tokenizer.hash[:12]}): rerun `tweetlm data tokenize` with this tokenizer, "
                        "or use the tokenizer the shards were made with")


def _units(corpus: Path) -> list[_Unit]:
    units = []
    for split in SPLITS:
        for path in shard_paths(corpus, split):
            meta = pq.ParquetFile(path).metadata
            units += [_Unit(split, path, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]
    return units


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _encode_all(units: list[_Unit], config: TokenizeConfig, tokenizer: Tokenizer, ray) -> Iterator[_Encoded]:
    """Encoded units in order: in this process, across config.workers processes, or in Ray tasks (`ray`, the
    connected module, with --ray).

    One process already keeps the cores busy, since tokenizers' Rust thread pool splits each batch:
    on 2 cores both ways give 1.2-1.6M tokens/s (6.6M tokens of TweetEval + XLM-T posts, vocab 16384).
    """
    if ray is not None:
        yield from _encode_on_ray(ray, units, config)
        return
    if config.workers == 1:
        yield from map(partial(_encode, tokenizer), units)
        return
    # spawn, not fork: a forked child of a process whose Rust thread pool has run can deadlock.
    with get_context("spawn").Pool(config.workers, _init_worker, (config.tokenizer,)) as pool:
        yield from pool.imap(_encode_in_worker, units)


def _encode_on_ray(ray, units: list[_Unit], config: TokenizeConfig) -> Iterator[_Encoded]:
    """Encoded units in order, from Ray tasks, 2 per CPU of the cluster in flight (so memory is bounded)."""
    # One thread per task, as in _init_worker: the tasks already fill the cluster's cores.
    encode = ray.remote(_encode_in_task).options(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    tokenizer, window = str(Path(config.tokenizer).absolute()), 2 * cluster_cpus(ray)
    pending = deque()
    for unit in units:
        pending.append(encode.remote(tokenizer, replace(unit, path=unit.path.absolute())))
        if len(pending) == window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def _encode_in_task(tokenizer: str, unit: _Unit) -> _Encoded:
    return _encode(_task_tokenizer(tokenizer), unit)


@cache  # once per Ray worker process
def _task_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.load(Path(path))


_worker_tokenizer: Tokenizer | None = None  # one per worker process, set by _init_worker


def _init_worker(tokenizer_path: Path) -> None:
    global _worker_tokenizer
    # One thread per process: the processes already fill the cores (Rust's pool would oversubscribe them).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_in_worker(unit: _Unit) -> _Encoded:
    return _encode(_worker_tokenizer, unit)


def _encode(tokenizer: Tokenizer, unit: _Unit) -> _Encoded:
    texts = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=["clean_text"]).column(0)
    assert texts.null_count == 0, f"{unit.path} row group {unit.row_group}: {texts.null_count} null clean_text"
    ids = tokenizer.encode_batch(texts.to_pylist())
    doc_tokens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    tokens = np.empty(doc_tokens.sum(), dtype=_dtype(tokenizer.vocab_size))
    starts = np.cumsum(doc_tokens) - doc_tokens
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[starts] = False
    tokens[starts] = tokenizer.boundary_id
    tokens[is_text] = np.fromiter((i for doc in ids for i in doc), dtype=tokens.dtype, count=len(tokens) - len(ids))
    doc_bytes = pc.binary_length(texts).to_numpy().astype(np.int64)
    return _Encoded(tokens, doc_tokens, doc_bytes)


class _ShardWriter:
    """Appends encoded documents to {split}-NNNNN.bin, starting a new file at the first document past shard_tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def add(self, encoded: _Encoded) -> None:
        assert encoded.tokens.dtype == self.dtype, (encoded.tokens.dtype, self.dtype)
        ends = np.cumsum(encoded.doc_tokens)
        starts = ends - encoded.doc_tokens
        first = 0  # first document not yet written
        while first < len(starts):
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            shard = self.shards[-1]
            room = self.shard_tokens - shard["tokens"]
            # documents that start before the shard is full go in it (at least one: room > 0)
            last = first + int(np.searchsorted(starts[first:] - starts[first], room))
            encoded.tokens[starts[first]:ends[last - 1]].tofile(self.file)
            shard["tokens"] += int(ends[last - 1] - starts[first])
            shard["bytes"] += int(encoded.doc_bytes[first:last].sum())
            shard["docs"] += last - first
            first = last

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "docs": 0})

    def close(self) -> list[dict]:
        if self.file is not None:
            self.file.close()
            self.file = None
        return self.shards
