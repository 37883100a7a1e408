"""The generation engine: continuous batching, batch invariance, cancellation, context refusal, stop strings
and tokens, penalties, logprobs, async streaming, on a tiny random-init model (mechanics) and real posts."""

import asyncio
import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import DATA

from tweetlm.errors import UserError
from tweetlm.infer.engine import PREFILL_CHUNK, Engine, SamplingParams
from tweetlm.infer.generate import GenerateConfig, generate
from tweetlm.infer.sampling import penalize, sample
from tweetlm.model.llama import Llama
from tweetlm.model.sizing import config_from_depth, preset

POSTS = (DATA / "tweeteval" / "emotion" / "train_text.txt").read_text(encoding="utf-8").splitlines()[:200]

MOE = dict(experts=4, experts_active=2, expert_dim=48)  # a mixture of experts' shape of the tiny model


def _tiny(cfg) -> Llama:
    """Random init: the engine's mechanics do not need a trained model. The <|endoftext|> row (id 0) is
    zeroed, so its logit is exactly 0 and greedy decoding (some of 1000 logits is always positive) never
    ends a post: greedy runs last until max_tokens."""
    torch.manual_seed(0)
    model = Llama(cfg)
    model.init_weights()
    model.embed.weight.data[0] = 0
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> Llama:
    return _tiny(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=2048))


def _prompt(tokenizer, *posts: str) -> list[int]:
    """A new post after these: each post after <|endoftext|>, as in the token shards."""
    return [t for p in posts for t in [tokenizer.boundary_id, *tokenizer.encode(p)]]


@dataclass
class _Out:
    text: str
    tokens: list[int]
    logprobs: list
    finish: str | None


def _collect(deltas) -> _Out:
    out = _Out("", [], [], None)
    for d in deltas:
        assert out.finish is None, "a delta after the last one"
        assert not d.logprobs or [lp.token_id for lp in d.logprobs] == d.token_ids
        out.text, out.tokens, out.logprobs = out.text + d.text, out.tokens + d.token_ids, out.logprobs + d.logprobs
        out.finish = d.finish_reason
    return out


def _wait(engine, until=None, **expected) -> dict:
    """engine.stats() once it shows `expected` values (and `until(stats)` holds)."""
    deadline = time.monotonic() + 30
    while True:
        stats = engine.stats()
        if all(stats[k] == v for k, v in expected.items()) and (until is None or until(stats)):
            return stats
        assert time.monotonic() < deadline, f"the engine never reached {expected}: {stats}"
        time.sleep(0.002)


# ---------------------------------------------------------------- batching


def test_a_short_request_submitted_after_a_long_one_finishes_first(model, tokenizer):
    with Engine(model, tokenizer, max_batch_size=4) as engine:
        long = engine.submit(_prompt(tokenizer, POSTS[0]), SamplingParams(max_tokens=1900, temperature=0))
        stream = iter(long)
        next(stream)  # the long request is decoding
        short = _collect(engine.submit(_prompt(tokenizer, POSTS[1]), SamplingParams(max_tokens=5, temperature=0)))
        assert short.finish == "length" and len(short.tokens) == 5
        assert long.completion_tokens < 1900 and engine.stats()["running"] == 1  # the long one is still going
        long.cancel()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model, tokenizer):
    """A 4-chunk prompt takes 4 steps, one chunk each, while a short request goes on decoding a token per step:
    the short one (4 tokens) is done before the long one's first token. Prefilled at once, the long prompt
    would give its first token at the short one's second step."""
    with Engine(model, tokenizer) as engine:
        short = engine.submit(_prompt(tokenizer, POSTS[11]), SamplingParams(max_tokens=4, temperature=0))
        long = engine.submit(_prompt(tokenizer, *POSTS[:200])[:4 * PREFILL_CHUNK], SamplingParams(max_tokens=1))
        next(iter(long))
        assert short.completion_tokens == 4


