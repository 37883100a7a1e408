"""The generation engine: continuous batching over a preallocated KV cache, streaming each request's tokens.

    with Engine(model, tokenizer, max_batch_size=32) as engine:
        request = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=1))
        for delta in request:              # or `async for` on an event loop
            print(delta.text, end="")

A background thread repeats one step: drop cancelled requests, give waiting ones a free cache slot, run one
forward over every running request's next tokens, sample, stream. Each request counts the tokens it has in
the cache against the tokens it knows (prompt, then its own samples) and feeds the difference: a prompt in
fixed chunks of PREFILL_CHUNK tokens (at most PREFILL_CHUNK prompt tokens per step, so a long prompt delays
the others' next token by one chunk, not by the whole prompt), then one token per step. Requests join and
leave the batch between steps, so a short request never waits for a long one to finish. The thread keeps its
state of each request (tokens, cache slot, generator, penalty counts, text) in a _Sequence; the Request is the
consumer's side, which the thread reaches only through Request._put and which reaches the thread only through
the cancel callback it is built with.

A step's token count is padded to one of few sizes, so that the kernels oneDNN compiles and keeps per matmul shape
stay few and the process's memory stays flat under load: see PAD_TOKENS.

Batch invariance: a request's tokens, logprobs included, are the same bits alone or beside any others, for
greedy and seeded sampling. Its chunks are cut at fixed offsets of its own prompt, attention runs per row
(kv_cache.py), the matmuls and elementwise ops give every row the same bits at any batch size
(runner.py), and sampling uses the request's own generator. Tested on CPU in fp32; not promised on CUDA.
"""

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch

from tweetlm.errors import UserError
from tweetlm.infer.kv_cache import Batch, KVCache
from tweetlm.infer.runner import Runner
from tweetlm.infer.sampling import SamplingParams, penalize, sample

__all__ = ["Engine", "Request", "SamplingParams", "Delta", "TokenLogprob"]

# Prompt tokens fed per step, and the fixed size of a prompt's chunks. On the small preset (2-core CPU) a step
# with a 256-token chunk takes ~6.5 ms (bench/infer.py: 8 prompts of 64 tokens, 2 such steps, 12.9 ms to
# their first tokens), about 4 decode steps of batch 8: what a long prompt adds to others' next token.
PREFILL_CHUNK = 256

# A step of more tokens than max_batch_size (a prefill chunk beside decode rows) is padded up to a multiple of
# PAD_TOKENS by a padding row in a cache slot of its own; a decode step (at most max_batch_size tokens) never is.
# Why: oneDNN and ideep above it cache a compiled kernel per matmul shape, ~560 KiB each (torch 2.13, measured
# for each of the small preset's 5 matrices at any row count), evicted only past 1024 shapes per cache. With one
# shape per token count, a server grew with each new count: bench/serve.py --soak (64 streaming clients, then 200
# hanging up, per round) went 460 -> 978 MB RSS in 20 rounds, still +11.7 MB a round over the last 10. Padded, a
# step has one of at most max_batch_size + (PREFILL_CHUNK + max_batch_size) / PAD_TOKENS token counts (40 at 32),
# all met in the first rounds: 430 -> 534 MB, +0.06 MB a round over the last 10 (docs/benchmarks.md). The padding
# is less than PAD_TOKENS tokens on a step of more than max_batch_size (64 prompts of 20-120 tokens: 386-422 ms
# against 378-399 unpadded, within this VM's noise), and changes no bits of the other rows.
PAD_TOKENS = 32


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the penalized logits, before temperature, top-k and top-p
    top: list[tuple[int, float]]  # the k likeliest (token_id, logprob), likeliest first


