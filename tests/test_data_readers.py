"""Readers: every real format detected and read into Posts, bad input counted with file and line."""

import bz2
import gzip
import json
import os
import random
import shutil
import socket
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
import zstandard

from tweetlm.data.post import Post
from tweetlm.data.readers import NON_POST, Dropped, detect, post_files, read
from tweetlm.errors import UserError

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


LONE = "\ud800"  # half a surrogate pair: valid JSON ("\\ud800"), but no UTF-8 can hold it


def _plain_posts(n: int) -> list[dict]:
    """Real posts of flat.jsonl that carry no inline referenced posts (one post per line)."""
    rows = [json.loads(line) for line in (V2 / "flat.jsonl").read_text().splitlines()]
    return [t for t in rows if "referenced_tweets" not in t][:n]


def _malformed(records) -> list[tuple[str, str]]:
    return [(r.source.rsplit(":", 1)[1], r.detail) for r in records if isinstance(r, Dropped)]


@pytest.mark.parametrize("field", ["id", "text", "author_id", "conversation_id", "lang", "created_at", "in_reply_to_id"])
def test_a_lone_surrogate_in_any_field_is_malformed_with_its_line_and_field(tmp_path, field):
    first, bad, last = _plain_posts(3)
    if field == "in_reply_to_id":
        bad["referenced_tweets"] = [{"type": "replied_to", "id": "1" + LONE}]
    else:
        bad[field] = (bad.get(field) or "x") + LONE
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in (first, bad, last)))  # json.dumps escapes it: "\\ud800"
    records = _read(path)
    (line, why), = _malformed(records)
    assert line == "2" and field in why and "surrogate" in why
    assert [r.id for r in records if isinstance(r, Post)] == [first["id"], last["id"]]


def test_a_lone_surrogate_or_a_nul_costs_only_its_record_in_every_format(tmp_path):
    a, b, c = _plain_posts(3)
    texts = (SHARED / "tweeteval/irony/val_text.txt").read_text(encoding="utf-8").splitlines()[:3]

    def v1(t, **kw):
        return {"id_str": t["id"], "full_text": t["text"], "user": {"id_str": t["author_id"]}, "lang": t["lang"], **kw}

    jsonl = lambda *objs: "".join(json.dumps(o) + "\n" for o in objs).encode()
    cases = {  # file: (bytes, [(record, field) of the malformed ones], posts kept)
        "page.jsonl": (jsonl({"data": [a, b | {"author_id": "9" + LONE}]}, {"data": [c | {"text": "a NUL \x00 here"}]}),
                       [("1", "author_id"), ("2", "text")], 1),
        "v1.jsonl": (jsonl(v1(a), v1(b, user={"id_str": "7" + LONE}), v1(c, full_text="a NUL \x00 here")),
                     [("2", "author_id"), ("3", "text")], 1),
        "tweets.js": (b"window.YTD.tweets.part0 = " + json.dumps(
            [{"tweet": v1(a)}, {"tweet": v1(b, in_reply_to_status_id_str="1" + LONE)}, {"tweet": v1(c, lang="e\x00")}]).encode(),
            [("2", "in_reply_to_id"), ("3", "lang")], 1),
        "document.json": (json.dumps([a, b | {"created_at": "2021" + LONE}, c | {"conversation_id": "1\x00"}]).encode(),
                          [("2", "created_at"), ("3", "conversation_id")], 1),
        "posts.csv": (("id,text\n" + f"1,{texts[0]}\n2,a NUL \x00 here\n3,{texts[2]}\n").encode(), [("3", "text")], 2),
        "posts.txt": (f"{texts[0]}\na NUL \x00 here\n{texts[2]}\n".encode(), [("2", "text")], 2),
    }
    for name, (content, expected, kept) in cases.items():
        (tmp_path / name).write_bytes(content)
        records = _read(tmp_path / name)
        malformed = _malformed(records)
        assert [line for line, _ in malformed] == [line for line, _ in expected], (name, malformed)
        for (_, why), (_, field) in zip(malformed, expected):
            assert field in why and ("surrogate" in why or "NUL" in why), (name, why)
        posts = [r for r in records if isinstance(r, Post)]
        assert len(posts) == kept and not any("\x00" in p.text for p in posts), name


