"""The posts index: SQLite FTS5 in one file on disk, ranked by BM25 with a recency boost.

    index = Index("work/posts.db")            # once per process: one writer and many reader threads
    index.add(posts)                          # Posts; re-adding an id updates it -> {"added", "updated", ...}
    index.search("brexit vote", since="7d")   # -> [{"id", "text", "created_at", ..., "score"}], best first
    index.get(["1250403528197263360"]), index.count

    tweetlm index add ../shared/data/twitter-api-v2 --index work/posts.db
    tweetlm search 'garage tools' --index work/posts.db --since 2020-04-01 --limit 5

Schema (version 1 in PRAGMA user_version; docs/CONTRACTS.md): a plain `posts` table keyed by post id, and
`posts_fts`, an external-content FTS5 table over `posts.body` kept in step by triggers. `body` is what is
searched: the text normalized as `data prepare` does (HTML entities, links -> "http") but with @handles kept, so
a handle can be searched; `text` is the post as read, for display. WAL journal: readers never block the writer
and see only committed batches; a second writing process waits on SQLite's lock (busy_timeout).

Ranking: score = -bm25 * (1 + recency * 2^(-age / half_life)), age = now - created_at (0 for future posts),
so a post from now weighs up to (1 + recency) times an equally matching old one (defaults 1 and 24 hours);
ties go to the newer post. Query words are ORed, each quoted, so no input is FTS5 syntax.
Speed at 1M posts (bench/search.py): FTS5 computes bm25 for every row a query matches, and "the" matches a
third of all posts. So the rarest query terms are kept while their matches add up to at most CANDIDATES
(the common ones add little to bm25 anyway); if even the rarest matches more, the newest CANDIDATES matching
posts are ranked. The best RERANK by bm25 are then reordered with the recency boost.
"""

import hashlib
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from tweetlm.artifacts.text import normalize
from tweetlm.data.post import Post
from tweetlm.data.readers import post_files, read
from tweetlm.errors import UserError

SCHEMA_VERSION = 1
CANDIDATES = 10_000  # matching rows a query ranks by bm25 at most: ~10 ms (bench/search.py, 1M posts)
RERANK = 200  # best rows by bm25 that the recency boost may reorder
HALF_LIFE = 24 * 3600.0  # seconds: a day-old post gets half the boost of a new one
RECENCY = 1.0  # a post from now scores up to (1 + RECENCY) times an old one with the same bm25
MAX_LIMIT = 1000
_MAX_TERMS = 32
_FIELDS = ("id", "text", "created_at", "author_id", "lang", "conversation_id", "in_reply_to_id", "kind", "source")
_COUNTS = ("read", "added", "updated", "unchanged", "removed")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS posts (
    pk INTEGER PRIMARY KEY,        -- FTS5 rowid; grows with each new post
    id TEXT NOT NULL UNIQUE,       -- the post id; "text:<hash>" for posts without one (plain text)
    text TEXT NOT NULL,            -- as read, for display
    body TEXT NOT NULL,            -- what is searched (module docstring)
    created_at INTEGER,            -- unix seconds, UTC; NULL when the source has none
    author_id TEXT, lang TEXT, conversation_id TEXT, in_reply_to_id TEXT, kind TEXT, source TEXT
);
-- --since reads created_at of up to CANDIDATES rows: from this covering index in ~half the time of the wide rows
CREATE INDEX IF NOT EXISTS posts_time ON posts(pk, created_at);
CREATE VIRTUAL TABLE IF NOT EXISTS posts_fts USING fts5(
    body, content='posts', content_rowid='pk', tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS posts_ai AFTER INSERT ON posts BEGIN
    INSERT INTO posts_fts(rowid, body) VALUES (new.pk, new.body);
END;
CREATE TRIGGER IF NOT EXISTS posts_ad AFTER DELETE ON posts BEGIN
    INSERT INTO posts_fts(posts_fts, rowid, body) VALUES ('delete', old.pk, old.body);
END;
CREATE TRIGGER IF NOT EXISTS posts_au AFTER UPDATE OF body ON posts WHEN old.body IS NOT new.body BEGIN
    INSERT INTO posts_fts(posts_fts, rowid, body) VALUES ('delete', old.pk, old.body);
    INSERT INTO posts_fts(rowid, body) VALUES (new.pk, new.body);
END;
PRAGMA user_version = {SCHEMA_VERSION};
"""

# Re-adding an id replaces the stored post if anything but its source differs, unless the stored one is newer
# (an edit that keeps its id, delivered out of order, is not undone by the older version).
_UPSERT = f"""
INSERT INTO posts (id, text, body, created_at, author_id, lang, conversation_id, in_reply_to_id, kind, source)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in ("text", "body", *_FIELDS[2:]))}
WHERE (excluded.created_at IS NULL OR posts.created_at IS NULL OR excluded.created_at >= posts.created_at)
  AND ({" OR ".join(f"posts.{c} IS NOT excluded.{c}" for c in _FIELDS[1:-1])})
