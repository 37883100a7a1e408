"""The posts index: real posts in, updates and edits replace, BM25 + recency ranking, --since, hostile queries,
readers beside a writer, CLI errors."""

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tweetlm.cli import main
from tweetlm.data.post import Post
from tweetlm.errors import UserError
from tweetlm.search.index import Index, add_files, to_unix

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2 = SHARED / "twitter-api-v2"
ENGLISH = SHARED / "xlm-t" / "english" / "train_text.txt"
GARAGE = "1253788283760492544"  # withheld.jsonl, 2020-04-24T20:49:55Z: "I know it isn’t supposed to work like this, ..."
EDITED_OLD, EDITED_NEW = "1576994746135764992", "1576994789110992896"  # edited.jsonl: the first version, the edit


def _post(id, text, created_at=None, **kw) -> Post:
    return Post(id=id, text=text, created_at=created_at, author_id=kw.get("author_id"), lang=None, conversation_id=None,
                in_reply_to_id=None, kind=kw.get("kind", "post"), source="test:1")


@pytest.fixture(scope="module")
def v2_index(tmp_path_factory) -> tuple[Index, dict]:
    path = tmp_path_factory.mktemp("index") / "posts.db"
    report = add_files((str(V2),), path)
    with Index(path, create=False) as index:
        yield index, report


def test_real_posts_are_added_and_every_record_accounted_for(v2_index):
    index, report = v2_index
    dropped = sum(report["dropped"].values())
    assert report["read"] == report["added"] + report["updated"] + report["unchanged"] + dropped
    assert index.count == report["added"] - report["removed"] == report["posts_in_index"]
    assert {"repost", "malformed", "edited_superseded", "withheld"} <= set(report["dropped"])
    assert len(report["skipped_files"]) == 5  # users, counts, lists, two compliance files
    (garage,) = index.get([GARAGE])
    assert garage["created_at"] == "2020-04-24T20:49:55Z" and garage["author_id"] == "1154498013626327041"
    assert garage["text"].startswith("I know it isn’t supposed to work like this")
    assert index.get(["nope", GARAGE, GARAGE]) == [garage], "unknown ids left out, the order asked kept"


def test_an_exact_match_ranks_first(v2_index):
    index, _ = v2_index
    hits = index.search("I know it isn't supposed to work like this, but this is the no excuses our equipment", limit=5)
    assert hits[0]["id"] == GARAGE and hits[0]["score"] > hits[1]["score"]
    assert index.search("garage")[0]["text"] == "I’ll be in the garage if you need me"
    assert index.search("@PhillyNEFL")[0]["text"].startswith("@PhillyNEFL"), "handles are searchable"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40) | st.lists(st.sampled_from(['"', "*", "^", "(", ")", ":", "-", "+", "NEAR", "AND", "OR",
                                                          "NOT", "body:", "{", "}", "\x00", "garage"])).map(" ".join))
def test_no_query_string_is_fts5_syntax(v2_index, query):
    index, _ = v2_index
    if not query.replace("\x00", " ").split():
        with pytest.raises(UserError, match="no words"):
            index.search(query)
    else:
        assert isinstance(index.search(query), list)


def test_readding_updates_and_the_newer_version_wins(tmp_path):
    with Index(tmp_path / "posts.db") as index:
        assert index.add([_post("7", "walking the dog in the park", "2024-01-01T10:00:00Z")])["added"] == 1
        counts = index.add([_post("7", "feeding the cat at home", "2024-01-01T10:05:00Z")])
        assert (counts["added"], counts["updated"]) == (0, 1)
        assert index.search("dog") == [] and index.search("cat")[0]["id"] == "7"
        counts = index.add([_post("7", "walking the dog in the park", "2024-01-01T10:00:00Z")])  # late, older copy
        assert counts["unchanged"] == 1 and index.get(["7"])[0]["text"] == "feeding the cat at home"
        assert index.add([_post("7", "feeding the cat at home", "2024-01-01T10:05:00Z")])["unchanged"] == 1
        assert index.count == 1 and index.remove(["7"]) == 1 and index.search("cat") == []


def test_an_edit_in_the_files_removes_the_older_version(tmp_path):
    page = json.loads((V2 / "edited.jsonl").read_text())
    old = next(t for t in page["includes"]["tweets"] if t["id"] == EDITED_OLD)
    with Index(tmp_path / "posts.db") as index:
        index.add([_post(EDITED_OLD, old["text"], old["created_at"])])  # indexed before it was edited
        assert index.search("miss")[0]["id"] == EDITED_OLD
    report = add_files((str(V2 / "edited.jsonl"),), tmp_path / "posts.db")
    assert report["removed"] == 1 and report["dropped"] == {"edited_superseded": 1}
    with Index(tmp_path / "posts.db") as index:
        assert index.get([EDITED_OLD]) == [] and index.search("miss") == []
        assert index.get([EDITED_NEW])[0]["text"].startswith("hey :)")


def test_plain_text_posts_are_keyed_by_text_so_readding_is_a_no_op(tmp_path):
    first = add_files((str(ENGLISH),), tmp_path / "posts.db")
    again = add_files((str(ENGLISH),), tmp_path / "posts.db")
    assert first["added"] > 1000 and again["added"] == again["updated"] == 0
    assert again["unchanged"] == first["added"] + first["unchanged"]
    with Index(tmp_path / "posts.db") as index:
        hit = index.search("TAYLOR SWIFT LOOKS NOTHING LIKE JACKIE")[0]
        assert hit["id"].startswith("text:") and hit["created_at"] is None and "JACKIE O" in hit["text"]


