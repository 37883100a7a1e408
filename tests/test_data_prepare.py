"""`tweetlm data prepare` on the real shared files: every record kept or counted, stable splits, clear errors."""

import gzip
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tweetlm.artifacts.text import normalize
from tweetlm.cli import main
from tweetlm.data.clean import is_spam
from tweetlm.data.corpus import SCHEMA, SPLITS
from tweetlm.data.dedup import BandIndex, ExactSet, MinHashBands
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.data.split import assign_split
from tweetlm.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2 = SHARED / "twitter-api-v2"


def _prepare(out: Path, *inputs: Path, **kw) -> dict:
    return prepare(PrepareConfig(inputs=tuple(str(i) for i in inputs), out=out, **kw))


def _rows(corpus: Path) -> dict[str, list[dict]]:
    return {s: [r for f in sorted((corpus / s).glob("*.parquet")) for r in pq.read_table(f).to_pylist()] for s in SPLITS}


@pytest.fixture(scope="module")
def v2_corpus(tmp_path_factory) -> tuple[Path, dict]:
    """Every file of twitter-api-v2/, once, with the defaults."""
    out = tmp_path_factory.mktemp("v2") / "corpus"
    return out, _prepare(out, V2)


def test_every_v2_file_goes_through_with_the_invariant(v2_corpus, capsys):
    out, report = v2_corpus
    assert report["invariant_ok"] and report["read"] == report["kept"] + sum(report["dropped"].values())
    assert json.loads((out / "report.json").read_text()) == report
    assert {Path(s["file"]).name for s in report["skipped"]} == {
        "counts.jsonl", "lists.jsonl", "users.jsonl", "tweets_compliance.jsonl", "users_compliance.jsonl"}
    assert len(report["by_source"]) + len(report["skipped"]) == len(list(V2.iterdir()))
    assert sum(s["read"] for s in report["by_source"].values()) == report["read"]
    malformed = {(Path(m["file"]).name, m["line"]) for m in report["malformed_examples"]}
    assert malformed == {("streaming_output_with_error.jsonl", 8), ("empty.json", 0)}
    rows = _rows(out)
    assert sum(map(len, rows.values())) == report["kept"] == sum(report["by_split"].values())
    assert pq.read_schema(next((out / "train").glob("*.parquet"))).names == SCHEMA.names
    assert set(report["dropped"]) >= {"malformed", "edited_superseded", "withheld", "repost", "duplicate", "near_duplicate"}


def test_v2_edits_keep_only_the_latest_version(v2_corpus):
    out, report = v2_corpus
    ids = {r["id"] for split in _rows(out).values() for r in split}
    assert "1576994789110992896" in ids and "1576994746135764992" not in ids  # edited.jsonl's after / before
    assert report["by_source"][str(V2 / "edited_before.jsonl")]["dropped"]["edited_superseded"] == 1


def test_reposts_and_near_duplicates_are_dropped_with_their_reason(v2_corpus):
    out, report = v2_corpus
    rows = [r for split in _rows(out).values() for r in split]
    assert not [r for r in rows if r["kind"] == "repost"] and report["dropped"]["repost"] > 500
    # withheld.jsonl holds one headline posted many times with small edits ("Day's Lows;" / "Day’s Lows,"):
    # exact copies go as duplicates, the variants as near duplicates, one remains.
    sensex = [r["clean_text"] for r in rows if r["clean_text"].startswith("Sensex Rebounds Over 500 Points From Day")
              and r["clean_text"].endswith("Top Gainer http")]
    assert len(sensex) == 1
    assert report["by_source"][str(V2 / "withheld.jsonl")]["dropped"]["near_duplicate"] >= 2
    assert len({r["clean_text"] for r in rows}) == len(rows)


def test_a_kept_repost_carries_its_original_text_so_it_goes_as_a_duplicate(tmp_path):
    default = _prepare(tmp_path / "a", V2 / "mentions_tweet.jsonl", near_dup_threshold=0)
    kept = _prepare(tmp_path / "b", V2 / "mentions_tweet.jsonl", near_dup_threshold=0, keep_reposts=True)
    assert (default["kept"], default["dropped"]) == (1, {"repost": 1})
    assert (kept["kept"], kept["dropped"]) == (1, {"duplicate": 1})
    assert [r["kind"] for rows in _rows(tmp_path / "b").values() for r in rows] == ["post"]


