"""A mixture of experts against the dense model with the same active parameters per token (issue 15's bench).

    .venv/bin/python bench/moe.py                          # small vs small-moe, 300 steps each + MoE for dense's time
    .venv/bin/python bench/moe.py --steps 10 --quick       # a smoke run (~2 minutes)

The dense `small` preset (the CPU demo) and `small-moe` (small with 8 SwiGLU experts of half its MLP width, 2
active: the same FLOPs per token, 4x the MLP weights), trained by `train()` as `tweetlm train` runs it (Muon +
AdamW, WSD schedule, 16 x 256 = 4096 tokens a step: configs/demo.toml), on the same batches of the shared tweets (every
TweetEval and XLM-T train text, as bench/train.py prepares them), scored on the same val windows:
  1. same tokens: both for --steps steps;
  2. same wall clock: the MoE again, with a time budget of the dense run's training time (its WSD schedule then
     decays over that budget, as a run of that length would);
then the router's balance at the end (the last logged step: tokens per expert, min and max over the mean; the
Switch loss, 1.0 balanced), the engine's decode tokens/s of each trained run at batch 1 and 8 (greedy, prompts of
real posts, each run in a fresh process as bench/infer.py measures it), and where a training step's time goes in
each (torch.profiler: ms a step, self CPU time by op). Prints tables,
then one line of JSON. Other processes slow everything: the load average is printed.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import prepare_data  # noqa: E402  (bench/train.py)

ROOT = Path(__file__).resolve().parents[1]


def run_training(a, tokens: Path, tokenizer: Path, out: Path, preset: str, *, steps: int = 10**9,
                 minutes: float = 10.0**6) -> dict:
    """train() on one preset for `steps` or `minutes` of training; its final metrics and the router's."""
    from tweetlm.train.config import load_config, parse_set
    from tweetlm.train.loop import train

    overrides = {"tokens": tokens, "tokenizer": tokenizer, "out": out, "model.preset": preset, "device": "cpu",
                 "eval.every": 10**9, "eval.samples_every": 10**9, "checkpoint.every": 10**9,
                 "eval.tokens": 8192 if a.quick else 65536, "steps": steps, "time_budget": minutes,
                 **parse_set(a.set if preset == "small" else a.set + a.moe_set)}
    result = train(load_config(ROOT / "configs" / "demo.toml", overrides))  # the CPU demo's batch, optimizer, schedule
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    router = [r for r in records if "router_aux" in r]
    if not router:
        return result
    return result | {k: router[-1][k] for k in ("router_aux", "expert_load_min", "expert_load_max")}


def decode_speeds(runs: dict[str, Path], new_tokens: int, repeats: int = 3) -> dict[str, dict[int, float]]:
    """Engine decode tokens/s of each run at batch 1 and 8: B x (N - 1) / (time for N tokens - time for 1), each
    measured by bench/infer.py's tweetlm side in a fresh process (an engine beside an OpenMP team of the training
    process runs 2-4x slower: bench/infer.py), best of `repeats`, the runs alternating."""
    best = {}
    for _ in range(repeats):
        for name, run in runs.items():
            child = subprocess.run([sys.executable, str(ROOT / "bench" / "infer.py"), "--run", str(run), "--batch", "1",
                                    "8", "--prompt-len", "32", "--new-tokens", str(new_tokens), "--measure", "tweetlm"],
                                   check=True, capture_output=True, text=True)
            for batch, (first, total, _) in json.loads(child.stdout.splitlines()[-1]).items():
                speed = int(batch) * (new_tokens - 1) / (total - first)
                best[name, int(batch)] = max(best.get((name, int(batch)), 0.0), speed)
    return {name: {b: best[name, b] for b in (1, 8)} for name in runs}