@pytest.mark.parametrize("moe", [False, True])
def test_batch_invariance_alone_and_beside_31_others(model, tokenizer, moe):
    """Greedy and seeded requests give the same tokens and logprobs, to the bit, alone or in a full batch
    of 32 whose members have other prompts (one longer than a prefill chunk), lengths and parameters. A mixture
    of experts too: there a token's expert multiplies it among whichever other tokens picked that expert."""
    if moe:
        model = _tiny(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=2048, **MOE))
    long_prompt = _prompt(tokenizer, *POSTS[:40])[:PREFILL_CHUNK + 60]  # prefilled in 2 chunks
    targets = [(long_prompt, SamplingParams(max_tokens=30, temperature=0, logprobs=5)),
               (_prompt(tokenizer, POSTS[2]), SamplingParams(max_tokens=30, temperature=1.0, top_k=40, top_p=0.9, seed=7,
                                                             frequency_penalty=0.5, logprobs=2))]
    others = [(_prompt(tokenizer, *POSTS[10 + i:10 + i + 1 + i % 3]),
               SamplingParams(max_tokens=1 + 7 * i % 50, temperature=[0, 0.8][i % 2], seed=i, presence_penalty=0.3 * (i % 3),
                              logprobs=[None, 3][i % 2])) for i in range(30)]
    others[5] = (_prompt(tokenizer, *POSTS[50:90])[:PREFILL_CHUNK + 100], others[5][1])  # prefilled alongside
    alone = []
    for prompt, params in targets:
        with Engine(model, tokenizer, max_batch_size=32) as engine:
            alone.append(_collect(engine.submit(prompt, params)))
    with Engine(model, tokenizer, max_batch_size=32) as engine:
        first = [engine.submit(p, s) for p, s in others[:15]]  # the targets join a batch already decoding
        _wait(engine, until=lambda stats: stats["completion_tokens_total"] > 0)
        mine = [engine.submit(p, s) for p, s in targets]
        rest = [engine.submit(p, s) for p, s in others[15:]]
        beside = [_collect(r) for r in mine]
        for r in first + rest:
            _collect(r)
    for a, b in zip(alone, beside):
        assert a.tokens == b.tokens and a.text == b.text and a.finish == b.finish == "length"
        assert a.logprobs == b.logprobs  # floats compared exactly
    assert len(set(alone[1].tokens)) > 1  # sampled, not a degenerate loop


def test_sampling_follows_the_distribution_and_its_cuts():
    """4,000 draws per row from probabilities 0.5 / 0.3 / 0.2 / 0: the frequencies match, top-k and top-p cut
    the tail, a zero-probability token never comes, and each row's draws depend only on its own generator."""
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log().repeat(3, 1)  # [3, V]
    params = [SamplingParams(), SamplingParams(top_k=2), SamplingParams(top_p=0.5)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    draws = torch.stack([sample(logits, params, gens) for _ in range(4000)])  # [4000, 3]
    freq = [torch.bincount(draws[:, j], minlength=4).double() / len(draws) for j in range(3)]
    assert freq[0].tolist() == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.03)
    assert freq[1].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.03)
    assert freq[2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert sample(logits[:1], params[:1], [torch.Generator().manual_seed(0)]).item() == draws[0, 0]  # alone: same draw


# ---------------------------------------------------------------- lifecycle


def test_cancel_frees_the_slot_at_once_and_the_others_go_on(model, tokenizer):
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        gone = engine.submit(_prompt(tokenizer, POSTS[3]), SamplingParams(max_tokens=1500, temperature=0))
        stays = engine.submit(_prompt(tokenizer, POSTS[4]), SamplingParams(max_tokens=1000, temperature=0))
        queued = engine.submit(_prompt(tokenizer, POSTS[5]), SamplingParams(max_tokens=3))
        assert engine.stats()["waiting"] >= 1
        queued.cancel()  # never got a slot: leaves the queue
        assert _collect(queued).tokens == [] and _wait(engine, waiting=0)
        stream = iter(gone)
        next(stream)
        gone.cancel()
        _wait(engine, running=1)  # freed before the next step
        rest = list(stream)  # what was already streamed, then the end, with no finish reason
        assert all(d.finish_reason is None for d in rest) and gone.completion_tokens < 1500
        newcomer = _collect(engine.submit(_prompt(tokenizer, POSTS[6]), SamplingParams(max_tokens=3, temperature=0)))
        assert newcomer.finish == "length" and len(newcomer.tokens) == 3  # took the freed slot
        for _ in engine.submit(_prompt(tokenizer, POSTS[7]), SamplingParams(max_tokens=1000, temperature=0)):
            break  # a consumer that stops reading cancels
        _wait(engine, running=1)
        assert _collect(stays).finish == "length" and stays.completion_tokens == 1000
        stats = _wait(engine, running=0)
    assert stats["requests_total"] == 5 and stats["completion_tokens_total"] >= 1000 + 3
    with pytest.raises(UserError, match="shutting down"):
        engine.submit([0], SamplingParams())


def test_requests_over_the_context_are_refused_with_a_clear_message(model, tokenizer):
    with Engine(model, tokenizer, max_seq_len=64) as engine:
        with pytest.raises(UserError, match=r"prompt \(60 tokens\) \+ max_tokens \(5\) exceed the model's context of 64 tokens"):
            engine.submit(list(range(10, 70)), SamplingParams(max_tokens=5))
        assert _collect(engine.submit(list(range(10, 70)), SamplingParams(max_tokens=4))).finish == "length"
        with pytest.raises(UserError, match="empty"):
            engine.submit([], SamplingParams())
        with pytest.raises(UserError, match="outside the vocabulary"):
            engine.submit([5, tokenizer.vocab_size], SamplingParams())
        assert engine.stats()["requests_total"] == 1  # nothing refused was queued
    with pytest.raises(UserError, match="max_seq_len"):
        Engine(model, tokenizer, max_seq_len=4096)
    for bad, field in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(top_k=-1), "top_k"), (dict(frequency_penalty=2.5), "frequency_penalty"),
                       (dict(logprobs=21), "logprobs"), (dict(stop=("",)), "stop")]:
        with pytest.raises(UserError, match=field):
            SamplingParams(**bad)