def _png(width: int = 64, height: int = 64) -> bytes:
    """A real PNG (random pixels): compressed bytes, where about 1 byte in 10 is a control byte."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + random.Random(0).randbytes(3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_nul_costs_its_record_only_and_binary_files_are_still_skipped(tmp_path):
    texts = (SHARED / "tweeteval/irony/val_text.txt").read_text(encoding="utf-8").splitlines()
    rows = [f'{i},"{t.replace(chr(34), "")}"' for i, t in enumerate(texts[:5], 1)]
    rows[1] = rows[1][:12] + "\x00" + rows[1][12:]  # one NUL near the start of the file
    (tmp_path / "five.csv").write_text("id,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert detect(tmp_path / "five.csv") == "csv"
    records = _read(tmp_path / "five.csv")
    assert [r.id for r in records if isinstance(r, Post)] == ["1", "3", "4", "5"]
    assert [line for line, _ in _malformed(records)] == ["3"]

    deep = texts + ["a NUL \x00 far past the first 64 KiB"] + texts[:3]  # 76 kB of real posts first
    (tmp_path / "deep.txt").write_text("\n".join(deep) + "\n", encoding="utf-8")
    records = _read(tmp_path / "deep.txt")
    assert [line for line, _ in _malformed(records)] == [str(len(texts) + 1)]
    assert sum(isinstance(r, Post) for r in records) == len(texts) + 3

    (tmp_path / "photo.jpg").write_bytes(_png())  # an image saved without compression, under any name
    with sqlite3.connect(tmp_path / "posts.db") as db:  # a database of real posts
        db.execute("CREATE TABLE posts (text TEXT)")
        db.executemany("INSERT INTO posts VALUES (?)", [(t,) for t in texts])
    db.close()
    files, skipped = post_files((str(tmp_path),))
    assert {p.name for p, _ in files} == {"five.csv", "deep.txt"}
    assert {Path(s["file"]).name: s["format"] for s in skipped} == {"photo.jpg": "binary", "posts.db": "binary"}
    assert all("control bytes" in s["why"] for s in skipped)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_utf16_and_utf32_files_with_a_bom_read_like_utf8(tmp_path, encoding):
    texts = (SHARED / "xlm-t/french/val_text.txt").read_text(encoding="utf-8").splitlines()[:50]
    originals = {"posts.txt": "\n".join(texts) + "\n", "two_tweets.jsonl": (V2 / "two_tweets.jsonl").read_text(encoding="utf-8"),
                 "posts.csv": "id,text\n" + "".join(f'{i},"{t.replace(chr(34), "")}"\n' for i, t in enumerate(texts))}
    fields = lambda records: [(r.id, r.text, r.kind) if isinstance(r, Post) else r for r in records]
    for name, text in originals.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        data = ("\ufeff" + text).encode(encoding) if encoding.endswith("-be") else text.encode(encoding)  # with its BOM
        for wide in (tmp_path / f"wide-{name}", tmp_path / f"wide-{name}.gz"):
            wide.write_bytes(gzip.compress(data) if wide.suffix == ".gz" else data)
            assert detect(wide) == detect(tmp_path / name), wide.name
            assert fields(_read(wide)) == fields(_read(tmp_path / name)), wide.name


def test_special_files_in_a_folder_are_skipped_with_why_and_a_fifo_given_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(V2 / "kpop.jsonl", folder / "kpop.jsonl")
    os.mkfifo(folder / "pipe.jsonl")
    (folder / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (folder / "more").symlink_to(V2, target_is_directory=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.sock"))
    try:
        files, skipped = post_files((str(folder),))
    finally:
        sock.close()
    assert files == [(folder / "kpop.jsonl", "v2")]
    why = {Path(s["file"]).name: s["why"] for s in skipped}
    assert set(why) == {"pipe.jsonl", "gone.jsonl", "more", "s.sock"}
    assert "named pipe" in why["pipe.jsonl"] and "deleted.jsonl" in why["gone.jsonl"] and "socket" in why["s.sock"]
    assert "folder" in why["more"]
    with pytest.raises(UserError, match="named pipe"):  # read once to detect, a pipe cannot be read again
        post_files((str(folder / "pipe.jsonl"),))
    with pytest.raises(UserError, match="deleted.jsonl"):
        post_files((str(folder / "gone.jsonl"),))


def test_a_text_that_is_not_a_string_is_malformed_not_a_crash(tmp_path):
    a, b = _plain_posts(2)
    lines = [{"id_str": "1", "full_text": 5, "user": {}}, {"id_str": "2", "full_text": a["text"], "user": {}},
             b | {"note_tweet": {"text": ["not", "text"]}}]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    records = _read(tmp_path / "odd.jsonl")
    assert [(line, "not a string" in why) for line, why in _malformed(records)] == [("1", True), ("3", True)]
    assert [r.id for r in records if isinstance(r, Post)] == ["2"]
