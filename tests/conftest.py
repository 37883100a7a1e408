"""The tiny fixtures the test modules share (STYLE.md, habit 9): a corpus of real posts, a tokenizer trained on it
and its token shards, a tiny chat model trained a few steps and a live server on it, a toxicity classifier.

Each is defined here once, so a session-scoped one is built once per session whichever modules use it (a fixture
imported into several test modules is a fixture of each, built once per module). Helpers that are not fixtures
are in helpers.py. Later stages are imported inside their fixtures, as helpers.py says why."""

from pathlib import Path

import pytest
from helpers import CONTEXT, DATA, LONG, POSTS, _real_posts, live_server

from tweetlm.data.corpus import SPLITS, ShardWriter
from tweetlm.data.post import POST_FIELDS
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer

def pytest_collection_modifyitems(items):
    """Tests marked cuda (tests/test_cuda.py) are skipped where PyTorch sees no GPU, as in CI: bench/gpu.sh runs them."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: bench/gpu.sh runs these on one"))


TRAIN_SAMPLE = 3000  # posts of each set for safety_model: ~4 s of training; the full sets (21k posts) take ~14 s


# ---------------------------------------------------------------- corpus and tokenizer


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A CORPUS folder as `data prepare` writes it: 8 of 10 posts to train, 1 to val, 1 to test."""
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "report.json").write_text("{}")
    writers = {split: ShardWriter(corpus, split, rows_per_shard=700) for split in SPLITS}
    for i, text in enumerate(_real_posts()):
        split = "val" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        row = dict.fromkeys(POST_FIELDS) | {"id": str(i), "text": text, "kind": "post", "source": f"fixture:{i}"}
        writers[split].write(row | {"clean_text": text})
    for w in writers.values():
        w.close()
    return corpus


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory) -> Path:
    """A TOKENIZER folder with a 1000-token vocabulary trained on small_corpus."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerConfig(corpus=small_corpus, out=out, vocab_size=1000))
    return out


@pytest.fixture(scope="session")
def tokenizer(small_tokenizer):
    """small_tokenizer loaded."""
    return Tokenizer.load(small_tokenizer)


@pytest.fixture(scope="module")
def small_tokens(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    """A TOKENS folder: small_corpus tokenized with small_tokenizer."""
    out = tmp_path_factory.mktemp("tokens")
    tokenize(TokenizeConfig(corpus=small_corpus, tokenizer=small_tokenizer, out=out))
    return out


# ---------------------------------------------------------------- a tiny chat model, served


@pytest.fixture(scope="session")
def served_run(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    """A run folder named tiny-chat: the tiny preset, 4 steps on real posts."""
    from tweetlm.train.config import load_config
    from tweetlm.train.loop import train

    run = tmp_path_factory.mktemp("served") / "tiny-chat"
    tokens = tmp_path_factory.mktemp("serve-tokens")
    tokenize(TokenizeConfig(corpus=small_corpus, tokenizer=small_tokenizer, out=tokens))
    train(load_config(None, {"tokens": tokens, "tokenizer": small_tokenizer, "out": run, "model.preset": "tiny",
                             "model.seq_len": CONTEXT, "batch_tokens": 2 * CONTEXT, "micro_batch": 2, "steps": 4,
                             "eval.tokens": CONTEXT, "log_every": 4}))
    return run


@pytest.fixture(scope="session")
def long_prompts(served_run) -> dict:
    """A real post to complete and one to answer after which greedy decoding runs LONG tokens without ending, found
    on this machine's numerics: what the tests that need a request to run to max_tokens send."""
    from tweetlm.infer.engine import Engine, SamplingParams
    from tweetlm.model.weights import load_model
    from tweetlm.tokenizer.chat import render_chat

    model, tokenizer = load_model(served_run)
    end = SamplingParams(max_tokens=LONG, temperature=0, stop_token_ids=(tokenizer.token_id("<|end|>"),))
    found = {}
    with Engine(model, tokenizer, max_batch_size=len(POSTS)) as engine:
        for kind, ids in (("prompt", lambda p: [tokenizer.boundary_id, *tokenizer.encode(p)]),
                          ("message", lambda p: render_chat(tokenizer, [{"role": "user", "content": p}]))):
            requests = [engine.submit(ids(p), end) for p in POSTS]
            ends = [[d.finish_reason for d in r][-1] for r in requests]
            found[kind] = next((p for p, e in zip(POSTS, ends) if e == "length"), None)
    assert None not in found.values(), f"every post's greedy continuation ends early on this fixture model: {found}"
    return found


@pytest.fixture(scope="module")
def server(served_run):
    """served_run on a live server: (base url, engine)."""
    with live_server(served_run) as (url, engine):
        yield url, engine


# ---------------------------------------------------------------- a toxicity classifier


@pytest.fixture(scope="session")
def safety_model(tmp_path_factory) -> tuple[Path, dict]:
    """A SAFETY folder trained on 3000 offensive + 3000 hate posts, and train_safety's result."""
    from tweetlm.eval.safety import SafetyConfig, train_safety

    out = tmp_path_factory.mktemp("safety") / "safety"
    return out, train_safety(SafetyConfig(data=DATA / "tweeteval", out=out, max_train_examples=TRAIN_SAMPLE))