def test_splits_are_stable_across_runs_and_worker_counts(v2_corpus, tmp_path):
    out, report = v2_corpus
    again = _prepare(tmp_path / "again", V2, workers=2)
    first, second = _rows(out), _rows(tmp_path / "again")
    assert first == second and again["by_split"] == report["by_split"]
    assert min(report["by_split"].values()) > 0
    _prepare(tmp_path / "again", V2 / "kpop.jsonl")  # a previous corpus in --out is replaced
    assert sum(map(len, _rows(tmp_path / "again").values())) == json.loads((tmp_path / "again/report.json").read_text())["kept"]


def test_a_thread_never_straddles_two_splits(v2_corpus):
    out, _ = v2_corpus
    splits_of = defaultdict(set)
    for split, rows in _rows(out).items():
        for r in rows:
            splits_of[r["conversation_id"] or r["id"]].add(split)
    assert max(Counter(r["conversation_id"] for rows in _rows(out).values() for r in rows if r["conversation_id"]).values()) >= 4
    assert all(len(s) == 1 for s in splits_of.values())
    keys = [str(i) for i in range(20_000)]
    counts = Counter(assign_split(k, seed=0, val_ratio=0.1, test_ratio=0.05) for k in keys)
    assert abs(counts["val"] / len(keys) - 0.1) < 0.01 and abs(counts["test"] / len(keys) - 0.05) < 0.01
    assert counts != Counter(assign_split(k, seed=1, val_ratio=0.1, test_ratio=0.05) for k in keys)


def test_bad_input_is_counted_with_file_and_line_and_the_run_goes_on(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = (SHARED / "tweeteval/irony/val_text.txt").read_bytes()
    (inputs / "a_cut.txt.gz").write_bytes(gzip.compress(text)[:5000])
    (inputs / "b_bad_utf8.txt").write_bytes(b"a post that reads fine\n\xff\xfe not UTF-8 at all\nanother fine post here\n")
    (inputs / "c_empty.jsonl").write_bytes(b"")
    shutil.copy(V2 / "streaming_output_with_error.jsonl", inputs / "d_stream.jsonl")
    report = _prepare(tmp_path / "corpus", inputs)
    assert report["invariant_ok"] and report["dropped"]["malformed"] == 4
    lines = {(Path(m["file"]).name, m["line"]) for m in report["malformed_examples"]}
    assert {("b_bad_utf8.txt", 2), ("c_empty.jsonl", 0), ("d_stream.jsonl", 8)} <= lines
    cut = report["by_source"][str(inputs / "a_cut.txt.gz")]
    assert cut["kept"] > 10 and ("a_cut.txt.gz", cut["read"]) in lines  # the break is the file's last record


def test_language_filter_keeps_only_the_asked_languages(tmp_path):
    report = _prepare(tmp_path / "c", SHARED / "xlm-t/french/val_text.txt", SHARED / "xlm-t/german/val_text.txt",
                      lang=("fr",))
    assert set(report["by_lang"]) == {"fr"} and report["dropped"]["language"] > 250
    french = report["by_source"][str(SHARED / "xlm-t/french/val_text.txt")]
    assert french["kept"] > 0.8 * french["read"]


def test_drop_top_authors_removes_the_most_prolific_accounts(v2_corpus, tmp_path):
    out, _ = v2_corpus
    authors = Counter(r["author_id"] for rows in _rows(out).values() for r in rows if r["author_id"])
    report = _prepare(tmp_path / "c", V2, drop_top_authors=0.01)
    kept = Counter(r["author_id"] for rows in _rows(tmp_path / "c").values() for r in rows if r["author_id"])
    top = authors.most_common(1)[0][0]  # 61 posts, 2nd has 58, 3rd 7
    assert report["invariant_ok"] and report["dropped"]["top_author"] >= authors[top]
    assert top not in kept and len(kept) < len(authors)


def test_normalization_defaults_and_switches():
    raw = "RT&amp;co @Jack_99: see https://t.co/abc  and www.x.org\n\n\n  then 😂 #Tag mail a@b.com"
    assert normalize(raw) == "RT&co @user: see http and http\nthen 😂 #Tag mail a@b.com"
    assert normalize(raw, mentions=False, links=False) == "RT&co @Jack_99: see https://t.co/abc and www.x.org\nthen 😂 #Tag mail a@b.com"


def test_spam_is_mostly_hashtags_mentions_or_links():
    assert is_spam("#ad #win #free http great") and is_spam("@user @user") and is_spam("http")
    assert not is_spam("@user @user thanks, that was great!") and not is_spam("Happy #Halloween")
    assert not is_spam("Good morning #twitter http")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 300), max_size=60), max_size=8))
