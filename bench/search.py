"""Benchmark of the posts index: ingestion posts/s and query latency at 1M posts.

    .venv/bin/python bench/search.py                   # 1M posts, ~2 minutes on 2 cores
    .venv/bin/python bench/search.py --posts 100000    # a smoke run

Input: every TweetEval and XLM-T `*_text.txt` line (102,906 posts) replicated with changes until there are
--posts of them, written as JSON Lines (`id`, `text`, `created_at`, `author_id`, `lang`) in 10 files: each copy
gets new ids, one word replaced by a word of another post, an author among 100,000 and a time spread over
one year in id order (so the index receives posts in time order, as a live one does).
Ingestion: `tweetlm index add` on those files (read, normalize, insert; one transaction per 20,000 posts).
Queries: 300, seeded, each 1 to 4 consecutive words of a random post (40% one word, 35% two, 25% three or
four), a fifth of them with --since 7d; timed one after another in one thread after 20 warm-up queries.
Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
YEAR = 365 * 86400
END = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()  # the newest post's time


def make_posts(folder: Path, total: int, *, seed: int = 0, files: int = 10) -> list[Path]:
    """The replicated posts as JSON Lines files (module docstring); returns the files."""
    texts = [line.strip() for path in sorted((SHARED / "tweeteval").rglob("*_text.txt")) + sorted((SHARED / "xlm-t").rglob("*_text.txt"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    vocabulary = [w for t in rng.sample(texts, 5000) for w in t.split()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"posts-{i:02d}.jsonl" for i in range(files)]
    per_file = -(-total // files)
    n = 0
    for path in paths:
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(min(per_file, total - n)):
                words = texts[n % len(texts)].split()
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
                created = END - YEAR * (1 - n / total) + rng.uniform(0, 60)
                f.write(json.dumps({"id": str(10**15 + n), "text": " ".join(words), "author_id": str(rng.randrange(100_000)),
                                    "created_at": datetime.fromtimestamp(created, timezone.utc).isoformat(), "lang": None},
                                   ensure_ascii=False) + "\n")
                n += 1
    return paths


def make_queries(texts: list[str], count: int, *, seed: int = 1) -> list[tuple[str, str | None]]:
    rng = random.Random(seed)
    queries = []
    while len(queries) < count:
        words = [w for w in rng.choice(texts).split() if any(c.isalnum() for c in w) and not w.startswith(("@", "http"))]
        if not words:
            continue
        size = rng.choices((1, 2, 3, 4), weights=(40, 35, 15, 10))[0]
        start = rng.randrange(max(1, len(words) - size + 1))
        queries.append((" ".join(words[start:start + size]), "7d" if rng.random() < 0.2 else None))
    return queries


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1_000_000, help="posts to index (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=300, help="timed queries (default 300)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tweetlm-bench-search"), help="scratch folder")
    args = parser.parse_args()
    from tweetlm.search.index import Index, add_files

    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    files = make_posts(args.work / "input", args.posts)
    print(f"input: {args.posts:,} posts in {len(files)} files ({time.perf_counter() - t0:.0f} s to write)", flush=True)

    db = args.work / "posts.db"
    report = add_files(tuple(map(str, files)), db)
    size_mb = sum(p.stat().st_size for p in args.work.glob("posts.db*")) / 1e6

    texts = [json.loads(line)["text"] for line in open(files[0], encoding="utf-8")]
    queries = make_queries(texts, args.queries + 20)
    latencies, results = [], []
    with Index(db, create=False) as index:
        for i, (query, since) in enumerate(queries):
            start = time.perf_counter()
            hits = index.search(query, since=since, now=END + 3600)
            if i >= 20:
                latencies.append((time.perf_counter() - start) * 1000)
                results.append(len(hits))
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)

    print()
    print(f"{'posts':>10}{'ingest s':>10}{'posts/s':>10}{'index MB':>10}{'queries':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    print(f"{report['posts_in_index']:>10,}{report['seconds']:>10.1f}{report['posts_per_s']:>10,.0f}{size_mb:>10,.0f}"
          f"{len(latencies):>9}{p50:>9.1f}{p99:>9.1f}{max(latencies):>9.1f}")
    print(f"queries with no hit: {results.count(0)} of {len(results)}; mean hits {statistics.mean(results):.1f}")
    print(json.dumps({"bench": "search", "cpus": os.cpu_count(), "posts": report["posts_in_index"],
                      "ingest_seconds": report["seconds"], "ingest_posts_per_s": report["posts_per_s"],
                      "index_mb": round(size_mb, 1), "queries": len(latencies), "p50_ms": round(p50, 2),
                      "p99_ms": round(p99, 2), "max_ms": round(max(latencies), 2)}))


if __name__ == "__main__":
    main()