"""


class Index:
    """One index file, opened once per process. `add` and `remove` are serialized (one writer); `search`,
    `get` and `count` may run in any number of threads at once, each on its own connection."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"no index at {self.path}: make one with `tweetlm index add POSTS... --index {self.path}`")
        self._lock = threading.Lock()  # guards the writer and the list of connections
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot make the folder of the index {self.path}: {e.strerror or e}") from None
        self._writer = self._connect()
        try:
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._writer.execute("PRAGMA journal_mode = WAL")  # stored in the file: every later opening uses it
                self._writer.executescript(_SCHEMA)
            elif version != SCHEMA_VERSION:
                raise UserError(f"{self.path} is a version {version} index; this tweetlm reads version {SCHEMA_VERSION}: "
                                "rebuild it with `tweetlm index add`")
        except sqlite3.DatabaseError as e:
            self.close()
            raise UserError(f"cannot open the index {self.path}: {e}; pass a file made by `tweetlm index add`") from None

    def _connect(self) -> sqlite3.Connection:
        conn = None
        try:
            # Autocommit mode (isolation_level=None): add() opens its own transaction, readers hold none.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous = NORMAL")  # in WAL, durable at checkpoints; never corrupt
            conn.execute("PRAGMA cache_size = -65536")  # 64 MB per connection
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            raise UserError(f"cannot open the index {self.path}: {e}; pass a file made by `tweetlm index add`") from None
        with self._lock:
            self._connections.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ writing

    def add(self, posts: Iterable[Post], *, replaces: Iterable[str] = ()) -> dict:
        """Adds or updates posts in one transaction, and removes the ids in `replaces` (older versions of
        edited posts). Reposts and posts with no text are skipped. Returns the counts."""
        rows, skipped = [], {"repost": 0, "empty": 0}
        for post in posts:
            row = _row(post)
            if isinstance(row, str):
                skipped[row] += 1
            else:
                rows.append(row)
        gone = [(i,) for i in sorted(set(replaces) - {row[0] for row in rows})]
        with self._lock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                (last,) = conn.execute("SELECT coalesce(max(pk), 0) FROM posts").fetchone()
                changed = conn.executemany(_UPSERT, rows).rowcount if rows else 0
                (added,) = conn.execute("SELECT count(*) FROM posts WHERE pk > ?", (last,)).fetchone()
                removed = conn.executemany("DELETE FROM posts WHERE id = ?", gone).rowcount if gone else 0
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise UserError(f"cannot write to the index {self.path}: {e} (another writer? a full disk?)") from None
        return {"added": added, "updated": changed - added, "unchanged": len(rows) - changed, "removed": removed,
                "skipped": skipped}

    def remove(self, ids: Iterable[str]) -> int:
        """Removes posts by id; returns how many there were."""
        return self.add((), replaces=ids)["removed"]

    # ------------------------------------------------------------ reading

    @property
    def count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM posts").fetchone()[0]

    def get(self, ids: Iterable[str]) -> list[dict]:
        """The stored posts with these ids, in the order asked; unknown ids are left out."""
        ids = list(dict.fromkeys(ids))
        found = {}
        for start in range(0, len(ids), 500):  # SQLite caps the variables in one statement
            chunk = ids[start:start + 500]
            sql = f"SELECT {', '.join(_FIELDS)} FROM posts WHERE id IN ({', '.join('?' * len(chunk))})"
            found.update((row[0], _post_dict(row)) for row in self._reader().execute(sql, chunk))
        return [found[i] for i in ids if i in found]

    def search(self, query: str, *, since: str | float | None = None, limit: int = 10, now: float | None = None,
               half_life: float = HALF_LIFE, recency: float = RECENCY) -> list[dict]:
        """The best `limit` posts for `query` (module docstring), each with its `score`. `since`: ISO date or
        time, a duration back from now ("24h", "7d"), or unix seconds; `half_life` in seconds."""
        if not 1 <= limit <= MAX_LIMIT:
            raise UserError(f"limit must be between 1 and {MAX_LIMIT} (got {limit})")
        if half_life <= 0 or recency < 0:
            raise UserError(f"half_life must be > 0 and recency >= 0 (got {half_life}, {recency})")
        now = time.time() if now is None else now
        start = None if since is None else parse_since(since, now=now)
        terms = _terms(query)
        if not terms:
            raise UserError(f"the query {query[:80]!r} has no words to search for")
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot for the term counts and the ranking
        try:
            match = _match(conn, terms)
            candidates = _candidates(conn, match, start)
            rows = conn.execute(f"SELECT pk, {', '.join(_FIELDS)} FROM posts WHERE pk IN "
                                f"({', '.join('?' * len(candidates))})", list(candidates)).fetchall()
        finally:
            conn.execute("COMMIT")
        hits = []
        for pk, *fields in rows:
            created = fields[2]
            boost = 0.0 if created is None else recency * 2.0 ** (-max(now - created, 0.0) / half_life)
            hits.append((-candidates[pk] * (1.0 + boost), created or 0, -pk, fields))
        hits.sort(reverse=True)
        return [_post_dict(fields) | {"score": round(score, 6)} for score, _, _, fields in hits[:limit]]


