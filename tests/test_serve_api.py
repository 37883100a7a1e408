"""`tweetlm serve`: the official openai client against a live server on a random local port, on a tiny
model trained a few steps on real posts. Completions, chat, streaming, n > 1, stop, seed, logprobs,
every error case, the API key, the limits, cancellation on disconnect, metrics, graceful shutdown,
and `tweetlm chat` with the same template."""

import json
import select
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch
from helpers import LONG, POSTS, _client, _raw, _status_error, _wait_idle, live_server

from tweetlm.cli import main
from tweetlm.infer.sampling import SamplingParams
from tweetlm.model.weights import load_model
from tweetlm.serve.app import ServeLimits
from tweetlm.serve.chat import ChatConfig, chat
from tweetlm.serve.server import bind

# ---------------------------------------------------------------- answers


def test_models_health_and_page(server, served_run):
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "tweetlm"
    assert _raw(url, "GET", "/health")[::2] == (200, b'{"status":"ok"}')
    status, headers, page = _raw(url, "GET", "/")
    policy = "default-src 'self'; frame-ancestors 'none'"  # no script from elsewhere, no framing (clickjacking)
    assert status == 200 and b'src="/static/chat.js"' in page and headers["content-security-policy"] == policy
    # the same page under /static, however its path is spelled, carries the same policy
    for path in ("/static/index.html", "/static//index.html", "/static/chat.js"):
        status, headers, data = _raw(url, "GET", path)
        assert status == 200 and headers["content-security-policy"] == policy, path
    status, _, same = _raw(url, "GET", "/static/index.html")
    assert same == page
    # HEAD, as load balancers and uptime checks send it: GET's status and headers, no body
    for path in ("/", "/health", "/static/index.html"):
        status, headers, data = _raw(url, "HEAD", path)
        assert (status, data) == (200, b"") and int(headers["content-length"]) > 0, path


