"""`tweetlm data prepare`: raw posts in any supported format -> a cleaned, deduplicated, split corpus.

    tweetlm data prepare ../shared/data/twitter-api-v2 'dumps/*.jsonl.zst' --out work/corpus --workers 2

Two stages (CORPUS/ layout in tweetlm/data/corpus.py, formats in readers.py):
1. Per input file, in `workers` processes (in this one for --workers 1): read, normalize and
   filter each post (repost, length, spam, language, and toxic with --drop-toxic: tweetlm/artifacts/safety.py,
   in batches), hash its text, MinHash it, pick its split.
   The survivors go to a temporary Arrow file per input (CORPUS/.prepare-tmp/), so memory does
   not grow with the size of a file.
2. In this process, file after file in input order: drop the most prolific authors, exact and
   near duplicates, and write the Parquet shards of each split. One process sees every post in
   one fixed order, so the corpus is the same for any number of workers.
   --drop-top-authors needs every author's count before its first drop, so stage 2 then waits
   for stage 1 to finish; otherwise it merges each file as soon as it is ready.

Every record read is kept or counted under one reason (REASONS); report.json holds the counts by
reason, source file, language and split, the first malformed records with file and line, the
skipped files with why, and the invariant `read == kept + sum(dropped)`.
"""

import itertools
import json
import multiprocessing as mp
import operator
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from tweetlm.artifacts.text import normalize
from tweetlm.data.clean import LanguageId, is_spam, length_reason
from tweetlm.data.corpus import SCHEMA, SPLITS, ShardWriter
from tweetlm.data.dedup import BandIndex, ExactSet, MinHashBands, text_hash
from tweetlm.data.post import POST_FIELDS, Post
from tweetlm.data.readers import Dropped, post_files, read
from tweetlm.data.split import assign_split, split_key
from tweetlm.errors import UserError, check

# Drop reasons, in the order the pipeline applies them (the first that fires names the drop).
REASONS = ("malformed", "edited_superseded", "withheld", "repost", "empty", "too_short", "too_long", "spam",
           "language", "toxic", "top_author", "duplicate", "near_duplicate")
_MAX_EXAMPLES = 20  # malformed records kept in report.json
_BATCH = 8192  # rows per batch of the temporary files, and so per step of stage 2
_TMP = ".prepare-tmp"
_post_values = operator.attrgetter(*POST_FIELDS)


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    inputs: tuple[str, ...]  # files, folders (read recursively, hidden files skipped) or globs; URLs with `ray`
    out: Path | str  # a folder; with `ray` also a URL (s3://, gs://, file://: ray_prepare.py)
    workers: int = 1
    lang: tuple[str, ...] = ()  # keep only these py3langid codes; () keeps all and skips language id
    min_chars: int = 10  # of the normalized text
    max_chars: int = 4000  # long posts (note_tweet) go up to 25,000
    keep_reposts: bool = False
    drop_spam: bool = True
    drop_top_authors: float = 0.0  # fraction of authors, most prolific first (TimeLMs: 0.01)
    near_dup_threshold: float = 0.8  # MinHash Jaccard; 0 turns near-dup detection off
    near_dup_mb: int = 128  # fixed memory of the near-duplicate index (dedup.py)
    val_ratio: float = 0.05
    test_ratio: float = 0.05
    mentions: bool = True  # replace @handles with @user
    links: bool = True  # replace URLs with http
    drop_toxic: Path | None = None  # a `tweetlm safety train` folder: drop the posts it scores toxic
    toxic_threshold: float | None = None  # default: the classifier's own
    seed: int = 0
    # A Ray cluster to run on (ray_prepare.py; workers and near_dup_mb then unused): "local" (started for the run),
    # "auto" (the one this machine joined), "ray://HOST:PORT" or "HOST:PORT". None: processes on this machine.
    ray: str | None = None

    def __post_init__(self):
        ratios = (self.val_ratio, self.test_ratio)
        check(bool(self.inputs), "inputs", self.inputs, "give at least one file, folder or glob")
        for field, values in (("inputs", self.inputs), ("out", (self.out,))):  # the local path reads local files only
            urls = [str(v) for v in values if "://" in str(v)]
            check(self.ray is not None or not urls, field, urls[0] if urls else None,
                  "a URL needs --ray (or give a local path)")
        check(self.workers >= 1, "workers", self.workers, "must be at least 1")
        check(self.min_chars >= 0, "min_chars", self.min_chars, "must be at least 0")
        check(self.max_chars >= max(1, self.min_chars), "max_chars", self.max_chars, "must be at least 1 and at least min_chars")
        check(0 <= self.drop_top_authors < 1, "drop_top_authors", self.drop_top_authors, "must be a fraction in [0, 1)")
        check(0 <= self.near_dup_threshold < 1, "near_dup_threshold", self.near_dup_threshold, "must be in [0, 1); 0 turns it off")
        check(self.near_dup_mb >= 1, "near_dup_mb", self.near_dup_mb, "must be at least 1")
        check(min(ratios) >= 0 and sum(ratios) < 1, "val_ratio", ratios, "val_ratio and test_ratio must be >= 0 and sum to less than 1")
        check(self.toxic_threshold is None or (self.drop_toxic is not None and 0 < self.toxic_threshold <= 1),
              "toxic_threshold", self.toxic_threshold, "must be in (0, 1], with drop_toxic")


