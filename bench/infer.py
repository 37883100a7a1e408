"""Benchmark of tweetlm's engine against transformers' `generate` on the same exported weights.

    .venv/bin/python bench/infer.py                          # small preset, random init, vocab 8192 (~2 minutes)
    .venv/bin/python bench/infer.py --run work/demo/run      # a trained run
    .venv/bin/python bench/infer.py --new-tokens 32 --repeats 1   # a smoke run

The model (a run folder, or a random-init preset saved as one with a tokenizer trained on the shared tweets)
is exported with `tweetlm.model.hf.export_hf` and loaded back with transformers' AutoModelForCausalLM
(SDPA attention). Both sides: fp32, the same torch threads, greedy, the same B prompts of --prompt-len real
post tokens, exactly --new-tokens new tokens each (end tokens ignored: transformers without eos, the engine
without a tokenizer, i.e. token ids only, as generate returns them).
- TTFT: time until every prompt of the batch has its first token (a run of 1 new token).
- decode tokens/s: B x (N - 1) / (time for N tokens - time for 1 token).
Each side runs in a process of its own (a second thread computing in the engine's process slows the engine;
see tweetlm/infer/engine.py). Each figure is the best of --repeats runs, the sides alternating, so that other
jobs on the machine slow both alike; a load average above 1 makes the figures meaningless. Prints a table,
then one line of JSON.
"""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TWEETLM_DATA") or ROOT.parent / "shared" / "data")  # bench/gpu.sh carries a copy


def _posts() -> list[str]:
    files = sorted(SHARED.glob("tweeteval/*/train_text.txt"))
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def random_run(work: Path, preset_name: str, vocab_size: int, seq_len: int) -> Path:
    """A run folder holding a random-init model and a tokenizer trained on the shared tweets (cached in work)."""
    from tweetlm.data.corpus import SPLITS, ShardWriter
    from tweetlm.data.post import POST_FIELDS
    from tweetlm.model.llama import Llama
    from tweetlm.model.sizing import preset
    from tweetlm.model.weights import save_model
    from tweetlm.tokenizer.bpe import Tokenizer
    from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer

    run = work / f"run-{preset_name}-{vocab_size}-{seq_len}"
    if (run / "tokenizer.json").is_file():
        return run
    corpus, tok_dir = work / "corpus", work / f"tokenizer-{vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        (corpus / "report.json").parent.mkdir(parents=True, exist_ok=True)
        (corpus / "report.json").write_text("{}")
        writers = {split: ShardWriter(corpus, split, rows_per_shard=1_000_000) for split in SPLITS}
        for i, text in enumerate(_posts()):
            row = dict.fromkeys(POST_FIELDS) | {"id": str(i), "text": text, "kind": "post", "source": "bench",
                                                "clean_text": text}
            writers["val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].write(row)
        for w in writers.values():
            w.close()
        train_tokenizer(TokenizerConfig(corpus=corpus, out=tok_dir, vocab_size=vocab_size))
    tokenizer = Tokenizer.load(tok_dir)
    model = Llama(preset(preset_name, vocab_size=tokenizer.vocab_size, max_seq_len=seq_len))
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, run)
    tokenizer.save(run)
    return run


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """batch prompts of exactly `length` tokens: real posts, one after the other, each after <|endoftext|>."""
    ids = itertools.chain.from_iterable([tokenizer.boundary_id] + tokenizer.encode(p) for p in _posts()[:5000])
    return [[next(ids) for _ in range(length)] for _ in range(batch)]


def time_ours(engine, batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from tweetlm.infer.engine import SamplingParams

    start = time.perf_counter()
    requests = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0)) for p in batch_prompts]
    out = [[t for d in r for t in d.token_ids] for r in requests]
    return time.perf_counter() - start, out


def time_theirs(hf, batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    ids = torch.tensor(batch_prompts)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=None)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def measure(args) -> dict:
    """One side, in a process of its own: {batch: [seconds for 1 token, for N tokens, the N tokens]}."""
    from tweetlm.model.weights import load_model

    model, tokenizer = load_model(args.run)
    out = {}
    if args.measure == "tweetlm":
        from tweetlm.infer.engine import Engine

        for batch in args.batch:
            batch_prompts = prompts(tokenizer, batch, args.prompt_len)
            with Engine(model, None, max_batch_size=batch) as engine:
                time_ours(engine, batch_prompts, 4)  # warm-up
                out[batch] = [time_ours(engine, batch_prompts, 1)[0], *time_ours(engine, batch_prompts, args.new_tokens)]
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32, attn_implementation="sdpa").eval()
        for batch in args.batch:
            batch_prompts = prompts(tokenizer, batch, args.prompt_len)
            time_theirs(hf, batch_prompts, 4)
            out[batch] = [time_theirs(hf, batch_prompts, 1)[0], *time_theirs(hf, batch_prompts, args.new_tokens)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run folder (default: a random-init --preset)")
    ap.add_argument("--preset", default="small", help="model preset for the random-init model (default small)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="its tokenizer's vocabulary (default 8192, as the demo)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tweetlm-bench-infer", help="cache folder")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure, best kept (default 3)")
    ap.add_argument("--measure", choices=["tweetlm", "transformers"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    import transformers

    from tweetlm.model.hf import export_hf
    from tweetlm.model.weights import load_model

    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or random_run(args.work, args.preset, args.vocab_size, args.prompt_len + args.new_tokens)
    hf_dir = args.work / "hf"
    export_hf(run, hf_dir)
    cfg = load_model(run)[0].config
    print(f"model: {run} ({cfg.depth} layers, dim {cfg.dim}, vocab {cfg.vocab_size}); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads", flush=True)

    best, tokens = {}, {}  # (side, batch, new tokens) -> seconds; (side, batch) -> the greedy tokens
    child = [sys.executable, __file__, "--run", str(run), "--hf", str(hf_dir), "--batch", *map(str, args.batch),
             "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    for repeat in range(args.repeats):
        for side in ("tweetlm", "transformers"):
            result = subprocess.run([*child, "--measure", side], check=True, capture_output=True, text=True)
            for batch, (first, total, out) in json.loads(result.stdout.splitlines()[-1]).items():
                for n, seconds in ((1, first), (args.new_tokens, total)):
                    best[side, int(batch), n] = min(best.get((side, int(batch), n), math.inf), seconds)
                tokens[side, int(batch)] = out
        print(f"round {repeat + 1} of {args.repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    results = []
    for batch in args.batch:
        same = sum(a == b for a, b in zip(tokens["tweetlm", batch], tokens["transformers", batch]))
        print(f"batch {batch}: the same greedy tokens in {same} of {batch} sequences")
        for side in ("tweetlm", "transformers"):
            ttft, total = best[side, batch, 1], best[side, batch, args.new_tokens]
            results.append({"side": side, "batch": batch, "ttft_ms": 1000 * ttft,
                            "decode_tok_per_s": batch * (args.new_tokens - 1) / (total - ttft)})
    print(f"\n{'batch':>5}  {'side':<13}{'TTFT ms':>9}{'decode tok/s':>14}{'ratio':>7}")
    for r in results:
        base = next(x for x in results if x["batch"] == r["batch"] and x["side"] == "transformers")
        print(f"{r['batch']:>5}  {r['side']:<13}{r['ttft_ms']:>9.1f}{r['decode_tok_per_s']:>14,.0f}"
              f"{r['decode_tok_per_s'] / base['decode_tok_per_s']:>6.2f}x")
    print(json.dumps({"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    sys.exit(main())