def profile_step(run: Path, tokens: Path, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """Over 3 training steps (forward, backward; no optimizer) of the run's model: ms per step, and the `top` ops by
    self CPU time with their share of it."""
    from torch.profiler import ProfilerActivity, profile

    from tweetlm.model.weights import load_model
    from tweetlm.tokenizer.shards import open_split, read_index
    from tweetlm.train.batches import TokenBatches

    model, _ = load_model(run)
    model.train()
    batches = TokenBatches(open_split(tokens, "train"), boundary_id=read_index(tokens)["boundary_id"], seq_len=256,
                           batch_size=16, seed=0)
    step = lambda: (model(*batches.next()) + (model.router_loss() if model.config.experts else 0)).backward()  # noqa: E731
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return total / 3 / 1000, [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="steps of 4096 tokens, same-tokens runs (default 300)")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "bench-moe", help="data and runs (work/bench-moe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both runs")
    ap.add_argument("--moe-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the MoE runs only (e.g. model.experts=16 model.experts_active=4 ...)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per decode timing (default 64)")
    ap.add_argument("--quick", action="store_true", help="a small val set (8192 tokens), for smoke runs")
    a = ap.parse_args()

    tokens, tokenizer = prepare_data(a.work, 8192)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load = [os.getloadavg()[0]]
    runs = {"small": run_training(a, tokens, tokenizer, a.work / f"{stamp}-small", "small", steps=a.steps)}
    load.append(os.getloadavg()[0])
    runs["small-moe"] = run_training(a, tokens, tokenizer, a.work / f"{stamp}-moe", "small-moe", steps=a.steps)
    load.append(os.getloadavg()[0])
    minutes = runs["small"]["time"] / 60
    runs["small-moe, dense's time"] = run_training(a, tokens, tokenizer, a.work / f"{stamp}-moe-clock", "small-moe",
                                                   minutes=minutes)
    load.append(os.getloadavg()[0])
    decode = decode_speeds({"small": a.work / f"{stamp}-small", "small-moe": a.work / f"{stamp}-moe"}, a.new_tokens)
    for name, speeds in decode.items():
        runs[name]["decode"] = speeds
    load.append(os.getloadavg()[0])
    profiles = {name: profile_step(a.work / f"{stamp}-{out}", tokens)
                for name, out in (("small", "small"), ("small-moe", "moe"))}

    print(f"\nsmall vs small-moe on the shared tweets, 4096 tokens/step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {' -> '.join(f'{x:.2f}' for x in load)}")
    print(f"{'run':<26}{'steps':>7}{'tokens':>10}{'train s':>9}{'tok/s':>8}{'val bpb':>9}{'aux':>7}{'load min-max':>14}"
          f"{'decode b1':>11}{'decode b8':>11}")
    for name, r in runs.items():
        router = " " * 21
        if "router_aux" in r:
            router = f"{r['router_aux']:>7.3f}{r['expert_load_min']:>7.2f}-{r['expert_load_max']:<6.2f}"
        decode = "".join(f"{r['decode'][b]:>11,.0f}" for b in (1, 8)) if "decode" in r else ""
        print(f"{name:<26}{r['step']:>7}{r['tokens']:>10,}{r['time']:>9.0f}{r['tok_per_s']:>8,.0f}{r['val_bpb']:>9.4f}"
              f"{router}{decode}")
    dense, moe, clock = runs["small"], runs["small-moe"], runs["small-moe, dense's time"]
    print(f"same tokens: val bpb {moe['val_bpb']:.4f} (MoE) vs {dense['val_bpb']:.4f} (dense), "
          f"{'lower' if moe['val_bpb'] < dense['val_bpb'] else 'NOT lower'}; "
          f"training tok/s {moe['tok_per_s'] / dense['tok_per_s']:.2f}x")
    print(f"same wall clock ({minutes:.1f} min): val bpb {clock['val_bpb']:.4f} (MoE, {clock['step']} steps) vs "
          f"{dense['val_bpb']:.4f} (dense, {dense['step']} steps)")
    print("where a training step's time goes (3 steps of forward and backward, self CPU time by op):")
    for name, (ms, ops) in profiles.items():
        print(f"  {name}: {ms:,.0f} ms a step; " + ", ".join(f"{op} {share:.1%}" for op, share in ops))
    print(json.dumps({"bench": "moe", "steps": a.steps, "runs": runs, "profiles": profiles, "load": load,
                      "argv": sys.argv[1:]}))


if __name__ == "__main__":
    main()
