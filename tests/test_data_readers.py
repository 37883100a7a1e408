"""Readers: every real format detected and read into Posts, bad input counted with file and line."""

import bz2
import gzip
import json
from pathlib import Path

import pytest
import zstandard

from tweetlm.data.post import Post
from tweetlm.data.readers import NON_POST, Dropped, detect, read

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2 = SHARED / "twitter-api-v2"

EXPECTED_FORMATS = {
    "counts.jsonl": "counts", "lists.jsonl": "lists", "users.jsonl": "users", "tweets_compliance.jsonl": "compliance",
    "users_compliance.jsonl": "compliance", "empty.json": "empty", "flat.jsonl": "v2_flat",
}


def _read(path: Path) -> list[Post | Dropped]:
    return list(read(path, detect(path)))


def _posts(path: Path) -> dict[str, Post]:
    return {r.id: r for r in _read(path) if isinstance(r, Post)}


def _reasons(records) -> list[str]:
    return [r.reason for r in records if isinstance(r, Dropped)]


def test_every_shared_v2_file_is_detected_by_what_it_holds():
    for path in sorted(V2.iterdir()):
        assert detect(path) == EXPECTED_FORMATS.get(path.name, "v2"), path.name
    assert set(EXPECTED_FORMATS.values()) - {"empty", "v2_flat"} <= set(NON_POST)


def test_tweeteval_text_files_are_posts_and_label_files_are_not():
    assert detect(SHARED / "tweeteval/hate/train_text.txt") == "text"
    assert detect(SHARED / "tweeteval/hate/train_labels.txt") == "labels"
    assert detect(SHARED / "tweeteval/emoji/mapping.txt") == "labels"
    records = _read(SHARED / "xlm-t/french/val_text.txt")
    lines = (SHARED / "xlm-t/french/val_text.txt").read_text(encoding="utf-8").splitlines()
    assert len(records) == len(lines) and all(isinstance(r, Post) for r in records)
    assert records[4].source.endswith("val_text.txt:5") and records[4].text == lines[4].strip()
    assert records[4].id is None and records[4].conversation_id is None


def test_v2_page_yields_data_and_included_posts_once_with_their_fields():
    page = json.loads((V2 / "two_tweets.jsonl").read_text())
    posts = _posts(V2 / "two_tweets.jsonl")
    data, original = page["data"][0], page["includes"]["tweets"][0]
    assert set(posts) == {data["id"], original["id"]}
    post = posts[data["id"]]
    assert (post.author_id, post.created_at, post.conversation_id, post.lang) == (
        data["author_id"], data["created_at"], data["conversation_id"], data["lang"])
    assert post.source == f"{V2 / 'two_tweets.jsonl'}:1"


def test_repost_carries_the_full_text_of_its_original():
    page = json.loads((V2 / "two_tweets.jsonl").read_text())
    repost, original = page["data"][0], page["includes"]["tweets"][0]
    assert repost["text"].startswith("RT @") and repost["referenced_tweets"][0]["type"] == "retweeted"
    post = _posts(V2 / "two_tweets.jsonl")[repost["id"]]
    assert post.kind == "repost" and post.text == original["text"]


def test_replies_and_quotes_get_their_kind_and_parent():
    posts = list(_posts(V2 / "flat.jsonl").values())
    replies = [p for p in posts if p.kind == "reply"]
    assert replies and all(p.in_reply_to_id for p in replies)
    assert any(p.kind == "quote" for p in posts)
    flat = [json.loads(line) for line in (V2 / "flat.jsonl").read_text().splitlines()]
    inline = {r["id"] for t in flat for r in t.get("referenced_tweets", []) if "text" in r}
    assert inline <= set(_posts(V2 / "flat.jsonl")), "inline referenced posts are posts too"


@pytest.mark.parametrize("name", ["edited.jsonl", "edited_after.jsonl", "edited_before.jsonl"])
def test_edited_posts_keep_only_the_latest_version(name):
    records = _read(V2 / name)
    history = json.loads((V2 / name).read_text())["data"][0]["edit_history_tweet_ids"]
    assert set(_posts(V2 / name)) == {history[-1]}
    assert _reasons(records) == ["edited_superseded"]


def test_withheld_placeholders_are_dropped_and_withheld_posts_with_text_kept():
    records = _read(V2 / "withheld.jsonl")
    posts = {r.id: r for r in records if isinstance(r, Post)}
    placeholders = [r for r in records if isinstance(r, Dropped) and r.reason == "withheld"]
    assert len(placeholders) == 12  # 11 "account withheld" notices and 1 copyright notice
    assert "1388424788171841537" in posts  # withheld in India only: the text is real
    assert not any("has been withheld in" in p.text for p in posts.values())