def test_completion_is_the_models_greedy_continuation(server, served_run, long_prompts):
    url, _ = server
    model, tokenizer = load_model(served_run)
    prompt = long_prompts["prompt"]
    ids = [tokenizer.boundary_id, *tokenizer.encode(prompt)]  # a completion is a new post, as `tweetlm generate`
    naive = []
    with torch.no_grad():  # greedy decoding the plain way: the whole sequence through the model at each step
        for _ in range(12):
            naive.append(model(torch.tensor([ids + naive]))[0, -1].argmax().item())

    out = _client(url).completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == tokenizer.decode(naive) and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert out.object == "text_completion" and out.model == "tiny-chat" and out.id.startswith("cmpl-")

    echo = _client(url).completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + out.choices[0].text

    # several prompts: n choices each, in order
    both = _client(url).completions.create(model="tiny-chat", prompt=[POSTS[1], prompt], max_tokens=12, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[1].text == out.choices[0].text


def test_chat_streams_the_same_reply_with_usage(server, long_prompts):
    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": long_prompts["message"]}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1

    # on the wire: server-sent events that end with [DONE]
    body = json.dumps({"model": "tiny-chat", "messages": messages, "max_tokens": 4, "stream": True}).encode()
    status, headers, data = _raw(url, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data.startswith(b"data: {") and data.endswith(b"data: [DONE]\n\n")


def test_n_choices_and_seeds(server):
    url, _ = server
    client = _client(url)
    ask = dict(model="tiny-chat", messages=[{"role": "user", "content": POSTS[3]}], max_tokens=10, temperature=1.0)
    first = client.chat.completions.create(n=3, seed=7, **ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert 3 <= first.usage.completion_tokens <= 30
    # the same seed gives the same choices, streamed or not, in any batch: choice i is seeded seed + i
    again = client.chat.completions.create(n=3, seed=7, **ask)
    assert [c.message.content for c in again.choices] == texts
    streamed = ["", ""]
    for chunk in client.chat.completions.create(n=2, seed=8, stream=True, **ask):
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert streamed[0] == texts[1]
    assert client.chat.completions.create(n=1, seed=8, **ask).choices[0].message.content == texts[1]
    assert client.chat.completions.create(n=1, seed=9, **ask).choices[0].message.content != texts[1]


def test_stop_strings_end_the_text_before_them(server, long_prompts):
    url, _ = server
    client = _client(url)
    ask = dict(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=20, temperature=0)
    greedy = client.completions.create(**ask).choices[0].text
    stop = greedy.strip()[3:5]
    stopped = client.completions.create(stop=[stop, "never in this text"], **ask).choices[0]
    assert stopped.text == greedy[:greedy.index(stop)] and stopped.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **ask))
    assert streamed == stopped.text


def test_logprobs_in_the_openai_shape(server, long_prompts):
    url, _ = server
    client = _client(url)
    out = client.completions.create(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and logprob <= 0 and logprob == pytest.approx(max(top.values()))  # greedy: the likeliest
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": long_prompts["message"]}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == chat.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.bytes is None or bytes(e.bytes).decode() == e.token
    plain = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server, served_run):
    """What lm-evaluation-harness sends: a prompt of token ids (or text), echo, logprobs, max_tokens 0 or 1; each
    prompt token's logprob is the model's own, null for a first token with no context."""
    url, _ = server
    client = _client(url)
    model, tokenizer = load_model(served_run)
    text = POSTS[3]
    ids = [tokenizer.boundary_id, *tokenizer.encode(text)]
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0].log_softmax(-1)  # [T, V]: row t predicts token t + 1
    expected = [full[t - 1, ids[t]].item() for t in range(1, len(ids))]

    scored = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].finish_reason == "length" and scored.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= logprob for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))

    # a text prompt follows <|endoftext|>: its first token is scored too, and one generated token comes after
    plus_one = client.completions.create(model="tiny-chat", prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = plus_one.choices[0].logprobs
    assert plus_one.choices[0].text.startswith(text) and len(lp.token_logprobs) == len(ids) - 1 + 1
    assert lp.token_logprobs[:-1] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens[:-1]) == text and lp.text_offset[:2] == [0, len(lp.tokens[0])]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, status, param, code, says", [
    ({"model": "gpt-4"}, 404, "model", "model_not_found", "`gpt-4` does not exist"),
    ({"max_tokens": 0}, 400, "max_tokens", None, "max_tokens 0 returns nothing without echo"),
    ({"max_tokens": -1}, 400, "max_tokens", None, "greater than or equal to 0"),
    ({"prompt": [1, -2]}, 400, "prompt[0]", None, "token ids must be integers greater than or equal to 0"),
    ({"prompt": [10**9]}, 400, None, None, "outside the vocabulary"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "context_length_exceeded", "context is 512 tokens"),
    ({"prompt": " ".join(POSTS)}, 400, "prompt", "context_length_exceeded", "shorten the prompt"),
    ({"temperature": "hot"}, 400, "temperature", None, "valid number"),
    ({"temperature": 2.5}, 400, "temperature", None, "less than or equal to 2"),
    ({"max_tokens": "10"}, 400, "max_tokens", None, "valid integer"),
    ({"n": 17}, 400, "n", None, "less than or equal to 16"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "at most 4"),
    ({"logprobs": 21}, 400, "logprobs", None, "less than or equal to 20"),
    ({"echo": True, "logprobs": 1, "stream": True}, 400, "stream", None, "echo with logprobs (scoring the prompt) is not streamed"),
    ({"stream_options": {"include_usage": True}}, 400, None, None, "only allowed when stream is true"),
    ({"suffix": "!"}, 400, None, None, "`suffix` is not supported"),
])
def test_bad_completion_requests_are_4xx_error_objects(server, fields, status, param, code, says):
    url, engine = server
    before = engine.stats()["requests_total"]
    body = {"model": "tiny-chat", "prompt": POSTS[6], "max_tokens": 4} | fields
    e = _status_error(lambda: _client(url).completions.create(**body))
    error = e.body  # the client unwraps {"error": {...}}
    assert e.status_code == status and error["type"] == "invalid_request_error", e.body
    assert (error["param"], error["code"]) == (param, code) and says in error["message"], error
    assert engine.stats()["requests_total"] == before  # refused before anything was queued


