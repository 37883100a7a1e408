"""The OpenAI wire format of requests: the bodies (validated by pydantic), and the error object any route answers.

Requests follow OpenAI's field names, defaults and ranges (platform.openai.com/docs/api-reference), plus
`top_k` as vLLM has it (0 or -1: off), and chat's `grounding` fields (serve/grounding.py). A field sent as
null takes its default, as OpenAI does. Other OpenAI fields are ignored, except those that would change the
answer and are not built (tools, functions, response_format, logit_bias, suffix): those are refused rather
than silently dropped. POST /v1/posts (tweetlm's own) is validated here too. Responses are built in serve/wire.py.

Every text field is `Text`: a JSON string may spell half of a UTF-16 surrogate pair ("\\ud800"), which Python keeps
but UTF-8, the tokenizer and the index cannot take; it is refused here with 400 naming the field, as a seed
torch cannot take is (SEED_MIN..SEED_MAX, also as seed + i for choice i).
"""

import time
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator,
                      model_validator)

from tweetlm.search.ground import MAX_ID_CHARS
from tweetlm.search.index import to_unix

MAX_N = 16  # choices per request: each is one sequence in the engine's batch
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs and the engine's limit
_UNSUPPORTED = ("tools", "functions", "response_format", "logit_bias", "suffix")
MAX_GROUNDING_K = 50  # posts one question retrieves; the prompt's token budget may keep fewer
MAX_POSTS = 1000  # posts in one POST /v1/posts: ~0.3 MB of 280-character posts, under the 1 MiB body limit
MAX_POST_CHARS = 25_000  # X's longest posts (Premium) are 25,000 characters
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed takes (a negative seed wraps to 2**64 + seed)


class FieldError(ValueError):
    """A check across fields that blames one of them: the 400 names `param` (pydantic would name none)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _whole_characters(value):
    """A string as UTF-8 can hold it, or a ValueError; anything else is left to the field's own type check."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"character {e.start} is U+{ord(value[e.start]):04X}, a lone UTF-16 surrogate (half "
                             "of a pair), which is not text: send valid Unicode") from None
    return value


Text = Annotated[str, BeforeValidator(_whole_characters)]
NonEmpty = Annotated[Text, StringConstraints(min_length=1)]


def _one_or_many(value):
    """OpenAI takes one string or a list of them; one list type keeps pydantic's errors plain (no union)."""
    return [value] if isinstance(value, str) else value


def _prompts(value):
    """A completion's prompt as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of
    such lists -> a list of strings and token-id lists."""
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [value]
    return _one_or_many(value)


