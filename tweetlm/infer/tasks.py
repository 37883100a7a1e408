"""The assistant's platform tasks on the engine: compose a post, reply to one, summarize a thread.

    tweetlm compose runs/chat --topic 'the garage' --hashtag DIY --seed 1

Each renders its task's messages (tweetlm/artifacts/prompts.py, the prompts the training data uses) with the chat
template, streams the model's reply and keeps the post that `clip` makes of it. What holds whatever the model
writes, an untrained one included:
- at most 280 characters (Python str characters), cut only at whitespace: no word, emoji ZWJ sequence, flag or
  skin tone is split; decoding is cancelled as soon as the word being written can no longer fit;
- no @user / http placeholder, mention or link, no control or broken character (U+FFFD): such words are
  dropped; a special token (<|end|>, a role token) ends the post;
- every requested hashtag: those the model did not write end the post, their room kept from the start.
A reply ended by max_tokens (or abandoned through `cancel`) loses its last word, which may be unfinished.
Blocking and thread-safe: all state is per call, and the engine takes requests from any thread (the server
calls these through asyncio.to_thread while the engine serves others).
"""

import dataclasses
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tweetlm.artifacts.prompts import LIMIT, check_hashtags, clip, compose_messages, reply_messages, summarize_messages
from tweetlm.device import resolve_device
from tweetlm.errors import UserError, check
from tweetlm.infer.engine import Engine
from tweetlm.infer.sampling import VERB_SAMPLING, SamplingParams
from tweetlm.model.weights import load_model
from tweetlm.tokenizer.bpe import SPECIAL_TOKENS
from tweetlm.tokenizer.chat import render_chat


def compose(engine, tokenizer, *, topic: str = "", hashtags: Sequence[str] = (), params: SamplingParams,
            cancel: threading.Event | None = None) -> str:
    """A new post about `topic` (may be empty) that holds each of `hashtags` ('#tag' or 'tag')."""
    tags = check_hashtags(hashtags)
    return _write(engine, tokenizer, compose_messages(topic, tags), params, tags, cancel, "topic")


def reply(engine, tokenizer, *, post: str, params: SamplingParams, cancel: threading.Event | None = None) -> str:
    """A reply to `post`."""
    return _write(engine, tokenizer, reply_messages(post), params, (), cancel, "post")


def summarize(engine, tokenizer, *, thread: Sequence[str], params: SamplingParams,
              cancel: threading.Event | None = None) -> str:
    """A post that sums up `thread` (its posts in order)."""
    return _write(engine, tokenizer, summarize_messages(thread), params, (), cancel, "thread")


def _write(engine, tokenizer, messages: list[dict], params: SamplingParams, hashtags: tuple[str, ...],
           cancel: threading.Event | None, what: str) -> str:
    """The post the model writes after `messages`; `cancel` set (from another thread) abandons it."""
    prompt = render_chat(tokenizer, messages)
    room = engine.max_seq_len - len(prompt)
    if room < 1:
        raise UserError(f"the {what} makes a prompt of {len(prompt)} tokens, which leaves no room in the model's "
                        f"context of {engine.max_seq_len} tokens: shorten it")
    # any special token ends the post: the template's <|end|>, or a role token, which the post must not hold
    params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room), stop_token_ids=(
        *params.stop_token_ids, *(tokenizer.token_id(name) for name in SPECIAL_TOKENS)))
    request = engine.submit(prompt, params)
    text, finish = "", None
    reserve = sum(1 + len(t) for t in hashtags)
    try:
        for delta in request:
            text, finish = text + delta.text, delta.finish_reason
            if cancel is not None and cancel.is_set():
                break
            # a post is made of the text's own characters, so it cannot outgrow the limit before the text does
            # (which spares clip on most tokens: ~0.1 ms each, as much as a decoding step of a small batch)
            if delta.text and len(text) + reserve > LIMIT and clip(text, hashtags=hashtags, final=False)[1]:
                break  # the next word cannot fit: what is kept is final, stop decoding
    finally:
        request.cancel()  # frees the engine's slot at once (a no-op once finished)
    # ended by the model: its last word is whole; by max_tokens or here: the last word may be cut, it goes
    return clip(text, hashtags=hashtags, final=finish == "stop")[0]


# ---------------------------------------------------------------- the verbs


_TASKS = {"compose": (compose, compose_messages), "reply": (reply, reply_messages),
         "summarize": (summarize, summarize_messages)}


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    run: Path
    num_samples: int = 1
    # max_tokens: a 280-character post is ~70 tokens of English; emoji and rare scripts take more
    sampling: SamplingParams = dataclasses.replace(VERB_SAMPLING, max_tokens=256)
    seed: int | None = None  # sample i uses seed + i
    device: str = "auto"

    def __post_init__(self):
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be at least 1")


def posts(cfg: TaskConfig, task: str, **inputs) -> list[str]:
    """`tweetlm compose / reply / summarize`: cfg.num_samples posts of `task` for `inputs` (the keyword arguments
    of that task's function), decoded together in one batch. Bad inputs fail before the model loads."""
    write, messages = _TASKS[task]
    params = cfg.sampling
    messages(**inputs)
    model, tokenizer = load_model(cfg.run, device=resolve_device(cfg.device))
    with Engine(model, tokenizer, max_batch_size=cfg.num_samples) as engine, \
            ThreadPoolExecutor(cfg.num_samples) as pool:
        futures = [pool.submit(write, engine, tokenizer, **inputs, params=dataclasses.replace(
            params, seed=None if cfg.seed is None else cfg.seed + i)) for i in range(cfg.num_samples)]
        return [f.result() for f in futures]