# ---------------------------------------------------------------- what comes out


def test_stop_strings_and_stop_tokens_end_the_text_before_them(model, tokenizer):
    prompt = _prompt(tokenizer, POSTS[8])
    with Engine(model, tokenizer) as engine:
        greedy = _collect(engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0)))
        assert greedy.finish == "length" and greedy.text == tokenizer.decode(greedy.tokens)
        stop = greedy.text[10:13]  # a piece from the middle, which may span tokens
        stopped = _collect(engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0, stop=["never seen", stop])))
        assert stopped.finish == "stop" and stopped.text == greedy.text[:greedy.text.index(stop)]
        assert stopped.tokens == greedy.tokens[:len(stopped.tokens)]
        end = greedy.tokens[6]
        k = greedy.tokens.index(end)
        by_token = _collect(engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(end,))))
        assert by_token.finish == "stop" and by_token.tokens == greedy.tokens[:k + 1]
        assert by_token.text == tokenizer.decode(greedy.tokens[:k])  # the end token is not text


def test_penalties_change_greedy_output_as_openai_defines_them(model, tokenizer):
    counts = torch.tensor([0.0, 1.0, 3.0])
    assert torch.equal(penalize(torch.zeros(3), counts, presence=0.5, frequency=0.25), torch.tensor([0.0, -0.75, -1.25]))
    prompt = _prompt(tokenizer, POSTS[9])
    with Engine(model, tokenizer) as engine:
        def greedy(**penalties) -> Counter:
            return Counter(_collect(engine.submit(prompt, SamplingParams(max_tokens=60, temperature=0, **penalties))).tokens)

        plain, high, negative = greedy(), greedy(frequency_penalty=2.0), greedy(presence_penalty=-2.0)
    assert max(plain.values()) > 1  # the tiny model repeats itself
    assert max(high.values()) == 1  # a high frequency penalty: no token twice
    assert len(negative) <= len(plain)  # a negative one rewards repeats


