"""Grounding on fresh posts (`tweetlm serve --index`): POST /v1/posts then GET /v1/search sees them at once,
updates replace, `since` filters, errors are OpenAI 400s, the API key applies; grounded chat through the openai
client puts the retrieved real posts in the prompt within the context and returns only citations of posts it
was given that exist in the index, streamed or not. The tiny model writes no citations of its own, so the
checker that strips invented ids is tested on hand-made answers, whole and in every streamed split."""

import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import openai
import pytest
from fastapi.testclient import TestClient
from helpers import CONTEXT, _client, _raw, live_server
from hypothesis import given, settings
from hypothesis import strategies as st

from tweetlm.cli import main
from tweetlm.infer.engine import Delta
from tweetlm.model.weights import load_model
from tweetlm.search.ground import Citations, check_citations, posts_message
from tweetlm.search.index import Index, add_files
from tweetlm.serve.app import create_app
from tweetlm.serve.grounding import GroundingConfig
from tweetlm.serve.schemas import MAX_POSTS

V2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitter-api-v2"
GARAGE = "1253788283760492544"  # withheld.jsonl, 2020-04-24T20:49:55Z: "I know it isn’t supposed to work like this, ..."
SHED = "1250403528197263360"  # 2020-04-15T12:40:07Z: "I’ll be in the garage if you need me"
KEY = "sekrit"
QUESTION = "who is in the garage with the equipment?"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("grounding") / "posts.db"
    add_files((str(V2),), path)  # ~900 real posts, 2010-2023
    with Index(path, create=False) as index:
        yield index


@pytest.fixture(scope="module")
def grounded(served_run, index):
    with live_server(served_run, api_key=KEY, index=index, grounding=GroundingConfig(k=5)) as (url, engine):
        yield url, engine


def _call(url: str, method: str, path: str, body=None, key: str | None = KEY):
    status, _, data = _raw(url, method, path, None if body is None else json.dumps(body).encode(),
                           {"Authorization": f"Bearer {key}"} if key else {})
    return status, json.loads(data)


def _search(url: str, **params) -> list[dict]:
    status, body = _call(url, "GET", "/v1/search?" + urlencode(params))
    assert status == 200 and body["object"] == "list", body
    return body["data"]


# ---------------------------------------------------------------- the checker, on hand-made answers


def test_citation_checker_keeps_given_posts_and_strips_invented_ids(index):
    given = {p["id"]: p for p in index.get([GARAGE, SHED])}
    answer = (f"Tools are in the garage [post:{GARAGE}], see also [post:99999999] and\t[post:{SHED}]. "
              f"Again [post:{GARAGE}][post:made-up]. Not markers: [post: {SHED}] [post:] [Post:1] [post:{GARAGE}")
    text, cited, stripped = check_citations(answer, given.get)
    assert text == (f"Tools are in the garage [post:{GARAGE}], see also and\t[post:{SHED}]. "
                    f"Again [post:{GARAGE}]. Not markers: [post: {SHED}] [post:] [Post:1] [post:{GARAGE}")
    assert [p["id"] for p in cited] == [GARAGE, SHED] and stripped == 2
    assert cited[0]["text"].startswith("I know it isn’t supposed to work like this")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\t", "\n", "[", "]", "post:", "1", "9", "x y", "[post:1]", "[post:9]"]),
                max_size=25).map("".join),
       st.lists(st.integers(0, 60), max_size=6))
def test_a_streamed_answer_joins_to_the_checked_whole(answer, cuts):
    def lookup(i):
        return {"id": i} if i == "1" else None

    whole, cited, stripped = check_citations(answer, lookup)
    citations, out, at = Citations(lookup), "", 0
    for cut in sorted(min(c, len(answer)) for c in cuts) + [len(answer)]:
        out += citations.feed(answer[at:cut])
        at = cut
    out += citations.finish()
    assert out == whole and citations.cited == cited and citations.stripped == stripped
    assert "[post:9]" not in whole


def test_posts_message_drops_the_lowest_ranked_posts_to_fit(index):
    hits = index.search("vote", limit=5)
    words = lambda text: len(text.split())  # noqa: E731 (a stand-in token count)
    content, used = posts_message(hits, words, 10_000)
    assert used == len(hits) == 5 and "(5 of 5 found)" in content
    assert [line.split("]")[0] for line in content.splitlines()[1:]] == [f"[post:{h['id']}" for h in hits]
    two = words(posts_message(hits[:2], words, 10_000)[0])
    content, used = posts_message(hits, words, two)
    assert used == 2 and "(2 of 5 found)" in content and f"[post:{hits[1]['id']}]" in content
    assert posts_message(hits, words, 3) is None