# ---------------------------------------------------------------- the verbs


def add_files(inputs: tuple[str, ...], index_path: Path, *, batch: int = 20_000) -> dict:
    """`tweetlm index add`: every post of the inputs (any format `data prepare` reads) into the index, one
    transaction per `batch` posts. An edited post's older versions in the inputs are removed from the index.
    Prints and returns the counts; every record read is added, updated, unchanged, skipped or dropped."""
    start = time.perf_counter()
    tasks, skipped_files = post_files(inputs)
    if not tasks:
        raise UserError(f"none of the {len(skipped_files)} input files holds posts; see `tweetlm index add --help`")
    totals = Counter()
    bar = tqdm(unit=" posts", unit_scale=True, file=sys.stderr, disable=None, desc="index add")
    with Index(index_path) as index, bar:
        posts, replaces = [], []

        def flush():
            counts = index.add(posts, replaces=replaces)
            totals.update(counts.pop("skipped"))
            totals.update(counts)
            bar.update(len(posts))
            posts.clear(), replaces.clear()

        for path, fmt in tasks:
            for record in read(path, fmt):
                totals["read"] += 1
                if isinstance(record, Post):
                    posts.append(record)
                    if len(posts) == batch:
                        flush()
                else:
                    totals[record.reason] += 1
                    if record.superseded:
                        replaces.append(record.superseded)
        flush()
        total = index.count
    seconds = time.perf_counter() - start
    report = {k: totals[k] for k in _COUNTS} | {
        "dropped": {r: n for r, n in sorted(totals.items()) if r not in _COUNTS and n},
        "skipped_files": skipped_files, "posts_in_index": total, "seconds": round(seconds, 3),
        "posts_per_s": round(totals["read"] / seconds, 1)}
    accounted = report["added"] + report["updated"] + report["unchanged"] + sum(report["dropped"].values())
    assert report["read"] == accounted, f"{report['read']} records read, {accounted} accounted for: {report}"
    print(f"index add: {report['read']:,} read -> {report['added']:,} added, {report['updated']:,} updated, "
          f"{report['unchanged']:,} unchanged, {report['removed']:,} older versions removed in {seconds:.1f} s "
          f"({report['posts_per_s']:,.0f} posts/s); {total:,} posts in {index_path}")
    if report["dropped"]:
        print("  not added  " + "  ".join(f"{k} {v:,}" for k, v in report["dropped"].items()))
    for f in skipped_files:
        print(f"  skipped    {f['file']}: {f['why']}")
    return report


def format_hits(hits: list[dict]) -> str:
    """Search results for a terminal: score, time, id and author, then the text."""
    lines = []
    for hit in hits:
        lines.append(f"{hit['score']:8.3f}  {hit['created_at'] or '-':<20}  {hit['id']}  author {hit['author_id'] or '-'}")
        lines.append("          " + hit["text"].replace("\n", "\n          "))
    return "\n".join(lines) if lines else "no posts found"


# ---------------------------------------------------------------- helpers