@pytest.mark.parametrize("fields, param, says", [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'system', 'developer', 'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid list"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, "messages", "leaves no room for a reply"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens", "max_completion_tokens is 10000, but this model's"),
    ({"max_completion_tokens": 400, "max_tokens": 4, "messages": [{"role": "user", "content": "x " * 200}]},
     "messages", "and max_completion_tokens is 400"),
    ({"top_logprobs": 2}, None, "only allowed when logprobs is true"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, None, "`tools` is not supported"),
])
def test_bad_chat_requests_are_400(server, fields, param, says):
    url, _ = server
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]} | fields
    e = _status_error(lambda: _client(url).chat.completions.create(**body))
    assert e.status_code == 400 and e.body["param"] == param and says in e.body["message"], e.body


SURROGATE = "\ud800"  # half of a UTF-16 pair: JSON can spell it ("\\ud800"), UTF-8 cannot, nor the tokenizer


@pytest.mark.parametrize("path, fields, param, says", [
    ("/v1/completions", {"seed": 2**64}, "seed", "less than or equal to 18446744073709551615"),
    ("/v1/completions", {"seed": -2**63 - 1}, "seed", "greater than or equal to -9223372036854775808"),
    ("/v1/completions", {"seed": 2**64 - 1, "n": 2}, "seed", "seed + 1"),  # choice i is seeded seed + i
    ("/v1/completions", {"seed": 2**64 - 3, "prompt": ["a", "b"], "n": 2}, "seed", "seed + 3"),
    ("/v1/chat/completions", {"seed": 2**64}, "seed", "less than or equal to"),
    ("/v1/chat/completions", {"seed": 2**64 - 1, "n": 2, "stream": True}, "seed", "seed + 1"),
    ("/v1/completions", {"prompt": f"hi {SURROGATE}"}, "prompt[0]", "surrogate"),
    ("/v1/completions", {"prompt": ["ok", "\udc00"], "stream": True}, "prompt[1]", "surrogate"),
    ("/v1/completions", {"stop": [SURROGATE]}, "stop[0]", "surrogate"),
    ("/v1/completions", {"model": SURROGATE}, "model", "surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content",
     "surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": f"a{SURROGATE}"}]}],
                              "stream": True}, "messages[0].content[0].text", "surrogate"),
    ("/v1/moderations", {"input": ["fine", SURROGATE]}, "input[1]", "surrogate"),
])
def test_out_of_range_seeds_and_lone_surrogates_are_400(server, path, fields, param, says):
    """What torch cannot seed (outside -2**63..2**64-1, also as seed + i) and text UTF-8 cannot hold: 400 naming the
    field, before anything is queued, never a 500."""
    url, engine = server
    before = engine.stats()["requests_total"]
    ask = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    body = {"model": "tiny-chat", "max_tokens": 2, "input": "x"} | ask | fields
    status, _, data = _raw(url, "POST", path, json.dumps(body).encode())  # json.dumps spells a surrogate "\\ud800"
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == param and says in error["message"], error
    assert error["type"] == "invalid_request_error" and engine.stats()["requests_total"] == before


def test_every_seed_torch_takes_is_accepted(server):
    url, _ = server
    client = _client(url)
    for seed, n in ((2**64 - 1, 1), (2**64 - 2, 2), (-2**63, 1)):
        out = client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2, seed=seed, n=n)
        assert len(out.choices) == n
    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi 👍🏽"}],
                                          max_tokens=2, seed=2**64 - 1)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_bad_bodies_and_paths_are_error_objects(server):
    url, _ = server
    ok = json.dumps({"model": "tiny-chat", "prompt": "hi", "max_tokens": 1}).encode()
    for body, content_type, says in ((b'{"model": "tiny-chat", "prompt": "hi",', "application/json", "not valid JSON"),
                                     (b"[1, 2]", "application/json", "must be a JSON object"),
                                     (b"", "application/json", "must be a JSON object"),
                                     (ok, "text/plain", "must be a JSON object")):  # what a cross-site form could send
        status, _, data = _raw(url, "POST", "/v1/completions", body, {"Content-Type": content_type})
        assert status == 400 and says in json.loads(data)["error"]["message"], data
    big = json.dumps({"model": "tiny-chat", "prompt": "x" * (1 << 20)}).encode()
    status, _, data = _raw(url, "POST", "/v1/completions", big)
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    status, _, data = _raw(url, "GET", "/v1/nope")
    assert status == 404 and json.loads(data)["error"]["message"] == "no route GET /v1/nope"
    assert _raw(url, "GET", "/v1/completions")[0] == 405