def prepare(cfg: PrepareConfig) -> dict:
    """Writes CORPUS/{train,val,test}/part-NNNNN.parquet and CORPUS/report.json; returns the report."""
    if cfg.ray is not None:
        from tweetlm.data.ray_prepare import prepare_on_ray  # here: Ray loads only for --ray

        return prepare_on_ray(cfg)
    start = time.perf_counter()
    out = Path(cfg.out)
    files, skipped = _inputs(cfg)
    tasks = [(str(path), fmt, str(out / _TMP / f"{i:06d}.arrow")) for i, (path, fmt) in enumerate(files)]
    _claim(out)
    bar = tqdm(unit=" posts", unit_scale=True, file=sys.stderr, disable=None, desc="data prepare")
    try:
        results = _stage1(tasks, cfg, progress=None if bar.disable else bar.update)
        top = None
        if cfg.drop_top_authors:  # every author's count is needed before the first drop
            results = list(results)
            top = _top_authors(results, cfg.drop_top_authors)
        merge = _Merge(out, cfg, top)
        for result in results:
            merge.add(result)
        merge.close()
    finally:
        bar.close()
        shutil.rmtree(out / _TMP, ignore_errors=True)
    report = _report(cfg, merge.files, merge.by_lang, merge.by_split, exact_hashes=len(merge.exact),
                     near_bytes=merge.near.nbytes if merge.near else 0, skipped=skipped,
                     seconds=time.perf_counter() - start)
    _write_report(report, out)
    return report


# ---------------------------------------------------------------- inputs and output


def _inputs(cfg: PrepareConfig) -> tuple[list[tuple[Path, str]], list[dict]]:
    """The input files that hold posts with their format, and the skipped ones; checks the filters' files first."""
    _check_filters(cfg)
    files, skipped = post_files(cfg.inputs)
    if not files:
        raise UserError(f"none of the {len(skipped)} input files holds posts ({skipped[0]['file']}: {skipped[0]['why']}); "
                        "see `tweetlm data prepare --help` for the formats")
    return files, skipped


def _check_filters(cfg: PrepareConfig) -> None:
    """An unknown language code or a missing classifier fails here, before any work."""
    if cfg.lang:
        _language_id(cfg.lang)
    if cfg.drop_toxic:
        _safety(cfg.drop_toxic, cfg.toxic_threshold)


def _claim(out: Path) -> None:
    """Makes `out` ready: a new or empty folder, or a previous corpus, which is replaced."""
    ours = {"report.json", _TMP, *SPLITS}
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a folder for the corpus")
        out.mkdir(parents=True, exist_ok=True)
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:
            raise UserError(f"--out {out} holds files that are not a corpus ({', '.join(others[:3])}); "
                            "pass a new or empty folder")
        for name in ours:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        (out / _TMP).mkdir()
    except OSError as e:
        raise UserError(f"cannot write the corpus to --out {out}: {e.strerror or e}; pass a writable folder") from None


# ---------------------------------------------------------------- stage 1: per file


@cache  # loaded once per process (~0.6 s)
def _language_id(langs: tuple[str, ...]) -> LanguageId:
    return LanguageId(langs)


