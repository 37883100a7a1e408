"""Grounded answers: retrieved posts written into the prompt, and the answer's citations checked.

    content, used = posts_message(hits, count_tokens, budget)   # a system message of `[post:ID] text` lines
    citations = Citations(lookup)                               # lookup(id) -> post dict, or None: not citable
    out = citations.feed(piece) ... + citations.finish()        # streamed: markers checked as they close
    text, cited, stripped = check_citations(text, lookup)       # a whole answer

A citation is `[post:ID]`, ID 1 to 128 characters without whitespace or brackets (every id `POST /v1/posts`
accepts; tweet ids are digits, id-less posts `text:<hash>`). A marker whose id `lookup` refuses is removed with
the spaces and tabs before it; anything else, malformed markers included, is text. A stream holds back its
tail from a "[" that may still open a marker (and the spaces before it) until the marker closes or no longer
can, so the pieces join to exactly what `check_citations` makes of the whole answer.
"""

import re
from collections.abc import Callable

from tweetlm.artifacts.text import normalize

MAX_ID_CHARS = 128
MARKER = re.compile(rf"[ \t]*\[post:([^\s\[\]]{{1,{MAX_ID_CHARS}}})\]")
_OPEN = "[post:"
_OPENING = re.compile(rf"\[post:[^\s\[\]]{{0,{MAX_ID_CHARS}}}")  # a marker not closed yet, at the end of the text


class Citations:
    """One answer's citation checker. `lookup(id)` gives the post dict of a citable id, else None; it is
    called once per distinct id. After `finish()`: `cited` (posts, in order of first citation), `kept` and
    `stripped` (markers kept and removed)."""

    def __init__(self, lookup: Callable[[str], dict | None]):
        self.lookup = lookup
        self.kept = self.stripped = 0
        self._seen: dict[str, dict | None] = {}  # id -> post or None, in order of first citation
        self._held = ""

    @property
    def cited(self) -> list[dict]:
        return [post for post in self._seen.values() if post is not None]

    def feed(self, text: str) -> str:
        """The answer's next piece in; out, what of the answer so far is settled (markers checked)."""
        self._held += text
        cut = _settled(self._held)
        out, self._held = self._held[:cut], self._held[cut:]
        return MARKER.sub(self._check, out)

    def finish(self) -> str:
        """The held-back tail, checked: the answer has ended."""
        out, self._held = self._held, ""
        return MARKER.sub(self._check, out)

    def _check(self, marker: re.Match) -> str:
        post_id = marker[1]
        if post_id not in self._seen:
            self._seen[post_id] = self.lookup(post_id)
        if self._seen[post_id] is None:
            self.stripped += 1
            return ""
        self.kept += 1
        return marker[0]


def check_citations(text: str, lookup: Callable[[str], dict | None]) -> tuple[str, list[dict], int]:
    """(text without the refused markers, the cited posts in order of first citation, markers removed)."""
    citations = Citations(lookup)
    out = citations.feed(text) + citations.finish()
    return out, citations.cited, citations.stripped


def _settled(text: str) -> int:
    """How much of `text` is final whatever comes next: all but a tail that may still become a marker,
    with the spaces before it (a refused marker takes them along)."""
    start = text.rfind("[")  # ids hold no "[": only the last one can open a marker still
    if start >= 0 and (_OPEN.startswith(text[start:]) or _OPENING.fullmatch(text, start)):
        return len(text[:start].rstrip(" \t"))
    return len(text.rstrip(" \t"))


def posts_message(posts: list[dict], count_tokens: Callable[[str], int], budget: int) -> tuple[str, int] | None:
    """The system message that gives the model `posts` (search hits, best first) and asks it to cite them:
    (content, posts used). The lowest-ranked posts are dropped until the content takes at most `budget`
    tokens by `count_tokens`; None if even the message without posts does not fit."""
    for used in range(len(posts), -1, -1):
        lines = [f"Recent posts that match the user's message, best first ({used} of {len(posts)} found). "
                 "Answer from them, and cite each post you use as [post:ID]."]
        lines += [_line(post) for post in posts[:used]]
        content = "\n".join(lines)
        if count_tokens(content) <= budget:
            return content, used
    return None


def _line(post: dict) -> str:
    """`[post:ID] 2020-04-24 20:49Z: text`, on one line; links shortened to "http" as the model saw them in
    training (tweetlm.artifacts.text.normalize)."""
    when = f" {post['created_at'][:16].replace('T', ' ')}Z" if post.get("created_at") else ""
    text = normalize(post["text"], mentions=False).replace("\n", " ")
    return f"[post:{post['id']}]{when}: {text}"
