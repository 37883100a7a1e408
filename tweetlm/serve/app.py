"""The HTTP app: OpenAI-compatible routes over the engine and the web chat page, behind the guard (serve/guard.py:
API key, limits, error objects, per-request metrics), with moderation (serve/moderation.py), grounding
(serve/grounding.py) and the responses' wire format (serve/wire.py).

    GET  /                      the web chat page (static/index.html, no build step; also HEAD)
    GET  /health                {"status": "ok"} (also HEAD)
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

With a safety classifier (`serve --moderate`), a toxic prompt or message is refused with 400, code
"content_filter", and a toxic reply ends with finish_reason "content_filter" (serve/moderation.py).
"""

import asyncio
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from tweetlm.errors import UserError
from tweetlm.infer.engine import SamplingParams
from tweetlm.serve.grounding import Grounding, GroundingConfig
from tweetlm.serve.guard import Guard, ServeLimits, add_error_handlers, api_key_check, client_gone, timeout_error
from tweetlm.serve.metrics import Metrics
from tweetlm.serve.moderation import Moderation
from tweetlm.serve.schemas import APIError, ChatRequest, CompletionRequest, ModerationRequest, error_body
from tweetlm.serve.tasks import TASK_ROUTES, add_task_routes
from tweetlm.serve.wire import DONE, ChatFormat, Choice, CompletionFormat, EventStream, Logprobs, model_list, now, sse
from tweetlm.tokenizer.chat import render_chat

STATIC = Path(__file__).parent / "static"
# the page shows model output with textContent only; the policy also blocks anything injected, and framing by
# another site (clickjacking). Sent with the page at / and with every file under /static, the page included.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"}
GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions", *TASK_ROUTES)
# metrics labels; anything else is "other"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/moderations", "/v1/posts", "/v1/search", *GENERATE_ROUTES)


