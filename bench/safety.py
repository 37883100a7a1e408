"""Benchmark of the safety classifier: how fast it scores posts, in batches (`data prepare --drop-toxic`) and one
at a time (`serve --moderate`, which scores each reply as it grows), and what it costs `data prepare`.

    .venv/bin/python bench/safety.py                        # trains one first (~15 s), ~1 minute in all
    .venv/bin/python bench/safety.py --safety work/safety   # an existing classifier

Posts: every TweetEval train text (74,655 lines). Timings are the best of 3 (single-threaded: scikit-learn's
vectorizers and the sparse product run on one core). Prints a table, then one line of JSON.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TWEETEVAL = ROOT.parent / "shared" / "data" / "tweeteval"

from tweetlm.artifacts.safety import SafetyClassifier  # noqa: E402
from tweetlm.artifacts.text import normalize  # noqa: E402
from tweetlm.data.prepare import PrepareConfig, prepare  # noqa: E402
from tweetlm.eval.safety import SafetyConfig, train_safety  # noqa: E402


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--safety", type=Path, help="a `tweetlm safety train` folder (default: train one now)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = args.safety or tmp / "safety"
        if args.safety is None:
            train_safety(SafetyConfig(data=TWEETEVAL, out=path))
        classifier = SafetyClassifier.load(path)
        files = sorted(TWEETEVAL.rglob("train_text.txt"))
        posts = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
        batch = 8192  # data prepare's batch
        t_batch = best_of(3, lambda: [classifier.score(posts[i : i + batch]) for i in range(0, len(posts), batch)])
        t_norm = best_of(3, lambda: [normalize(p) for p in posts])
        single = posts[:500]
        t_single = best_of(3, lambda: [classifier.score([p]) for p in single])
        reply = " ".join(posts[:20])[:1000]  # a long reply, as the server scores it at its end
        t_reply = best_of(3, lambda: [classifier.score([reply]) for _ in range(100)]) / 100

        runs = {}
        for name, toxic in (("prepare", None), ("prepare --drop-toxic", path)):
            t0 = time.perf_counter()
            report = prepare(PrepareConfig(inputs=tuple(map(str, files)), out=tmp / name.replace(" ", "_"),
                                           drop_toxic=toxic, near_dup_threshold=0.0))
            seconds = time.perf_counter() - t0
            runs[name] = {"posts_per_s": report["read"] / seconds, "toxic": report["dropped"].get("toxic", 0)}

    result = {
        "posts": len(posts),
        "batch_posts_per_s": len(posts) / t_batch,
        "normalize_share": t_norm / t_batch,
        "single_ms": 1000 * t_single / len(single),
        "reply_1000_chars_ms": 1000 * t_reply,
        "prepare_posts_per_s": runs["prepare"]["posts_per_s"],
        "prepare_drop_toxic_posts_per_s": runs["prepare --drop-toxic"]["posts_per_s"],
        "dropped_toxic": runs["prepare --drop-toxic"]["toxic"],
        "threshold": classifier.threshold,
    }
    print(f"safety classifier ({classifier.info['features']:,} features, threshold {classifier.threshold:.3f}) "
          f"on {len(posts):,} TweetEval train posts")
    print(f"  batches of {batch}: {result['batch_posts_per_s']:,.0f} posts/s "
          f"({result['normalize_share']:.0%} of it normalize)")
    print(f"  one post at a time: {result['single_ms']:.2f} ms a post; "
          f"a 1,000-character reply: {result['reply_1000_chars_ms']:.2f} ms")
    print(f"  data prepare, 1 worker, near-dup off: {result['prepare_posts_per_s']:,.0f} posts/s; with --drop-toxic "
          f"{result['prepare_drop_toxic_posts_per_s']:,.0f} posts/s ({result['dropped_toxic']:,} dropped as toxic)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
