"""Next-token choice: a request's sampling parameters and the tensor functions the engine applies to logits.

Order per token, as OpenAI and vLLM: penalties on the logits -> logprobs taken there -> temperature -> top-k
-> top-p -> draw. Every function works along each row on its own and draws from that row's request's own
generator, so a request's tokens never depend on which other requests share its batch.
"""

import math
from dataclasses import dataclass

import torch

from tweetlm.errors import check

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and when it ends; each field is checked on construction (ConfigError, a UserError)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 is off
    top_k: int = 0  # 0 is off
    seed: int | None = None  # same seed, same tokens: alone or in any batch
    presence_penalty: float = 0.0  # OpenAI semantics, in [-2, 2]
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: the request ends before them, they are not returned
    stop_token_ids: tuple[int, ...] = ()  # end the request too (besides <|endoftext|>), e.g. <|end|> for chat
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k likeliest (k <= 20)
    # None: none; k: each prompt token's logprob given the tokens before it, and the k likeliest there (the first
    # token has none: Request.prompt_logprobs[0] is None). With it, max_tokens may be 0: score, generate nothing.
    prompt_logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))  # lists from JSON are welcome
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check(_is_int(self.max_tokens) and self.max_tokens >= (0 if self.prompt_logprobs is not None else 1), "max_tokens",
              self.max_tokens, "must be an integer >= 1 (0 only to score a prompt)")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf, "temperature",
              self.temperature, "must be a number >= 0 (0 is greedy)")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0 (0 is off)")
        check(self.seed is None or _is_int(self.seed), "seed", self.seed, "must be an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and -2 <= value <= 2, name, value, "must be in [-2, 2]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
              "must be token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                  f"must be None or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The verbs' sampling for posts (generate, chat, compose / reply / summarize): a little below temperature 1, the
# unlikely tail cut off; each verb's config holds it with its own max_tokens.
VERB_SAMPLING = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)


def penalize(logits: torch.Tensor, counts: torch.Tensor, *, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logits [V] minus presence * (count > 0) + frequency * count, counts [V] of the
    tokens generated so far (the prompt's do not count)."""
    return logits - presence * (counts > 0) - frequency * counts


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] of rows with temperature > 0 -> token ids [B], row i with params[i] and its own generator.

    Batched, and each row's token depends on that row alone: every op works along the vocabulary of one row
    (top-k, sort, softmax, cumsum), and the random number is drawn from the row's generator, then inverted
    through the row's CDF (float64, so u x total never reaches the last sum). A request thus samples the same
    tokens alone or beside others, at the cost of one tiny draw per row rather than a whole sampling pass."""
    V = logits.shape[-1]
    logits = logits / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=logits.device)
    if (top_k < V).any():
        kth = logits.topk(int(top_k.max()), dim=-1).values.gather(1, top_k[:, None] - 1)  # [B, 1]
        logits = logits.masked_fill((logits < kth) & (top_k[:, None] < V), float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones before it already reach top_p (the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # [B, V]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators])  # [B]
    # the first index whose cumulative mass exceeds u x total: a token of zero probability never qualifies
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=V - 1)
