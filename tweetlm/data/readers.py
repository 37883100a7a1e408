"""Readers for the post formats real users hold; each yields `Post` or `Dropped` records.

    fmt = detect(path)            # "v2", "v2_flat", "v1", "jsonl", "json", "archive", "csv", "text",
                                  # a NON_POST name ("users", "counts", "binary", ...) or "empty"
    for record in read(path, fmt): ...

Files may be plain, gzip, zstd or bz2 (told apart by their magic bytes, not their names), in
UTF-8, or UTF-16 / UTF-32 with a BOM (read as UTF-8).
Every record read is either a `Post` or a `Dropped` with a reason, so nothing is lost
silently: a bad JSON line, invalid UTF-8, a truncated compressed file, an empty file, or a
post with a NUL or a lone surrogate in a field (data/post.py: `invalid_field`) is a
`Dropped("malformed", "path:line", why)` and reading goes on. Blank lines are not records.
A file is binary, and skipped, when control bytes are more than 1% of its first 64 KiB
(`_binary`); a stray NUL in a text file costs only its record.

Formats (each mapped onto the fields of `Post`, data/post.py):
- API v2 pages (`data` + `includes`, one page per line as twarc writes them; in streaming
  output `data` is one object). Posts in `includes.tweets` (quoted, replied-to and reposted
  originals) are posts too and are yielded once per page. Long posts take their full text from
  `note_tweet`. A repost takes the full text of its original.
- Flattened v2 (twarc flatten: one post per line, referenced posts inline) and any JSON Lines
  file with a `text` field go through the same v2 post parser (missing fields are None).
- API v1.1 statuses (`extended_tweet.full_text`, `full_text`, `text`; `retweeted_status` and
  `quoted_status` are yielded as posts too) and an account archive's `tweets.js`.
- CSV/TSV (by the .csv/.tsv suffix) with a text column; plain text, one post per line
  (TweetEval, XLM-T `*_text.txt`), where id and conversation id are None.
- `.json` documents (a list of records or one page) and archives are parsed whole; the
  `source` of their records is "path:record number". Everything else streams line by line.
Files that hold no posts (NON_POST: users, counts, lists, compliance, label files) are named by
`detect` so the caller can skip them; a users lookup's `includes.tweets` (pinned posts) go with it.

kind: "repost" for a retweet (`referenced_tweets` type retweeted, `retweeted_status`, or text
starting "RT @"), else "reply" (replied_to / in_reply_to_status_id), else "quote", else "post".

Edits: a post whose id is not the last of its own `edit_history_tweet_ids` is an older version
of an edited post and is dropped as "edited_superseded", whether or not the newer version is
in the input (API v2 files normally carry it in `includes`, as edited_before.jsonl does).
Withheld: a post withheld in some countries keeps its text and is kept; one whose text is the
platform's placeholder (`withheld.scope` is "tweet" or "user") or empty is dropped as "withheld".
"""

import bz2
import codecs
import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zstandard

from tweetlm.artifacts.files import find_inputs
from tweetlm.data.post import Kind, Post, invalid_field

# Files that hold no posts: detected and skipped, with these explanations.
NON_POST = {
    "users": "user objects (API v2 users lookup), no posts",
    "counts": "post counts per time bucket (API v2 counts), no posts",
    "lists": "list objects (API v2 lists), no posts",
    "compliance": "compliance events (ids and actions), no posts",
    "labels": "one number per line (a labels or mapping file), no posts",
    "table": "a CSV/TSV file without a text column (text, full_text, tweet or content)",
    "records": "JSON records without post fields (text, full_text, data or tweet)",
    "binary": "binary: over 1% of its first 64 KiB are control bytes (NUL and the other C0 bytes but tab, line breaks, "
              "form feed and escape)",
}
_TEXT_COLUMNS = ("text", "full_text", "tweet", "content")
_LABEL_LINE = re.compile(rb"-?\d+(\t.*)?")
# Truncated or corrupt compressed streams, UTF-16/32 that does not decode (_Utf8Reader), unreadable files.
_READ_ERRORS = (EOFError, OSError, zstandard.ZstdError)
# Byte order marks of the wide encodings read (UTF-32's first: its little-endian BOM starts with UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# C0 control bytes but tab, line feed, vertical tab, form feed, carriage return and escape: text holds next to none.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b")