# ---------------------------------------------------------------- posts and search over HTTP


def test_posted_posts_are_found_at_once_and_updates_replace(grounded, index):
    url, _ = grounded
    count = index.count
    post = {"id": "api-1", "text": "Zorblax &amp; friends launch a rocket https://t.co/abc @nasa", "author_id": "7",
            "created_at": "2026-01-02T03:04:05Z"}
    status, out = _call(url, "POST", "/v1/posts", {"posts": [post, {"id": "api-2", "text": " \n "}]})
    assert status == 200 and out == {"added": 1, "updated": 0, "unchanged": 0, "skipped": 1, "count": count + 1}
    (hit,) = _search(url, q="zorblax")
    assert hit["id"] == "api-1" and hit["text"] == post["text"] and hit["author_id"] == "7" and "source" not in hit
    assert _search(url, q="@nasa")[0]["id"] == "api-1", "searched as the index's own add cleans it: handles kept"

    assert _call(url, "POST", "/v1/posts", {"posts": [post]})[1]["unchanged"] == 1
    edited = post | {"text": "Quibblefrost launch delayed", "created_at": 1767323045}  # unix seconds, 2026-01-02
    assert _call(url, "POST", "/v1/posts", {"posts": [edited]})[1] == {
        "added": 0, "updated": 1, "unchanged": 0, "skipped": 0, "count": count + 1}
    assert _search(url, q="zorblax") == [] and _search(url, q="quibblefrost")[0]["created_at"] == "2026-01-02T03:04:05Z"


def test_since_filters_by_iso_time_unix_seconds_and_duration(grounded):
    url, _ = grounded
    fresh = {"id": "fresh-vote", "text": "the vote is today", "created_at": time.time()}
    _call(url, "POST", "/v1/posts", {"posts": [fresh]})
    old = _search(url, q="vote", limit=100)
    assert len(old) > 5 and {h["created_at"][:4] for h in old} >= {"2021", "2022"}
    for since in ("2022-01-01", "2022-01-01T00:00:00Z", "1640995200"):
        hits = _search(url, q="vote", since=since, limit=100)
        assert hits and all(h["created_at"] >= "2022-01-01" for h in hits), since
        assert len(hits) < len(old)
    assert [h["id"] for h in _search(url, q="vote", since="24h")] == ["fresh-vote"]


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/search?q=", None, "q", "at least 1 character"),
    ("/v1/search?q=%20%20", None, "q", "no words"),
    ("/v1/search?q=vote&since=yesterday", None, "since", "neither an ISO date"),
    ("/v1/search?q=vote&limit=101", None, "limit", "less than or equal to 100"),
    ("/v1/posts", {"posts": []}, "posts", "at least 1 item"),
    ("/v1/posts", {"posts": [{"id": str(i), "text": "x"} for i in range(MAX_POSTS + 1)]}, "posts", "at most 1000"),
    ("/v1/posts", {"posts": [{"id": "a b", "text": "x"}]}, "posts[0].id", "without whitespace or brackets"),
    ("/v1/posts", {"posts": [{"id": "1", "text": ""}]}, "posts[0].text", "at least 1 character"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "x", "created_at": "soon"}]}, "posts[0].created_at", "not an ISO"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "x"}, {"id": "1", "text": "y"}]}, None, "repeats posts[0].id"),
    # a lone surrogate ("\\ud800" in the JSON) is no text: neither UTF-8, the index nor the tokenizer can take it
    ("/v1/posts", {"posts": [{"id": "\ud800", "text": "x"}]}, "posts[0].id", "lone UTF-16 surrogate"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "ok \udc00"}]}, "posts[0].text", "lone UTF-16 surrogate"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "x", "author_id": "\ud800"}]}, "posts[0].author_id", "surrogate"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "x", "created_at": "2024\ud800"}]}, "posts[0].created_at",
     "surrogate"),
    ("/v1/posts", {"posts": [{"id": "1", "text": "x", "in_reply_to_id": "\udfff"}]}, "posts[0].in_reply_to_id",
     "surrogate"),
])
def test_bad_posts_and_searches_are_openai_400s(grounded, path, body, param, says):
    status, out = _call(grounded[0], "GET" if body is None else "POST", path, body)
    assert status == 400 and out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param, out
    assert says in out["error"]["message"], out


