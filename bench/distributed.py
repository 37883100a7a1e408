"""Tokens/s of `tweetlm train` in 1 and 2 processes under torchrun, and on CUDA with FSDP and torch.compile;
with --nodes 2, of 1 process against two single-process torchrun nodes on this host, and the time a node's loss
takes to end the other node.

    .venv/bin/python bench/distributed.py                    # CPU: small preset, 1 then 2 processes (ddp), 1 minute each
    .venv/bin/python bench/distributed.py --parallel fsdp    # the same with FSDP2 (and AdamW, which fsdp needs)
    .venv/bin/python bench/distributed.py --device cuda --preset 1b --seq-len 2048 --micro-batch 8 --batch-tokens 65536
        # CUDA: 1 process plain + compile, then every process count of --procs (default: 1 and all GPUs) with fsdp + compile
    .venv/bin/python bench/distributed.py --nodes 2          # CPU: 1 process, then 2 nodes of 1 process; then node losses

Each configuration is one real run, `torchrun --standalone --nproc-per-node N -m tweetlm train ...`, with the same
global batch (batch_tokens) and a training-time budget; evaluation and checkpoints are pushed past the budget.
tokens/s = tokens / training time over the logged steps after the first WARMUP (start-up, compilation), all
processes together; MFU against the peak of all the devices (train/dist.py). On CPU torchrun gives each of
several processes 1 thread (OMP_NUM_THREADS=1), a single process keeps all cores' threads: 2 processes on 2 cores
compare the same cores used two ways.

--nodes N: N torchrun launchers on this host (`--nnodes N --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint
127.0.0.1:PORT`), each node given cores / N threads, against 1 process (all cores' threads). Then, twice, the same
N nodes train until the first logged step and one node is killed as a lost machine would be (SIGKILL of its
launcher and of its process, which torchrun runs in a session of its own): first a node that does not host the
rendezvous, then the one that does (node 0, started first). Reported: seconds from the kill to the exit of the
last surviving launcher, and whether a survivor printed tweetlm's "lost contact" line.

Data: --tokens/--tokenizer, or the shared tweets run through `data prepare`, a 8192-token tokenizer and
`data tokenize` (bench/train.py's prepare_data), cached in --work. Prints a table, then one line of JSON.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train import prepare_data  # bench/train.py (this folder is on sys.path when run as a script)

WARMUP = 3  # steps left out of tokens/s: process start, first allocations, torch.compile's first graphs


def _train_args(a, tokens: Path, tokenizer: Path, out: Path, *, parallel: str, compile: bool, minutes: float) -> list[str]:
    """`-m tweetlm train ...` of one run: evaluation and checkpoints pushed past the budget."""
    never = 10**9
    sets = {"model.seq_len": a.seq_len, "micro_batch": a.micro_batch, "batch_tokens": a.batch_tokens, "log_every": 1,
            "eval.every": never, "eval.samples_every": never, "checkpoint.every": never, "eval.tokens": 8192,
            **({"optim.name": "adamw", "optim.lr": 0.006} if parallel == "fsdp" else {})}
    return ["-m", "tweetlm", "train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(out),
            "--preset", a.preset, "--time-budget", str(minutes), "--device", a.device, "--parallel", parallel,
            *(f"--set={k}={v}" for k, v in sets.items()), *(f"--set={s}" for s in a.set), *(["--compile"] if compile else [])]


def _start_nodes(nodes: int, train: list[str], logs: Path | None = None) -> list[subprocess.Popen]:
    """`nodes` torchrun launchers of one process each on this host, meeting at a free port of 127.0.0.1; node 0
    first, the others once it hosts the rendezvous. Output to logs/node{i}.log, else to this terminal."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun sets OMP_NUM_THREADS only with several processes per node: share the cores between the nodes
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nodes))}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"bench-{port}", *train]
    launchers = []
    for i in range(nodes):
        with open(logs / f"node{i}.log", "w") if logs else contextlib.nullcontext() as out:
            launchers.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                              start_new_session=True))
        while i == 0:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert launchers[0].poll() is None, "node 0 did not start"
            time.sleep(0.05)
    return launchers