class _Service:
    """The generation routes' logic; create_app wires it to FastAPI. tasks.py uses its engine, tokenizer,
    limits and moderation, and check_model."""

    def __init__(self, engine, tokenizer, model_name: str, limits: ServeLimits, metrics: Metrics,
                 moderation: Moderation, grounding: Grounding):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits, self.metrics, self.moderation, self.grounding = limits, metrics, moderation, grounding
        self.end_id = tokenizer.token_id("<|end|>")
        self.logprobs = Logprobs(tokenizer)

    def check_model(self, body) -> None:
        """404 model_not_found unless the body names the model served."""
        if body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist: this server has `{self.model_name}`",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------ shared

    def _check(self, body, prompts: list[list[int]], max_tokens: int | None, param: str,
               max_param: str = "max_tokens") -> int:
        """The model name and the context budget, with OpenAI's codes; returns max_tokens (None: the rest
        of the context, as OpenAI's chat default). `max_param`: the field the client set max_tokens with."""
        self.check_model(body)
        context = self.engine.max_seq_len
        if max_tokens is not None and max_tokens >= context:
            raise APIError(400, f"{max_param} is {max_tokens}, but this model's context is {context} tokens: "
                                f"ask for fewer", param=max_param, code="context_length_exceeded")
        longest = max(len(p) for p in prompts)
        if max_tokens is None and longest < context:
            return context - longest
        if longest + (1 if max_tokens is None else max_tokens) > context:
            asked = f"and {max_param} is {max_tokens}" if max_tokens else "which leaves no room for a reply"
            raise APIError(400, f"this model's context is {context} tokens, but the {param} takes {longest} tokens "
                                f"{asked}: shorten the {param} or ask for fewer tokens",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def _submit(self, body, prompts: list[list[int]], max_tokens: int, logprobs: int | None, stop_ids: tuple[int, ...],
                prompt_logprobs: int | None = None):
        """n engine requests per prompt, choice i seeded seed + i; all or none are queued."""
        requests = []
        try:
            for prompt in prompts:
                for _ in range(body.n):
                    params = SamplingParams(
                        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                        seed=None if body.seed is None else body.seed + len(requests), stop=tuple(body.stop),
                        stop_token_ids=stop_ids, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
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

    async def _collect(self, http: Request, requests, start: float) -> list[Choice] | None:
        """All choices to the end, or None if the client went away first (its requests are then cancelled)."""
        async def gather():
            choices = [Choice() for _ in requests]
            async for i, delta in self._deltas(requests, start):
                choices[i].add(delta)
            return choices

        work, gone = asyncio.create_task(gather()), asyncio.create_task(client_gone(http))
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
            raise timeout_error(self.limits) from None

    async def _events(self, requests, start: float, out: CompletionFormat | ChatFormat, include_usage: bool,
                      prompt_tokens: int, edit=None):
        """SSE lines: `out`'s first chunks, a chunk per delta (`edit(i, delta)` first, if given), the usage
        chunk if asked, then [DONE]."""
        for obj in out.first_chunks():
            yield sse(obj)
        sent, stopped = [""] * len(requests), set()  # each choice's text so far; choices ended by moderation
        try:
            async for i, delta in self._deltas(requests, start):
                if i in stopped:
                    continue
                if edit is not None:
                    delta = edit(i, delta)
                delta = await self.moderation.screen(sent[i], delta)
                if delta.finish_reason == "content_filter":  # moderation ended the choice: stop decoding it
                    requests[i].cancel()
                    stopped.add(i)
                sent[i] += delta.text
                if delta.text or delta.logprobs or delta.finish_reason:
                    yield sse(out.chunk(i, delta))
        except TimeoutError:  # the 200 status is sent: the error travels as an event (the openai client raises it)
            yield sse(timeout_error(self.limits).body)
        except RuntimeError as e:  # the engine failed
            yield sse(error_body(str(e), type="server_error"))
        if include_usage:
            yield sse(out.usage_chunk(prompt_tokens, sum(r.completion_tokens for r in requests)))
        yield DONE

    # ------------------------------------------------------------ routes

    async def completions(self, body: CompletionRequest, http: Request):
        start = asyncio.get_running_loop().time()
        # a text prompt follows <|endoftext|> (a new post); token ids are taken as they are
        prompts = [p if isinstance(p, list) else [self.tokenizer.boundary_id, *self.tokenizer.encode(p)]
                   for p in body.prompt]
        texts = [self.tokenizer.decode(p) if isinstance(p, list) else p for p in body.prompt]
        max_tokens = self._check(body, prompts, body.max_tokens, "prompt")
        await self.moderation.check_input(texts, "prompt")
        scoring = body.echo and body.logprobs is not None  # the prompt's tokens are scored too
        requests = self._submit(body, prompts, max_tokens, body.logprobs, (), body.logprobs if scoring else None)
        out = CompletionFormat(self.model_name, [texts[i // body.n] for i in range(len(requests))], body.echo,
                               None if body.logprobs is None else self.logprobs)
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return EventStream(self._events(requests, start, out, body.include_usage, prompt_tokens), requests)

        choices = await self._collect(http, requests, start)
        if choices is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it
        await self.moderation.withhold_flagged(choices)
        if scoring:  # the echoed tokens: a text prompt's without the <|endoftext|> put before it
            echoed = [prompts[i // body.n][0 if isinstance(body.prompt[i // body.n], list) else 1:]
                      for i in range(len(requests))]
            out.score([self.logprobs.scored(ids, r.prompt_logprobs[-len(ids):], c.logprobs)
                       for ids, r, c in zip(echoed, requests, choices)])
        return out.response(choices, prompt_tokens, sum(r.completion_tokens for r in requests))

    async def chat(self, body: ChatRequest, http: Request):
        start = asyncio.get_running_loop().time()
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt = render_chat(self.tokenizer, messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt, grounded = await self.grounding.prepare(body, messages, prompt)
        newer = body.max_completion_tokens is not None  # OpenAI's newer name wins, and is the one errors name
        max_tokens = self._check(body, [prompt], body.max_completion_tokens if newer else body.max_tokens, "messages",
                                 "max_completion_tokens" if newer else "max_tokens")
        await self.moderation.check_input([m.as_template_message()["content"] for m in body.messages], "messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        requests = self._submit(body, [prompt], max_tokens, k, (self.end_id,))
        out = ChatFormat(self.model_name, len(requests), grounded, None if k is None else self.logprobs,
                         body.include_usage)
        if body.stream:
            return EventStream(self._events(requests, start, out, body.include_usage, len(prompt), grounded.edit),
                               requests)

        choices = await self._collect(http, requests, start)
        if choices is None:
            return Response(status_code=499)
        grounded.check(choices)
        await self.moderation.withhold_flagged(choices)
        return out.response(choices, len(prompt), sum(r.completion_tokens for r in requests))


class _Static(StaticFiles):
    """The page's files, each with PAGE_HEADERS: the page itself is also here, under any spelling of its path."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


def create_app(engine, tokenizer, *, model_name: str, api_key: str | None = None,
               limits: ServeLimits = ServeLimits(), moderator=None, index=None,
               grounding: GroundingConfig = GroundingConfig()) -> FastAPI:
    """The app over a running engine. The app owns the engine from here: it closes it at shutdown, after
    the last in-flight request has been answered. `moderator`: a SafetyClassifier (or anything with
    score(texts) -> array and threshold) that moderates requests and replies and answers /v1/moderations.
    `index`: a tweetlm.search.index.Index (the caller's to close) for /v1/posts, /v1/search and grounding."""
    metrics = Metrics()
    moderation = Moderation(moderator, metrics)
    grounder = Grounding(index, tokenizer, engine.max_seq_len, grounding, metrics)
    service = _Service(engine, tokenizer, model_name, limits, metrics, moderation, grounder)
    created = now()
    page = (STATIC / "index.html").read_text()

    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="tweetlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, limits=limits, metrics=metrics, routes=ROUTES, generating=GENERATE_ROUTES)
    add_error_handlers(app)
    guarded = [Depends(api_key_check(api_key))]

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    app.mount("/static", _Static(directory=STATIC), name="static")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers and uptime checks send
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return model_list(model_name, created)

    @app.get("/v1/models/{name}", dependencies=guarded)
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_list(model_name, created)["data"][0]

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await service.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.chat(body, request)

    @app.post("/v1/moderations", dependencies=guarded)
    async def moderations(body: ModerationRequest):
        return await moderation.classify(body.input)

    grounder.routes(app, guarded)
    add_task_routes(app, service, guarded)
    return app