@cache  # loaded once per process (~1 s)
def _safety(path: Path, threshold: float | None):
    from tweetlm.artifacts.safety import SafetyClassifier  # here: it loads scikit-learn, needed only with --drop-toxic

    return SafetyClassifier.load(path, threshold)


@cache
def _minhash_bands(threshold: float, seed: int) -> MinHashBands:
    return MinHashBands(threshold, seed=seed)


def _stage1(tasks: list, cfg: PrepareConfig, progress: Callable[[int], None] | None) -> Iterator[dict]:
    """Each task's result, in task order; tasks run in worker processes when there are several."""
    if cfg.workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield _prepare_file(task, cfg, progress)
        return
    ctx = mp.get_context("spawn")  # fork is unsafe with threads (pyarrow's) and not the default everywhere
    with ExitStack() as stack:
        queue = stack.enter_context(ctx.Manager()).Queue() if progress else None
        pool = stack.enter_context(ctx.Pool(min(cfg.workers, len(tasks))))
        results = pool.imap(partial(_prepare_file, cfg=cfg, progress=None if queue is None else queue.put), tasks)
        while True:
            try:
                result = results.next(timeout=0.2)
            except mp.TimeoutError:
                result = None
            except StopIteration:
                return
            while queue is not None and not queue.empty():
                progress(queue.get())
            if result is not None:
                yield result


def _prepare_file(task: tuple[str, str, str], cfg: PrepareConfig, progress: Callable[[int], None] | None) -> dict:
    """Stage 1 for one file: the survivors go to the task's temporary file; returns the counts."""
    path, fmt, spill_path = task
    langid = _language_id(cfg.lang) if cfg.lang else None
    spill = _Spill(Path(spill_path), cfg)
    n, dropped, malformed, authors = 0, Counter(), [], Counter()

    def cleaned() -> Iterator[tuple[Post, str, str]]:
        nonlocal n
        for n, record in enumerate(read(Path(path), fmt), 1):
            if progress and n % _BATCH == 0:
                progress(_BATCH)
            if isinstance(record, Dropped):
                dropped[record.reason] += 1
                if record.reason == "malformed" and len(malformed) < _MAX_EXAMPLES:
                    file, _, line = record.source.rpartition(":")
                    malformed.append({"file": file, "line": int(line), "error": record.detail})
                continue
            clean, lang, reason = _clean(record, cfg, langid)
            if reason:
                dropped[reason] += 1
                continue
            yield record, clean, lang

    survivors = cleaned()
    if cfg.drop_toxic:
        survivors = _drop_toxic(survivors, _safety(cfg.drop_toxic, cfg.toxic_threshold), dropped)
    for record, clean, lang in survivors:
        if cfg.drop_top_authors and record.author_id:
            authors[record.author_id] += 1
        spill.add(record, clean, lang)
    spill.close()
    if progress:
        progress(n % _BATCH)
    return {"file": path, "format": fmt, "read": n, "dropped": dropped, "malformed": malformed,
            "authors": authors, "spill": spill_path}


def _drop_toxic(survivors: Iterator[tuple[Post, str, str]], safety, dropped: Counter) -> Iterator[tuple[Post, str, str]]:
    """The survivors the safety classifier does not flag, scored on clean_text in batches of _BATCH: one post at
    a time costs ~0.8 ms, in a batch ~0.11 ms a post (bench/safety.py)."""
    while batch := list(itertools.islice(survivors, _BATCH)):
        toxic = safety.score([clean for _, clean, _ in batch]) >= safety.threshold
        dropped["toxic"] += int(toxic.sum())
        yield from (row for row, flagged in zip(batch, toxic) if not flagged)


def _clean(post: Post, cfg: PrepareConfig, langid: LanguageId | None) -> tuple[str, str, str | None]:
    """(normalized text, language, drop reason or None); the language is py3langid's when
    --lang is set, else the source's own tag ("und" when it has none)."""
    if post.kind == "repost" and not cfg.keep_reposts:
        return "", "", "repost"
    clean = normalize(post.text, mentions=cfg.mentions, links=cfg.links)
    reason = length_reason(clean, min_chars=cfg.min_chars, max_chars=cfg.max_chars)
    if reason is None and cfg.drop_spam and is_spam(clean):
        reason = "spam"
    lang = post.lang or "und"
    if reason is None and langid is not None:
        lang = langid(clean)
        if lang not in langid.keep:
            reason = "language"
    return clean, lang, reason


