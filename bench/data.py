"""Benchmark of `data prepare` and `data tokenize` on the shared tweets replicated past 1M posts.

    .venv/bin/python bench/data.py                      # ~5 minutes on 2 cores
    .venv/bin/python bench/data.py --copies 2 --quick   # a smoke run
    .venv/bin/python bench/data.py --quick --ray        # adds prepare and tokenize on a local Ray (--ray auto: a cluster)

Input: one copy is every TweetEval and XLM-T `*_text.txt` file (102,906 lines) plus every file
of twitter-api-v2/ (API v2 pages and flattened lines, ~2.2k records). Copy i prefixes each
post's text with "r{i} " (in the JSON files, every "text" field), so copies are not exact
duplicates of each other; near-duplicate detection does catch many of them, as it would
reposted spam. 10 copies are 1.05M records.

Runs, each in a fresh process (peak RSS from os.wait4, the max over the process and its workers):
- prepare, near-dup off and on (0.8), 1 and 2 workers, on all copies;
- peak memory of prepare (1 worker) on 1 copy against all copies (10x the input);
- tokenizer training (vocab 8192) on the 1-copy corpus, then tokenize of the all-copies corpus
  with 1 and 2 workers;
- with --ray [ADDRESS]: prepare (near-dup off and on) and tokenize on that Ray cluster (a local one started for
  each run when no ADDRESS), same inputs; peak RSS is then the driver's only (Ray's workers are not its children).
Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def make_copies(work: Path, copies: int) -> list[Path]:
    """One folder per copy (see the module docstring); returns the folders."""
    texts = sorted((SHARED / "tweeteval").rglob("*_text.txt")) + sorted((SHARED / "xlm-t").rglob("*_text.txt"))
    v2 = sorted((SHARED / "twitter-api-v2").iterdir())
    folders = []
    for i in range(copies):
        folder = work / "input" / f"copy{i:03d}"
        folders.append(folder)
        if folder.is_dir():
            continue
        folder.mkdir(parents=True)
        tag = f"r{i} "
        for n, path in enumerate(texts):
            lines = path.read_text(encoding="utf-8").splitlines()
            (folder / f"{n:02d}_{path.parent.name}_{path.name}").write_text("".join(tag + ln + "\n" for ln in lines), encoding="utf-8")
        for path in v2:
            (folder / path.name).write_bytes(path.read_bytes().replace(b'"text": "', b'"text": "' + tag.encode()))
    return folders


def run_child(code: str) -> tuple[dict, float]:
    """Runs Python `code` in a fresh process; returns the JSON of its last stdout line and its
    peak RSS in MB (that of the process or of its largest worker, whichever is larger)."""
    with tempfile.TemporaryFile() as err:  # progress bars and warnings, shown only on failure
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it, so Popen.wait must not be called
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{code}\n{err.read().decode()[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss / 1024  # Linux: KiB


def bench_prepare(inputs: list[Path], out: Path, *, workers: int, near_dup: float, ray: str | None = None) -> dict:
    code = f"""
import json
from pathlib import Path
from tweetlm.data.prepare import PrepareConfig, prepare
r = prepare(PrepareConfig(inputs={tuple(map(str, inputs))!r}, out=Path({str(out)!r}), workers={workers},
                          near_dup_threshold={near_dup}, ray={ray!r}))
print(json.dumps({{k: r[k] for k in ("read", "kept", "seconds", "dropped")}}))
"""
    result, rss = run_child(code)
    return {"workers": workers, "near_dup": near_dup, "ray": ray, "posts": result["read"], "kept": result["kept"],
            "seconds": result["seconds"], "posts_per_s": result["read"] / result["seconds"],
            "posts_per_s_per_worker": result["read"] / result["seconds"] / workers, "peak_rss_mb": rss}


def bench_tokenize(corpus: Path, tokenizer: Path, out: Path, *, workers: int, ray: str | None = None) -> dict:
    code = f"""
import json, time
from pathlib import Path
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
t0 = time.perf_counter()
index = tokenize(TokenizeConfig(corpus=Path({str(corpus)!r}), tokenizer=Path({str(tokenizer)!r}), out=Path({str(out)!r}), workers={workers},
                                ray={ray!r}))
