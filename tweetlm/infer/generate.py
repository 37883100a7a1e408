"""Posts from a trained run, streamed as text: `tweetlm generate RUN --prompt TEXT`, on the engine."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tweetlm.errors import UserError
from tweetlm.infer.engine import Engine, SamplingParams


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


def generate(model, tokenizer, cfg: GenerateConfig) -> Iterator[tuple[int, str]]:
    """Streams (sample index, text piece), one sample after the other (the engine decodes them all at once).
    Each sample is a new post after `cfg.prompt`; with a seed, sample i uses seed + i."""
    prompt_ids = [tokenizer.boundary_id] + tokenizer.encode(cfg.prompt)
    if len(prompt_ids) + cfg.max_new_tokens > model.config.max_seq_len:  # the engine's check, in the flags' words
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceed the "
                        f"model's context of {model.config.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
    with Engine(model, tokenizer, max_batch_size=cfg.num_samples) as engine:
        requests = [engine.submit(prompt_ids, SamplingParams(
            max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            stop=cfg.stop, seed=None if cfg.seed is None else cfg.seed + i)) for i in range(cfg.num_samples)]
        try:
            for i, request in enumerate(requests):
                for delta in request:
                    if delta.text:
                        yield i, delta.text
        finally:  # a reader that stops early (output piped into head) leaves nothing running
            for request in requests:
                request.cancel()


def generate_ids(model, prompt_ids: list[int], *, batch_size: int = 1, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token ids [batch_size] of `batch_size` continuations of one prompt, one step at a time,
    for exactly max_new_tokens steps (token ids only: no text, no stop at <|endoftext|>). Continuation i is
    seeded from `generator`'s draws when sampling."""
    device = "cpu" if generator is None else generator.device
    seeds = torch.randint(2**62, (batch_size,), generator=generator, device=device).tolist()
    with Engine(model, None, max_batch_size=batch_size) as engine:
        requests = [engine.submit(prompt_ids, SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)) for seed in seeds]
        streams = [iter(r) for r in requests]
        try:
            for _ in range(max_new_tokens):
                yield torch.tensor([next(s).token_ids[0] for s in streams])
        finally:
            for request in requests:
                request.cancel()
