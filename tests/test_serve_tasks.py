"""POST /v1/compose, /v1/reply, /v1/summarize on a live server (the tiny model of conftest.py's served_run): the post
guarantees, the same post as infer/tasks.py for the same seed, errors as OpenAI objects, the API key, the
concurrency limit, the timeout and moderation."""

import json
import re

import numpy as np
import openai
import pytest
from helpers import LONG, _client, _raw, _wait_idle, live_server

from tweetlm.artifacts.prompts import LIMIT
from tweetlm.infer.engine import SamplingParams
from tweetlm.infer.tasks import compose, reply, summarize
from tweetlm.model.weights import load_model
from tweetlm.serve.app import ServeLimits

THREAD = ["I'll be in the garage if you need me", "@bob Headed there myself 👍🏼", "Clearing a shelf https://t.co/x"]


def _post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, data = _raw(url, "POST", path, json.dumps(body).encode(), headers)
    return status, json.loads(data)


def test_each_task_answers_one_post_the_same_as_the_library(server, served_run):
    url, engine = server
    _, tokenizer = load_model(served_run)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=7)
    for path, fields, direct in (
            ("/v1/compose", {"topic": "brexit", "hashtags": ["vote", "#EU"]},
             lambda: compose(engine, tokenizer, topic="brexit", hashtags=("#vote", "#EU"), params=params)),
            ("/v1/reply", {"post": "Who else is still up? @bob http://x.co"},
             lambda: reply(engine, tokenizer, post="Who else is still up? @bob http://x.co", params=params)),
            ("/v1/summarize", {"thread": THREAD}, lambda: summarize(engine, tokenizer, thread=THREAD, params=params))):
        status, body = _post(url, path, {"model": "tiny-chat", "max_tokens": 120, "seed": 7, **fields})
        assert status == 200, body
        assert body["object"] == "task.completion" and body["model"] == "tiny-chat" and body["task"] == path[4:]
        assert body["finish_reason"] == "stop" and body["id"].startswith("task-")
        text = body["text"]
        assert len(text) <= LIMIT and "@user" not in text and "http" not in text
        assert text == direct()  # the route maps the sampling fields onto the same call
    assert {"#vote", "#eu"} <= {t.casefold() for t in re.findall(r"#\w+", _post(url, "/v1/compose", {
        "model": "tiny-chat", "hashtags": ["vote", "EU"], "seed": 3})[1]["text"])}
    for seed in (2**64 - 1, -2**63):  # the ends of what torch seeds
        assert _post(url, "/v1/reply", {"model": "tiny-chat", "post": "hi", "max_tokens": 8, "seed": seed})[0] == 200


@pytest.mark.parametrize("path, fields, status, param, says", [
    ("/v1/compose", {"model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
    ("/v1/compose", {"model": None}, 400, "model", "Field required"),
    ("/v1/compose", {"hashtags": ["#a b"]}, 400, "hashtags", "a hashtag is #"),
    ("/v1/compose", {"hashtags": [f"tag{i:03d}" for i in range(30)]}, 400, "hashtags", "more than half a post"),
    ("/v1/compose", {"hashtags": "ai"}, 400, "hashtags", "valid list"),
    ("/v1/compose", {"topic": "word " * 600}, 400, None, "shorten it"),
    ("/v1/compose", {"n": 2}, 400, None, "n and stream are not supported"),
    ("/v1/compose", {"stream": True}, 400, None, "n and stream are not supported"),
    ("/v1/compose", {"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/reply", {}, 400, "post", "Field required"),
    ("/v1/reply", {"post": "  "}, 400, "post", "the post to reply to is empty"),
    ("/v1/summarize", {"thread": []}, 400, "thread", "at least 1 item"),
    ("/v1/summarize", {"thread": ["", " "]}, 400, "thread", "the thread is empty"),
    # what torch cannot seed and what UTF-8 cannot hold (a lone surrogate, "\\ud800" in the JSON): 400, never 500
    ("/v1/compose", {"seed": 2**64}, 400, "seed", "less than or equal to 18446744073709551615"),
    ("/v1/reply", {"post": "hi", "seed": -2**63 - 1}, 400, "seed", "greater than or equal to"),
    ("/v1/compose", {"topic": "garage \ud800"}, 400, "topic", "lone UTF-16 surrogate"),
    ("/v1/compose", {"hashtags": ["ok", "\udfff"]}, 400, "hashtags[1]", "lone UTF-16 surrogate"),
    ("/v1/reply", {"post": "\ud800"}, 400, "post", "lone UTF-16 surrogate"),
    ("/v1/summarize", {"thread": ["fine", "bad \udc00"]}, 400, "thread[1]", "lone UTF-16 surrogate"),
])
def test_bad_requests_are_openai_error_objects(server, path, fields, status, param, says):
    url, engine = server
    before = engine.stats()["requests_total"]
    code, body = _post(url, path, {"model": "tiny-chat", **fields})
    error = body["error"]
    assert code == status and error["param"] == param and says in error["message"], body
    assert error["type"] == "invalid_request_error"
    assert engine.stats()["requests_total"] == before  # refused before anything was queued


def test_api_key_timeout_metrics(served_run):
    with live_server(served_run, api_key="s3cret") as (url, _):
        ask = {"model": "tiny-chat", "post": "hi"}
        assert _post(url, "/v1/reply", ask)[1]["error"]["code"] == "invalid_api_key"
        assert _post(url, "/v1/reply", ask, {"Authorization": "Bearer s3cret"})[0] == 200
        status, _, data = _raw(url, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert 'tweetlm_requests_total{route="/v1/reply",status="200"} 1' in data.decode()
    # a limit far below one decoding step: 408, and the request is cancelled in the engine
    with live_server(served_run, limits=ServeLimits(request_timeout=1e-6)) as (url, engine):
        status, body = _post(url, "/v1/compose", {"model": "tiny-chat", "max_tokens": 200})
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert _wait_idle(engine)["completion_tokens_total"] < 20


def test_the_concurrency_limit_counts_task_requests(served_run, long_prompts):
    with live_server(served_run, limits=ServeLimits(max_concurrent=1)) as (url, engine):
        client = _client(url)
        stream = client.completions.create(model="tiny-chat", prompt=long_prompts["prompt"], max_tokens=LONG,
                                           temperature=0, stream=True)
        next(iter(stream))  # the one allowed request is running
        status, body = _post(url, "/v1/summarize", {"model": "tiny-chat", "thread": THREAD})
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        stream.close()
        _wait_idle(engine)


class _FlagsAllButOk:
    """A stand-in classifier: every text is toxic unless it starts with "ok"."""

    threshold = 0.5

    def score(self, texts):
        return np.array([0.0 if t.startswith("ok") else 1.0 for t in texts])


def test_moderation_refuses_inputs_and_withholds_posts(served_run):
    with live_server(served_run, moderator=_FlagsAllButOk()) as (url, engine):
        status, body = _post(url, "/v1/reply", {"model": "tiny-chat", "post": "you are awful"})
        assert status == 400 and body["error"]["code"] == "content_filter" and body["error"]["param"] == "post"
        status, body = _post(url, "/v1/reply", {"model": "tiny-chat", "post": "ok then", "seed": 1})
        assert status == 200 and body["text"] is None and body["finish_reason"] == "content_filter"
        with pytest.raises(openai.APIStatusError):  # the OpenAI routes are moderated by the same classifier
            _client(url).completions.create(model="tiny-chat", prompt="awful", max_tokens=2)
