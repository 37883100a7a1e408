"""`tweetlm data prepare --ray [ADDRESS]`: prepare.py's corpus, each stage spread over a Ray cluster.

    ray start --head                          # on one machine
    ray start --address HEAD_IP:6379          # on each of the others
    tweetlm data prepare /shared/posts --out /shared/corpus --ray auto

Plain Ray tasks, as datatrove's and NeMo Curator's Ray executors do it (a task per input file, then a shuffle
partitioned by hash), in four stages with a progress bar each (ray_cluster.py: addresses and paths):
1. read: per input file, prepare.py's own `_prepare_file` (read, normalize, filter, text hash, MinHash bands and
   split: one place for each rule). Its survivors come back as one Arrow table in Ray's object store, and its
   author counts cut into P partitions by author hash (P: the cluster's CPUs).
2. authors (--drop-top-authors only), a group-by: P tasks each add up and rank one partition; the most prolific
   `fraction` of all authors is among the first k of the partitions, ranked again.
3. dedup, one shuffle by key: each group of consecutive files (GROUP_POSTS posts) sends, for each post past the
   author drop, (band, key, order) to partition key % P: band -1 with the text hash (exact), band b with the post's
   b-th MinHash band hash (near); order = file index << 32 | row is the post's place in the input order (P: the
   cluster's CPUs, or more, so that a partition holds at most PART_POSTS posts' keys). Each of P tasks sorts its
   partition and marks, in each group of equal (band, key), every post but the first in order.
4. write, per file: drop its marked rows ("duplicate" if marked under band -1, else "near_duplicate") and write
   its Parquet shards, CORPUS/SPLIT/part-FFFFF-NNNNN.parquet: the file's index first, so the shards read in name
   order (as every reader does) hold the posts in the local path's order.
The driver adds up the counts and writes report.json last, as prepare.py does.

Inputs and --out may be URLs that pyarrow.fs opens: file:///shared/posts (tested), s3://bucket/posts,
gs://bucket/posts (credentials as pyarrow finds them: AWS_* / GOOGLE_APPLICATION_CREDENTIALS, instance roles).
A task copies its input file to a local temporary folder to read it (the readers read local files), and the posts'
`source` and the report name the URL; shards are written locally and then copied to --out.

Why the answer is the local one. Exact: "not the first of its text hash in the input order" is ExactSet's rule.
Near: the local BandIndex drops a post when one of its band hashes equals one of an earlier post that reached the
index, and every post past exact dedup reaches it, kept or not. An exact duplicate has the band hashes of its first
copy, which is earlier and reached the index; so the rule is "not the first of one of its (band, hash) groups
among the posts past the author drop", which is what stage 3 marks. The local index has fixed memory and forgets
old posts (dedup.py), so it can only miss drops: the Ray path drops the same posts while the local index forgets
nothing, more beyond that, and never a post without a near copy earlier in the input order. Hence no connected
components of the candidate pairs (NeMo Curator's fuzzy dedup): for A~B and B~C but not A~C, in the order A, C, B,
they would also drop C, which has no near copy before it and which the local path keeps.

Memory: a file's survivors are one object in the store (Ray spills it to disk past the store's size); the
shuffle holds 18 bytes per post and band, ~180 bytes per post with near dedup's 9 bands.
"""

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from tqdm import tqdm

from tweetlm.data.corpus import SPLITS, ShardWriter
from tweetlm.data.dedup import text_hash
from tweetlm.data.prepare import (
    _TMP,
    PrepareConfig,
    _check_filters,
    _claim,
    _inputs,
    _prepare_file,
    _report,
    _top_author_rows,
    _write_report,
    _write_rows,
)
from tweetlm.data.ray_cluster import cluster_cpus, ray_session
from tweetlm.data.readers import NON_POST, detect, post_files
from tweetlm.errors import UserError

_EXACT = -1  # the band of a text hash in the dedup shuffle
PART_POSTS = 200_000  # posts per dedup partition at most: ~36 MB of keys with near dedup's 9 bands (18 B per key)
# Posts whose keys one task emits (consecutive files together): each of its objects, one per partition, then
# outweighs Ray's 100 KB limit for objects returned inline into the driver's memory and goes to the object store
# (spilled to disk past its size) instead: emitted file by file, the whole shuffle passed through the driver.
GROUP_POSTS = 100_000