@dataclass(frozen=True, slots=True)
class Dropped:
    """A record that is not kept as a post, with the reason and where it was read."""

    reason: str
    source: str  # "path:line"
    detail: str = ""
    superseded: str | None = None  # "edited_superseded": the id of the older version that this record is


# ---------------------------------------------------------------- opening and detection


class _Converted(io.RawIOBase):
    """Another stream's bytes, converted a block at a time. Each subclass defines `_more() -> bool`: read and convert
    the next block into self._out (self._pos back to 0), False at the end of the input."""

    def __init__(self, raw):
        self._raw, self._out, self._pos = raw, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos == len(self._out):
            if not self._more():
                return 0
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ZstdReader(_Converted):
    """Decompresses zstd frames one after another; raises EOFError if the input ends inside a
    frame (python-zstandard's stream_reader ends silently there, hiding a truncated file)."""

    def __init__(self, raw):
        super().__init__(raw)
        self._dobj, self._fed = zstandard.ZstdDecompressor().decompressobj(), False

    def _more(self) -> bool:
        chunk = self._raw.read(1 << 16)
        if not chunk:
            if self._fed and not self._dobj.eof:
                raise EOFError("zstd stream ended inside a frame")
            return False
        self._out, self._pos = b"", 0
        while chunk:  # a chunk may end one frame and start the next
            if self._dobj.eof:
                self._dobj, self._fed = zstandard.ZstdDecompressor().decompressobj(), False
            self._out += self._dobj.decompress(chunk)
            self._fed = True
            chunk = self._dobj.unused_data if self._dobj.eof else b""
        return True


class _Utf8Reader(_Converted):
    """UTF-16 or UTF-32 bytes (BOM first) as UTF-8 bytes. A lone surrogate comes out as bytes that are not UTF-8, so
    its line is malformed like any invalid UTF-8; bytes that decode to nothing (a cut last code unit, a code point
    past U+10FFFF) end the stream with an OSError, which the readers count as a malformed record."""

    def __init__(self, raw, encoding: str):
        super().__init__(raw)
        self._encoding, self._done = encoding, False
        self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")  # it drops the BOM

    def _more(self) -> bool:
        if self._done:
            return False
        chunk = self._raw.read(1 << 16)
        self._done = not chunk
        try:
            text = self._decoder.decode(chunk, final=self._done)
        except UnicodeDecodeError as e:
            raise OSError(f"invalid {self._encoding.upper()}: {e.reason}") from None
        self._out, self._pos = text.encode("utf-8", "surrogatepass"), 0
        return True


def _decompressed(path: Path) -> io.BufferedIOBase:
    """The decompressed bytes of a file, whatever its compression."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\x28\xb5\x2f\xfd":
        return io.BufferedReader(_ZstdReader(open(path, "rb")), buffer_size=1 << 16)
    return open(path, "rb")


def _open(path: Path) -> io.BufferedIOBase:
    """The decompressed bytes of a file, as UTF-8 when the text is UTF-16 or UTF-32 (told by its BOM)."""
    f = _decompressed(path)
    try:
        head = f.peek(4)[:4]
    except BaseException:
        f.close()
        raise
    encoding = next((encoding for bom, encoding in _BOMS if head.startswith(bom)), None)
    return io.BufferedReader(_Utf8Reader(f, encoding), buffer_size=1 << 16) if encoding else f


def _suffix(path: Path) -> str:
    """The format suffix under any compression suffix: tweets.csv.gz -> .csv."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".gzip", ".zst", ".zstd", ".bz2")]
    return suffixes[-1] if suffixes else ""


def detect(path: Path) -> str:
    """The format of a file from its first bytes after decompression (see the module docstring)."""
    head = first = b""
    try:
        with _open(path) as f:
            head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
            first = head.lstrip().split(b"\n", 1)[0]
            if b"\n" not in head.lstrip() and first:
                first += f.readline(16 << 20)  # an API v2 page is one line of up to megabytes
    except _READ_ERRORS:  # sniff what could be read; the reader reports where the stream breaks
        if not head.strip():
            return "text"
    if not head.strip():
        return "empty"
    if _binary(head):
        return "binary"
    text = head.lstrip()
    if text.startswith(b"window.YTD."):
        return "archive"
    if _suffix(path) in (".csv", ".tsv"):
        header = first.decode("utf-8", "replace").lower()
        return "csv" if any(c in _TEXT_COLUMNS for c in re.split(r"[,\t]", header.replace('"', ""))) else "table"
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        try:
            return _record_format(json.loads(first)) or "records"
        except ValueError:  # a pretty-printed document, or a first line that is bad JSON
            return "json" if _suffix(path) == ".json" else "jsonl"
    lines = [ln.strip() for ln in text.split(b"\n")[:20] if ln.strip()]
    if all(_LABEL_LINE.fullmatch(ln) for ln in lines[:-1] or lines):  # the last line may be cut
        return "labels"
    return "text"


