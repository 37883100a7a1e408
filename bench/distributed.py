"""Tokens/s of `tweetlm train` in 1 and 2 processes under torchrun, and on CUDA with FSDP and torch.compile.

    .venv/bin/python bench/distributed.py                    # CPU: small preset, 1 then 2 processes (ddp), 1 minute each
    .venv/bin/python bench/distributed.py --parallel fsdp    # the same with FSDP2 (and AdamW, which fsdp needs)
    .venv/bin/python bench/distributed.py --device cuda --preset 1b --seq-len 2048 --micro-batch 8 --batch-tokens 65536
        # CUDA: 1 process plain + compile, then every process count of --procs (default: 1 and all GPUs) with fsdp + compile

Each configuration is one real run, `torchrun --standalone --nproc-per-node N -m tweetlm train ...`, with the same
global batch (batch_tokens) and a training-time budget; evaluation and checkpoints are pushed past the budget.
tokens/s = tokens / training time over the logged steps after the first WARMUP (start-up, compilation), all
processes together; MFU against the peak of all the devices (train/dist.py). On CPU torchrun gives each of
several processes 1 thread (OMP_NUM_THREADS=1), a single process keeps all cores' threads: 2 processes on 2 cores
compare the same cores used two ways.

Data: --tokens/--tokenizer, or the shared tweets run through `data prepare`, a 8192-token tokenizer and
`data tokenize` (bench/train.py's prepare_data), cached in --work. Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train import prepare_data  # bench/train.py (this folder is on sys.path when run as a script)

WARMUP = 3  # steps left out of tokens/s: process start, first allocations, torch.compile's first graphs


def bench_one(a, tokens: Path, tokenizer: Path, *, procs: int, parallel: str, compile: bool) -> dict:
    """One torchrun run; returns its throughput from RUN/metrics.jsonl."""
    out = a.work / f"run-{procs}x-{parallel}{'-compile' if compile else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    never = 10**9
    sets = {"model.seq_len": a.seq_len, "micro_batch": a.micro_batch, "batch_tokens": a.batch_tokens, "log_every": 1,
            "eval.every": never, "eval.samples_every": never, "checkpoint.every": never, "eval.tokens": 8192,
            **({"optim.name": "adamw", "optim.lr": 0.006} if parallel == "fsdp" else {})}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "tweetlm",
            "train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(out), "--preset", a.preset,
            "--time-budget", str(a.minutes), "--device", a.device, "--parallel", parallel,
            *(f"--set={k}={v}" for k, v in sets.items()), *(f"--set={s}" for s in a.set), *(["--compile"] if compile else [])]
    print(f"\n== {procs} process{'es' if procs > 1 else ''}, {parallel}{', compile' if compile else ''}: {' '.join(argv[2:])}", flush=True)
    subprocess.run(argv, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tok_per_s" in r][WARMUP:]
    assert len(steps) >= 2, f"only {len(steps)} timed steps in {a.minutes} minutes: raise --minutes"
    tok_per_s = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["time"] - steps[0]["time"])
    mfus = sorted(r["mfu"] for r in steps if r["mfu"] is not None)
    return {"procs": procs, "parallel": parallel, "compile": compile, "steps": steps[-1]["step"], "tok_per_s": tok_per_s,
            "mfu": mfus[len(mfus) // 2] if mfus else None, "final_loss": steps[-1]["loss"],
            "device": json.loads((out / "env.json").read_text())["device"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="token shards (default: made from ../shared/data in --work)")
    ap.add_argument("--tokenizer", help="their tokenizer (with --tokens)")
    ap.add_argument("--work", default=Path(tempfile.gettempdir()) / "tweetlm-bench-distributed", type=Path,
                    help="cache for the default data, and the run folders")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--procs", type=int, nargs="+", help="process counts (default: 1 2 on CPU; 1 and every GPU on CUDA)")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), help="default: ddp on CPU, fsdp on CUDA")
    ap.add_argument("--preset", default="small", help="model preset (default small)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward on each process (default 8)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="global tokens per optimizer step (default 4096)")
    ap.add_argument("--minutes", type=float, default=1.0, help="training-time budget of each run (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (repeatable)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    tokens, tokenizer = (Path(a.tokens), Path(a.tokenizer)) if a.tokens else prepare_data(a.work, 8192)

    if a.device == "cpu":
        configs = [(n, a.parallel or "ddp", False) for n in a.procs or (1, 2)]
    else:
        import torch

        gpus = torch.cuda.device_count()
        configs = [(1, "ddp", True)] + [(n, a.parallel or "fsdp", True) for n in a.procs or sorted({1, gpus})]
    load = [os.getloadavg()[0]]
    results = []
    for procs, parallel, compile in configs:
        results.append(bench_one(a, tokens, tokenizer, procs=procs, parallel=parallel, compile=compile))
        load.append(os.getloadavg()[0])

    base = results[0]["tok_per_s"]
    print(f"\n{a.preset}, {a.batch_tokens} tokens per step (micro-batch {a.micro_batch} x {a.seq_len}), "
          f"{a.minutes:g} min each; 1-minute load average before and after each run: {load}")
    print(f"{'processes':>10}  {'parallel':<9}{'compile':<9}{'steps':>7}{'tok/s':>10}{'vs first':>10}{'MFU':>8}   device")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        print(f"{r['procs']:>10}  {r['parallel']:<9}{str(r['compile']):<9}{r['steps']:>7}{r['tok_per_s']:>10,.0f}"
              f"{r['tok_per_s'] / base:>9.2f}x{mfu:>8}   {r['device']}")
    print(json.dumps({"bench": "distributed", "preset": a.preset, "batch_tokens": a.batch_tokens, "seq_len": a.seq_len,
                      "micro_batch": a.micro_batch, "minutes": a.minutes, "load": load, "results": results,
                      "argv": sys.argv[1:]}))


if __name__ == "__main__":
    main()