def test_long_posts_take_their_full_text_from_note_tweet(tmp_path):
    full = "a long post " * 40
    page = {"data": [{"id": "1", "text": full[:270] + "…", "note_tweet": {"text": full}, "author_id": "9"}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(page) + "\n")
    assert _posts(tmp_path / "long.jsonl")["1"].text == full


def test_v1_statuses_and_archive_tweets(tmp_path):
    original = {"id_str": "10", "full_text": "the original, in full", "user": {"id_str": "7"}, "lang": "en",
                "created_at": "Wed Oct 10 20:19:24 +0000 2018"}
    status = {"id_str": "11", "text": "RT @a: the original, in…", "truncated": True, "user": {"id_str": "8"},
              "retweeted_status": original}
    extended = {"id_str": "12", "text": "cut…", "extended_tweet": {"full_text": "cut no more"}, "user": {"id_str": "8"},
                "in_reply_to_status_id_str": "10"}
    (tmp_path / "v1.jsonl").write_text("\n".join(json.dumps(s) for s in (status, extended)) + "\n")
    posts = _posts(tmp_path / "v1.jsonl")
    assert detect(tmp_path / "v1.jsonl") == "v1"
    assert (posts["11"].kind, posts["11"].text) == ("repost", "the original, in full")
    assert (posts["10"].kind, posts["10"].author_id, posts["10"].created_at) == ("post", "7", "2018-10-10T20:19:24+00:00")
    assert (posts["12"].text, posts["12"].kind, posts["12"].in_reply_to_id) == ("cut no more", "reply", "10")

    entries = [{"tweet": {"id_str": "20", "full_text": "from my archive", "lang": "en"}},
               {"tweet": {"id_str": "21", "full_text": "old version", "edit_info": {"initial": {"editTweetIds": ["21", "22"]}}}},
               {"tweet": {"id_str": "23", "full_text": "RT @b: someone else's"}}]
    (tmp_path / "tweets.js").write_text("window.YTD.tweets.part0 = " + json.dumps(entries, indent=2))
    records = _read(tmp_path / "tweets.js")
    assert detect(tmp_path / "tweets.js") == "archive"
    assert [(r.id, r.kind) for r in records if isinstance(r, Post)] == [("20", "post"), ("23", "repost")]
    assert _reasons(records) == ["edited_superseded"]


def test_csv_with_a_text_column(tmp_path):
    (tmp_path / "posts.csv").write_text('id,author_id,text\n1,5,"hello, world"\n2,6,"two\nlines"\n', encoding="utf-8-sig")  # as Excel saves
    (tmp_path / "other.csv").write_text("id,label\n1,0\n")
    posts = _posts(tmp_path / "posts.csv")
    assert (posts["1"].text, posts["1"].author_id, posts["2"].text) == ("hello, world", "5", "two\nlines")
    assert posts["2"].source.endswith("posts.csv:4")  # the line where the record ends
    assert detect(tmp_path / "other.csv") == "table"


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, zstandard.ZstdCompressor().compress])
def test_compressed_files_read_like_plain_ones(tmp_path, compress):
    path = tmp_path / "two_sets"  # no suffix: the magic bytes tell the compression
    path.write_bytes(compress((V2 / "2sets.jsonl").read_bytes()))
    assert detect(path) == "v2"
    fields = lambda records: [(r.id, r.text, r.kind) for r in records]  # noqa: E731
    assert fields(_read(path)) == fields(_read(V2 / "2sets.jsonl"))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, zstandard.ZstdCompressor().compress])
def test_a_truncated_compressed_file_is_counted_malformed_and_keeps_what_came_before(tmp_path, compress):
    lines = (SHARED / "tweeteval/emoji/train_text.txt").read_bytes()  # > one 900 kB bz2 block
    path = tmp_path / "cut.txt.gz"
    data = compress(lines)
    path.write_bytes(data[: len(data) * 2 // 3])
    records = _read(path)
    posts = [r for r in records if isinstance(r, Post)]
    assert _reasons(records) == ["malformed"] and "unreadable after line" in records[-1].detail
    assert records[-1].source == f"{path}:{len(posts) + 1}"
    assert 0 < len(posts) < len(lines.splitlines())


def test_bad_json_line_and_invalid_utf8_are_malformed_with_their_line(tmp_path):
    records = _read(V2 / "streaming_output_with_error.jsonl")
    bad = [r for r in records if isinstance(r, Dropped)]
    assert [(r.reason, r.source.rsplit(":", 1)[1]) for r in bad] == [("malformed", "8")]
    assert sum(isinstance(r, Post) for r in records) == 11  # 7 good lines: their posts and included originals

    (tmp_path / "mixed.txt").write_bytes("first post\n".encode() + b"bad \xff byte\n" + "third post \xe9\n".encode())
    records = _read(tmp_path / "mixed.txt")
    assert [type(r).__name__ for r in records] == ["Post", "Dropped", "Post"]
    assert records[1].source == f"{tmp_path / 'mixed.txt'}:2" and "UTF-8" in records[1].detail


def test_an_empty_file_is_one_malformed_record():
    assert [(r.reason, r.detail) for r in _read(V2 / "empty.json")] == [("malformed", "empty file")]
