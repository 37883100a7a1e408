"""The OpenAI wire format of responses: engine Deltas in, response objects and stream chunks out, as plain dicts.

Shapes as platform.openai.com/docs/api-reference has them (completions, chat completions, models). A stream is
server-sent events: its format's first chunks, a chunk per Delta, the usage chunk if the request asked for it
(stream_options.include_usage), then `data: [DONE]`. Request bodies and the error object are in serve/schemas.py.
"""

import json
import time
import uuid

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tweetlm"}]}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
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


class Choice:
    """One choice's text, logprobs and finish reason, gathered from its engine deltas."""

    def __init__(self):
        self.text, self.logprobs, self.finish_reason, self.withheld = "", [], None, False

    def add(self, delta) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason

    def withhold(self) -> None:
        self.text, self.logprobs, self.finish_reason, self.withheld = "", [], "content_filter", True


def _token_bytes(text: str) -> list[int] | None:
    # a token that is part of a UTF-8 character decodes to U+FFFD alone: its bytes are unknown here (null, as OpenAI allows)
    return None if "\ufffd" in text else list(text.encode())


class Logprobs:
    """The engine's TokenLogprob entries in OpenAI's shapes. As OpenAI's, they cover the text only: the token
    that ended the request (<|endoftext|> or <|end|>) is left out."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ends = (tokenizer.boundary_id, tokenizer.token_id("<|end|>"))

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _text(self, entries: list) -> list:
        return [e for e in entries if e.token_id not in self.ends]

    def chat(self, entries: list) -> dict:
        """Chat's `logprobs`: {"content": one entry per token with its top alternatives}."""
        content = []
        for e in self._text(entries):
            token = self._decode(e.token_id)
            top = [{"token": (t := self._decode(i)), "logprob": lp, "bytes": _token_bytes(t)} for i, lp in e.top]
            content.append({"token": token, "logprob": e.logprob, "bytes": _token_bytes(token), "top_logprobs": top})
        return {"content": content}

    def scored(self, prompt_ids: list[int], prompt_entries: list, entries: list) -> dict:
        """Legacy completions' `logprobs` with echo: every echoed prompt token (null where it has no context: the
        first of a token-id prompt), then every generated one, end tokens included, so that the lists align with
        the request's tokens (what lm-evaluation-harness reads); `text_offset` from the echoed prompt's start."""
        return self._lists([*zip(prompt_ids, prompt_entries), *((e.token_id, e) for e in entries)], 0)

    def completion(self, entries: list, offset: int) -> dict:
        """Legacy completions' `logprobs`: parallel lists, `text_offset` counted from `offset`."""
        return self._lists([(e.token_id, e) for e in self._text(entries)], offset)

    def _lists(self, pairs: list, offset: int) -> dict:
        """(token id, TokenLogprob or None) pairs as OpenAI's parallel lists; None gives null logprob and top."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for token_id, e in pairs:
            tokens.append(token := self._decode(token_id))
            logprobs.append(None if e is None else e.logprob)
            tops.append(None if e is None else {self._decode(i): lp for i, lp in e.top})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


class CompletionFormat:
    """One POST /v1/completions' response objects. `prompts`: each choice's prompt (choice i answers prompt
    i // n), echoed before its text if asked; `logprobs`: None if not asked."""

    def __init__(self, model: str, prompts: list[str], echo: bool, logprobs: Logprobs | None):
        self.head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model}
        self.prompts, self.echo, self.logprobs = prompts, echo, logprobs
        self.base = [len(p) if echo else 0 for p in prompts]  # logprobs' text_offset starts after an echoed prompt
        self.sent = list(self.base)  # characters of each choice's text sent so far (a stream), for text_offset
        self.scores = None  # with echo and logprobs: each choice's logprobs, prompt included (`score`)

    def score(self, logprobs: list[dict]) -> None:
        """Each choice's `logprobs` when the prompt was scored (echo with logprobs): Logprobs.scored's."""
        self.scores = logprobs

    def _logprobs(self, entries: list, offset: int) -> dict | None:
        return None if self.logprobs is None else self.logprobs.completion(entries, offset)

    def first_chunks(self) -> list[dict]:
        """A stream's echoed prompts, if asked."""
        if not self.echo:
            return []
        return [self.head | {"choices": [{"index": i, "text": p, "logprobs": None, "finish_reason": None}]}
                for i, p in enumerate(self.prompts)]

    def chunk(self, i: int, delta) -> dict:
        """Choice i's stream chunk for one Delta."""
        logprobs = self._logprobs(delta.logprobs, self.sent[i])
        self.sent[i] += len(delta.text)
        return self.head | {"choices": [{"index": i, "text": delta.text, "logprobs": logprobs,
                                         "finish_reason": delta.finish_reason}]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """A stream's last chunk when the request asked for usage: no choices, the token counts."""
        return self.head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, choices: list[Choice], prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole response, not streamed."""
        return self.head | {
            "choices": [{"index": i, "text": (self.prompts[i] if self.echo else "") + c.text,
                         "logprobs": None if c.withheld else self.scores[i] if self.scores
                         else self._logprobs(c.logprobs, self.base[i]),
                         "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


class ChatFormat:
    """One POST /v1/chat/completions' response objects, for `n` choices. `grounded`: the request's Grounded
    (serve/grounding.py: the posts in its prompt, each choice's citations); `logprobs`: None if not asked."""

    def __init__(self, model: str, n: int, grounded, logprobs: Logprobs | None, include_usage: bool):
        self.head = {"id": new_id("chatcmpl"), "created": now(), "model": model}
        self.chunk_head = self.head | {"object": "chat.completion.chunk"}
        self.usage_field = {"usage": None} if include_usage else {}  # as OpenAI: null on all chunks but the last
        self.n, self.grounded, self.logprobs = n, grounded, logprobs

    def _logprobs(self, entries: list) -> dict | None:
        return None if self.logprobs is None else self.logprobs.chat(entries)

    def first_chunks(self) -> list[dict]:
        """A stream's first chunk per choice: the role, and the grounding."""
        return [self.chunk_head | self.grounded.head
                | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]}
                | self.usage_field for i in range(self.n)]

    def chunk(self, i: int, delta) -> dict:
        """Choice i's stream chunk for one Delta."""
        content = {"content": delta.text} if delta.text else {}
        if delta.finish_reason:
            content |= self.grounded.fields(i)  # the choice's citations, once its text is settled
        return self.chunk_head | {"choices": [{"index": i, "delta": content, "logprobs": self._logprobs(delta.logprobs),
                                               "finish_reason": delta.finish_reason}]} | self.usage_field

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """A stream's last chunk when the request asked for usage: no choices, the token counts."""
        return self.chunk_head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, choices: list[Choice], prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole response, not streamed."""
        return self.head | self.grounded.head | {
            "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": None if c.withheld else c.text}
                         | self.grounded.fields(i, c.withheld),
                         "logprobs": None if c.withheld else self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}