def test_logprobs_in_openai_shape_and_equal_to_a_full_forward(model, tokenizer):
    prompt = _prompt(tokenizer, *POSTS[20:60])[:PREFILL_CHUNK + 30]  # chunked prefill, then decoding
    with Engine(model, tokenizer) as engine:
        greedy = _collect(engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=5)))
        hot = _collect(engine.submit(prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=3, logprobs=0)))
        plain = _collect(engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0)))
    assert plain.logprobs == [] and plain.tokens == greedy.tokens
    for out in (greedy, hot):
        with torch.no_grad():
            full = model(torch.tensor([prompt + out.tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)  # [8, V]
        for i, lp in enumerate(out.logprobs):
            assert lp.token_id == out.tokens[i]
            assert lp.logprob == pytest.approx(full[i, lp.token_id].item(), abs=1e-4)  # before temperature
            assert [t for t, _ in lp.top] == full[i].topk(len(lp.top)).indices.tolist()
    for lp in greedy.logprobs:
        values = [v for _, v in lp.top]
        assert len(lp.top) == 5 and values == sorted(values, reverse=True) and sum(map(math.exp, values)) <= 1 + 1e-6
        assert lp.top[0] == (lp.token_id, lp.logprob)  # greedy: the likeliest
    assert all(lp.top == [] for lp in hot.logprobs)


def test_prompt_logprobs_score_every_prompt_token_as_a_full_forward(model, tokenizer):
    """prompt_logprobs: each prompt token's logprob given those before it, across prefill chunks, the same beside
    other requests, and max_tokens 0 scores without generating (what echo + logprobs of /v1/completions needs)."""
    prompt = _prompt(tokenizer, *POSTS[20:70])[:2 * PREFILL_CHUNK + 17]  # three chunks
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].log_softmax(-1)  # [T, V]: row t predicts token t + 1
    with Engine(model, tokenizer) as engine:
        others = [engine.submit(_prompt(tokenizer, post), SamplingParams(max_tokens=20, temperature=0))
                  for post in POSTS[:5]]
        scored = engine.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
        out = _collect(scored)
        beside = scored.prompt_logprobs
        alone = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))
        alone_out = _collect(alone)
        for r in others:
            _collect(r)
    assert out.tokens == [] and out.finish == "length" and scored.completion_tokens == 0
    assert beside[0] is None and len(beside) == len(prompt)
    for t, lp in enumerate(beside[1:], start=1):
        assert lp.token_id == prompt[t]
        assert lp.logprob == pytest.approx(full[t - 1, prompt[t]].item(), abs=1e-4)
        assert [i for i, _ in lp.top] == full[t - 1].topk(3).indices.tolist()
    assert [lp.logprob for lp in alone.prompt_logprobs[1:]] == [lp.logprob for lp in beside[1:]]  # the same bits
    assert all(lp.top == [] for lp in alone.prompt_logprobs[1:]) and len(alone_out.tokens) == 2
    with pytest.raises(UserError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_scoring_the_prompt_changes_no_generated_token(model, tokenizer):
    """The first token comes from the prompt's last position, also when the scored chunk is alone in its step."""
    prompt = _prompt(tokenizer, POSTS[3])
    with Engine(model, tokenizer) as engine:
        plain = _collect(engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0)))
        scored = _collect(engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0)))
    assert scored.tokens == plain.tokens


@pytest.mark.parametrize("overrides", [dict(qk_norm=True, tie_embeddings=False), dict(n_kv_heads=1), MOE,
                                       dict(MOE, shared_experts=1, qk_norm=True)])
