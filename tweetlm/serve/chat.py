"""`tweetlm chat RUN`: a conversation in the terminal, with the chat template the server uses.

Lines starting with / are commands: /new starts over, /quit (or Ctrl-D) ends. Ctrl-C stops a reply
as it streams. When the conversation outgrows the model's context, its oldest turns are dropped.
"""

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tweetlm.device import resolve_device
from tweetlm.infer.sampling import VERB_SAMPLING, SamplingParams
from tweetlm.tokenizer.chat import render_chat


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    run: Path
    system: str = ""
    sampling: SamplingParams = dataclasses.replace(VERB_SAMPLING, max_tokens=256)
    seed: int | None = None  # reply i of the session uses seed + i: a session replays exactly
    device: str = "auto"


def _fit(tokenizer, system: list[dict], turns: list[dict], max_tokens: int, context: int) -> list[int]:
    """The prompt ids, dropping the oldest turns (user + reply) while prompt + max_tokens overflow the context."""
    while True:
        ids = render_chat(tokenizer, system + turns)
        if len(ids) + max_tokens <= context or len(turns) <= 1:
            return ids
        del turns[:2]


def chat(cfg: ChatConfig, *, read: Callable[[str], str] = input, out=None) -> None:
    """Reads user lines with `read(prompt)` (EOFError ends) and streams replies to `out` (default stdout)."""
    from tweetlm.infer.engine import Engine
    from tweetlm.model.weights import load_model

    out = out or sys.stdout
    model, tokenizer = load_model(cfg.run, device=resolve_device(cfg.device))
    sampling = dataclasses.replace(cfg.sampling, stop_token_ids=(tokenizer.token_id("<|end|>"),))
    max_tokens = sampling.max_tokens
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    turns: list[dict] = []
    replies = 0
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        out.write(f"chatting with {Path(cfg.run).resolve().name} (context {engine.max_seq_len} tokens): "
                  "/new starts over, /quit or Ctrl-D ends, Ctrl-C stops a reply\n")
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                out.write("\n")
                return
            if line in ("/quit", "/exit"):
                return
            if line == "/new":
                turns.clear()
                out.write("(new conversation)\n")
                continue
            if not line:
                continue
            turns.append({"role": "user", "content": line})
            ids = _fit(tokenizer, system, turns, max_tokens, engine.max_seq_len)
            room = engine.max_seq_len - len(ids)
            if room < 1:
                turns.pop()
                out.write(f"(that message does not fit the model's context of {engine.max_seq_len} tokens: "
                          "write a shorter one)\n")
                continue
            request = engine.submit(ids, dataclasses.replace(
                sampling, max_tokens=min(max_tokens, room), seed=None if cfg.seed is None else cfg.seed + replies))
            replies += 1
            out.write("bot> ")
            reply = ""
            try:
                for delta in request:
                    reply += delta.text
                    out.write(delta.text)
                    out.flush()
            except KeyboardInterrupt:
                request.cancel()
                out.write(" [stopped]")
            out.write("\n")
            turns.append({"role": "assistant", "content": reply})