def test_exact_set_matches_a_python_set(batches):
    exact, seen = ExactSet(), set()
    for batch in batches:
        hashes = np.array([x * 0x9E3779B97F4A7C15 % 2**64 for x in batch], np.uint64)
        expected = []
        for h in hashes.tolist():
            expected.append(h not in seen)
            seen.add(h)
        assert exact.first_seen(hashes).tolist() == expected
    assert len(exact) == len(seen)


def _exact_lsh(keys: np.ndarray) -> np.ndarray:
    """What unbounded LSH keeps: posts none of whose band hashes appeared before."""
    seen = [set() for _ in range(keys.shape[1])]
    keep = []
    for row in keys.tolist():
        keep.append(not any(h in band for h, band in zip(row, seen)))
        for h, band in zip(row, seen):
            band.add(h)
    return np.array(keep)


def test_band_index_finds_near_copies_with_fixed_memory():
    posts = (SHARED / "tweeteval/emotion/train_text.txt").read_text(encoding="utf-8").splitlines()[:3000]
    posts += [p + " indeed" for p in posts[:1000]]  # one word more: Jaccard ~0.9 for a tweet
    bands = MinHashBands(0.8, seed=0)
    keys = bands(posts)
    expected = _exact_lsh(keys)
    assert (~expected[3000:]).mean() > 0.6
    large = BandIndex(bands.bands, memory_mb=64)
    assert (np.concatenate([large.first_seen(keys[i:i + 512]) for i in range(0, len(keys), 512)]) == expected).all()
    small = BandIndex(bands.bands, memory_mb=1)  # 14,563 slots per band: older posts get forgotten
    keep = np.concatenate([small.first_seen(keys[i:i + 512]) for i in range(0, len(keys), 512)])
    assert (keep | ~expected).all() and keep.sum() > expected.sum()  # it misses some copies, never drops more
    assert small.nbytes == 14_563 * 8 * bands.bands


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.md").write_text("mine")
    for argv in (["data", "prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c")],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "file" / "c")],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "full")],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "c"), "--lang", "en,xx"],
                 ["data", "prepare", str(tmp_path / "*.nothing"), "--out", str(tmp_path / "c")],
                 ["data", "prepare", str(V2 / "users.jsonl"), str(V2 / "counts.jsonl"), "--out", str(tmp_path / "c")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tweetlm: error: ") and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "full" / "notes.md").read_text() == "mine"
    with pytest.raises(UserError, match="val_ratio and test_ratio must be >= 0 and sum to less than 1"):
        PrepareConfig(inputs=("x",), out=tmp_path, val_ratio=0.6, test_ratio=0.5)
    # the library names the config field, the CLI the flag that sets it
    assert main(["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "c"), "--near-dup", "1.5"]) == 2
    assert capsys.readouterr().err == "tweetlm: error: --near-dup 1.5: must be in [0, 1); 0 turns it off\n"


def test_a_lone_surrogate_is_one_malformed_record_and_special_files_are_skipped_with_why(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = '{"id": "s\\ud800", "text": "a post long enough to be kept"}\n'  # valid JSON, but no UTF-8 can hold that id
    (inputs / "x.jsonl").write_text(bad + (V2 / "flat.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    os.mkfifo(inputs / "pipe.jsonl")
    (inputs / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    assert main(["data", "prepare", str(inputs), "--out", str(tmp_path / "corpus")]) == 0
    report = json.loads((tmp_path / "corpus" / "report.json").read_text())
    assert report["invariant_ok"] and report["dropped"]["malformed"] == 1 and report["kept"] > 50
    (example,) = report["malformed_examples"]
    assert (example["file"], example["line"]) == (str(inputs / "x.jsonl"), 1) and "surrogate" in example["error"]
    why = {Path(s["file"]).name: s["why"] for s in report["skipped"]}
    assert set(why) == {"pipe.jsonl", "gone.jsonl"} and "named pipe" in why["pipe.jsonl"]
    capsys.readouterr()
    assert main(["data", "prepare", str(inputs / "pipe.jsonl"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tweetlm: error: ") and len(err.strip().splitlines()) == 1 and "named pipe" in err, err