seconds = time.perf_counter() - t0
print(json.dumps({{"tokens": sum(s["tokens"] for shards in index["splits"].values() for s in shards), "seconds": seconds}}))
"""
    result, rss = run_child(code)
    return {"workers": workers, "ray": ray, "tokens": result["tokens"], "seconds": result["seconds"],
            "tokens_per_s": result["tokens"] / result["seconds"], "peak_rss_mb": rss}


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    run_child(f"""
from pathlib import Path
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer
train_tokenizer(TokenizerConfig(corpus=Path({str(corpus)!r}), out=Path({str(out)!r}), vocab_size={vocab_size}))
print("{{}}")
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10, help="copies of the shared tweets (10 = 1.05M records)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tweetlm-bench-data"), help="scratch folder")
    parser.add_argument("--quick", action="store_true", help="skip the 2-worker and near-dup 2-worker runs")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="also run prepare and tokenize on Ray: auto, ray://HOST:PORT, or nothing for a local Ray")
    args = parser.parse_args()
    assert args.copies >= 1, "--copies must be at least 1"
    work = args.work
    t0 = time.perf_counter()
    copies = make_copies(work, args.copies)
    print(f"input: {args.copies} copies in {work / 'input'} ({time.perf_counter() - t0:.0f} s to write)", flush=True)

    def corpus(name: str) -> Path:
        shutil.rmtree(work / name, ignore_errors=True)
        return work / name

    runs = []
    for near_dup in (0.0, 0.8):
        for workers in (1,) if args.quick else (1, 2):
            runs.append({"input": "10x" if args.copies == 10 else f"{args.copies}x",
                         **bench_prepare(copies, corpus(f"corpus-nd{near_dup}-w{workers}"), workers=workers, near_dup=near_dup)})
            print(f"  prepare workers={workers} near_dup={near_dup}: {runs[-1]['posts_per_s']:,.0f} posts/s", flush=True)
        if args.ray:
            runs.append({"input": f"{args.copies}x", **bench_prepare(copies, corpus(f"corpus-nd{near_dup}-ray"), workers=1,
                                                                    near_dup=near_dup, ray=args.ray)})
            print(f"  prepare ray={args.ray} near_dup={near_dup}: {runs[-1]['posts_per_s']:,.0f} posts/s", flush=True)
    memory = {}
    for near_dup in (0.0, 0.8):
        one = bench_prepare(copies[:1], corpus(f"corpus-1x-nd{near_dup}"), workers=1, near_dup=near_dup)
        full = next(r for r in runs if r["workers"] == 1 and r["near_dup"] == near_dup and not r["ray"])
        memory[f"near_dup={near_dup}"] = {"posts_1x": one["posts"], "peak_rss_mb_1x": one["peak_rss_mb"],
                                          "posts_full": full["posts"], "peak_rss_mb_full": full["peak_rss_mb"],
                                          "ratio": full["peak_rss_mb"] / one["peak_rss_mb"]}

    tokenize = []
    if (ROOT / "tweetlm/tokenizer/shards.py").is_file() and (ROOT / "tweetlm/tokenizer/bpe.py").is_file():
        tokenizer = corpus("tokenizer")
        train_tokenizer(work / "corpus-1x-nd0.0", tokenizer, vocab_size=8192)
        for workers in (1, 2):
            tokenize.append(bench_tokenize(work / "corpus-nd0.0-w1", tokenizer, corpus(f"tokens-w{workers}"), workers=workers))
        if args.ray:
            tokenize.append(bench_tokenize(work / "corpus-nd0.0-w1", tokenizer, corpus("tokens-ray"), workers=1, ray=args.ray))
    else:
        print("tokenize: not measured (tweetlm/tokenizer/shards.py or tweetlm/tokenizer/bpe.py missing)")

    print()
    print(f"{'run':<28}{'posts':>11}{'seconds':>9}{'posts/s':>10}{'per worker':>12}{'peak RSS MB':>13}")
    for r in runs:
        name = f"prepare {r['input']} {'ray' if r['ray'] else 'w=' + str(r['workers'])} nd={r['near_dup']}"
        print(f"{name:<28}{r['posts']:>11,}{r['seconds']:>9.1f}{r['posts_per_s']:>10,.0f}"
              f"{r['posts_per_s_per_worker']:>12,.0f}{r['peak_rss_mb']:>13,.0f}")
    for name, m in memory.items():
        print(f"peak RSS {name}: {m['peak_rss_mb_1x']:,.0f} MB at {m['posts_1x']:,} posts, "
              f"{m['peak_rss_mb_full']:,.0f} MB at {m['posts_full']:,} posts: x{m['ratio']:.2f}")
    for t in tokenize:
        print(f"tokenize {'ray' if t['ray'] else 'w=' + str(t['workers'])}: {t['tokens']:,} tokens in {t['seconds']:.1f} s = {t['tokens_per_s']:,.0f} tokens/s "
              f"(peak RSS {t['peak_rss_mb']:,.0f} MB)")
    print(json.dumps({"bench": "data", "cpus": os.cpu_count(), "prepare": runs, "memory": memory, "tokenize": tokenize}))


if __name__ == "__main__":
    main()