def test_engine_decoding_equals_full_recomputation(tokenizer, overrides):
    """The engine's forward (fused, packed, cached) against Llama.forward over the whole sequence, on the
    architecture's options; the default shape is tested by the other tests and test_model_llama.py."""
    model = _tiny(config_from_depth(2, vocab_size=tokenizer.vocab_size, max_seq_len=512, dim=64, n_heads=4, **overrides))
    prompt = _prompt(tokenizer, *POSTS[60:100])[:PREFILL_CHUNK + 10]
    with Engine(model, tokenizer) as engine:
        out = _collect(engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=1)))
    with torch.no_grad():
        full = model(torch.tensor([prompt + out.tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
    assert out.tokens == full.argmax(-1).tolist()
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(full.max(-1).values.tolist(), abs=1e-4)


def test_async_consumers_stream_without_blocking_the_loop(model, tokenizer):
    prompts = [_prompt(tokenizer, p) for p in POSTS[100:103]]
    with Engine(model, tokenizer) as engine:
        blocking = [_collect(engine.submit(p, SamplingParams(max_tokens=20, temperature=0))) for p in prompts]

        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            async def collect(request):
                return _collect([d async for d in request])

            tick = asyncio.create_task(ticker())
            requests = [engine.submit(p, SamplingParams(max_tokens=20, temperature=0)) for p in prompts]
            outs = await asyncio.gather(*map(collect, requests))
            async for _ in engine.submit(prompts[0], SamplingParams(max_tokens=1000, temperature=0)):
                break  # leaving early cancels, as a client that goes away
            tick.cancel()
            return outs, ticks

        outs, ticks = asyncio.run(main())
        assert outs == blocking and ticks > 0  # the loop ran other tasks while waiting for tokens
        _wait(engine, running=0)


def test_generate_streams_samples_in_order_and_a_seed_repeats_them(model, tokenizer):
    cfg = GenerateConfig(run=Path("unused"), prompt="I love", num_samples=3, seed=5,
                         sampling=dataclasses.replace(GenerateConfig.sampling, max_tokens=12))
    first = list(generate(model, tokenizer, cfg))
    assert [i for i, _ in first] == sorted(i for i, _ in first) and {i for i, _ in first} <= {0, 1, 2}
    assert first == list(generate(model, tokenizer, cfg))
    with pytest.raises(UserError, match=r"--max-new-tokens \(5000\) exceed the model's context of 2048 tokens"):
        list(generate(model, tokenizer, GenerateConfig(run=Path("unused"), sampling=SamplingParams(max_tokens=5000))))


def test_generate_shows_every_sample_even_one_that_ends_at_once(model, tokenizer, tmp_path, capsys):
    """Each sample starts with (i, ""), so that one whose first token is <|endoftext|> still shows: the CLI prints
    its header and says it is empty."""
    from tweetlm.cli import main
    from tweetlm.model.weights import save_model

    ending = _tiny(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    with torch.no_grad():
        ending.embed.weight.zero_()  # tied: every logit is 0, and greedy takes the first, <|endoftext|>
    assert tokenizer.boundary_id == 0
    sampling = dataclasses.replace(GenerateConfig.sampling, max_tokens=10, temperature=0)
    cfg = GenerateConfig(run=Path("unused"), prompt="Hello", num_samples=3, sampling=sampling)
    assert list(generate(ending, tokenizer, cfg)) == [(0, ""), (1, ""), (2, "")]
    streamed = list(generate(model, tokenizer, cfg))  # the random model never ends a post: text follows each start
    assert [piece for piece in streamed if not piece[1]] == [(0, ""), (1, ""), (2, "")] and streamed[0] == (0, "")

    def printed(m, *args: str) -> str:
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        save_model(m, run)
        tokenizer.save(run)
        capsys.readouterr()
        assert main(["generate", str(run), "--prompt", "Hello", "--max-new-tokens", "10", "--temperature", "0",
                     "--device", "cpu", *args]) == 0
        return capsys.readouterr().out

    empty = " (empty: the post ended at once)"
    assert printed(ending, "--num-samples", "3") == "".join(f"[{i}] Hello{empty}\n" for i in (1, 2, 3))
    assert printed(ending) == f"Hello{empty}\n"
    out = printed(model, "--num-samples", "3")  # random text (a newline among it, maybe), each after its header
    assert out.startswith("[1] Hello") and 0 < out.index("\n[2] Hello") < out.index("\n[3] Hello") and empty not in out


@pytest.mark.parametrize("overrides", [{}, dict(qk_norm=True, n_kv_heads=1), MOE])
def test_padded_decode_step_of_cuda_graphs_equals_the_forward(tokenizer, overrides):
    """Runner.decode, the step the engine captures as CUDA graphs on a GPU, run eagerly here: 3 rows of different
    lengths padded to 4 (the padding row writes the padding slot only) and keys to 64, against the row-by-row forward."""
    from tweetlm.infer.kv_cache import Batch, KVCache
    from tweetlm.infer.runner import Runner

    model = _tiny(config_from_depth(2, vocab_size=tokenizer.vocab_size, max_seq_len=128, dim=64, n_heads=4, **overrides))
    runner = Runner(model)
    caches = [KVCache(model.config, 4, 128, dtype=torch.float32, device="cpu") for _ in range(2)]  # slot 3 pads
    for cache in caches:  # zeroed, as on CUDA: decode's masked keys must be finite (0 x NaN is NaN)
        cache.k.zero_(), cache.v.zero_()
    prompts = [_prompt(tokenizer, post)[:n] for post, n in zip(POSTS[:3], (5, 17, 40))]
    with torch.inference_mode():
        for cache in caches:
            runner.forward(torch.tensor([t for p in prompts for t in p[:-1]]),
                           Batch(cache, [0, 1, 2], [0, 0, 0], [len(p) - 1 for p in prompts]), cache)
        for cache in caches:
            cache.k[:, 3], cache.v[:, 3] = 7.0, 7.0  # the padding slot: what a padding row writes goes there
        last, starts = [p[-1] for p in prompts], [len(p) - 1 for p in prompts]
        reference = runner.forward(torch.tensor(last), Batch(caches[0], [0, 1, 2], starts, [1, 1, 1]), caches[0])
        padded = runner.decode(last, [0, 1, 2], starts, caches[1])
    assert padded.shape == reference.shape == (3, tokenizer.vocab_size)
    assert torch.allclose(padded, reference, atol=1e-5)
    for slot, prompt in enumerate(prompts):  # each row's keys and values, written where the forward writes them
        for ours, theirs in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
            assert torch.allclose(ours[:, slot, :, :len(prompt)], theirs[:, slot, :, :len(prompt)], atol=1e-5)
