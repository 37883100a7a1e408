"""Grounding on fresh posts: a live posts index behind the server (`tweetlm serve RUN --index INDEX [--ground]`).

    POST /v1/posts    {"posts": [{"id", "text", "created_at"?, "author_id"?, "lang"?, "conversation_id"?,
                      "in_reply_to_id"?}, ...]} -> {"added", "updated", "unchanged", "skipped", "count"}
    GET  /v1/search   ?q=WORDS&since=WHEN&limit=N -> {"object": "list", "data": [post + "score", ...]}

Posts go through the index's own `add` (tweetlm/search/index.py: the same cleaning as `tweetlm index add`, a
known id updated unless the stored version is newer) and are searchable as soon as the call returns.

A grounded chat request (`"grounding": true` in the body, or the server's `--ground` unless the body says
false) searches the index with its last user message (BM25 with the recency boost; `grounding_k` posts,
`grounding_since`), and a system message listing them as `[post:ID] time: text`, best first, goes in after
the request's own system messages (tweetlm/search/ground.py). The posts may take at most `--ground-tokens`
tokens, and no more than leaves the reply its max_tokens (or, unset, a quarter of the context): the
lowest-ranked are dropped first, and the message says how many it shows (a context too small for one post
gets none: `serve` warns at start, see room_warning, and /metrics counts the posts of each prompt). The
answer's citations `[post:ID]` are then checked: an id is kept only if its post was in this prompt and is
still in the index (a post the model never saw cannot ground anything, even if it exists); other markers are
removed from the text. Each choice's message (a stream: its last chunk's delta) carries `citations` (the
cited posts) and `citations_stripped`, as OpenAI's message carries its `annotations`; the response (a stream:
its first chunks) carries `grounding: {"posts": [ids in the prompt], "retrieved": n}`. A stream holds back a
possible marker until it closes, so streamed and plain answers read the same.
"""

import asyncio
import dataclasses
import re
import time
from dataclasses import dataclass

from fastapi import Query

from tweetlm.data.post import Post
from tweetlm.errors import UserError, check
from tweetlm.search.ground import Citations, posts_message
from tweetlm.search.index import parse_since
from tweetlm.serve.schemas import MAX_GROUNDING_K, APIError, PostsRequest
from tweetlm.tokenizer.chat import render_chat

MAX_SEARCH = 100  # posts one GET /v1/search returns
MAX_QUERY_CHARS = 2000
REPLY_SHARE = 4  # a grounded request without max_tokens keeps at least 1/REPLY_SHARE of the context for the reply
_UNIX = re.compile(r"\s*\d+(\.\d+)?\s*")
# room_warning's yardstick: a post of median length (TweetEval's posts: 97 characters), a tweet's id, a time
_TYPICAL_POST = {"id": "1861234567890123456", "created_at": "2026-01-01T12:00:00Z",
                 "text": "Just got back from the farmers market: the strawberries are finally in season and they "
                         "taste amazing"}


@dataclass(frozen=True, kw_only=True)
class GroundingConfig:
    default: bool = False  # ground every chat request that does not say "grounding": false (--ground)
    k: int = 5  # posts a question retrieves (--ground-k); a request's grounding_k overrides it
    tokens: int = 1024  # most prompt tokens the posts may take (--ground-tokens); a short context allows fewer

    def __post_init__(self):
        check(1 <= self.k <= MAX_GROUNDING_K, "k", self.k, f"must be in 1..{MAX_GROUNDING_K}")
        check(self.tokens >= 1, "tokens", self.tokens, "must be at least 1")