class _Spill:
    """Stage 1's survivors of one file in an Arrow IPC file, with what stage 2 needs precomputed:
    `hash` (exact dedup), `bands` (near dedup), `split`, and `lang` for the report."""

    def __init__(self, path: Path, cfg: PrepareConfig):
        self.cfg = cfg
        self.bands = _minhash_bands(cfg.near_dup_threshold, cfg.seed) if cfg.near_dup_threshold else None
        fields = [*SCHEMA, pa.field("lang_seen", pa.string()), pa.field("split", pa.string()), pa.field("hash", pa.uint64())]
        if self.bands:
            fields.append(pa.field("bands", pa.list_(pa.uint64(), self.bands.bands)))
        self.schema = pa.schema(fields)
        self.writer = pa.ipc.new_file(str(path), self.schema)
        self.rows: list[tuple] = []

    def add(self, post: Post, clean: str, lang: str) -> None:
        split = assign_split(split_key(post, clean), seed=self.cfg.seed, val_ratio=self.cfg.val_ratio,
                             test_ratio=self.cfg.test_ratio)
        self.rows.append((*_post_values(post), clean, lang, split, text_hash(clean)))
        if len(self.rows) == _BATCH:
            self._flush()

    def _flush(self) -> None:
        columns = list(zip(*self.rows))
        arrays = [pa.array(c, f.type) for c, f in zip(columns, self.schema)]
        if self.bands:
            keys = self.bands(list(columns[len(SCHEMA) - 1]))  # clean_text
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel()), self.bands.bands))
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.rows = []

    def close(self) -> None:
        if self.rows:
            self._flush()
        self.writer.close()


# ---------------------------------------------------------------- stage 2: in input order


def _top_authors(results: list[dict], fraction: float) -> pa.Array:
    """The most prolific `fraction` of authors (ties broken by id). Memory: one counter entry
    per distinct author (~100 bytes), only when --drop-top-authors is set."""
    counts = Counter()
    for r in results:
        counts.update(r["authors"])
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return pa.array(ranked[: int(fraction * len(counts))], pa.string())


def _top_author_rows(batch: pa.RecordBatch, top: pa.Array) -> np.ndarray:
    """bool[rows]: the rows whose author is one of `top`."""
    return pc.is_in(batch["author_id"], value_set=top).fill_null(False).to_numpy(zero_copy_only=False)


def _write_rows(batch: pa.RecordBatch | pa.Table, writers: dict[str, ShardWriter], by_lang: Counter,
               by_split: Counter) -> int:
    """Writes the kept rows of `batch` to the shards of their split, counting them by language and split."""
    by_lang.update(batch["lang_seen"].to_pylist())
    splits = batch["split"]
    for split in SPLITS:
        rows = batch.filter(pc.equal(splits, split))
        by_split[split] += rows.num_rows
        for row in rows.select(SCHEMA.names).to_pylist():
            writers[split].write(row)
    return batch.num_rows


class _Merge:
    """Stage 2: author, exact and near-duplicate drops, then Parquet shards per split."""

    def __init__(self, out: Path, cfg: PrepareConfig, top_authors: pa.Array | None):
        self.top = top_authors
        self.exact = ExactSet()
        self.near = BandIndex(_minhash_bands(cfg.near_dup_threshold, cfg.seed).bands, memory_mb=cfg.near_dup_mb) \
            if cfg.near_dup_threshold else None
        self.writers = {split: ShardWriter(out, split) for split in SPLITS}
        self.files: list[dict] = []
        self.by_lang, self.by_split = Counter(), Counter()

    def add(self, result: dict) -> None:
        kept, dropped = 0, result["dropped"]
        with pa.memory_map(result["spill"]) as source:
            spill = pa.ipc.open_file(source)
            for i in range(spill.num_record_batches):
                batch = spill.get_batch(i)
                keep = np.ones(batch.num_rows, bool)
                if self.top is not None:
                    self._drop(keep, np.flatnonzero(_top_author_rows(batch, self.top)), "top_author", dropped)
                rows = np.flatnonzero(keep)
                first = self.exact.first_seen(batch["hash"].to_numpy()[rows])
                self._drop(keep, rows[~first], "duplicate", dropped)
                if self.near is not None:
                    rows = np.flatnonzero(keep)
                    bands = batch["bands"].flatten().to_numpy().reshape(batch.num_rows, -1)
                    first = self.near.first_seen(bands[rows])
                    self._drop(keep, rows[~first], "near_duplicate", dropped)
                kept += _write_rows(batch.filter(keep), self.writers, self.by_lang, self.by_split)
        self.files.append({**result, "kept": kept})

    @staticmethod
    def _drop(keep: np.ndarray, rows: np.ndarray, reason: str, dropped: Counter) -> None:
        """Drops `rows` (indices of rows still kept) for `reason`."""
        if len(rows):
            dropped[reason] += len(rows)
            keep[rows] = False

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