def test_api_key(served_run):
    with live_server(served_run, api_key="s3cret-key") as (url, _):
        ask = dict(model="tiny-chat", prompt="hi", max_tokens=2)
        for key in ("none", "s3cret-ke", "s3cret-key-and-more"):
            e = _status_error(lambda: _client(url, key).completions.create(**ask))
            assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
        assert _client(url, "s3cret-key").completions.create(**ask).choices[0].finish_reason == "length"
        assert _raw(url, "GET", "/health")[0] == 200 and _raw(url, "GET", "/")[0] == 200  # open: a load balancer, the page
        assert _raw(url, "GET", "/metrics")[0] == 401
        assert _raw(url, "GET", "/metrics", headers={"Authorization": "Bearer s3cret-key"})[0] == 200


def test_concurrency_limit_and_request_timeout(served_run, long_prompts):
    with live_server(served_run, limits=ServeLimits(max_concurrent=1)) as (url, engine):
        client = _client(url)
        stream = client.completions.create(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=LONG,
                                           temperature=0, stream=True)
        next(iter(stream))  # the one allowed request is running
        e = _status_error(lambda: client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2))
        assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded" and e.response.headers["retry-after"] == "1"
        stream.close()
        _wait_idle(engine)
    # a limit far below one decoding step: plain requests get 408, a stream that started ends with an error event
    with live_server(served_run, limits=ServeLimits(request_timeout=1e-6)) as (url, engine):
        client = _client(url)
        e = _status_error(lambda: client.completions.create(model="tiny-chat", prompt="hi", max_tokens=50))
        assert e.status_code == 408 and e.body["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="ran past the server's limit"):
            list(client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=50, stream=True))
        assert _wait_idle(engine)["completion_tokens_total"] < 20  # both were cancelled, 50 tokens short


def _status_line(sock) -> int:
    """The status of the response on `sock` (it reads the first line only)."""
    seen = b""
    while b"\r\n" not in seen:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {seen!r}"
        seen += chunk
    return int(seen.split(b" ", 2)[1])


