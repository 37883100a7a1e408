"""Benchmark of `tweetlm serve`: 1, 8 and 32 concurrent streaming chat clients against a live server.

    .venv/bin/python bench/serve.py                               # small preset, 20 s per level (~2 minutes)
    .venv/bin/python bench/serve.py --run work/demo/run --seconds 10 --device cuda

The server is `tweetlm serve` itself, in its own process (--port 0, --max-batch-size 32). Each client is an
openai.AsyncOpenAI loop: one streaming /v1/chat/completions request after another (a real tweet as the user
message, temperature 1, `max_tokens` --max-tokens, stream_options.include_usage), for --seconds; requests
started before the end run to completion. Per level:
- aggregate tokens/s: completion tokens (from each stream's usage) / time from the level's start to its last byte;
- time to first token: from sending a request to its first chunk with content (the role chunk, sent at once,
  is not a token), p50 and p99 over the level's requests;
- errors: requests that raised, whatever the reason.
Targets (issue 5): zero errors; aggregate tokens/s at 32 clients >= 5x a single client's.

--soak checks that the server's memory stops growing (docs/benchmarks.md, "Serving memory"):

    .venv/bin/python bench/serve.py --soak                        # 20 rounds (~4 minutes on 2 cores)
    .venv/bin/python bench/serve.py --soak --rounds 5 --burst 16 --disconnects 50 --seconds 2   # ~35 s

Each round: a burst of --burst streaming clients for --seconds (default 3 here) as above, then --disconnects
clients that each open a stream, read a few chunks and hang up (a 429 is retried after 0.5 s).
After each round, once the server is idle (/metrics: nothing running, waiting or in flight), it prints the server's
resident memory (VmRSS of /proc/PID/status); at the end, the growth per round over the last 10 rounds (least
squares). Per-request state kept, or kernels compiled per new shape, grow round after round; a sound server
levels off after the first rounds (caches fill, the KV cache's pages are touched as sequences reach new positions).

--engine-only runs the same clients (threads) on an Engine in this process, without HTTP: the difference
is what the server itself costs.

Model: --run, or by default the `small` preset after 1 training step on TweetEval train texts (near-random
weights, so replies run to max_tokens: the worst case for the server), made once in --work.
Prints a table, then one line of JSON. Other processes on the machine slow the server: the load average is printed.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def make_run(work: Path, seq_len: int) -> Path:
    """The default model: the small preset, one step on TweetEval train texts, with its own 8192-token tokenizer."""
    from tweetlm.data.prepare import PrepareConfig, prepare
    from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
    from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer
    from tweetlm.train.config import load_config
    from tweetlm.train.loop import train

    run = work / f"small-{seq_len}"
    if (run / "checkpoints").is_dir():
        return run
    corpus, tokenizer, tokens = work / "corpus", work / "tokenizer", work / "tokens"
    if not (corpus / "report.json").is_file():
        prepare(PrepareConfig(inputs=tuple(str(p) for p in sorted(SHARED.glob("tweeteval/*/train_text.txt"))), out=corpus))
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer(TokenizerConfig(corpus=corpus, out=tokenizer, vocab_size=8192))
    if not (tokens / "index.json").is_file():
        tokenize(TokenizeConfig(corpus=corpus, tokenizer=tokenizer, out=tokens))
    train(load_config(None, {"tokens": tokens, "tokenizer": tokenizer, "out": run, "model.preset": "small",
                             "model.seq_len": seq_len, "batch_tokens": seq_len, "micro_batch": 1, "steps": 1,
                             "eval.tokens": seq_len}))
    return run


def start_server(run: Path, device: str, log: Path) -> tuple[subprocess.Popen, str, str]:
    """`tweetlm serve RUN --port 0` in its own process: (process, base url, model name)."""
    proc = subprocess.Popen([sys.executable, "-m", "tweetlm", "serve", str(run), "--port", "0", "--device", device,
                             "--max-batch-size", "32"], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}; see {log}")
    # uvicorn's access log goes to stdout: unread, the pipe fills (64 KiB, ~1,100 requests) and the server blocks
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    return proc, line.split(" at ", 1)[1].split(": web chat", 1)[0], line.split()[1]


def _drain(stream) -> None:
    for _ in stream:
        pass


async def _request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streaming chat request: (seconds to the first token's chunk, completion tokens). The first token is
    the first chunk with content, or the last chunk when the model ended at once (an empty reply)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=1.0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    assert first is not None and tokens > 0, f"a stream without tokens: first token {first}, {tokens} tokens"
    return first, tokens


async def run_level(url: str, model: str, clients: int, seconds: float, max_tokens: int, prompts: list[str]) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    ttfts, tokens, errors = [], [], []
    start = time.perf_counter()
    end = start + seconds

    async def one_client(c: int):
        i = c
        while time.perf_counter() < end:
            try:
                first, n = await _request(client, model, prompts[i % len(prompts)], max_tokens)
                ttfts.append(first)
                tokens.append(n)
            except Exception as e:  # counted, and the client carries on, as a real one would
                errors.append(f"{type(e).__name__}: {e}")
            i += clients

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return {"clients": clients, "requests": len(tokens), "tokens": sum(tokens), "seconds": round(elapsed, 2),
            "tok_per_s": round(sum(tokens) / elapsed, 1), "ttft_p50_ms": round(1000 * q[49], 1),
            "ttft_p99_ms": round(1000 * q[98], 1), "errors": len(errors), "first_errors": errors[:3]}


def run_level_engine(engine, tokenizer, clients: int, seconds: float, max_tokens: int, prompts: list[str]) -> dict:
    """run_level's load on the engine directly: the same requests, rendered with the same chat template."""
    from tweetlm.infer.engine import SamplingParams
    from tweetlm.tokenizer.chat import render_chat

    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop_token_ids=(tokenizer.token_id("<|end|>"),))
    ttfts, tokens = [], []
    start = time.perf_counter()
    end = start + seconds

    def one_client(c: int):
        for i in range(c, 1 << 30, clients):
            if time.perf_counter() >= end:
                return
            sent = time.perf_counter()
            request = engine.submit(render_chat(tokenizer, [{"role": "user", "content": prompts[i % len(prompts)]}]), params)
            first = None
            for delta in request:
                if first is None and (delta.text or delta.finish_reason):
                    first = time.perf_counter() - sent
            ttfts.append(first)
            tokens.append(request.completion_tokens)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return {"clients": clients, "requests": len(tokens), "tokens": sum(tokens), "seconds": round(elapsed, 2),
            "tok_per_s": round(sum(tokens) / elapsed, 1), "ttft_p50_ms": round(1000 * q[49], 1),
            "ttft_p99_ms": round(1000 * q[98], 1), "errors": 0, "first_errors": []}