@dataclass
class Delta:
    """One streamed piece of one request. token_ids holds every sampled token, the one that ended the request
    (<|endoftext|> or a stop token) included; text never holds end tokens or stop strings, and may be "" while
    an incomplete UTF-8 character or a possible start of a stop string is held back."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token when params.logprobs is not None, else []
    finish_reason: str | None  # None until the last Delta: "stop" or "length"


_END = object()  # ends a cancelled request's stream


class Request:
    """The consumer's side of one request. Iterate it (blocking, or `async for`) to receive its Deltas in order;
    a consumer that stops iterating early cancels it. Only one consumer should iterate a request."""

    def __init__(self, prompt_tokens: int, params: SamplingParams, cancel: Callable[[], None]):
        self.id = uuid.uuid4().hex
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # counted as the engine queues this request's Deltas
        self.params = params
        # with params.prompt_logprobs: one per prompt token (None for the first), set before the first Delta
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._cancel = cancel  # the engine's: flags this request for its next step, or takes it off the queue
        # between the two threads
        self._finished = False  # the last item is queued
        self._queue: deque = deque()
        self._ready = threading.Condition()
        self._wake = None  # set by an async consumer: wakes its event loop

    def cancel(self) -> None:
        """The client went away: the engine frees this request's cache slot before its next step."""
        self._cancel()

    def _put(self, item) -> None:
        """The engine thread's one way in: queue a Delta, _END (cancelled) or the exception that stopped it."""
        with self._ready:
            if isinstance(item, Delta):
                self.completion_tokens += len(item.token_ids)
            self._queue.append(item)
            self._finished |= item is _END or isinstance(item, BaseException) or item.finish_reason is not None
            self._ready.notify()
            if self._wake is not None:
                self._wake()

    def _take(self, item):
        """What the consumer does with a queued item: a Delta to yield, or None when the stream is over (also
        when the last item was taken by an earlier iteration)."""
        if isinstance(item, BaseException):
            raise RuntimeError(f"the engine stopped: {item!r}") from item
        return None if item is _END else item

    def __iter__(self) -> Iterator[Delta]:
        done = False
        try:
            while not done:
                with self._ready:
                    self._ready.wait_for(lambda: self._queue or self._finished)
                    item = self._queue.popleft() if self._queue else _END
                delta = self._take(item)
                if delta is None:
                    return
                done = delta.finish_reason is not None
                yield delta
        finally:
            if not done:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        # no thread waits: the engine thread wakes this loop with call_soon_threadsafe
        loop, event = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        with self._ready:
            self._wake = wake
        done = False
        try:
            while not done:
                with self._ready:
                    item = self._queue.popleft() if self._queue else _END if self._finished else None
                    if item is None:
                        event.clear()
                if item is None:
                    await event.wait()
                    continue
                delta = self._take(item)
                if delta is None:
                    return
                done = delta.finish_reason is not None
                yield delta
        finally:
            if not done:
                self.cancel()


class _Sequence:
    """The engine thread's side of one request: what its steps read and change (see the module docstring)."""

    def __init__(self, request: Request, prompt_ids: list[int], tokenizer, device: torch.device, vocab_size: int):
        params = request.params
        self.request = request
        self.ids = list(prompt_ids)  # prompt + sampled tokens
        self.cached = 0  # tokens whose keys and values are in the cache
        self.slot: int | None = None
        self.cancelled = False  # set by request.cancel(), under the engine's lock
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.counts = torch.zeros(vocab_size, device=device) if params.penalized else None  # [V] sampled so far
        self.text = _TextStream(tokenizer, params.stop) if tokenizer is not None else None
        self.end_ids = set(params.stop_token_ids) | ({tokenizer.boundary_id} if tokenizer is not None else set())
        self.prompt_scores = [None] if params.prompt_logprobs is not None else None  # the first token has no context

    def score(self, logits: torch.Tensor) -> None:
        """Score the prompt tokens that the logits [n, V] of the chunk just fed (from position `cached`) predict:
        row j, at position cached + j, predicts the token at cached + j + 1 (the last row of the last chunk
        predicts the first sample, not a prompt token)."""
        targets = self.ids[self.cached + 1:self.cached + 1 + len(logits)]
        logp = logits[:len(targets)].log_softmax(dim=-1)  # [T, V]
        chosen = logp.gather(1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None]).squeeze(1).tolist()
        top_values, top_ids = logp.topk(self.request.params.prompt_logprobs, dim=-1)  # [T, k]
        for token, lp, ids, values in zip(targets, chosen, top_ids.tolist(), top_values.tolist()):
            self.prompt_scores.append(TokenLogprob(token, lp, list(zip(ids, values))))

    def append(self, token: int, logprob: TokenLogprob | None) -> Delta:
        """Take a sampled token, return its Delta (finish_reason set when this one ends the request)."""
        self.ids.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        finish, text = None, ""
        if token in self.end_ids:
            finish = "stop"
            text = self.text.flush() if self.text else ""
        else:
            text = self.text.push(token) if self.text else ""
            if self.text and self.text.stopped:
                finish = "stop"
            elif len(self.ids) - self.request.prompt_tokens == self.request.params.max_tokens:
                finish = "length"
                text += self.text.flush() if self.text else ""
        return Delta(text, [token], [logprob] if logprob else [], finish)