def test_the_api_key_guards_posts_and_search_and_no_index_is_404(grounded, server):
    url = grounded[0]
    for method, path, body in (("GET", "/v1/search?q=vote", None),
                               ("POST", "/v1/posts", {"posts": [{"id": "k", "text": "sneakypost"}]})):
        for key in (None, "wrong"):
            status, out = _call(url, method, path, body, key=key)
            assert status == 401 and out["error"]["code"] == "invalid_api_key"
        status, out = _call(server[0], method, path, body, key=None)  # the plain server: no --index
        assert status == 404 and "--index INDEX" in out["error"]["message"]
    assert _search(url, q="vote") and not _search(url, q="sneakypost")


# ---------------------------------------------------------------- grounded chat


def _ask(url, **fields):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16,
            "temperature": 0} | fields
    extra = {k: body.pop(k) for k in list(body) if k.startswith("grounding")}  # the openai client's way to send them
    return _client(url, KEY).chat.completions.create(**body, extra_body=extra)


def _check_citations(message, posts: list[str], index):
    for citation in message.citations:
        assert citation["id"] in posts and index.get([citation["id"]])[0]["text"] == citation["text"]
    assert isinstance(message.citations_stripped, int)


def test_grounded_chat_puts_the_retrieved_posts_in_the_prompt(grounded, index):
    url, _ = grounded
    plain = _ask(url)
    assert getattr(plain, "grounding", None) is None and getattr(plain.choices[0].message, "citations", None) is None
    answer = _ask(url, grounding=True)
    expected = [h["id"] for h in index.search(QUESTION, limit=5)]
    posts = answer.grounding["posts"]
    assert answer.grounding["retrieved"] == 5 and posts == expected[:len(posts)] and GARAGE in posts
    # the posts' lines are in the prompt: it grows by at least their tokens
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 10 * len(posts)
    _check_citations(answer.choices[0].message, posts, index)

    few = _ask(url, grounding=True, grounding_k=1, grounding_since="2020-04-20")
    assert few.grounding == {"posts": [GARAGE], "retrieved": 1}  # the shed post (04-15) is before since
    assert plain.usage.prompt_tokens < few.usage.prompt_tokens < answer.usage.prompt_tokens


def test_the_posts_fit_the_context_lowest_ranked_dropped(grounded):
    url, _ = grounded
    answer = _ask(url, grounding=True, grounding_k=50, max_tokens=200)
    used, found = len(answer.grounding["posts"]), answer.grounding["retrieved"]
    assert 0 < used < found and answer.usage.prompt_tokens + 200 <= CONTEXT
    # without max_tokens a quarter of the context stays free for the reply
    answer = _ask(url, grounding=True, grounding_k=50, max_tokens=None)
    assert 0 < len(answer.grounding["posts"]) and answer.usage.prompt_tokens <= CONTEXT - CONTEXT // 4


def test_a_grounded_stream_reads_like_the_plain_answer(grounded, index):
    url, _ = grounded
    plain = _ask(url, grounding=True, max_tokens=24)
    chunks = list(_ask(url, grounding=True, max_tokens=24, stream=True))
    assert chunks[0].grounding == plain.grounding and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    last = chunks[-1].choices[0]
    assert last.finish_reason == plain.choices[0].finish_reason
    assert last.delta.citations == plain.choices[0].message.citations
    _check_citations(last.delta, plain.grounding["posts"], index)


class _Citing:
    """A stand-in engine whose "model" reads the `[post:ID]` lines of its prompt and cites each, then a real post
    of the index it was not given and an invented id, streamed in 3-character pieces (so markers straddle them)."""

    max_seq_len = CONTEXT

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def submit(self, prompt, params):
        given = re.findall(r"^\[post:([^\]]+)\]", self.tokenizer.decode(prompt), re.M)
        text = "".join(f"See [post:{i}]. " for i in given) + f"Also [post:{SHED}] and [post:404404]."
        return _Reply([text[i:i + 3] for i in range(0, len(text), 3)])

    def stats(self):
        names = ("running", "waiting", "requests_total", "prompt_tokens_total", "completion_tokens_total")
        return dict.fromkeys(names, 0)

    def close(self):
        pass


class _Reply:
    def __init__(self, pieces):
        self.pieces, self.completion_tokens = pieces, len(pieces)

    async def __aiter__(self):
        for i, piece in enumerate(self.pieces):
            yield Delta(piece, [0], [], "stop" if i == len(self.pieces) - 1 else None)

    def cancel(self):
        pass