def prepare_on_ray(cfg: PrepareConfig) -> dict:
    """prepare.prepare(cfg) on the Ray cluster at cfg.ray: the same shards' rows, splits and report counts."""
    start = time.perf_counter()
    out = str(cfg.out) if "://" in str(cfg.out) else str(Path(cfg.out).absolute())  # the tasks' folder may be another
    files, skipped = _input_files(cfg)
    with ray_session(cfg.ray) as ray:
        _claim_url(out) if "://" in out else _claim(Path(out))
        try:
            results, exact_hashes = _run(ray, cfg, files, out, skipped)
        finally:
            if "://" not in out:
                shutil.rmtree(Path(out) / _TMP, ignore_errors=True)
    by_lang, by_split = Counter(), Counter()
    for r in results:  # in input order, as the local path counts
        by_lang.update(r.pop("by_lang"))
        by_split.update(r.pop("by_split"))
    report = _report(cfg, results, by_lang, by_split, exact_hashes=exact_hashes, near_bytes=0, skipped=skipped,
                     seconds=time.perf_counter() - start)
    _write_report(report, out, _write_url if "://" in out else None)
    return report


def _run(ray, cfg: PrepareConfig, files: list[tuple[str, str | None]], out: str, skipped: list[dict]) -> tuple[list[dict], int]:
    """The four stages (module docstring): each file's result with its final counts, and the distinct text hashes;
    adds the input URLs that hold no posts to `skipped`."""
    parts = cluster_cpus(ray)
    author_parts = parts if cfg.drop_top_authors else 0
    read = ray.remote(_read_file).options(num_returns=2 + author_parts)
    refs = [read.remote(str(path), fmt, cfg, author_parts) for path, fmt in files]
    results = _gather(ray, [r[0] for r in refs], "read", lambda r: r.get("read", 0))
    skipped += [r["skipped"] for r in results if "skipped" in r]  # an input URL may hold no posts
    posts = [i for i, r in enumerate(results) if "skipped" not in r]
    if not posts:
        raise UserError(f"none of the {len(skipped)} input files holds posts ({skipped[0]['file']}: "
                        f"{skipped[0]['why']}); see `tweetlm data prepare --help` for the formats")
    results, refs = [results[i] for i in posts], [refs[i] for i in posts]
    tables = [r[1] for r in refs]

    top = None
    if cfg.drop_top_authors:
        top = ray.put(_top_authors(ray, [r[2:] for r in refs], cfg.drop_top_authors))

    # the shuffle's partitions: at least one per CPU, and no more than PART_POSTS posts' keys in one, so that a mark
    # task's memory stays flat however large the input (the survivors: what stage 1 did not drop)
    survivors = [r["read"] - sum(r["dropped"].values()) for r in results]
    parts = max(parts, -(-sum(survivors) // PART_POSTS))
    keys = ray.remote(_dedup_keys).options(num_returns=parts)
    shuffled = [keys.remote(start, top, parts, *tables[start:end]) for start, end in _groups(survivors, GROUP_POSTS)]
    shuffled = [s if parts > 1 else [s] for s in shuffled]
    mark = ray.remote(_mark).options(num_returns=1 + len(tables))
    marks = [mark.remote(len(tables), *(s[p] for s in shuffled)) for p in range(parts)]
    exact_hashes = sum(h for h, _ in _gather(ray, [m[0] for m in marks], "dedup", lambda counts: counts[1]))

    write = ray.remote(_write_file)
    written = [write.remote(i, tables[i], top, out, result, *(m[1 + i] for m in marks))
               for i, result in enumerate(results)]
    return _gather(ray, written, "write", lambda r: r["kept"]), exact_hashes


def _gather(ray, refs: list, desc: str, count: Callable[[object], int]) -> list:
    """The values of `refs` in their order, with a bar of posts (posts/s) updated as each task ends."""
    index, values, pending = {ref: i for i, ref in enumerate(refs)}, [None] * len(refs), list(refs)
    with tqdm(unit=" posts", unit_scale=True, desc=f"data prepare: {desc}", disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            values[index[done[0]]] = value = ray.get(done[0])
            bar.update(count(value))
    return values


# ---------------------------------------------------------------- stage 1: read, per file


def _read_file(path: str, fmt: str | None, cfg: PrepareConfig, author_parts: int) -> tuple:
    """(result, survivors table, author counts of each of `author_parts` partitions) for one input file; for a
    URL (fmt None) that holds no posts, the result is {"skipped": {"file", "format", "why"}}."""
    url = path if "://" in path else None
    with tempfile.TemporaryDirectory(prefix="tweetlm-prepare-") as tmp:
        if url:
            path = f"{tmp}/{PurePosixPath(url).name}"  # the name tells CSV, TSV and archives apart
            fs, remote = pafs.FileSystem.from_uri(url)
            with fs.open_input_stream(remote) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            fmt = detect(Path(path))
            if fmt in NON_POST:
                return {"skipped": {"file": url, "format": fmt, "why": NON_POST[fmt]}}, None, *([{}] * author_parts)
        result = _prepare_file((path, fmt, f"{tmp}/spill.arrow"), cfg, None)
        with pa.OSFile(result.pop("spill")) as f:  # read into memory: the file goes with the folder
            table = pa.ipc.open_file(f).read_all()
    if url:  # name the URL, not the temporary copy
        result["file"] = url
        result["malformed"] = [{**m, "file": url} for m in result["malformed"]]
        sources = pa.array([url + s[len(path):] for s in table["source"].to_pylist()], pa.string())  # URL:LINE
        table = table.set_column(table.schema.get_field_index("source"), "source", sources)
    authors = [{} for _ in range(author_parts)]
    for author, n in result.pop("authors").items():
        authors[text_hash(author) % author_parts][author] = n
    return result, table, *authors


# ---------------------------------------------------------------- stage 2: top authors, a group-by


def _top_authors(ray, author_refs: list[list], fraction: float) -> pa.Array:
    """prepare._top_authors' answer: the most prolific `fraction` of all authors, ties broken by id."""
    rank = ray.remote(_rank_authors).options(num_returns=2)
    ranked = [rank.remote(*(refs[p] for refs in author_refs)) for p in range(len(author_refs[0]))]
    k = int(fraction * sum(ray.get([n for n, _ in ranked])))
    head = ray.remote(_head)
    heads = ray.get([head.remote(r, k) for _, r in ranked])
    top = sorted((pair for head in heads for pair in head), key=_by_count)[:k]
    return pa.array([author for author, _ in top], pa.string())


def _by_count(pair: tuple[str, int]) -> tuple[int, str]:
    return -pair[1], pair[0]


def _rank_authors(*counts: dict) -> tuple[int, list[tuple[str, int]]]:
    """One partition: (distinct authors, (author, posts) most prolific first)."""
    total = Counter()
    for c in counts:
        total.update(c)
    return len(total), sorted(total.items(), key=_by_count)


def _head(ranked: list, k: int) -> list:
    return ranked[:k]


# ---------------------------------------------------------------- stage 3: dedup, a shuffle by key


def _groups(sizes: list[int], posts: int) -> list[tuple[int, int]]:
    """Consecutive files [start, end), each group closed once it holds `posts` posts (the last may hold fewer)."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        total += n
        if total >= posts:
            groups.append((start, i + 1))
            start, total = i + 1, 0
    return groups + [(start, len(sizes))] if start < len(sizes) else groups


def _dedup_keys(first: int, top: pa.Array | None, parts: int, *tables: pa.Table):
    """(band int16[m], key uint64[m], order int64[m]) for each of `parts` partitions (module docstring, stage 3), of
    the files first, first + 1, ... whose survivors `tables` are."""
    band, key, orders = [], [], []
    for index, table in enumerate(tables, start=first):
        assert table.num_rows < 2**32, f"{table.num_rows} posts in one input file: split it (order packs rows in 32 bits)"
        rows = np.arange(table.num_rows) if top is None else np.flatnonzero(~_top_author_rows(table, top))
        order = (np.int64(index) << 32) | rows
        band.append(np.full(len(rows), _EXACT, np.int16))
        key.append(table["hash"].to_numpy()[rows])
        orders.append(order)
        if "bands" in table.column_names:
            n_bands = table.schema.field("bands").type.list_size
            bands = table["bands"].combine_chunks().flatten().to_numpy().reshape(-1, n_bands)[rows]  # [n, bands]
            band.append(np.tile(np.arange(n_bands, dtype=np.int16), len(rows)))
            key.append(bands.ravel())
            orders.append(np.repeat(order, n_bands))
    band, key, order = np.concatenate(band), np.concatenate(key), np.concatenate(orders)
    part = key % np.uint64(parts)
    by_part = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[by_part], np.arange(parts + 1))
    out = [tuple(a[by_part[bounds[p]:bounds[p + 1]]] for a in (band, key, order)) for p in range(parts)]
    return tuple(out) if parts > 1 else out[0]


def _mark(n_files: int, *parts: tuple) -> tuple:
    """One partition: ((distinct text hashes, posts), then per file (rows marked duplicate, rows marked near
    duplicate))."""
    band, key, order = (np.concatenate([p[i] for p in parts]) for i in range(3))
    at = np.lexsort((order, key, band))  # groups of equal (band, key), each in input order
    band, key, order = band[at], key[at], order[at]
    first = np.ones(len(band), bool)
    first[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    is_exact = band == _EXACT
    counts = int((first & is_exact).sum()), int(is_exact.sum())
    marked, exact = order[~first], band[~first] == _EXACT
    file, row = marked >> 32, marked & 0xFFFFFFFF
    by_file = np.argsort(file, kind="stable")
    bounds = np.searchsorted(file[by_file], np.arange(n_files + 1))
    out = []
    for f in range(n_files):
        at = by_file[bounds[f]:bounds[f + 1]]
        out.append((row[at][exact[at]], row[at][~exact[at]]))
    return counts, *out


# ---------------------------------------------------------------- stage 4: write, per file


def _write_file(index: int, table: pa.Table, top: pa.Array | None, out: str, result: dict, *marks: tuple) -> dict:
    """Drops the file's marked rows (reasons in the local path's order) and writes its shards; its final counts."""
    keep, dropped = np.ones(table.num_rows, bool), Counter(result["dropped"])
    top_rows = np.zeros(0, np.int64) if top is None else np.flatnonzero(_top_author_rows(table, top))
    exact = np.unique(np.concatenate([np.zeros(0, np.int64), *(m[0] for m in marks)]))
    near = np.setdiff1d(np.concatenate([np.zeros(0, np.int64), *(m[1] for m in marks)]), exact)
    for reason, rows in (("top_author", top_rows), ("duplicate", exact), ("near_duplicate", near)):
        if len(rows):
            dropped[reason] += len(rows)
            keep[rows] = False
    with tempfile.TemporaryDirectory(prefix="tweetlm-prepare-") as tmp:
        folder = Path(tmp) if "://" in out else Path(out)  # a URL's shards are written here, then copied
        writers = {split: ShardWriter(folder, split, prefix=f"part-{index:05d}") for split in SPLITS}
        by_lang, by_split = Counter(), Counter()
        kept = _write_rows(table.filter(keep), writers, by_lang, by_split)
        for writer in writers.values():
            writer.close()
        if "://" in out:
            fs, path = pafs.FileSystem.from_uri(out)
            for shard in sorted(folder.glob("*/*.parquet")):
                fs.create_dir(f"{path}/{shard.parent.name}", recursive=True)
                pafs.copy_files(str(shard), f"{path}/{shard.parent.name}/{shard.name}", destination_filesystem=fs)
    return {**result, "dropped": dropped, "kept": kept, "by_lang": by_lang, "by_split": by_split}


# ---------------------------------------------------------------- URLs (pyarrow.fs)


def _input_files(cfg: PrepareConfig) -> tuple[list[tuple[str, str | None]], list[dict]]:
    """prepare._inputs' (file, format) and skipped files, with each URL input's files listed, in the order given:
    a URL's format is found by the task that reads it (None here)."""
    urls = [i for i in cfg.inputs if "://" in i]
    if not urls:
        files, skipped = _inputs(cfg)
        return [(str(path), fmt) for path, fmt in files], skipped
    _check_filters(cfg)
    files, skipped = [], []
    for arg in cfg.inputs:
        if "://" in arg:
            files += [(url, None) for url in _list_url(arg)]
        else:
            found, others = post_files((arg,))
            files += [(str(path), fmt) for path, fmt in found]
            skipped += others
    return list(dict.fromkeys(files)), skipped


def _list_url(url: str) -> list[str]:
    """The files at a URL: itself, or a folder's (prefix's), recursively, sorted, without hidden ones."""
    scheme = url.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(url)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [url]
        if info.type != pafs.FileType.Directory:
            raise UserError(f"{url}: no such file or folder; check the URL")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{url}: cannot list it ({str(e).splitlines()[0]}); check the URL and its credentials") from None
    names = sorted(f.path for f in found if f.type == pafs.FileType.File
                   and not any(part.startswith(".") for part in PurePosixPath(f.path).relative_to(path).parts))
    if not names:
        raise UserError(f"{url}: no files there; check the URL")
    return [f"{scheme}://{name}" for name in names]


def _write_url(url: str, text: str) -> None:
    fs, path = pafs.FileSystem.from_uri(url)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _claim_url(out: str) -> None:
    """prepare._claim for a URL: a new or empty folder, or a previous corpus, which is replaced."""
    try:
        fs, path = pafs.FileSystem.from_uri(out)
        fs.create_dir(path, recursive=True)
        names = {PurePosixPath(f.path).name for f in fs.get_file_info(pafs.FileSelector(path))}
        others = sorted(names - {"report.json", *SPLITS})
        if others:
            raise UserError(f"--out {out} holds files that are not a corpus ({', '.join(others[:3])}); "
                            "pass a new or empty folder")
        if "report.json" in names:
            fs.delete_file(f"{path}/report.json")
        for split in names & set(SPLITS):
            fs.delete_dir(f"{path}/{split}")
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"cannot write the corpus to --out {out}: {str(e).splitlines()[0]}; pass a writable folder") from None