class Engine:
    """Continuous batching over `max_batch_size` cache slots of `max_seq_len` tokens (default: the model's
    context). `tokenizer` None streams token ids only (text "", no stop strings, no <|endoftext|> stop)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_seq_len: int | None = None):
        cfg = model.config
        max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= cfg.max_seq_len:
            raise UserError(f"max_seq_len {max_seq_len}: must be in [1, {cfg.max_seq_len}], the model's context")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size {max_batch_size}: must be at least 1")
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self._max_batch_size = max_batch_size  # also the cache's padding slot: the last, written by padding rows only
        self._device, self._vocab_size = model.embed.weight.device, cfg.vocab_size
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # changed by the engine thread only, under the lock
        self._closing = False
        self._error: BaseException | None = None
        self._totals = {"requests_total": 0, "prompt_tokens_total": 0, "completion_tokens_total": 0}
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, max_batch_size, ready), name="tweetlm-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------ API

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; UserError (nothing queued) if it cannot fit the context or the engine is closing."""
        n, vocab = len(prompt_ids), self._vocab_size
        if n == 0:
            raise UserError("the prompt is empty: give at least one token (a new post starts with <|endoftext|>)")
        if n + params.max_tokens > self.max_seq_len:
            raise UserError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceed the model's context of "
                            f"{self.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
        if bad := [t for t in prompt_ids if not 0 <= t < vocab]:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need text: this engine was built without a tokenizer")
        request = Request(n, params, cancel=lambda: self._cancel(seq))  # seq, the engine's side, is made next
        seq = _Sequence(request, prompt_ids, self.tokenizer, self._device, self._vocab_size)
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"the engine stopped: {self._error!r}") from self._error
            if self._closing:
                raise UserError("the engine is shutting down: no new requests")
            self._waiting.append(seq)
            self._totals["requests_total"] += 1
            self._totals["prompt_tokens_total"] += n
            self._cond.notify()
        return request

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), **self._totals}

    def close(self) -> None:
        """Refuse new requests, finish the queued and running ones, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ engine thread

    def _cancel(self, seq: _Sequence) -> None:
        """Any thread, through request.cancel(): a queued request leaves at once, a running one before the next
        step (flagging a finished one changes nothing: it is in neither)."""
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.request._put(_END)
            self._cond.notify()

    def _run(self, model, slots: int, ready: threading.Event) -> None:
        # The weights are packed here, not in the caller's thread, so that a caller that only submits and reads
        # (the server's event loop, `tweetlm generate`) never starts an OpenMP team of its own. Each thread that
        # runs torch's parallel regions keeps its own team, and once their threads outnumber the cores, GNU
        # OpenMP's idle workers sleep instead of spinning: every parallel region (~30 per decode step) then
        # waits for a wake-up. Measured on the small preset, 2 cores, batch 1: a decode step took 0.95 ms in the
        # process's only computing thread, 2.3 ms in a second one (1.55 ms with GOMP_SPINCOUNT=infinite).
        with torch.inference_mode():  # no autograd bookkeeping on any op of this thread
            try:
                self._runner = Runner(model)
                self._cache = KVCache(model.config, slots + 1, self.max_seq_len, dtype=self._runner.dtype,
                                      device=self._device)  # + the padding slot
            except BaseException as e:
                self._error = e
                return
            finally:
                ready.set()
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._waiting or self._running or self._closing)
                    for s in [s for s in self._running if s.cancelled]:
                        self._release(s, _END)
                    while self._waiting and self._free_slots:
                        seq = self._waiting.popleft()
                        seq.slot = self._free_slots.pop()
                        self._running.append(seq)
                    if not self._running:
                        if self._closing and not self._waiting:
                            return
                        continue
                self._step()
        except BaseException as e:  # a bug: fail every request loudly rather than leave its consumer waiting
            with self._cond:
                self._error = e
                for s in [*self._waiting, *self._running]:
                    s.request._put(e)
                self._waiting.clear()
                self._running.clear()

    def _release(self, seq: _Sequence, last) -> None:
        """Under the lock: free the sequence's slot and queue its request's last item."""
        self._running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.request._put(last)

    def _step(self) -> None:
        """One forward over every running request's next tokens, then sample and stream."""
        rows, prefill = [], 0
        for s in self._running:
            n = len(s.ids) - s.cached
            if s.cached < s.request.prompt_tokens:  # prefill: the prompt's next fixed chunk, within this step's budget
                n = min(n, PREFILL_CHUNK - s.cached % PREFILL_CHUNK)
                if prefill and prefill + n > PREFILL_CHUNK:
                    continue
                prefill += n
            rows.append((s, n))
        tokens = [t for s, n in rows for t in s.ids[s.cached:s.cached + n]]
        scoring = [s.prompt_scores is not None and s.cached < s.request.prompt_tokens for s, _ in rows]
        slots, starts, lengths = [s.slot for s, _ in rows], [s.cached for s, _ in rows], [n for _, n in rows]
        if self._device.type == "cuda" and len(tokens) == len(rows) and not any(scoring):  # decoding, CUDA graphs
            logits, ends = self._runner.decode(tokens, slots, starts, self._cache), list(range(len(rows)))  # [R, V]
        else:
            if len(tokens) > self._max_batch_size:  # a prefill step: padded to one of few sizes (see PAD_TOKENS)
                multiple = min(PAD_TOKENS, self.max_seq_len)  # the padding row's positions stay within the cache
                if pad := -len(tokens) % multiple:
                    tokens += [0] * pad
                    slots, starts, lengths = slots + [self._max_batch_size], starts + [0], lengths + [pad]
                    scoring = scoring + [False]
            batch = Batch(self._cache, slots, starts, lengths, every=scoring)
            logits, ends = self._runner.forward(torch.tensor(tokens, device=self._device), batch, self._cache), batch.ends
        for (s, n), end, scored in zip(rows, ends, scoring):
            if scored:
                s.score(logits[end - n + 1:end + 1])
            s.cached += n
        # more logits than rows: a scored prompt's every token (also when every token of the step is an output and
        # batch.outputs is None), or a padding row's
        if len(logits) != len(rows):
            logits = logits[ends[:len(rows)]]  # [R, V] each row's last token
        ready = [i for i, (s, _) in enumerate(rows) if s.cached == len(s.ids)]  # the rest are mid-prompt
        for i in ready:
            if (s := rows[i][0]).prompt_scores is not None and s.request.prompt_logprobs is None:
                s.request.prompt_logprobs = s.prompt_scores  # before its first Delta is queued
        scored_only = [i for i in ready if rows[i][0].request.params.max_tokens == 0]
        if scored_only:
            with self._cond:
                for i in scored_only:
                    self._release(rows[i][0], Delta("", [], [], "length"))
            ready = [i for i in ready if i not in scored_only]
        if ready:
            seqs = [rows[i][0] for i in ready]
            next_ids, logprobs = _choose(logits[ready] if len(ready) < len(rows) else logits, seqs)
            deltas = [s.append(token, lp) for s, token, lp in zip(seqs, next_ids, logprobs)]
            with self._cond:
                self._totals["completion_tokens_total"] += len(deltas)
                for s, delta in zip(seqs, deltas):
                    if delta.finish_reason is None:
                        s.request._put(delta)
                    else:
                        self._release(s, delta)