def _prompt(value):
    """One prompt: text (whole characters) or a non-empty list of token ids >= 0 (the engine checks the vocabulary).
    Checked here, with one message each, rather than by a union type, whose errors name both branches."""
    if isinstance(value, str):
        return _whole_characters(value)
    if not isinstance(value, list) or not value:
        raise ValueError("a prompt is a string or a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError("token ids must be integers greater than or equal to 0")
    return value


Prompt = Annotated[Any, BeforeValidator(_prompt)]  # str | list[int]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share. strict: "10" is not a number, 1 is not a boolean (as OpenAI)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Annotated[list[NonEmpty], BeforeValidator(_one_or_many)] = Field([], max_length=MAX_STOP)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_unsupported(cls, data):
        if not isinstance(data, dict):
            return data  # pydantic then says it must be an object
        for name in _UNSUPPORTED:
            if data.get(name):
                raise ValueError(f"`{name}` is not supported by this server; remove it")
        return {k: v for k, v in data.items() if v is not None}

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _seeds_in_range(self):
        last = self.choices - 1
        if self.seed is not None and self.seed + last > SEED_MAX:
            raise FieldError("seed", f"choice i is seeded seed + i, and seed + {last} is over {SEED_MAX}, the largest "
                                     "seed: send a smaller seed")
        return self

    @property
    def choices(self) -> int:
        """Engine requests this body makes (each seeded seed + i)."""
        return self.n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    """POST /v1/completions. A list of prompts gives n choices per prompt, indexed prompt * n + j."""

    # text (which follows <|endoftext|>, as a new post) or token ids (taken as they are)
    prompt: Annotated[list[Prompt], BeforeValidator(_prompts)] = Field(min_length=1)
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with echo: the prompt's tokens are scored too

    @model_validator(mode="after")
    def _choices_and_echo(self):
        if len(self.prompt) * self.n > MAX_N:
            raise ValueError(f"{len(self.prompt)} prompts x n={self.n} is over the server's limit of {MAX_N} choices")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens 0 returns nothing without echo: ask for at least 1 token")
        if self.echo and self.logprobs is not None and self.stream:
            raise FieldError("stream", "echo with logprobs (scoring the prompt) is not streamed: set stream to false")
        return self

    @property
    def choices(self) -> int:
        return len(self.prompt) * self.n


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


def _parts(content):
    """OpenAI's content: a string, or a list of text parts; a string is one part (checked here, so that its
    error names `content`, the field sent)."""
    return [{"type": "text", "text": _whole_characters(content)}] if isinstance(content, str) else content


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Annotated[list[TextPart], BeforeValidator(_parts)]

    def as_template_message(self) -> dict:
        text = "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def _moderation_texts(value):
    """OpenAI's moderation input: a string, a list of strings, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return value
    texts = []
    for item in value:
        if isinstance(item, dict):
            if item.get("type") != "text":
                raise ValueError(f"only text is moderated here: an input of type {item.get('type')!r} is not supported")
            item = item.get("text")
        texts.append(item)
    return texts


class ModerationRequest(BaseModel):
    """POST /v1/moderations. `model` is accepted and ignored: the server has one classifier."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: Annotated[list[Text], BeforeValidator(_moderation_texts)] = Field(min_length=1)
    model: Text | None = None


class ChatRequest(Sampling):
    """POST /v1/chat/completions. max_tokens unset: the reply may fill the rest of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens, wins over it
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    # grounding on the server's posts index (serve/grounding.py); the openai client sends them in extra_body
    grounding: bool | None = None  # None: the server's default (`serve --ground`)
    grounding_k: int | None = Field(None, ge=1, le=MAX_GROUNDING_K)  # None: the server's (`--ground-k`)
    # only posts from then on: ISO time, duration ("24h") or unix seconds
    grounding_since: Annotated[str | float | None, BeforeValidator(_whole_characters)] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self


def _post_id(value: str) -> str:
    if not 1 <= len(value) <= MAX_ID_CHARS or any(c.isspace() or c in "[]" for c in value):
        raise ValueError(f"{value[:40]!r}: an id is 1 to {MAX_ID_CHARS} characters without whitespace or brackets "
                         "(so that an answer can cite it as [post:ID])")
    return value


PostId = Annotated[Text, AfterValidator(_post_id)]
Field128 = Annotated[Text, StringConstraints(max_length=128)]


class IndexPost(BaseModel):
    """A post for the index; created_at as ISO 8601 (no zone: UTC) or unix seconds."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: PostId
    text: Text = Field(min_length=1, max_length=MAX_POST_CHARS)
    created_at: Annotated[str | float | None, BeforeValidator(_whole_characters)] = None
    author_id: Field128 | None = None
    lang: Field128 | None = None
    conversation_id: PostId | None = None
    in_reply_to_id: PostId | None = None

    @field_validator("created_at")
    @classmethod
    def _iso(cls, value):
        if isinstance(value, float):
            if not 0 <= value < 253402300800:  # 1970 to 9999 (NaN fails too)
                raise ValueError(f"{value} unix seconds is not a time between 1970 and 9999")
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
        if value is not None and to_unix(value) is None:
            raise ValueError(f"{value[:40]!r} is not an ISO 8601 time (2024-05-01T12:00:00Z) or unix seconds")
        return value


class PostsRequest(BaseModel):
    """POST /v1/posts: posts to add to the index, or to update (same id)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    posts: list[IndexPost] = Field(min_length=1, max_length=MAX_POSTS)

    @model_validator(mode="after")
    def _distinct_ids(self):
        first = {}
        for i, post in enumerate(self.posts):
            if post.id in first:
                raise ValueError(f"posts[{i}].id {post.id!r} repeats posts[{first[post.id]}].id: send each post once")
            first[post.id] = i
        return self


# ---------------------------------------------------------------- errors


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object; the HTTP status carries the class (400, 401, 404, 408, 413, 429)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = error_body(message, type=type, param=param, code=code)
