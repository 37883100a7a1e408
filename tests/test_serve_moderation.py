"""`tweetlm serve --moderate`: POST /v1/moderations in OpenAI's shape, toxic requests refused before anything is
queued, toxic replies stopped (streamed or not) with finish_reason content_filter, all through the official
openai client and counted in /metrics. The real classifier scores the requests; replies from the tiny model
are rarely toxic, so a stand-in classifier that flags long texts stops them."""

from pathlib import Path

import numpy as np
import pytest
from helpers import LONG, _client, _raw, _status_error, live_server

from tweetlm.artifacts.safety import SafetyClassifier
from tweetlm.cli import main
from tweetlm.serve.moderation import MODERATION_CATEGORIES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


@pytest.fixture(scope="module")
def classifier(safety_model) -> SafetyClassifier:
    return SafetyClassifier.load(safety_model[0])


@pytest.fixture(scope="module")
def posts(classifier) -> dict:
    """The least and the most toxic of 300 real offensive-val posts, by the classifier."""
    texts = (DATA / "offensive" / "val_text.txt").read_text(encoding="utf-8").splitlines()[:300]
    scores = classifier.score(texts)
    return {"clean": texts[int(scores.argmin())], "toxic": texts[int(scores.argmax())]}


@pytest.fixture(scope="module")
def moderated(served_run, classifier):
    with live_server(served_run, moderator=classifier) as (url, engine):
        yield url, engine


def _metrics(url: str) -> dict:
    text = _raw(url, "GET", "/metrics")[2].decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def test_moderations_endpoint_in_openais_shape(moderated, classifier, posts):
    url, _ = moderated
    out = _client(url).moderations.create(input=[posts["clean"], posts["toxic"]], model="omni-moderation-latest")
    assert out.id.startswith("modr-") and out.model == "tweetlm-safety" and len(out.results) == 2
    expected = classifier.score([posts["clean"], posts["toxic"]])
    for result, score in zip(out.results, expected):
        scores, flags = result.category_scores.model_dump(by_alias=True), result.categories.model_dump(by_alias=True)
        assert scores["hate"] == scores["harassment"] == pytest.approx(score)
        assert result.flagged == flags["hate"] == flags["harassment"] == (score >= classifier.threshold)
        assert set(scores) >= set(MODERATION_CATEGORIES) and scores["sexual"] == 0.0 and not flags["violence"]
        applied = result.category_applied_input_types.model_dump(by_alias=True)
        assert applied["hate"] == ["text"] and applied["self-harm"] == []  # only what the classifier measures
    assert [r.flagged for r in out.results] == [False, True]
    one = _client(url).moderations.create(input=[{"type": "text", "text": posts["toxic"]}])
    assert one.results[0].flagged and _client(url).moderations.create(input=posts["clean"]).results[0].flagged is False
    for body, says in ((b'{"input": []}', "at least 1 item"),
                       (b'{"input": [{"type": "image_url", "image_url": {"url": "x"}}]}', "only text is moderated"),
                       (b'{"input": ["fine", "\\ud800"]}', "input[1]: character 0 is U+D800, a lone UTF-16 surrogate"),
                       (b'{"input": [{"type": "text", "text": "\\udfff"}]}', "input[0]: character 0 is U+DFFF")):
        status, _, data = _raw(url, "POST", "/v1/moderations", body)
        assert status == 400 and says.encode() in data, data


def test_toxic_requests_are_refused_before_anything_is_queued(moderated, posts):
    url, engine = moderated
    client, before, queued = _client(url), _metrics(url), engine.stats()["requests_total"]
    e = _status_error(lambda: client.chat.completions.create(
        model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": posts["clean"]},
                                                   {"role": "user", "content": posts["toxic"]}]))
    assert e.status_code == 400 and e.body["code"] == "content_filter" and e.body["param"] == "messages"
    assert "messages[1] scores" in e.body["message"] and "rephrase it" in e.body["message"]
    e = _status_error(lambda: client.completions.create(model="tiny-chat", prompt=[posts["toxic"]], max_tokens=4))
    assert e.status_code == 400 and e.body["code"] == "content_filter" and e.body["param"] == "prompt"
    assert engine.stats()["requests_total"] == queued
    after = _metrics(url)
    refused = 'tweetlm_moderation_refusals_total{stage="input"}'
    assert after[refused] == before[refused] + 2
    assert after['tweetlm_requests_total{route="/v1/chat/completions",status="400"}'] >= 1
    # a clean request goes through
    ok = client.chat.completions.create(model="tiny-chat", max_tokens=4,
                                        messages=[{"role": "user", "content": posts["clean"]}])
    assert ok.choices[0].finish_reason in ("stop", "length", "content_filter")


class _FlagsLongTexts:
    """A stand-in classifier: a text is toxic when it is longer than `limit` characters."""

    threshold = 0.5

    def __init__(self, limit: int):
        self.limit = limit

    def score(self, texts):
        return np.array([float(len(t) > self.limit) for t in texts])


def test_toxic_replies_stop_with_content_filter(served_run, server, long_prompts):
    message = [{"role": "user", "content": long_prompts["message"]}]  # greedy decoding runs LONG tokens after it
    ask = dict(model="tiny-chat", messages=message, max_tokens=LONG, temperature=0)
    reference = _client(server[0]).chat.completions.create(**ask).choices[0].message.content  # unmoderated
    limit = len(long_prompts["message"])  # the request passes, the reply crosses it
    assert len(reference) > limit
    with live_server(served_run, moderator=_FlagsLongTexts(limit)) as (url, engine):
        client = _client(url)
        plain = client.chat.completions.create(logprobs=True, **ask).choices[0]
        assert plain.finish_reason == "content_filter" and plain.message.content is None and plain.logprobs is None

        chunks = list(client.chat.completions.create(stream=True, **ask))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert reference.startswith(text) and len(text) <= limit < len(text) + 20  # sent up to the flagged piece
        stats = engine.stats()
        assert stats["running"] == 0 and stats["completion_tokens_total"] < 2 * LONG  # the stream's decoding was cut

        prompt = long_prompts["prompt"][:limit]
        completion = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=LONG, temperature=0,
                                               echo=True).choices[0]
        assert completion.finish_reason == "content_filter" and completion.text == prompt  # the echo alone
        assert _metrics(url)['tweetlm_moderation_refusals_total{stage="output"}'] == 3


def test_moderation_off_and_a_missing_classifier(server, served_run, tmp_path, capsys):
    status, _, data = _raw(server[0], "POST", "/v1/moderations", b'{"input": "hi"}')
    assert status == 404 and b"--moderate SAFETY" in data
    assert _metrics(server[0])['tweetlm_moderation_refusals_total{stage="input"}'] == 0
    assert main(["serve", str(served_run), "--port", "0", "--moderate", str(tmp_path / "nope")]) == 2
    assert main(["serve", str(served_run), "--port", "0", "--moderate", f"{tmp_path}:2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no safety classifier at" in err[0] and "must be in (0, 1]" in err[1], err