def measure(args, run: Path, prompts: list[str]) -> list[dict]:
    """Every level, after a short warm-up (first allocations, lazy inits), against the server or the engine."""
    counts = [int(c) for c in args.clients.split(",")]
    if args.engine_only:
        from tweetlm.infer.engine import Engine
        from tweetlm.model.weights import load_model

        model, tokenizer = load_model(run, device=args.device)
        with Engine(model, tokenizer, max_batch_size=32) as engine:
            run_level_engine(engine, tokenizer, 1, 2.0, 8, prompts)
            return [run_level_engine(engine, tokenizer, c, args.seconds, args.max_tokens, prompts) for c in counts]
    proc, url, model = start_server(run, args.device, args.work / "server.log")
    try:
        asyncio.run(run_level(url, model, 1, 2.0, 8, prompts))
        return [asyncio.run(run_level(url, model, c, args.seconds, args.max_tokens, prompts)) for c in counts]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Until /metrics shows nothing running, waiting or in flight (the cancelled streams' slots freed too)."""
    gauges = ("tweetlm_running_batch_size", "tweetlm_queue_depth", "tweetlm_requests_in_flight")
    deadline, values = time.perf_counter() + timeout, {}
    while time.perf_counter() < deadline:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            text = response.read().decode()
        values = {name: float(value) for name, value in (line.split() for line in text.splitlines()
                                                          if line.split(" ")[0] in gauges)}
        if len(values) == len(gauges) and not any(values.values()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server was not idle after {timeout} s: {values}")


async def run_disconnects(url: str, model: str, clients: int, max_tokens: int, prompts: list[str],
                          chunks: int = 4) -> dict:
    """`clients` streaming chat requests at once, each closed by its client after `chunks` chunks (mid-stream:
    max_tokens is far more); one refused with 429 (the server's --max-concurrent) is retried until it streams."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    counts = {"disconnected": 0, "refused": 0, "finished": 0, "errors": 0}

    async def one_client(c: int):
        while True:
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[c % len(prompts)]}],
                    max_tokens=max_tokens, temperature=1.0, stream=True)
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen == chunks:
                        break
                await stream.close()  # hang up: the server sees the connection close mid-stream
                counts["disconnected" if seen == chunks else "finished"] += 1
                return
            except openai.RateLimitError:  # retried after half the server's Retry-After (1 s): the burst stays dense
                counts["refused"] += 1
                await asyncio.sleep(0.5)
            except Exception:  # counted; one that raised is an error of the server's (or a 60 s stall)
                counts["errors"] += 1
                return

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    await client.close()
    return counts


def soak(args, run: Path, prompts: list[str]) -> dict:
    """--rounds rounds of load, the server's RSS after each once it is idle."""
    proc, url, model = start_server(run, args.device, args.work / "server.log")
    try:
        start_mb = rss_mb(proc.pid)
        asyncio.run(run_level(url, model, 1, 2.0, 8, prompts))  # warm-up, as measure()
        wait_idle(url)
        warm_mb = rss_mb(proc.pid)
        print(f"server pid {proc.pid}: RSS {start_mb:.0f} MB at start, {warm_mb:.0f} MB after the warm-up", flush=True)
        print(f"{'round':>6}{'requests':>10}{'tok/s':>8}{'errors':>8}{'hung up':>9}{'429s':>7}{'RSS MB':>9}"
              f"{'change':>9}", flush=True)
        rounds, previous = [], warm_mb
        for r in range(1, args.rounds + 1):
            level = asyncio.run(run_level(url, model, args.burst, args.seconds, args.max_tokens, prompts))
            gone = asyncio.run(run_disconnects(url, model, args.disconnects, args.max_tokens, prompts))
            wait_idle(url)
            time.sleep(1.0)  # let the last connections and tasks be torn down
            mb = rss_mb(proc.pid)
            rounds.append({"round": r, "requests": level["requests"], "tok_per_s": level["tok_per_s"],
                           "errors": level["errors"] + gone["errors"], "first_errors": level["first_errors"],
                           "disconnected": gone["disconnected"], "refused": gone["refused"], "rss_mb": round(mb, 1)})
            print(f"{r:>6}{level['requests']:>10}{level['tok_per_s']:>8,.0f}{rounds[-1]['errors']:>8}"
                  f"{gone['disconnected']:>9}{gone['refused']:>7}{mb:>9.1f}{mb - previous:>+9.1f}", flush=True)
            previous = mb
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    last = rounds[-10:]
    slope = statistics.linear_regression([r["round"] for r in last], [r["rss_mb"] for r in last]).slope \
        if len(last) > 1 else float("nan")
    return {"start_mb": round(start_mb, 1), "warm_mb": round(warm_mb, 1), "rounds": rounds,
            "growth_mb_per_round": round(slope, 2), "over_rounds": len(last)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run folder to serve (default: the small preset, made in --work)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tweetlm-bench-serve")
    ap.add_argument("--seq-len", type=int, default=1024, help="context of the default model (default 1024)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--seconds", type=float, help="how long each level (or soak burst) sends new requests "
                    "(default 20, 3 with --soak)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    ap.add_argument("--engine-only", action="store_true", help="the same load on the engine in this process, no HTTP")
    ap.add_argument("--soak", action="store_true", help="rounds of load; the server's RSS after each (see above)")
    ap.add_argument("--rounds", type=int, default=20, help="--soak: rounds (default 20)")
    ap.add_argument("--burst", type=int, default=64,
                    help="--soak: streaming clients of each round's burst (default 64)")
    ap.add_argument("--disconnects", type=int, default=200,
                    help="--soak: clients that hang up mid-stream, each round (default 200)")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 3.0 if args.soak else 20.0

    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or make_run(args.work, args.seq_len)
    prompts = (SHARED / "tweeteval" / "emotion" / "val_text.txt").read_text(encoding="utf-8").splitlines()[:200]
    load = [os.getloadavg()[0]]
    if args.soak:
        result = soak(args, run, prompts)
        load.append(os.getloadavg()[0])
        errors = sum(r["errors"] for r in result["rounds"])
        print(f"RSS {result['start_mb']:.0f} MB at start, {result['warm_mb']:.0f} after the warm-up, "
              f"{result['rounds'][-1]['rss_mb']:.0f} after {args.rounds} rounds; growth over the last "
              f"{result['over_rounds']} rounds: {result['growth_mb_per_round']:+.2f} MB/round; errors {errors}; "
              f"load average before/after {load}")
        print(json.dumps({"run": str(run), "device": args.device, "soak": True, "burst": args.burst,
                          "disconnects": args.disconnects, "seconds": args.seconds, "max_tokens": args.max_tokens,
                          **result, "load": load}))
        return
    levels = measure(args, run, prompts)
    load.append(os.getloadavg()[0])

    print(f"{'clients':>8}{'requests':>10}{'tokens':>9}{'tok/s':>9}{'TTFT p50':>11}{'TTFT p99':>11}{'errors':>8}")
    for r in levels:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['tokens']:>9}{r['tok_per_s']:>9,.0f}{r['ttft_p50_ms']:>9.0f}ms"
              f"{r['ttft_p99_ms']:>9.0f}ms{r['errors']:>8}")
    scale = levels[-1]["tok_per_s"] / levels[0]["tok_per_s"] if levels[0]["tok_per_s"] else float("nan")
    errors = sum(r["errors"] for r in levels)
    print(f"{levels[-1]['clients']} clients / 1: {scale:.1f}x tokens/s (target >= 5x: {'met' if scale >= 5 else 'NOT met'}); "
          f"errors {errors} (target 0: {'met' if errors == 0 else 'NOT met'}); load average before/after {load}")
    print(json.dumps({"run": str(run), "device": args.device, "engine_only": args.engine_only, "max_tokens": args.max_tokens,
                      "seconds": args.seconds, "levels": levels, "scale": round(scale, 2), "load": load}))


if __name__ == "__main__":
    main()
