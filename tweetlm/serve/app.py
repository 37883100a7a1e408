"""The HTTP app: OpenAI-compatible routes over the engine, the web chat page, auth, limits and metrics.

    GET  /                      the web chat page (static/index.html, no build step)
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens, latency, time to first token, queue, batch
    GET  /v1/models             the one model served
    POST /v1/completions        text after a prompt (a new post: the prompt follows <|endoftext|>)
    POST /v1/chat/completions   a reply to messages, rendered with the tokenizer's chat template
    POST /v1/moderations        OpenAI's moderation object from the safety classifier (with --moderate)
    POST /v1/posts, GET /v1/search   the posts index that grounds chat answers (with --index; serve/grounding.py)
    POST /v1/compose, /v1/reply, /v1/summarize   one post of at most 280 characters (serve/tasks.py)

Every bad request is an OpenAI error object with a 4xx status: 400 bad JSON, field or value (also a
prompt that does not fit the context), 401 missing or wrong API key, 404 unknown model or path,
408 the request ran past `request_timeout` (a stream that already started ends with an error event
instead, the status being sent), 413 body too large, 429 too many requests at once.
The engine stops a request's decoding when its client goes away, streaming or not.

With a safety classifier (`serve --moderate`, tweetlm/eval/safety.py), every prompt or message is scored before
anything is queued: one at or above the threshold refuses the request with 400, code "content_filter". Each
reply is scored as it grows: a stream scores its text before sending each piece, and a choice that reaches the
threshold ends there with finish_reason "content_filter", the flagged piece unsent and its decoding cancelled;
a plain response scores each whole choice, and a flagged one comes back with finish_reason "content_filter",
its text withheld (chat: content null; completions: "", or the echoed prompt alone) and no logprobs. Refusals
are counted in /metrics (tweetlm_moderation_refusals_total, by stage).
"""

import asyncio
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from tweetlm.errors import UserError
from tweetlm.infer.engine import Delta, SamplingParams
from tweetlm.serve import schemas
from tweetlm.serve.grounding import Grounding, GroundingConfig
from tweetlm.serve.metrics import Histogram, Metrics
from tweetlm.serve.schemas import APIError, ChatRequest, CompletionRequest, ModerationRequest, error_body
from tweetlm.serve.tasks import TASK_ROUTES, add_task_routes
from tweetlm.tokenizer.chat import render_chat

STATIC = Path(__file__).parent / "static"
GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions", *TASK_ROUTES)
# metrics labels; anything else is "other"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/moderations", "/v1/posts", "/v1/search", *GENERATE_ROUTES)


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    max_body_bytes: int = 1 << 20  # 1 MiB holds ~250k tokens of text, far past any context we serve
    max_concurrent: int = 64  # generation requests at once (running + queued); more get 429
    request_timeout: float = 300.0  # seconds from arrival to the last token; longer ones are cancelled

    def __post_init__(self):
        for name in ("max_body_bytes", "max_concurrent", "request_timeout"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *extra]})
    await send({"type": "http.response.body", "body": raw})