def _kill_node(launcher: subprocess.Popen) -> None:
    """SIGKILL of a launcher and of its processes (each in a session of its own), as the loss of its machine."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for group in (launcher.pid, *map(int, children)):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()


def bench_one(a, tokens: Path, tokenizer: Path, *, procs: int, parallel: str, compile: bool, nodes: int = 1) -> dict:
    """One torchrun run (or `nodes` of them, one process each); returns its throughput from RUN/metrics.jsonl."""
    where = f"{nodes}-nodes" if nodes > 1 else f"{procs}x"
    out = a.work / f"run-{where}-{parallel}{'-compile' if compile else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    train = _train_args(a, tokens, tokenizer, out, parallel=parallel, compile=compile, minutes=a.minutes)
    what = f"{nodes} nodes x 1 process" if nodes > 1 else f"{procs} process{'es' if procs > 1 else ''}"
    print(f"\n== {what}, {parallel}{', compile' if compile else ''}: {' '.join(train)}", flush=True)
    if nodes > 1:
        for launcher in _start_nodes(nodes, train):
            assert launcher.wait() == 0, f"a node failed: exit code {launcher.returncode}"
    else:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *train],
                       check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tok_per_s" in r][WARMUP:]
    assert len(steps) >= 2, f"only {len(steps)} timed steps in {a.minutes} minutes: raise --minutes"
    tok_per_s = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["time"] - steps[0]["time"])
    mfus = sorted(r["mfu"] for r in steps if r["mfu"] is not None)
    return {"nodes": nodes, "procs": procs * nodes, "parallel": parallel, "compile": compile, "steps": steps[-1]["step"],
            "tok_per_s": tok_per_s,
            "mfu": mfus[len(mfus) // 2] if mfus else None, "final_loss": steps[-1]["loss"],
            "device": json.loads((out / "env.json").read_text())["device"]}


def node_loss(a, tokens: Path, tokenizer: Path, *, nodes: int, parallel: str, lost: int) -> dict:
    """Kill node `lost` after the first logged step; seconds until every other launcher has exited."""
    out = a.work / f"run-loss-{lost}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    launchers = _start_nodes(nodes, _train_args(a, tokens, tokenizer, out / "run", parallel=parallel, compile=False,
                                                minutes=60), logs=out)
    metrics = out / "run" / "metrics.jsonl"
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert all(n.poll() is None for n in launchers), f"a node ended before its first step: see {out}"
        time.sleep(0.05)
    killed = time.monotonic()
    _kill_node(launchers[lost])
    codes = [n.wait(timeout=900) for i, n in enumerate(launchers) if i != lost]
    seconds = time.monotonic() - killed
    logs = [(out / f"node{i}.log").read_text() for i in range(nodes) if i != lost]
    return {"lost": "rendezvous host (node 0)" if lost == 0 else f"node {lost}", "seconds": seconds,
            "exit_codes": codes, "named": any("lost contact with" in log for log in logs), "logs": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="token shards (default: made from ../shared/data in --work)")
    ap.add_argument("--tokenizer", help="their tokenizer (with --tokens)")
    ap.add_argument("--work", default=Path(tempfile.gettempdir()) / "tweetlm-bench-distributed", type=Path,
                    help="cache for the default data, and the run folders")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--procs", type=int, nargs="+", help="process counts (default: 1 2 on CPU; 1 and every GPU on CUDA)")
    ap.add_argument("--nodes", type=int, default=1, help="N > 1: 1 process, then N torchrun nodes of 1 process on this "
                    "host, then the loss of a node (CPU; see above)")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), help="default: ddp on CPU, fsdp on CUDA")
    ap.add_argument("--preset", default="small", help="model preset (default small)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward on each process (default 8)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="global tokens per optimizer step (default 4096)")
    ap.add_argument("--minutes", type=float, default=1.0, help="training-time budget of each run (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (repeatable)")
    a = ap.parse_args()
    if a.nodes > 1 and a.device != "cpu":
        ap.error("--nodes runs its nodes on this host's CPU: every node's process would take GPU 0")
    a.work.mkdir(parents=True, exist_ok=True)
    tokens, tokenizer = (Path(a.tokens), Path(a.tokenizer)) if a.tokens else prepare_data(a.work, 8192)

    if a.nodes > 1:
        configs = [(1, a.parallel or "ddp", False, 1), (1, a.parallel or "ddp", False, a.nodes)]
    elif a.device == "cpu":
        configs = [(n, a.parallel or "ddp", False, 1) for n in a.procs or (1, 2)]
    else:
        import torch

        gpus = torch.cuda.device_count()
        configs = [(1, "ddp", True, 1)] + [(n, a.parallel or "fsdp", True, 1) for n in a.procs or sorted({1, gpus})]
    load = [os.getloadavg()[0]]
    results = []
    for procs, parallel, compile, nodes in configs:
        results.append(bench_one(a, tokens, tokenizer, procs=procs, parallel=parallel, compile=compile, nodes=nodes))
        load.append(os.getloadavg()[0])
    losses = []
    for lost in (1, 0) if a.nodes > 1 else ():  # a node that does not host the rendezvous, then the one that does
        losses.append(node_loss(a, tokens, tokenizer, nodes=a.nodes, parallel=a.parallel or "ddp", lost=lost))
        load.append(os.getloadavg()[0])

    base = results[0]["tok_per_s"]
    print(f"\n{a.preset}, {a.batch_tokens} tokens per step (micro-batch {a.micro_batch} x {a.seq_len}), "
          f"{a.minutes:g} min each; 1-minute load average before and after each run: {load}")
    print(f"{'nodes':>6}{'processes':>11}  {'parallel':<9}{'compile':<9}{'steps':>7}{'tok/s':>10}{'vs first':>10}"
          f"{'MFU':>8}   device")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        print(f"{r['nodes']:>6}{r['procs']:>11}  {r['parallel']:<9}{str(r['compile']):<9}{r['steps']:>7}"
              f"{r['tok_per_s']:>10,.0f}{r['tok_per_s'] / base:>9.2f}x{mfu:>8}   {r['device']}")
    for r in losses:
        print(f"lost {r['lost']}: the other node exited {r['seconds']:.1f} s later (exit codes {r['exit_codes']}), "
              f"{'naming' if r['named'] else 'NOT naming'} the lost rank; logs in {r['logs']}")
    print(json.dumps({"bench": "distributed", "preset": a.preset, "batch_tokens": a.batch_tokens, "seq_len": a.seq_len,
                      "micro_batch": a.micro_batch, "minutes": a.minutes, "load": load, "results": results,
                      "node_losses": losses, "argv": sys.argv[1:]}))


if __name__ == "__main__":
    main()
