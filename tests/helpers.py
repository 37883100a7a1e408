"""What several test modules share that is not a fixture: the real posts, synthetic token shards, the tiny
training settings, torchrun's processes and free ports, a live server and the calls made to it, a foreign tokenizer. The fixtures are in conftest.py;
no test module imports another.

conftest.py imports this file before every test module, so later stages (torch, the server, the openai client:
~4 s) are imported inside the helpers that use them, and a data or tokenizer test neither waits for them nor
fails when one of them does not import."""

import http.client
import itertools
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

# ../shared/data beside the checkout; TWEETLM_DATA elsewhere (bench/gpu.sh carries a copy to a GPU machine)
DATA = Path(os.environ.get("TWEETLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
EMOJI = ["👩\u200d💻", "👍🏽", "🇫🇷", "1\ufe0f\u20e3", "❤\ufe0f", "👨\u200d👩\u200d👧\u200d👦", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"]


# ---------------------------------------------------------------- real posts


def _real_posts() -> list[str]:
    """150 posts from each TweetEval task and XLM-T language (8 languages, several scripts), plus the
    posts with a ZWJ emoji sequence from TweetEval hate and offensive."""
    files = sorted(DATA.glob("tweeteval/*/train_text.txt")) + sorted(DATA.glob("xlm-t/*/train_text.txt"))
    posts = []
    for f in files:
        with open(f, encoding="utf-8") as lines:
            posts += [line.rstrip("\n") for line in itertools.islice(lines, 150)]
    for task in ("hate", "offensive"):
        text = (DATA / "tweeteval" / task / "train_text.txt").read_text(encoding="utf-8")
        posts += [line for line in text.splitlines() if "\u200d" in line]
    return posts


def foreign_tokenizer(padding: int) -> tuple[HFTokenizer, int]:
    """A GPT-2 / Llama 3 style tokenizer.json trained on real posts: byte-level BPE, its own specials after the
    vocabulary (<|endoftext|> among them, as GPT-2's), and a post-processor that puts <|begin_of_text|> first.
    Also the model's vocab_size: the tokenizer's, plus `padding` unused rows as many models keep."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_real_posts()[:500], trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|begin_of_text|>", "<|endoftext|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok, tok.get_vocab_size() + padding


# ---------------------------------------------------------------- token shards and training

BOUNDARY = 0


def _shards(seed: int = 0, n_shards: int = 3, docs: int = 200) -> list[np.ndarray]:
    """Shards as `data tokenize` writes them: [boundary] + 1..60 ids per document, lengths like posts."""
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(n_shards):
        parts = [np.concatenate([[BOUNDARY], rng.integers(1, 500, rng.integers(1, 60))]) for _ in range(docs)]
        shards.append(np.concatenate(parts).astype(np.uint16))
    return shards


STEPS = 24
# The tiny preset at seq_len 64, 2 micro-batches of 8 per step: ~0.03 s a step on one CPU core.
TINY = {"model.preset": "tiny", "model.seq_len": 64, "batch_tokens": 1024, "micro_batch": 8, "log_every": 1,
        "eval.tokens": 2048, "steps": STEPS}


def _config(tokens: Path, tokenizer: Path, out: Path, **overrides):
    from tweetlm.train.config import load_config

    return load_config(None, {"tokens": tokens, "tokenizer": tokenizer, "out": out, **TINY, **overrides})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def _one_thread():
    """torch on 1 thread for the duration, as each process under torchrun runs: the reference runs of the tests of
    several processes. (2 threads on a busy 2-core machine spin-wait on each other: a 3-second run took 90.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(launcher: int) -> dict[int, int]:
    """torchrun's worker processes, {RANK: pid}, through Linux's /proc (tweetlm runs and is tested on Linux)."""
    workers = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile (FileNotFoundError or ProcessLookupError)
            continue
        workers.update({int(v.removeprefix(b"RANK=")): int(child) for v in env if v.startswith(b"RANK=")})
    return workers


def _one_line_error(argv: list[str], capsys) -> str:
    from tweetlm.cli import main

    capsys.readouterr()  # drop what came before
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tweetlm: error: "), err
    return err


# ---------------------------------------------------------------- a live server

CONTEXT = 512
LONG = 300  # tokens: a reply this long is still running when its client leaves (~1 ms a token here)
POSTS = [p.strip() for p in (DATA / "tweeteval" / "emotion" / "train_text.txt").read_text(encoding="utf-8").splitlines()[:20]]


@contextmanager
def live_server(run: Path, *, limits=None, **options):
    """The app under uvicorn in a thread, on a free port: yields (base url, engine). `limits` is a ServeLimits
    (default: ServeLimits()); `options` go to create_app (api_key, moderator)."""
    from tweetlm.infer.engine import Engine
    from tweetlm.model.weights import load_model
    from tweetlm.serve.app import ServeLimits, create_app
    from tweetlm.serve.server import bind, uvicorn_server

    limits = ServeLimits() if limits is None else limits
    model, tokenizer = load_model(run)
    engine = Engine(model, tokenizer, max_batch_size=8)
    app = create_app(engine, tokenizer, model_name=run.name, limits=limits, **options)
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app, limits, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _client(url: str, key: str = "none"):
    """The official openai client (an openai.OpenAI) of the server at `url`."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one plain HTTP request: for what the openai client cannot send or hides."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.headers), data


def _status_error(call):
    """The openai.APIStatusError that `call()` raises."""
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def _wait_idle(engine, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.01)
    return stats
