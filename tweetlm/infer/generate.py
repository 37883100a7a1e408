"""Posts from a trained run, streamed as text: `tweetlm generate RUN --prompt TEXT`, on the engine."""

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tweetlm.errors import UserError, check
from tweetlm.infer.engine import Engine
from tweetlm.infer.sampling import VERB_SAMPLING, SamplingParams


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    run: Path
    prompt: str = ""
    num_samples: int = 1
    sampling: SamplingParams = dataclasses.replace(VERB_SAMPLING, max_tokens=64)
    seed: int | None = None  # sample i uses seed + i
    device: str = "auto"

    def __post_init__(self):
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be at least 1")


def generate(model, tokenizer, cfg: GenerateConfig) -> Iterator[tuple[int, str]]:
    """Streams (sample index, text piece), one sample after the other (the engine decodes them all at once):
    (i, "") when sample i starts, then its non-empty pieces, none when the post ends at once (<|endoftext|> or a
    stop string first). Each sample is a new post after `cfg.prompt`; with a seed, sample i uses seed + i."""
    prompt_ids = [tokenizer.boundary_id] + tokenizer.encode(cfg.prompt)
    max_tokens = cfg.sampling.max_tokens
    if len(prompt_ids) + max_tokens > model.config.max_seq_len:  # the engine's check, in the flags' words
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({max_tokens}) exceed the "
                        f"model's context of {model.config.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
    with Engine(model, tokenizer, max_batch_size=cfg.num_samples) as engine:
        requests = [engine.submit(prompt_ids, dataclasses.replace(cfg.sampling, seed=None if cfg.seed is None else cfg.seed + i))
                    for i in range(cfg.num_samples)]
        try:
            for i, request in enumerate(requests):
                yield i, ""  # every sample shows, an empty one too
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
