"""The assistant's platform tasks over HTTP (tweetlm's own routes, beside OpenAI's), on tweetlm/infer/tasks.py.

    POST /v1/compose     {"model", "topic"?, "hashtags"?: ["#tag" | "tag", ...], sampling fields}
    POST /v1/reply       {"model", "post", sampling fields}
    POST /v1/summarize   {"model", "thread": ["post", ...], sampling fields}
    -> {"id", "object": "task.completion", "created", "model", "task", "text", "finish_reason": "stop"}

`text` is one post: at most 280 characters, cut between words, no @user / http placeholder, every requested
hashtag in it (infer/tasks.py). Sampling fields are those of /v1/completions (max_tokens, default 256,
temperature, top_p, top_k, seed, stop, presence_penalty, frequency_penalty); n > 1 and stream are refused.
The API key, the body and concurrency limits (GENERATE_ROUTES), the timeout (408) and the error objects are
the OpenAI routes' own; decoding stops when the client leaves or the timeout passes. With moderation, the
inputs are scored first (400, code content_filter) and a flagged post comes back as text null with
finish_reason "content_filter".
"""

import asyncio
import threading

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator, model_validator

from tweetlm.artifacts.prompts import check_hashtags, reply_messages, summarize_messages
from tweetlm.errors import UserError
from tweetlm.infer import tasks
from tweetlm.infer.engine import SamplingParams
from tweetlm.serve import wire
from tweetlm.serve.guard import client_gone, timeout_error
from tweetlm.serve.schemas import Sampling, Text

TASK_ROUTES = ("/v1/compose", "/v1/reply", "/v1/summarize")


def _checked(check, value):
    """artifacts/prompts.py's check as a pydantic field check: its UserError becomes a 400 naming the field."""
    try:
        return check(value)
    except UserError as e:
        raise ValueError(str(e)) from None


class _TaskRequest(Sampling):
    max_tokens: int = Field(256, ge=1)  # infer/tasks.py: a post of 280 characters is ~70 tokens of English

    @model_validator(mode="after")
    def _one_finished_post(self):
        if self.n != 1 or self.stream:
            raise ValueError("n and stream are not supported here: the answer is one finished post; send the "
                             "request again for another")
        return self


class ComposeRequest(_TaskRequest):
    topic: Text = ""
    hashtags: list[Text] = []

    @field_validator("hashtags")
    @classmethod
    def _hashtags(cls, value):
        return list(_checked(check_hashtags, value))


class ReplyRequest(_TaskRequest):
    post: Text

    @field_validator("post")
    @classmethod
    def _post(cls, value):
        _checked(reply_messages, value)
        return value


class SummarizeRequest(_TaskRequest):
    thread: list[Text] = Field(min_length=1)

    @field_validator("thread")
    @classmethod
    def _thread(cls, value):
        _checked(summarize_messages, value)
        return value


def add_task_routes(app, service, guarded: list) -> None:
    """POST /v1/compose, /v1/reply and /v1/summarize on `app`, over create_app's service (its engine, tokenizer,
    limits and moderation, and its model check), behind the API key."""

    @app.post("/v1/compose", dependencies=guarded)
    async def compose(body: ComposeRequest, http: Request):
        return await _answer(service, http, body, "compose", [body.topic, *body.hashtags], "topic",
                             lambda params, cancel: tasks.compose(service.engine, service.tokenizer, topic=body.topic,
                                                                  hashtags=body.hashtags, params=params, cancel=cancel))

    @app.post("/v1/reply", dependencies=guarded)
    async def reply(body: ReplyRequest, http: Request):
        return await _answer(service, http, body, "reply", [body.post], "post",
                             lambda params, cancel: tasks.reply(service.engine, service.tokenizer, post=body.post,
                                                                params=params, cancel=cancel))

    @app.post("/v1/summarize", dependencies=guarded)
    async def summarize(body: SummarizeRequest, http: Request):
        return await _answer(service, http, body, "summarize", body.thread, "thread",
                             lambda params, cancel: tasks.summarize(service.engine, service.tokenizer, thread=body.thread,
                                                                    params=params, cancel=cancel))


async def _answer(service, http: Request, body: _TaskRequest, task: str, texts: list[str], param: str, write):
    """Runs `write(params, cancel)` (a blocking infer/tasks.py call) in a worker thread, until it returns, the
    client leaves (499, unanswered) or the deadline passes (408); in the last two cases `cancel` stops it."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    service.check_model(body)
    await service.moderation.check_input([t for t in texts if t], param)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=max(body.top_k, 0), seed=body.seed, stop=tuple(body.stop),
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    cancel = threading.Event()
    work = asyncio.create_task(asyncio.to_thread(write, params, cancel))
    gone = asyncio.create_task(client_gone(http))
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=max(0.0, start + service.limits.request_timeout - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            cancel.set()  # the worker cancels its engine request at its next token
            work.add_done_callback(lambda t: t.cancelled() or t.exception())  # its end, error or not, is nobody's
    if work not in done:
        if gone in done:
            return Response(status_code=499)  # nginx's "client closed request", as the OpenAI routes
        raise timeout_error(service.limits)
    text, finish = work.result(), "stop"
    if await service.moderation.withholds(text):
        text, finish = None, "content_filter"
    return {"id": wire.new_id("task"), "object": "task.completion", "created": wire.now(),
            "model": service.model_name, "task": task, "text": text, "finish_reason": finish}