class _Guard:
    """ASGI middleware around every request: refuses a body over the limit (413) and a generation request
    past the concurrency limit (429), and records route, status and latency for /metrics. Pure ASGI (no
    BaseHTTPMiddleware) so that streams pass through untouched and a stream's latency runs to its last byte."""

    def __init__(self, app, *, limits: ServeLimits, metrics: Metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start, status = loop.time(), 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        generating = route in GENERATE_ROUTES
        try:
            if generating and self.metrics.in_flight >= self.limits.max_concurrent:
                return await _send_json(send_and_see, 429, error_body(
                    f"the server is answering {self.limits.max_concurrent} requests already: retry in a moment",
                    type="rate_limit_error", code="rate_limit_exceeded"), {"Retry-After": "1"})
            receive = await self._buffered_body(scope, receive, send_and_see)
            if receive is None:  # answered 413, or the client left while sending (nginx's 499, unanswered)
                status = 413 if status == 413 else 499
                return
            self.metrics.in_flight += generating
            try:
                await self.app(scope, receive, send_and_see)
            finally:
                self.metrics.in_flight -= generating
        finally:
            self.metrics.requests[route, status] += 1
            self.metrics.latency.setdefault(route, Histogram()).observe(loop.time() - start)

    async def _buffered_body(self, scope, receive, send):
        """Reads the whole body (at most max_body_bytes) and returns a `receive` that replays it, or None
        once it has answered 413 or the client has gone."""
        limit = self.limits.max_body_bytes
        too_large = error_body(f"the request body is over the server's limit of {limit} bytes",
                               code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, too_large)
            return None
        chunks, size, more = [], 0, True
        while more:  # chunked bodies carry no length: count as they come
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _send_json(send, 413, too_large)
                return None
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay


class _Choice:
    """One choice's text, logprobs and finish reason, gathered from its engine deltas."""

    def __init__(self):
        self.text, self.logprobs, self.finish_reason, self.withheld = "", [], None, False

    def add(self, delta) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason

    def withhold(self) -> None:
        self.text, self.logprobs, self.finish_reason, self.withheld = "", [], "content_filter", True


class _Moderation:
    """The safety classifier on requests and replies (module docstring). Scoring runs in a worker thread, off
    the event loop: ~0.8 ms for a post, ~1.6 ms for a 1,000-character reply (bench/safety.py)."""

    def __init__(self, classifier, metrics: Metrics):
        self.classifier, self.threshold, self.metrics = classifier, classifier.threshold, metrics

    async def scores(self, texts: list[str]) -> list[float]:
        return (await asyncio.to_thread(self.classifier.score, texts)).tolist()

    async def check_input(self, texts: list[str], param: str) -> None:
        for i, score in enumerate(await self.scores(texts)):
            if score >= self.threshold:
                self.metrics.refused["input"] += 1
                raise APIError(400, f"the server's moderation refused this request: {param}[{i}] scores {score:.2f} "
                                    f"toxic, at or above its threshold {self.threshold:.2f}; rephrase it",
                               param=param, code="content_filter")

    async def flagged(self, text: str) -> bool:
        return (await self.scores([text]))[0] >= self.threshold

    async def withhold_flagged(self, choices: list[_Choice]) -> None:
        for choice, score in zip(choices, await self.scores([c.text for c in choices])):
            if score >= self.threshold:
                choice.withhold()
                self.metrics.refused["output"] += 1


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their engine requests however the response ends: finished, client
    gone (Starlette cancels the stream when it sees the disconnect), or never started."""

    def __init__(self, events, requests):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
        self.requests = requests

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self.requests:
                r.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Service:
    """The generation routes' logic; create_app wires it to FastAPI."""

    def __init__(self, engine, tokenizer, model_name: str, limits: ServeLimits, metrics: Metrics,
                 moderation: _Moderation | None, grounding: Grounding):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits, self.metrics, self.moderation, self.grounding = limits, metrics, moderation, grounding
        self.end_id = tokenizer.token_id("<|end|>")

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def text_logprobs(self, entries: list) -> list:
        """The engine's logprobs less the token that ended the request (<|endoftext|> or <|end|>): as OpenAI,
        logprobs cover the text only."""
        return [e for e in entries if e.token_id not in (self.tokenizer.boundary_id, self.end_id)]

    # ------------------------------------------------------------ shared

    def _check(self, body, prompts: list[list[int]], max_tokens: int | None, param: str) -> int:
        """The model name and the context budget, with OpenAI's codes; returns max_tokens (None: the rest
        of the context, as OpenAI's chat default)."""
        if body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist: this server has `{self.model_name}`",
                           param="model", code="model_not_found")
        context = self.engine.max_seq_len
        if max_tokens is not None and max_tokens >= context:
            raise APIError(400, f"max_tokens is {max_tokens}, but this model's context is {context} tokens: "
                                f"ask for fewer", param="max_tokens", code="context_length_exceeded")
        longest = max(len(p) for p in prompts)
        if max_tokens is None and longest < context:
            return context - longest
        if longest + (max_tokens or 1) > context:
            asked = f"and max_tokens is {max_tokens}" if max_tokens else "which leaves no room for a reply"
            raise APIError(400, f"this model's context is {context} tokens, but the {param} takes {longest} tokens "
                                f"{asked}: shorten the {param} or ask for fewer tokens",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def _submit(self, body, prompts: list[list[int]], max_tokens: int, logprobs: int | None, stop_ids: tuple[int, ...]):
        """n engine requests per prompt, choice i seeded seed + i; all or none are queued."""
        requests = []
        try:
            for prompt in prompts:
                for _ in range(body.n):
                    params = SamplingParams(
                        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                        seed=None if body.seed is None else body.seed + len(requests), stop=tuple(body.stop),
                        stop_token_ids=stop_ids, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, logprobs=logprobs)
                    requests.append(self.engine.submit(prompt, params))
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        return requests

    async def _deltas(self, requests, start: float):
        """(choice index, delta) from all requests as they come. Raises TimeoutError past the deadline;
        whatever way it ends, the requests still running are cancelled."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, request):
            try:
                async for delta in request:
                    queue.put_nowait((i, delta))
                queue.put_nowait(None)
            except Exception as e:  # an engine failure surfaces in the consumer, not in a lost task
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            left, first = len(tasks), True
            while left:
                # the timeout wraps only the wait: a deadline must never fire inside the consumer's send
                async with asyncio.timeout_at(start + self.limits.request_timeout):
                    item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    left -= 1
                    continue
                if first:
                    self.metrics.ttft.observe(loop.time() - start)
                    first = False
                yield item
        finally:
            for t in tasks:
                t.cancel()
            for r in requests:
                r.cancel()

    async def _collect(self, http: Request, requests, start: float) -> list[_Choice] | None:
        """All choices to the end, or None if the client went away first (its requests are then cancelled)."""
        async def gather():
            choices = [_Choice() for _ in requests]
            async for i, delta in self._deltas(requests, start):
                choices[i].add(delta)
            return choices

        async def client_gone():
            while (await http.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.create_task(gather()), asyncio.create_task(client_gone())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            return None
        try:
            return work.result()
        except TimeoutError:
            raise self.timeout() from None

    def timeout(self) -> APIError:
        return APIError(408, f"the request ran past the server's limit of {self.limits.request_timeout:g} s: "
                             "ask for fewer tokens or retry later", type="timeout_error", code="request_timeout")

    async def _events(self, requests, start: float, chunk, include_usage: bool, prompt_tokens: int, first=(),
                      edit=None):
        """SSE lines: `first` chunks, a chunk per delta (`edit(i, delta)` first, if given), the usage chunk if
        asked, then [DONE]."""
        for obj in first:
            yield _sse(obj)
        sent, stopped = [""] * len(requests), set()  # each choice's text so far; choices ended by moderation
        try:
            async for i, delta in self._deltas(requests, start):
                if i in stopped:
                    continue
                if edit is not None:
                    delta = edit(i, delta)
                if self.moderation is not None and delta.text and await self.moderation.flagged(sent[i] + delta.text):
                    requests[i].cancel()
                    stopped.add(i)
                    self.metrics.refused["output"] += 1
                    delta = Delta("", [], [], "content_filter")  # the flagged piece is not sent
                sent[i] += delta.text
                if delta.text or delta.logprobs or delta.finish_reason:
                    yield _sse(chunk(i, delta))
        except TimeoutError:  # the 200 status is sent: the error travels as an event (the openai client raises it)
            yield _sse(self.timeout().body)
        except RuntimeError as e:  # the engine failed
            yield _sse(error_body(str(e), type="server_error"))
        if include_usage:
            yield _sse(chunk(None, None) | {"choices": [], "usage": schemas.usage(
                prompt_tokens, sum(r.completion_tokens for r in requests))})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ routes

    async def completions(self, body: CompletionRequest, http: Request):
        start = asyncio.get_running_loop().time()
        prompts = [[self.tokenizer.boundary_id, *self.tokenizer.encode(p)] for p in body.prompt]
        max_tokens = self._check(body, prompts, body.max_tokens, "prompt")
        if self.moderation is not None:
            await self.moderation.check_input(body.prompt, "prompt")
        requests = self._submit(body, prompts, max_tokens, body.logprobs, ())
        head = {"id": schemas.new_id("cmpl"), "object": "text_completion", "created": schemas.now(), "model": self.model_name}
        prompt_tokens = sum(len(p) for p in prompts)
        text_of = [body.prompt[i // body.n] for i in range(len(requests))]  # the prompt of each choice
        base = [len(t) if body.echo else 0 for t in text_of]  # logprobs' text_offset starts after an echoed prompt

        def logprobs(entries, offset):
            if body.logprobs is None:
                return None
            return schemas.completion_logprobs(self.text_logprobs(entries), self.decode, offset)

        if body.stream:
            sent = list(base)  # characters of each choice's text sent so far, for text_offset

            def chunk(i, delta):
                if delta is None:
                    return dict(head)
                lp = logprobs(delta.logprobs, sent[i])
                sent[i] += len(delta.text)
                return head | {"choices": [{"index": i, "text": delta.text, "logprobs": lp,
                                            "finish_reason": delta.finish_reason}]}
            echo = [head | {"choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": None}]}
                    for i, t in enumerate(text_of)] if body.echo else []
            return _EventStream(self._events(requests, start, chunk, body.include_usage, prompt_tokens, echo), requests)

        choices = await self._collect(http, requests, start)
        if choices is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it
        if self.moderation is not None:
            await self.moderation.withhold_flagged(choices)
        return head | {
            "choices": [{"index": i, "text": (text_of[i] if body.echo else "") + c.text,
                         "logprobs": None if c.withheld else logprobs(c.logprobs, base[i]),
                         "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": schemas.usage(prompt_tokens, sum(r.completion_tokens for r in requests))}

    async def chat(self, body: ChatRequest, http: Request):
        start = asyncio.get_running_loop().time()
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt = render_chat(self.tokenizer, messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt, grounded = await self.grounding.prepare(body, messages, prompt)
        max_tokens = self._check(body, [prompt], body.max_completion_tokens or body.max_tokens, "messages")
        if self.moderation is not None:
            await self.moderation.check_input([m.as_template_message()["content"] for m in body.messages], "messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        requests = self._submit(body, [prompt], max_tokens, k, (self.end_id,))
        head = {"id": schemas.new_id("chatcmpl"), "created": schemas.now(), "model": self.model_name}

        def logprobs(entries):
            return None if k is None else {"content": schemas.chat_logprobs(self.text_logprobs(entries), self.decode)}

        if body.stream:
            head |= {"object": "chat.completion.chunk"}
            usage_field = {"usage": None} if body.include_usage else {}  # as OpenAI: null on all but the last

            def chunk(i, delta):
                if delta is None:
                    return dict(head)
                content = {"content": delta.text} if delta.text else {}
                if delta.finish_reason:
                    content |= grounded.fields(i)  # the choice's citations, once its text is settled
                return head | {"choices": [{"index": i, "delta": content,
                                            "logprobs": logprobs(delta.logprobs),
                                            "finish_reason": delta.finish_reason}]} | usage_field
            roles = [head | grounded.head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]} | usage_field
                     for i in range(len(requests))]
            return _EventStream(self._events(requests, start, chunk, body.include_usage, len(prompt), roles,
                                             grounded.edit), requests)

        choices = await self._collect(http, requests, start)
        if choices is None:
            return Response(status_code=499)
        grounded.check(choices)
        if self.moderation is not None:
            await self.moderation.withhold_flagged(choices)
        return head | grounded.head | {
            "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": None if c.withheld else c.text}
                         | grounded.fields(i, c.withheld),
                         "logprobs": None if c.withheld else logprobs(c.logprobs), "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": schemas.usage(len(prompt), sum(r.completion_tokens for r in requests))}


def _param(loc) -> str | None:
    """pydantic's ("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or None


def create_app(engine, tokenizer, *, model_name: str, api_key: str | None = None,
               limits: ServeLimits = ServeLimits(), moderator=None, index=None,
               grounding: GroundingConfig = GroundingConfig()) -> FastAPI:
    """The app over a running engine. The app owns the engine from here: it closes it at shutdown, after
    the last in-flight request has been answered. `moderator`: a SafetyClassifier (or anything with
    score(texts) -> array and threshold) that moderates requests and replies and answers /v1/moderations.
    `index`: a tweetlm.search.index.Index (the caller's to close) for /v1/posts, /v1/search and grounding."""
    metrics = Metrics()
    moderation = _Moderation(moderator, metrics) if moderator is not None else None
    grounder = Grounding(index, tokenizer, engine.max_seq_len, grounding, metrics)
    service = _Service(engine, tokenizer, model_name, limits, metrics, moderation, grounder)
    created = schemas.now()
    page = (STATIC / "index.html").read_text()

    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="tweetlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, limits=limits, metrics=metrics)

    def authorized(request: Request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):  # the engine's own checks (ranges, context, shutting down)
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):  # FastAPI's 422 becomes OpenAI's 400
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        param = _param(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if param is None and error["type"] in ("missing", "model_attributes_type"):  # no body, or not an object
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown path (404), wrong method (405)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def index():
        # the page shows model output with textContent only; the policy also blocks anything injected
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return schemas.model_list(model_name, created)

    @app.get("/v1/models/{name}", dependencies=guarded)
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return schemas.model_list(model_name, created)["data"][0]

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await service.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.chat(body, request)

    @app.post("/v1/moderations", dependencies=guarded)
    async def moderations(body: ModerationRequest):
        if moderation is None:
            raise APIError(404, "moderation is off on this server: start it with `tweetlm serve RUN --moderate SAFETY`",
                           code="not_found")
        return schemas.moderation(await moderation.scores(body.input), moderation.threshold)

    grounder.routes(app, guarded)
    add_task_routes(app, service, guarded)
    return app