def _row(post: Post) -> tuple | str:
    """The posts table's row for a Post, or why it is skipped."""
    if post.kind == "repost":
        return "repost"  # its text is its original's, which the readers yield too
    body = normalize(post.text, mentions=False)
    if not body:
        return "empty"
    key = post.id or "text:" + _text_key(body)
    return (key, post.text, body, to_unix(post.created_at), post.author_id, post.lang, post.conversation_id,
            post.in_reply_to_id, post.kind, post.source)


def _text_key(body: str) -> str:
    return hashlib.blake2b(body.encode(), digest_size=8).hexdigest()


def to_unix(created_at: str | None) -> int | None:
    """ISO 8601 (as the readers give it; no zone means UTC) -> unix seconds; None if absent or unreadable."""
    if not created_at:
        return None
    try:
        moment = datetime.fromisoformat(created_at)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _iso(seconds: int | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _post_dict(fields) -> dict:
    post = dict(zip(_FIELDS, fields))
    post["created_at"] = _iso(post["created_at"])
    return post


def parse_duration(text: str) -> float:
    """Seconds in "30s", "90m", "24h", "7d", "2w"."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise UserError(f"{text!r} is not a duration: write a number and s, m, h, d or w (90m, 24h, 7d)")
    return float(m[1]) * _SECONDS[m[2]]


def parse_since(since: str | float, *, now: float) -> float:
    """Unix seconds from an ISO date or time ("2024-05-01", "2024-05-01T12:00:00Z"; no zone means UTC), a
    duration back from `now` ("90m", "24h", "7d", "2w") or a number of unix seconds."""
    if isinstance(since, int | float):
        return float(since)
    if _DURATION.fullmatch(since.strip().lower()):
        return now - parse_duration(since)
    seconds = to_unix(since.strip())
    if seconds is None:
        raise UserError(f"since {since!r} is neither an ISO date (2024-05-01, 2024-05-01T12:00:00Z) "
                        "nor a duration (90m, 24h, 7d, 2w)")
    return float(seconds)


def _terms(query: str) -> list[str]:
    """The query's distinct words (split at whitespace), each quoted as an FTS5 string: FTS5 then splits
    and folds it with the index's own tokenizer ("don't" is the phrase "don t"), and no input is syntax."""
    words = dict.fromkeys(query.replace("\x00", " ").lower().split())  # FTS5 would read a NUL as the string's end
    return ['"' + word.replace('"', '""') + '"' for word in words][:_MAX_TERMS]


def _match(conn: sqlite3.Connection, terms: list[str]) -> str:
    """The FTS5 query: the rarest terms, ORed, while their matches add up to at most CANDIDATES; at least
    one. A term's matches are counted up to CANDIDATES + 1 only, so a common word costs ~1 ms, not a scan."""
    counted = []
    for term in terms:
        (n,) = conn.execute("SELECT count(*) FROM (SELECT rowid FROM posts_fts WHERE posts_fts MATCH ? LIMIT ?)",
                            (term, CANDIDATES + 1)).fetchone()
        if n:
            counted.append((n, term))
    counted.sort()
    chosen, total = [], 0
    for n, term in counted:
        if chosen and total + n > CANDIDATES:
            break
        chosen.append(term)
        total += n
    return " OR ".join(chosen)


def _candidates(conn: sqlite3.Connection, match: str, since: float | None) -> dict[int, float]:
    """{pk: bm25} of the RERANK best by bm25 among the newest CANDIDATES posts that match (all of them when
    fewer match, as `_match` arranges unless one term alone is that common), less those before `since`.
    bm25 costs ~0.8 us a row (its document length is a lookup), hence the cap. Measured at 1M posts: a cap of
    20,000 gave a p99 of 56 ms (--since queries, machine under load); 10,000 with the posts_time index, 16 ms."""
    if not match:
        return {}
    newest = "SELECT rowid AS pk, bm25(posts_fts) AS bm FROM posts_fts WHERE posts_fts MATCH :q ORDER BY rowid DESC LIMIT :n"
    if since is None:
        sql = f"SELECT pk, bm FROM ({newest}) ORDER BY bm, pk DESC LIMIT :k"
    else:  # filtered after the cap, so a common word's scan stays bounded
        sql = (f"SELECT c.pk, c.bm FROM ({newest}) AS c JOIN posts INDEXED BY posts_time ON posts.pk = c.pk "
               "WHERE posts.created_at >= :since ORDER BY c.bm, c.pk DESC LIMIT :k")
    return dict(conn.execute(sql, {"q": match, "n": CANDIDATES, "k": RERANK, "since": since}).fetchall())