def _choose(logits: torch.Tensor, seqs: list[_Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token of each sequence from its logits row [R, V], each with its own parameters and generator."""
    params = [s.request.params for s in seqs]
    for i, s in enumerate(seqs):
        if s.counts is not None:
            logits[i] = penalize(logits[i], s.counts, presence=params[i].presence_penalty,
                                 frequency=params[i].frequency_penalty)
    next_ids = logits.argmax(dim=-1).tolist()  # greedy rows
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        picks = sample(logits[sampled], [params[i] for i in sampled], [seqs[i].generator for i in sampled])
        for i, token in zip(sampled, picks.tolist()):
            next_ids[i] = token
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if asked:
        logp = logits[asked].log_softmax(dim=-1)  # [A, V]
        chosen = logp.gather(1, torch.tensor([[next_ids[i]] for i in asked], device=logp.device)).squeeze(1).tolist()
        top_values, top_ids = logp.topk(max(params[i].logprobs for i in asked), dim=-1)  # [A, k]
        for j, i in enumerate(asked):
            kj = params[i].logprobs
            top = list(zip(top_ids[j, :kj].tolist(), top_values[j, :kj].tolist()))
            logprobs[i] = TokenLogprob(next_ids[i], chosen[j], top)
    return next_ids, logprobs


class _TextStream:
    """Turns one request's token ids into text pieces: holds back an incomplete UTF-8 character and any tail
    that could still become a stop string, and stops at a stop string (the earliest, when several match).
    Decodes only the tokens since the last point where everything was sent, so a long reply costs O(n)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []  # tokens since the last clean point
        self.sent = 0  # characters of decode(ids) already returned
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [cut for s in self.stop if (cut := text.find(s, self.sent)) >= 0]
        if cuts:
            self.stopped = True
            return text[self.sent:min(cuts)]
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for s in self.stop:  # keep back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        if self.sent == len(text):  # nothing held back: a byte-level BPE decodes the rest independently
            self.ids, self.sent = [], 0
        return piece

    def flush(self) -> str:
        piece = self.tokenizer.decode(self.ids)[self.sent:]
        self.ids, self.sent = [], 0
        return piece