def _binary(head: bytes) -> bool:
    """Whether the first 64 KiB of a file are binary: control bytes (_CONTROL) are more than 1% of them, and more
    than 40 (so that one stray NUL does not make a small file binary). Measured on 43 binary files (PNG, JPEG,
    GIF, PDF, zip, Parquet, SQLite, .so, .pyc, .mo): 2% (a PDF) to 94% (SQLite); random bytes 10.5%; every file of
    ../shared/data 0%. A text file with a few NULs stays text and loses only the records holding them."""
    control = len(head) - len(head.translate(None, _CONTROL))
    return control > max(len(head), 4096) // 100


def post_files(inputs: tuple[str, ...]) -> tuple[list[tuple[Path, str]], list[dict]]:
    """The files of the inputs (paths, folders, globs: artifacts.files.find_inputs) that hold posts, as (path,
    format), and those that do not, as {"file", "format", "why"}: files of a NON_POST format, and the named pipes,
    sockets and broken links of the folders and globs (format None)."""
    paths, others = find_inputs(inputs)
    files, skipped = [], []
    for path in paths:
        fmt = detect(path)
        if fmt in NON_POST:
            skipped.append({"file": str(path), "format": fmt, "why": NON_POST[fmt]})
        else:
            files.append((path, fmt))
    skipped += [{"file": str(path), "format": None, "why": f"{what}, not a file: not read"} for path, what in others]
    return files, skipped


