"""The GPU figures (bench/gpu.sh runs this after the tests marked cuda): the card's measured ceilings, training
throughput and MFU, engine decode against the memory-bandwidth bound, and `eval bpb` + `generate` on a 1b
checkpoint written here.

    python3 bench/gpu.py --out work/gpu                  # everything, ~5 minutes on an H200
    python3 bench/gpu.py --out work/gpu --presets 125m --steps 12 --decode-batches 1   # a smoke run

1. Ceilings: an 8192^3 bf16 matmul on random data (3 warm-ups, the median of 10 timed with CUDA events) and a
   device-to-device copy of 4 GiB (bytes read + written over the time).
2. Training, per preset: `tweetlm train --device cuda --parallel fsdp --compile` (FSDP2 on one GPU, bf16
   MixedPrecisionPolicy, bf16 autocast, AdamW) at seq_len 2048 for --steps steps. tokens/s over the steps after
   the first --warmup (compilation, allocator warm-up); MFU = training FLOPs per token (model/sizing.py, 6N + the
   attention term) x tokens/s over the data-sheet peak (989 TFLOP/s for an H100/H200 SXM) and over the measured
   matmul rate.
3. Decode: the trained 1b checkpoint in tweetlm's engine (bf16 on CUDA), B prompts of 64 real post tokens,
   --new-tokens greedy tokens each; tokens/s = B x (N - 1) / (time for N tokens - time for 1). The bound: a
   step reads every weight once (the embedding table only as the output head), so at most
   bandwidth / weight bytes steps per second, B tokens each; the fraction is measured over that bound, against
   the data sheet's 4.8 TB/s (H200) and the measured copy rate.
4. `tweetlm eval bpb` and `tweetlm generate` on that checkpoint, as a user runs them.

Data: the shared tweets (--data, default ../shared/data, or $TWEETLM_DATA) through `data prepare`, a
32768-token tokenizer and `data tokenize` (bench/train.py's prepare_data), in --work. Writes OUT/gpu.json and
OUT/gpu.md (the table printed last).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQ_LEN = 2048
MICRO_BATCH = {"125m": 32, "1b": 16, "8b": 4}  # sequences of 2048 per forward: fills an 80 GB+ card with activations
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16, data sheet
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # HBM bytes/s, data sheets


def _median_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def ceilings() -> dict:
    """Random data (zeros run faster than real numbers), freed before the runs."""
    g = torch.Generator("cuda").manual_seed(0)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    matmul = 2 * n**3 / (_median_ms(lambda: a @ b) / 1e3)
    src = torch.randn(2**30, device="cuda", generator=g)  # 4 GiB of fp32
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / (_median_ms(lambda: dst.copy_(src)) / 1e3)
    return {"matmul_bf16_tflops": matmul / 1e12, "copy_tb_per_s": copy / 1e12}


def _tweetlm(*args: str, timeout: float) -> tuple[str, float]:
    """`python -m tweetlm ARGS` in a process of its own (its GPU memory is freed when it ends): (output, seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tweetlm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    if done.returncode != 0:
        raise RuntimeError(f"tweetlm {' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr, time.perf_counter() - start


def train_throughput(a, tokens: Path, tokenizer: Path, name: str, matmul_tflops: float) -> dict:
    from tweetlm.artifacts.checkpoint import latest_checkpoint, read_config
    from tweetlm.model.llama import ModelConfig
    from tweetlm.model.sizing import flops_per_token, num_params

    run = a.work / f"run-{name}"
    micro = MICRO_BATCH[name]
    never = 10**9
    sets = {"model.seq_len": SEQ_LEN, "micro_batch": micro, "batch_tokens": 2 * micro * SEQ_LEN, "log_every": 1,
            "eval.every": never, "eval.tokens": 8 * SEQ_LEN, "eval.samples_every": never, "eval.samples": 1,
            "checkpoint.every": never, "optim.name": "adamw", "optim.lr": 0.003}
    shutil.rmtree(run, ignore_errors=True)  # a previous bench's run of this preset
    _, seconds = _tweetlm("train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(run),
                          "--preset", name, "--steps", str(a.steps), "--device", "cuda", "--parallel", "fsdp",
                          "--compile", *(f"--set={k}={v}" for k, v in sets.items()), timeout=a.timeout)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tok_per_s" in r and r["step"] > a.warmup]
    tok_per_s = sum(r["tokens"] - p["tokens"] for p, r in zip(steps, steps[1:])) / sum(r["time"] - p["time"] for p, r in zip(steps, steps[1:]))
    cfg = ModelConfig(**read_config(latest_checkpoint(run)))
    losses = [r["loss"] for r in records if "loss" in r]
    flops = flops_per_token(cfg, SEQ_LEN) * tok_per_s
    return {"preset": name, "params": num_params(cfg), "batch_tokens": sets["batch_tokens"], "micro_batch": micro,
            "steps": a.steps, "tok_per_s": tok_per_s, "tflops": flops / 1e12, "mfu": flops / PEAK_BF16,
            "mfu_measured": flops / (matmul_tflops * 1e12), "loss_first": losses[0], "loss_last": losses[-1],
            "wall_s": seconds, "run": str(run)}


def decode(run: Path, batches: list[int], new_tokens: int, bandwidths: dict) -> list[dict]:
    from infer import prompts, time_ours  # bench/infer.py (on sys.path from main): the CPU figures' prompts, timing

    from tweetlm.infer.engine import Engine
    from tweetlm.model.sizing import num_params
    from tweetlm.model.weights import load_model

    model, tokenizer = load_model(run, device="cuda")
    cfg = model.config
    weight_bytes = 2 * num_params(cfg, embedding=False)  # bf16; the table is read as the output head only
    out = []
    for batch in batches:
        batch_prompts = prompts(tokenizer, batch, 64)
        with Engine(model, None, max_batch_size=batch) as engine:
            time_ours(engine, batch_prompts, 4)  # warm-up: cuBLAS handles, allocator
            first = min(time_ours(engine, batch_prompts, 1)[0] for _ in range(2))
            total = min(time_ours(engine, batch_prompts, new_tokens)[0] for _ in range(2))
        tok_per_s = batch * (new_tokens - 1) / (total - first)
        row = {"batch": batch, "tok_per_s": tok_per_s, "step_ms": 1000 * (total - first) / (new_tokens - 1),
               "weight_gb": weight_bytes / 1e9}
        for source, bandwidth in bandwidths.items():
            row[f"of_bound_{source}"] = tok_per_s / (batch * bandwidth / weight_bytes)
        out.append(row)
        print(f"decode batch {batch}: {tok_per_s:,.0f} tok/s, {row['step_ms']:.2f} ms a step", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def table(r: dict) -> str:
    c = r["ceilings"]
    lines = [f"GPU: {r['device']} ({r['memory_gb']:.0f} GB), torch {r['torch']}, CUDA {r['cuda']}", "",
             "| what | figure |", "| --- | --- |",
             f"| tests marked cuda | {r.get('cuda_tests', 'not run')} |",
             f"| bf16 matmul 8192^3 (measured) | {c['matmul_bf16_tflops']:.0f} TFLOP/s |",
             f"| device copy (measured, read + write) | {c['copy_tb_per_s']:.2f} TB/s |"]
    for t in r["train"]:
        if "error" in t:
            lines.append(f"| train {t['preset']} | failed: {t['error']} |")
            continue
        lines.append(f"| train {t['preset']} ({t['params'] / 1e6:,.0f}M, fsdp + compile + bf16, {t['batch_tokens']:,} tok/step) "
                     f"| {t['tok_per_s']:,.0f} tok/s, {t['tflops']:.0f} TFLOP/s, MFU {t['mfu']:.1%} of 989, "
                     f"{t['mfu_measured']:.1%} of measured; loss {t['loss_first']:.2f} -> {t['loss_last']:.2f} |")
    for d in r.get("decode", []):
        lines.append(f"| decode 1b bf16, batch {d['batch']} | {d['tok_per_s']:,.0f} tok/s ({d['step_ms']:.2f} ms/step), "
                     + ", ".join(f"{v:.0%} of the {k.removeprefix('of_bound_')} bound" for k, v in d.items() if k.startswith("of_bound_"))
                     + " |")
    for verb in ("eval_bpb", "generate"):
        if verb in r:
            lines.append(f"| {verb.replace('_', ' ')} on the 1b checkpoint | {r[verb]} |")
    return "\n".join(lines)


def _save(out: Path, r: dict) -> None:
    """After each part, so that a run cut short still leaves the figures it has."""
    (out / "gpu.json").write_text(json.dumps(r, indent=1))
    (out / "gpu.md").write_text(table(r) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "work" / "gpu", help="where gpu.json and gpu.md go")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tweetlm-gpu"), help="data and runs (default /tmp/tweetlm-gpu)")
    ap.add_argument("--data", type=Path, help="the shared data folder (default $TWEETLM_DATA or ../shared/data)")
    ap.add_argument("--presets", nargs="*", default=["125m", "1b"],
                    help="training presets (default 125m 1b); none: decode a random-init 1b only")
    ap.add_argument("--steps", type=int, default=30, help="training steps per preset (default 30)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s (default 10)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64], help="engine batch sizes (default 1 8 64)")
    ap.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per prompt (default 128)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed to each tweetlm command (default 300)")
    ap.add_argument("--cuda-tests", help=argparse.SUPPRESS)  # bench/gpu.sh passes pytest's summary line
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    if a.data:
        os.environ["TWEETLM_DATA"] = str(a.data)
    sys.path.insert(0, str(ROOT / "bench"))
    from train import prepare_data  # bench/train.py

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    r = {"device": props.name, "memory_gb": props.total_memory / 1e9, "torch": torch.__version__, "cuda": torch.version.cuda,
         "cuda_tests": a.cuda_tests, "train": []}
    r["ceilings"] = ceilings()
    torch.cuda.empty_cache()
    print(f"ceilings: {r['ceilings']}", flush=True)
    bandwidths = {"data-sheet": next((v for k, v in BANDWIDTH.items() if k in props.name), BANDWIDTH["H200"]),
                  "measured-copy": r["ceilings"]["copy_tb_per_s"] * 1e12}

    if a.presets:
        start = time.perf_counter()
        tokens, tokenizer = prepare_data(a.work, 32768)
        print(f"data: {time.perf_counter() - start:.0f} s", flush=True)
    for name in a.presets:
        try:
            r["train"].append(train_throughput(a, tokens, tokenizer, name, r["ceilings"]["matmul_bf16_tflops"]))
            print(f"train {name}: {r['train'][-1]}", flush=True)
        except Exception as e:  # report and go on: the other figures still come
            r["train"].append({"preset": name, "error": str(e).splitlines()[0][:200]})
            print(f"train {name} failed: {e}", flush=True)
        _save(a.out, r)
    trained = [t for t in r["train"] if "error" not in t]
    # the largest preset trained (1b by default), or with --presets and no name a random-init 1b (decode only)
    run = Path(trained[-1]["run"]) if trained else None
    try:
        if run is None:
            from infer import random_run  # bench/infer.py

            run = random_run(a.work, "1b", 32768, SEQ_LEN)
        r["decode"] = decode(run, a.decode_batches, a.new_tokens, bandwidths)
    except Exception as e:
        r["decode_error"] = repr(e)[:500]
        print(f"decode failed: {e!r}", flush=True)
    _save(a.out, r)
    if trained:
        for verb, args in (("eval_bpb", ["eval", "bpb", str(run), "--corpus", str(a.work / "corpus"), "--split", "val"]),
                           ("generate", ["generate", str(run), "--prompt", "Monday mornings are", "--max-new-tokens", "32",
                                         "--seed", "1"])):
            try:
                output, seconds = _tweetlm(*args, "--device", "cuda", timeout=a.timeout)
                r[verb] = f"{seconds:.0f} s: " + " / ".join(line.strip() for line in output.strip().splitlines()[-2:])[:200]
            except Exception as e:
                r[verb] = f"failed: {str(e)[:300]}"
            print(f"{verb}: {r[verb]}", flush=True)
    _save(a.out, r)
    print("\n" + table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