def _budget(config: GroundingConfig, context: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """Prompt tokens the posts' system message may take: --ground-tokens, and no more than leaves the reply its
    max_tokens (None: a quarter of the context). 2: the message's <|system|> and <|end|>."""
    return min(config.tokens, context - prompt_tokens - 2 - (max_tokens or context // REPLY_SHARE))


def room_warning(tokenizer, context: int, config: GroundingConfig) -> str | None:
    """The line `serve --index` prints when a grounded answer to the shortest question, max_tokens unset, has
    no room for one post of median length (each such answer would carry `grounding.posts: []`); else None."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    budget = _budget(config, context, len(render_chat(tokenizer, [{"role": "user", "content": "?"}])), None)
    need = count(posts_message([_TYPICAL_POST], count, 1 << 30)[0])
    if need <= budget:
        return None
    fix = (f"raise --ground-tokens ({config.tokens})" if budget == config.tokens else
           "serve a model with a longer context, or send a smaller max_tokens")
    return (f"warning: grounded answers will hold no post of typical length: the posts may take {max(budget, 0)} "
            f"prompt tokens (context {context}, a quarter kept for the reply, --ground-tokens {config.tokens}), "
            f"and the instructions with one post of {len(_TYPICAL_POST['text'])} characters take {need}: {fix}")


def _public(post: dict) -> dict:
    """A stored post as the API shows it: `source` is a path on the server, not the client's business."""
    return {k: v for k, v in post.items() if k != "source"}


def _since(value: str | float | None, param: str) -> float | None:
    """Unix seconds from an ISO time, a duration back from now ("24h") or unix seconds (also as a string)."""
    if value is None:
        return None
    if isinstance(value, str) and _UNIX.fullmatch(value):
        value = float(value)
    try:
        return parse_since(value, now=time.time())
    except UserError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


class Grounded:
    """One chat request's grounding: the posts in its prompt (None: not grounded) and a citation checker per
    choice. Off, every method leaves the response as it is."""

    def __init__(self, posts: list[dict] | None = None, retrieved: int = 0, index=None, metrics=None):
        self.posts, self.retrieved, self.index, self.metrics = posts, retrieved, index, metrics
        self._given = {p["id"] for p in posts or ()}
        self._citations: dict[int, Citations] = {}

    @property
    def head(self) -> dict:
        """Response fields: the posts in the prompt, best first."""
        if self.posts is None:
            return {}
        return {"grounding": {"posts": [p["id"] for p in self.posts], "retrieved": self.retrieved}}

    def _lookup(self, post_id: str) -> dict | None:
        # a primary-key read on this thread's SQLite connection, ~24 us (a B-tree lookup): fine on the event loop
        if post_id not in self._given:
            return None
        found = self.index.get([post_id])
        return _public(found[0]) if found else None

    def _checker(self, i: int) -> Citations:
        if i not in self._citations:
            self._citations[i] = Citations(self._lookup)
        return self._citations[i]

    def _settle(self, i: int, text: str) -> str:
        """Choice i's last text in; its final text out, counted in /metrics."""
        citations = self._checker(i)
        text = citations.feed(text) + citations.finish()
        self.metrics.citations["kept"] += citations.kept
        self.metrics.citations["stripped"] += citations.stripped
        return text

    def edit(self, i: int, delta):
        """A streamed Delta of choice i with its text checked: possible markers held back until they close."""
        if self.posts is None:
            return delta
        text = self._settle(i, delta.text) if delta.finish_reason else self._checker(i).feed(delta.text)
        return dataclasses.replace(delta, text=text)

    def check(self, choices: list) -> None:
        """Whole choices (wire.Choice): each text checked in place."""
        if self.posts is not None:
            for i, choice in enumerate(choices):
                choice.text = self._settle(i, choice.text)

    def fields(self, i: int, withheld: bool = False) -> dict:
        """Choice i's message fields (a stream: its last delta's), once its text is settled."""
        if self.posts is None:
            return {}
        citations = self._checker(i)
        return {"citations": [] if withheld else citations.cited, "citations_stripped": citations.stripped}


class Grounding:
    """The posts index of a server (None: no index) and what grounds chat requests on it."""

    def __init__(self, index, tokenizer, context: int, config: GroundingConfig, metrics):
        self.index, self.tokenizer, self.context, self.config, self.metrics = index, tokenizer, context, config, metrics
        assert index is not None or not config.default, "grounding by default needs an index (ServeConfig checks)"

    def _need_index(self, what: str):
        if self.index is None:
            raise APIError(404, f"{what} needs a posts index, and this server has none: start it with "
                                "`tweetlm serve RUN --index INDEX`", code="not_found")
        return self.index

    async def prepare(self, body, messages: list[dict], prompt: list[int]) -> tuple[list[int], Grounded]:
        """The chat prompt with the posts that ground it, and the request's Grounded (off if not asked)."""
        if not (self.config.default if body.grounding is None else body.grounding):
            return prompt, Grounded()
        if self.index is None:
            raise APIError(400, "grounding needs a posts index, and this server has none: start it with "
                                "`tweetlm serve RUN --index INDEX`, or leave grounding out", param="grounding")
        since = _since(body.grounding_since, "grounding_since")
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        budget = _budget(self.config, self.context, len(prompt), body.max_completion_tokens or body.max_tokens)
        hits, message = await asyncio.to_thread(self._retrieve, query, since, body.grounding_k or self.config.k, budget)
        self.metrics.grounded += 1
        self.metrics.grounding_posts.observe(0 if message is None else message[1])
        if message is None:  # not even the message without posts fits: the prompt goes as it is
            return prompt, Grounded([], len(hits), self.index, self.metrics)
        content, used = message
        at = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        grounded = render_chat(self.tokenizer, [*messages[:at], {"role": "system", "content": content}, *messages[at:]])
        assert len(grounded) <= len(prompt) + 2 + max(budget, 0), (len(grounded), len(prompt), budget)
        return grounded, Grounded(hits[:used], len(hits), self.index, self.metrics)

    def _retrieve(self, query: str, since: float | None, k: int, budget: int):
        """(search hits, (system message, posts used) or None); in a worker thread."""
        hits = self.index.search(query, since=since, limit=k) if query.strip() else []
        hits = [_public(h) for h in hits]
        message = posts_message(hits, lambda text: len(self.tokenizer.encode(text)), budget) if budget > 0 else None
        return hits, message

    def routes(self, app, guarded: list) -> None:
        """POST /v1/posts and GET /v1/search on `app`, behind the API key."""

        @app.post("/v1/posts", dependencies=guarded)
        async def add_posts(body: PostsRequest):
            index = self._need_index("POST /v1/posts")
            posts = [Post(id=p.id, text=p.text, created_at=p.created_at, author_id=p.author_id, lang=p.lang,
                          conversation_id=p.conversation_id, in_reply_to_id=p.in_reply_to_id,
                          kind="reply" if p.in_reply_to_id else "post", source=f"POST /v1/posts:{i}")
                     for i, p in enumerate(body.posts)]

            def add():  # a worker thread: the write waits for SQLite's lock, the count reads the new snapshot
                return index.add(posts), index.count

            counts, total = await asyncio.to_thread(add)
            return {"added": counts["added"], "updated": counts["updated"], "unchanged": counts["unchanged"],
                    "skipped": sum(counts["skipped"].values()), "count": total}

        @app.get("/v1/search", dependencies=guarded)
        async def search(q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS), since: str | None = None,
                         limit: int = Query(10, ge=1, le=MAX_SEARCH)):
            index = self._need_index("GET /v1/search")
            start = _since(since, "since")
            if not q.strip():
                raise APIError(400, "q: the query has no words to search for", param="q")
            hits = await asyncio.to_thread(index.search, q, since=start, limit=limit)
            return {"object": "list", "data": [_public(h) for h in hits]}
