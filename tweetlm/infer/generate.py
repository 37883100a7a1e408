"""KV-cache decoding of posts, streamed as text: `tweetlm generate RUN --prompt TEXT`."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tweetlm.errors import UserError
from tweetlm.infer.kv_cache import KVCache
from tweetlm.infer.sampling import sample


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    run: Path
    prompt: str = ""
    num_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.num_samples < 1:
            raise UserError(f"--num-samples {self.num_samples}: must be at least 1")


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], *, batch_size: int = 1, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token ids [batch_size] of `batch_size` continuations of one prompt, one step at a
    time: the prompt is prefilled once into the cache, then each step feeds one token per row."""
    cfg = model.config
    device = model.embed.weight.device
    if len(prompt_ids) + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceed the model's "
                        f"context of {cfg.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
    cache = KVCache(cfg, batch_size, max_len=len(prompt_ids) + max_new_tokens, dtype=model.embed.weight.dtype, device=device)
    tokens = torch.tensor([prompt_ids] * batch_size, dtype=torch.long, device=device)  # [B, T]
    for _ in range(max_new_tokens):
        logits = model(tokens, kv_cache=cache)[:, -1, :]  # [B, V]
        tokens = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)[:, None]
        yield tokens[:, 0]


class _TextStream:
    """Turns one row's token ids into text pieces: holds back an incomplete UTF-8 character and any
    tail that could still become a stop string, and ends at the boundary token or a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already yielded
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.tokenizer.boundary_id:
            self.done = True
            return self.flush()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            if (cut := text.find(s, self.sent)) >= 0:
                self.done = True
                piece, self.sent = text[self.sent:cut], cut
                return piece
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for s in self.stop:  # keep back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


def generate(model, tokenizer, cfg: GenerateConfig) -> Iterator[tuple[int, str]]:
    """Streams (sample index, text piece) as tokens come. Each sample is a new post after `cfg.prompt`."""
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.embed.weight.device).manual_seed(cfg.seed)
    prompt_ids = [tokenizer.boundary_id] + tokenizer.encode(cfg.prompt)
    streams = [_TextStream(tokenizer, cfg.stop) for _ in range(cfg.num_samples)]
    steps = generate_ids(model, prompt_ids, batch_size=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    for next_ids in steps:
        for i, token in enumerate(next_ids.tolist()):
            if piece := streams[i].push(token):
                yield i, piece
        if all(s.done for s in streams):
            return
    for i, s in enumerate(streams):
        if not s.done and (piece := s.flush()):
            yield i, piece