def test_a_burst_past_max_concurrent_gets_429(served_run):
    """30 requests at once with --max-concurrent 4: exactly 4 answered, 26 refused with 429. Deterministic: every
    head arrives before any body is complete, so no admitted request can finish (and free its place) before all 30
    are counted; the refused are answered at once, their bodies unread."""
    burst, limit = 30, 4
    body = json.dumps({"model": "tiny-chat", "prompt": POSTS[2], "max_tokens": 8}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with live_server(served_run, limits=ServeLimits(max_concurrent=limit)) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(burst)]
        try:
            for sock in socks:
                sock.sendall(head + body[:-1])  # all but the body's last byte
            answered, deadline = set(), time.monotonic() + 10
            while len(answered) < burst - limit and time.monotonic() < deadline:
                ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.1)
                answered.update(ready)
            for sock in socks:
                try:
                    sock.sendall(body[-1:])
                except OSError:  # a refused request's connection may be closed already
                    pass
            statuses = [_status_line(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert sorted(statuses) == [200] * limit + [429] * (burst - limit), statuses
        _wait_idle(engine)
        metrics = _raw(url, "GET", "/metrics")[2].decode()
        assert "tweetlm_requests_in_flight 0\n" in metrics  # every admitted request gave its place back
        assert _client(url).completions.create(model="tiny-chat", prompt="hi", max_tokens=2).choices


def test_a_client_that_sends_no_whole_request_is_dropped(served_run, long_prompts):
    """A connection that stays silent, stops in its head, or stops in its body is closed read_timeout after it
    opened (uvicorn has no such limit of its own), freeing its place; a request sent in time may run past it."""
    with live_server(served_run, limits=ServeLimits(read_timeout=0.3, max_concurrent=1)) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        partial = (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                   b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in partial]
        for sock, data in zip(socks, partial):
            sock.sendall(data)
        for sock in socks:
            try:
                assert sock.recv(4096) == b""  # closed by the server, with no response
            except ConnectionResetError:
                pass
            sock.close()
        deadline = time.monotonic() + 10
        gone = 'tweetlm_requests_total{route="/v1/completions",status="499"} 1'
        while gone not in _raw(url, "GET", "/metrics")[2].decode():
            assert time.monotonic() < deadline, "the request whose body stalled was not counted as gone"
            time.sleep(0.01)
        assert "tweetlm_requests_in_flight 0\n" in _raw(url, "GET", "/metrics")[2].decode()  # its place is free
        out = _client(url).completions.create(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=LONG,
                                              temperature=0)
        assert out.usage.completion_tokens == LONG  # a whole request is never cut, however long its answer takes


def _leave_early(url: str, body: dict, engine) -> None:
    """Sends a request on a raw socket and closes it once the engine has it: after the first event of a stream."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    queued = engine.stats()["requests_total"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        seen = b""
        while body["stream"] and b"data: {" not in seen:
            seen += sock.recv(4096)
        while engine.stats()["requests_total"] == queued:
            time.sleep(0.001)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(server, long_prompts, stream):
    url, engine = server
    before = _wait_idle(engine)["completion_tokens_total"]
    body = {"model": "tiny-chat", "prompt": long_prompts["prompt"], "max_tokens": LONG, "temperature": 0, "stream": stream}
    _leave_early(url, body, engine)
    after = _wait_idle(engine)["completion_tokens_total"]
    assert after - before < LONG // 2, f"{after - before} of {LONG} tokens were decoded for a client that had left"


def test_metrics(server):
    url, engine = server
    client = _client(url)
    client.completions.create(model="tiny-chat", prompt="hi", max_tokens=3)
    _status_error(lambda: client.completions.create(model="nope", prompt="hi"))
    status, headers, data = _raw(url, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['tweetlm_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values['tweetlm_requests_total{route="/v1/completions",status="404"}'] >= 1
    stats = engine.stats()
    assert values["tweetlm_completion_tokens_total"] == stats["completion_tokens_total"] >= 3
    assert values["tweetlm_prompt_tokens_total"] == stats["prompt_tokens_total"]
    assert values["tweetlm_queue_depth"] == 0 and values["tweetlm_running_batch_size"] == 0
    assert values["tweetlm_requests_in_flight"] == 0
    assert values['tweetlm_request_seconds_count{route="/v1/completions"}'] >= 2
    assert values['tweetlm_time_to_first_token_seconds_bucket{le="+Inf"}'] == values["tweetlm_time_to_first_token_seconds_count"] >= 1


# ---------------------------------------------------------------- the verbs


def test_serve_verb_finishes_streams_on_sigterm(served_run, long_prompts):
    proc = subprocess.Popen([sys.executable, "-m", "tweetlm", "serve", str(served_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny-chat (cpu, context 512 tokens) at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split(": web chat", 1)[0]
        stream = _client(url).completions.create(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=LONG,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the stream in flight (~LONG ms of decoding to go) runs to its end
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == LONG
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "server stopped" in out, err
    finally:
        proc.kill()


def test_listening_socket_gets_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it every response waited ~40 ms for the
    client's delayed ACK (docs/benchmarks.md). Checked on the socket, since tests assert no wall times."""
    with bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_serve_verb_errors_are_one_line(served_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(served_run), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "holds no checkpoint" in err[0] and "cannot listen on 127.0.0.1" in err[1], err


def test_terminal_chat_uses_the_servers_template(served_run, server, capsys):
    lines = iter(["hello there", "/new", POSTS[7]])

    def read(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat(ChatConfig(run=served_run, system="Be brief.", sampling=SamplingParams(max_tokens=12, temperature=0)), read=read)
    out = capsys.readouterr().out
    replies = [line.split("bot> ", 1)[1] for line in out.splitlines() if "bot> " in line]
    assert len(replies) == 2 and "(new conversation)" in out
    # the second reply, after /new, is the API's reply to the system message and that one user message
    api = _client(server[0]).chat.completions.create(
        model="tiny-chat", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": POSTS[7].strip()}])
    assert replies[1] == api.choices[0].message.content.split("\n")[0]