def _record_format(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "data" in obj:
        data = obj["data"]
        item = (data[0] if data else {}) if isinstance(data, list) else data
        if not isinstance(item, dict) or "text" in item or not item:
            return "v2"
        for name, key in (("users", "username"), ("counts", "tweet_count"), ("lists", "member_count")):
            if key in item:
                return name
        return None
    if "action" in obj and "reason" in obj and "text" not in obj:
        return "compliance"
    if isinstance(obj.get("tweet"), dict) or any(k in obj for k in ("id_str", "full_text", "user", "retweeted_status")):
        return "v1"
    if "text" in obj:
        v2_keys = ("author_id", "edit_history_tweet_ids", "referenced_tweets", "__twarc")
        return "v2_flat" if any(k in obj for k in v2_keys) else "jsonl"
    return None


# ---------------------------------------------------------------- reading


def read(path: Path, fmt: str) -> Iterator[Post | Dropped]:
    """Every record of a file of format `fmt` (from `detect`), as Post or Dropped."""
    if fmt == "empty":
        yield Dropped("malformed", f"{path}:0", "empty file")
    elif fmt in ("v2", "v2_flat", "v1", "jsonl"):
        yield from _read_json_lines(path)
    elif fmt in ("json", "archive"):
        yield from _read_json_document(path, archive=fmt == "archive")
    elif fmt == "csv":
        yield from _read_csv(path)
    elif fmt == "text":
        yield from _read_text(path)
    else:
        raise AssertionError(f"no reader for format {fmt!r} of {path}")


def _lines(path: Path) -> Iterator[tuple[int, bytes | Dropped]]:
    """(line number, bytes) for each line; a Dropped where a compressed stream breaks off."""
    n = 0
    try:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                yield n, line
    except _READ_ERRORS as e:
        yield n + 1, Dropped("malformed", f"{path}:{n + 1}", f"unreadable after line {n}: {e}")


def _read_json_lines(path: Path) -> Iterator[Post | Dropped]:
    for n, line in _lines(path):
        if isinstance(line, Dropped):
            yield line
        elif line.strip():
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
                yield Dropped("malformed", f"{path}:{n}", f"{type(e).__name__}: {e}"[:200])
                continue
            yield from _records(obj, f"{path}:{n}")


def _read_json_document(path: Path, *, archive: bool) -> Iterator[Post | Dropped]:
    try:
        with _open(path) as f:
            content = f.read()
        if archive:  # "window.YTD.tweets.part0 = [ ... ]"
            content = content.partition(b"=")[2]
        doc = json.loads(content)
    except _READ_ERRORS as e:
        yield Dropped("malformed", f"{path}:0", f"unreadable: {e}")
        return
    except ValueError as e:
        yield Dropped("malformed", f"{path}:{getattr(e, 'lineno', 0)}", f"{type(e).__name__}: {e}"[:200])
        return
    for i, obj in enumerate(doc if isinstance(doc, list) else [doc], 1):
        yield from _records(obj, f"{path}:{i}")


def _read_text(path: Path) -> Iterator[Post | Dropped]:
    for n, line in _lines(path):
        if isinstance(line, Dropped):
            yield line
            continue
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            yield Dropped("malformed", f"{path}:{n}", f"invalid UTF-8: {e}")
            continue
        if text:
            yield _post(id=None, text=text, source=f"{path}:{n}")


def _read_csv(path: Path) -> Iterator[Post | Dropped]:
    dialect, line = ("excel-tab" if _suffix(path) == ".tsv" else "excel"), 0
    try:
        with io.TextIOWrapper(_open(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            rows = csv.DictReader(f, dialect=dialect)
            header = {name.strip().lower(): name for name in rows.fieldnames or ()}
            column = {key: header.get(key) for key in ("id", "created_at", "author_id", "lang", "conversation_id")}
            text_column = next(header[c] for c in _TEXT_COLUMNS if c in header)
            reply_column = header.get("in_reply_to_id") or header.get("referenced_tweets.replied_to.id")
            for row in rows:
                line = rows.line_num
                source = f"{path}:{line}"
                try:
                    "\x1f".join(v for v in row.values() if isinstance(v, str)).encode("utf-8")
                except UnicodeEncodeError as e:  # surrogateescape marks the invalid bytes
                    yield Dropped("malformed", source, f"invalid UTF-8: {e}")
                    continue
                fields = {key: row.get(name) or None for key, name in column.items() if name}
                reply_to = (row.get(reply_column) if reply_column else None) or None
                yield _post(**fields, text=row.get(text_column) or "", in_reply_to_id=reply_to,
                            kind="reply" if reply_to else None, source=source)
    except (*_READ_ERRORS, csv.Error) as e:  # the rest of the file cannot be parsed
        yield Dropped("malformed", f"{path}:{line + 1}", f"unreadable CSV after line {line}: {e}")


# ---------------------------------------------------------------- records -> posts


def _records(obj, source: str) -> Iterator[Post | Dropped]:
    """The posts in one JSON record (a v2 page, a v2 or v1.1 post, an archive entry)."""
    fmt = _record_format(obj)
    if fmt == "v2":
        yield from _v2_page(obj, source)
    elif fmt == "v1":
        yield from _v1_posts(obj.get("tweet", obj), source)
    elif fmt in ("v2_flat", "jsonl"):  # referenced posts inline: a page of one post
        inline = [r for r in obj.get("referenced_tweets") or () if isinstance(r, dict) and "text" in r]
        yield from _v2_page({"data": obj, "includes": {"tweets": inline}}, source)
    else:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        yield Dropped("malformed", source, f"no post in this record ({fmt or 'unknown'}: {keys})")


def _v2_page(page: dict, source: str) -> Iterator[Post | Dropped]:
    data = page.get("data")
    posts = data if isinstance(data, list) else [data]
    included = {t.get("id"): t for t in (page.get("includes") or {}).get("tweets") or () if isinstance(t, dict)}
    in_data = {t.get("id") for t in posts if isinstance(t, dict)}
    # Originals first: a kept repost (--keep-reposts) then goes as a duplicate of its original.
    for t in included.values():
        if t.get("id") not in in_data:
            yield _v2_post(t, included, source)
    for t in posts:
        yield _v2_post(t, included, source)


def _v2_text(t: dict) -> str:
    note = t.get("note_tweet")
    return (note.get("text") if isinstance(note, dict) else None) or t.get("text") or ""


def _v2_post(t, included: dict, source: str) -> Post | Dropped:
    if not isinstance(t, dict) or not isinstance(t.get("text"), str):
        return Dropped("malformed", source, "a post without a text field")
    edits = t.get("edit_history_tweet_ids")
    if edits and edits[-1] != t.get("id"):
        return Dropped("edited_superseded", source, f"{t.get('id')} was edited into {edits[-1]}", superseded=t.get("id"))
    text = _v2_text(t)
    withheld = t.get("withheld")
    if withheld and (withheld.get("scope") or not text.strip()):
        return Dropped("withheld", source, f"{t.get('id')} withheld ({withheld.get('scope', 'no text')})")
    refs = {r.get("type"): r for r in t.get("referenced_tweets") or () if isinstance(r, dict)}
    kind = "repost" if "retweeted" in refs else "reply" if "replied_to" in refs else "quote" if "quoted" in refs else None
    if kind == "repost":  # the post's own text is "RT @user: " and a truncated copy
        original_id = refs["retweeted"].get("id")
        original = included.get(original_id) or refs["retweeted"]
        text = _v2_text(original) or text
    return _post(id=t.get("id"), text=text, created_at=t.get("created_at"), author_id=t.get("author_id"),
                 lang=t.get("lang"), conversation_id=t.get("conversation_id"),
                 in_reply_to_id=refs.get("replied_to", {}).get("id"), kind=kind, source=source)


def _v1_text(s: dict) -> str:
    extended = s.get("extended_tweet")
    return (extended.get("full_text") if isinstance(extended, dict) else None) or s.get("full_text") or s.get("text") or ""


def _v1_id(s: dict) -> str | None:
    return s.get("id_str") or (str(s["id"]) if s.get("id") is not None else None)


def _v1_edit_ids(s: dict) -> list:
    """The archive's edit history: edit_info.initial.editTweetIds or edit_info.edit.editControlInitial."""
    info = s.get("edit_info") or {}
    initial = info.get("initial") or (info.get("edit") or {}).get("editControlInitial") or {}
    return initial.get("editTweetIds") or []


def _v1_posts(s, source: str) -> Iterator[Post | Dropped]:
    if not isinstance(s, dict):
        yield Dropped("malformed", source, "a status that is not an object")
        return
    edits = _v1_edit_ids(s)
    if edits and edits[-1] != _v1_id(s):
        yield Dropped("edited_superseded", source, f"{_v1_id(s)} was edited into {edits[-1]}", superseded=_v1_id(s))
        return
    reposted, quoted = s.get("retweeted_status"), s.get("quoted_status")
    reply_to = s.get("in_reply_to_status_id_str") or None
    kind = "repost" if reposted else "reply" if reply_to else "quote" if quoted or s.get("is_quote_status") else None
    user = s.get("user") if isinstance(s.get("user"), dict) else {}
    created = s.get("created_at")
    try:  # v1.1 and archives write "Wed Oct 10 20:19:24 +0000 2018"; the corpus holds ISO 8601
        created = datetime.strptime(created, "%a %b %d %H:%M:%S %z %Y").isoformat()
    except (TypeError, ValueError):
        pass
    yield _post(id=_v1_id(s), text=_v1_text(reposted if isinstance(reposted, dict) else s), created_at=created,
                author_id=user.get("id_str"), lang=s.get("lang"), conversation_id=None,
                in_reply_to_id=reply_to, kind=kind, source=source)
    for original in (reposted, quoted):
        if isinstance(original, dict):
            yield from _v1_posts(original, source)


def _post(*, text: str, source: str, id=None, created_at=None, author_id=None, lang=None, conversation_id=None,
          in_reply_to_id=None, kind: Kind | None = None) -> Post | Dropped:
    """A Post, or a malformed Dropped when a field cannot be kept (a NUL, a lone surrogate: post.invalid_field);
    every reader builds its posts here. kind defaults to "repost" for text starting "RT @" (old clients, archives,
    plain text)."""
    if not isinstance(text, str):  # a JSON record's text may be any value
        return Dropped("malformed", source, f"text is {type(text).__name__}, not a string")
    if kind is None:
        kind = "repost" if text.startswith("RT @") else "post"
    post = Post(id=_str(id), text=text, created_at=_str(created_at), author_id=_str(author_id), lang=_str(lang),
                conversation_id=_str(conversation_id), in_reply_to_id=_str(in_reply_to_id), kind=kind, source=source)
    why = invalid_field(post)
    return post if why is None else Dropped("malformed", source, why)


def _str(value) -> str | None:
    """Ids are strings in the corpus; a generic JSONL file may hold them as numbers."""
    return value if value is None or isinstance(value, str) else str(value)