def test_invented_and_ungiven_citations_are_stripped_streamed_or_not(served_run, index):
    _, tokenizer = load_model(served_run)
    app = create_app(_Citing(tokenizer), tokenizer, model_name="tiny-chat", index=index)
    http = TestClient(app)  # in-process: the engine is no model, so no need for a port
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
    ask = dict(model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=64,
               extra_body={"grounding": True, "grounding_k": 1, "grounding_since": "2020-04-20"})  # the shed is older
    answer = client.chat.completions.create(**ask)
    assert answer.grounding == {"posts": [GARAGE], "retrieved": 1}
    message = answer.choices[0].message
    assert message.content == f"See [post:{GARAGE}]. Also and."  # SHED is in the index, but was not given
    assert [c["id"] for c in message.citations] == [GARAGE] and message.citations_stripped == 2
    chunks = list(client.chat.completions.create(stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    last = chunks[-1].choices[0].delta
    assert last.citations == message.citations and last.citations_stripped == 2
    metrics = http.get("/metrics").text
    assert 'tweetlm_citations_total{outcome="kept"} 2' in metrics  # one in each answer
    assert 'tweetlm_citations_total{outcome="stripped"} 4' in metrics


def test_grounding_by_default_can_be_turned_off_per_request_and_is_counted(served_run, index):
    with live_server(served_run, index=index, grounding=GroundingConfig(default=True, k=2)) as (url, _):
        client = _client(url)
        ask = dict(model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
        assert len(client.chat.completions.create(**ask).grounding["posts"]) == 2
        off = client.chat.completions.create(**ask, extra_body={"grounding": False})
        assert getattr(off, "grounding", None) is None
        metrics = _raw(url, "GET", "/metrics")[2].decode()
        assert "tweetlm_grounded_requests_total 1\n" in metrics
        # posts per grounded prompt: one request, with two posts
        assert 'tweetlm_grounding_posts_bucket{le="1"} 0\n' in metrics and "tweetlm_grounding_posts_sum 2" in metrics
        assert 'tweetlm_grounding_posts_bucket{le="2"} 1\n' in metrics
        assert "tweetlm_grounding_posts_count 1\n" in metrics


def test_grounding_errors(grounded, server, served_run, capsys):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "grounding": True}
    status, out = _call(server[0], "POST", "/v1/chat/completions", body, key=None)  # no --index
    assert status == 400 and out["error"]["param"] == "grounding" and "--index INDEX" in out["error"]["message"]
    for fields, param in (({"grounding_since": "someday"}, "grounding_since"), ({"grounding_k": 0}, "grounding_k"),
                          ({"grounding": "yes"}, "grounding"), ({"grounding_since": "\ud800"}, "grounding_since"),
                          ({"messages": [{"role": "user", "content": "garage \ud800"}]}, "messages[0].content"),
                          ({"messages": [{"role": "user", "content": "\udc00"}], "stream": True},
                           "messages[0].content")):
        status, out = _call(grounded[0], "POST", "/v1/chat/completions", body | fields)
        assert status == 400 and out["error"]["param"] == param, out
    assert main(["serve", str(served_run), "--port", "0", "--ground"]) == 2
    assert main(["serve", str(served_run), "--port", "0", "--index", "x.db", "--ground-k", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--ground needs a posts index" in err[0] and "--ground-k 0" in err[1], err


def test_a_context_too_small_for_a_post_is_said_at_start_and_in_each_answer(served_run, index):
    """A 128-token context leaves a grounded answer (a quarter kept for the reply) no room for one post: `serve`
    warns as it starts, each answer's grounding.posts is [] beside what was retrieved, and /metrics counts it."""
    from tweetlm.infer.engine import Engine
    from tweetlm.serve.grounding import room_warning

    model, tokenizer = load_model(served_run)
    warning = room_warning(tokenizer, 128, GroundingConfig())
    assert warning.startswith("warning: grounded answers will hold no post") and "context 128" in warning, warning
    assert room_warning(tokenizer, CONTEXT, GroundingConfig()) is None
    assert "raise --ground-tokens (20)" in room_warning(tokenizer, CONTEXT, GroundingConfig(tokens=20))

    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=128)
    with TestClient(create_app(engine, tokenizer, model_name="tiny-chat", index=index)) as http:
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32,
                "temperature": 0, "grounding": True}  # 32: the quarter of the context kept by default
        out = http.post("/v1/chat/completions", json=body).json()
        assert out["grounding"] == {"posts": [], "retrieved": 5}, out
        assert out["choices"][0]["message"]["citations"] == []
        metrics = http.get("/metrics").text
    assert 'tweetlm_grounding_posts_bucket{le="0"} 1\n' in metrics and "tweetlm_grounding_posts_count 1\n" in metrics