def test_recency_boost_orders_equal_matches_newest_first_by_the_documented_formula(tmp_path):
    now = to_unix("2024-06-01T00:00:00Z")
    times = {"old": "2023-06-01T00:00:00Z", "day": "2024-05-31T00:00:00Z", "new": "2024-06-01T00:00:00Z"}
    with Index(tmp_path / "posts.db") as index:
        index.add([_post(id, "sunrise over the harbour", created) for id, created in times.items()])
        index.add([_post("other", "nothing alike here")])
        hits = index.search("harbour sunrise", now=now)
        assert [h["id"] for h in hits] == ["new", "day", "old"]
        score = {h["id"]: h["score"] for h in hits}
        # score = -bm25 * (1 + 1.0 * 2^(-age / 24h)): x2 now, x1.5 a day later, ~x1 a year later
        assert score["new"] / score["old"] == pytest.approx(2.0, rel=1e-4)
        assert score["day"] / score["old"] == pytest.approx(1.5, rel=1e-4)
        flat = index.search("harbour sunrise", now=now, recency=0.0)
        assert len({h["score"] for h in flat}) == 1 and [h["id"] for h in flat] == ["new", "day", "old"]


def test_since_takes_iso_dates_and_durations(v2_index):
    index, _ = v2_index
    all_garage = {h["id"] for h in index.search("garage", limit=50)}
    now = to_unix("2020-04-25T00:00:00Z")
    recent = index.search("the", since="2d", now=now, limit=1000)
    assert recent and all("2020-04-23T00:00:00Z" <= h["created_at"] for h in recent)
    assert {h["id"] for h in index.search("garage", since="2020-04-01", limit=50)} == all_garage
    assert index.search("garage", since="2021-01-01T00:00:00Z") == []
    for bad in ("yesterday", "7 days ago", "2024-13-01"):
        with pytest.raises(UserError, match="since"):
            index.search("garage", since=bad)


def test_readers_see_whole_batches_while_a_writer_adds(tmp_path):
    lines = [line for line in ENGLISH.read_text(encoding="utf-8").splitlines() if line.strip()][:3000]
    path = tmp_path / "posts.db"
    writer, other = Index(path), Index(path)  # `other`: another process's view of the same file
    batch, errors, seen = 300, [], []

    def write():
        for start in range(0, len(lines), batch):
            writer.add([_post(f"p{start + i}", text) for i, text in enumerate(lines[start:start + batch])])

    def read(index):
        try:
            while True:  # at least one read, even when the writer is done first (a loaded machine)
                done = not thread.is_alive()
                seen.append(index.count)
                index.search("the love")
                if done:
                    break
        except Exception as e:  # noqa: BLE001 - the test reports any failure of a reader
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    readers = [threading.Thread(target=read, args=(ix,)) for ix in (writer, other, other)]
    for r in readers:
        r.start()
    for r in [thread, *readers]:
        r.join()
    assert errors == [] and seen and all(n % batch == 0 or n == len(lines) for n in seen), f"a reader saw a batch half-written: {sorted(set(seen))}"
    assert other.count == len(lines)
    writer.close(), other.close()


def test_cli_index_add_and_search_and_one_line_errors(tmp_path, capsys):
    db = tmp_path / "posts.db"
    assert main(["index", "add", str(V2 / "withheld.jsonl"), "--index", str(db)]) == 0
    assert "added" in capsys.readouterr().out
    assert main(["search", "garage", "--index", str(db), "--json", "--limit", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["text"] == "I’ll be in the garage if you need me" and "score" in hits[0]
    assert main(["search", "garage", "--index", str(db)]) == 0
    assert "garage" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("not a database, just text\n" * 100)
    for argv, message in [
        (["search", "garage", "--index", str(tmp_path / "missing.db")], "no index at"),
        (["search", "garage", "--index", str(db), "--since", "soon"], "since"),
        (["search", "garage", "--index", str(db), "--limit", "0"], "limit"),
        (["search", "garage", "--index", str(db), "--half-life", "forever"], "duration"),
        (["search", "   ", "--index", str(db)], "no words"),
        (["search", "garage", "--index", str(tmp_path / "notes.txt")], "is not a database"),
        (["index", "add", str(tmp_path / "nothing-here"), "--index", str(db)], "no such file"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_index_add_counts_a_lone_surrogate_as_malformed_and_reports_special_files(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = '{"id": "s\\ud800", "text": "a post long enough to be kept"}\n'  # valid JSON, but SQLite cannot store that id as UTF-8
    (inputs / "x.jsonl").write_text(bad + (V2 / "withheld.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    os.mkfifo(inputs / "pipe.jsonl")
    (inputs / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    report = add_files((str(inputs),), tmp_path / "posts.db")
    assert report["dropped"]["malformed"] == 1 and report["added"] > 100
    assert report["read"] == report["added"] + report["updated"] + report["unchanged"] + sum(report["dropped"].values())
    why = {Path(s["file"]).name: s["why"] for s in report["skipped_files"]}
    assert set(why) == {"pipe.jsonl", "gone.jsonl"} and "named pipe" in why["pipe.jsonl"]
    with Index(tmp_path / "posts.db", create=False) as index:
        assert index.get([GARAGE]) and index.count == report["posts_in_index"]
    capsys.readouterr()
    assert main(["index", "add", str(inputs / "pipe.jsonl"), "--index", str(tmp_path / "posts.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "named pipe" in err, err