# ---------------------------------------------------------------- report


def _report(cfg: PrepareConfig, files: list[dict], by_lang: Counter, by_split: Counter, *, exact_hashes: int,
            near_bytes: int, skipped: list[dict], seconds: float) -> dict:
    """report.json from each input file's result (stage 1's counts plus its `kept` and final `dropped`), in input order."""
    dropped, by_source, malformed = Counter(), {}, []
    for f in files:
        dropped.update(f["dropped"])
        by_source[f["file"]] = {"format": f["format"], "read": f["read"], "kept": f["kept"],
                                "dropped": dict(sorted(f["dropped"].items()))}
        malformed += f["malformed"]
    read, kept = sum(f["read"] for f in files), sum(f["kept"] for f in files)
    config = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    return {
        "read": read, "kept": kept,
        "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
        "invariant_ok": read == kept + sum(dropped.values()),
        "by_split": {s: by_split[s] for s in SPLITS},
        "by_lang": dict(by_lang.most_common()),
        "by_source": by_source,
        "skipped": skipped,
        "malformed_examples": malformed[:_MAX_EXAMPLES],
        "exact_dedup_hashes": exact_hashes,
        "near_dup_index_bytes": near_bytes,
        "seconds": round(seconds, 3),
        "posts_per_s": round(read / seconds, 1) if seconds else None,
        "config": config,
    }


def _write_report(report: dict, out: Path | str, write: Callable[[str, str], None] | None = None) -> None:
    """report.json, last (its presence marks a finished corpus), once the invariant holds; then the summary.
    `write(path, text)` writes it elsewhere than the local disk (ray_prepare.py: a URL)."""
    assert report["invariant_ok"], f"read {report['read']} != kept {report['kept']} + dropped {report['dropped']}"
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    if write:
        write(f"{out}/report.json", text)
    else:
        (Path(out) / "report.json").write_text(text)
    print(_summary(report, out))


def _summary(report: dict, out: Path) -> str:
    def counts(d: dict, limit: int = 12) -> str:
        items = list(d.items())
        more = f"  (+{len(items) - limit} more)" if len(items) > limit else ""
        return "  ".join(f"{k} {v:,}" for k, v in items[:limit]) + more

    read, kept = report["read"], report["kept"]
    ok = "ok" if report["invariant_ok"] else "VIOLATED"
    lines = [
        f"data prepare: {read:,} read -> {kept:,} kept ({kept / max(read, 1):.1%}) in {report['seconds']:.1f} s "
        f"({report['posts_per_s'] or 0:,.0f} posts/s)",
        f"  read == kept + sum(dropped): {read:,} == {kept:,} + {sum(report['dropped'].values()):,}  {ok}",
        f"  dropped   {counts(report['dropped'])}",
        f"  splits    {counts(report['by_split'])}",
        f"  languages {counts(report['by_lang'])}",
        "  files     read      kept  format    file",
    ]
    sources = sorted(report["by_source"].items(), key=lambda kv: -kv[1]["read"])
    for file, s in sources[:15]:
        lines.append(f"         {s['read']:>8,} {s['kept']:>8,}  {s['format']:<8}  {file}")
    if len(sources) > 15:
        lines.append(f"          ... {len(sources) - 15} more files in report.json")
    for s in report["skipped"]:
        lines.append(f"  skipped   {s['file']}: {s['why']}")
    for m in report["malformed_examples"][:3]:
        lines.append(f"  malformed {m['file']}:{m['line']}: {m['error']}")
    lines.append(f"  -> {out}/report.json")
    return "\n".join(lines)
